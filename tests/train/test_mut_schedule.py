"""What mutation testing of train/schedule.py found untested (scripts/mutation.sh schedule; docs/mutation.md): the
step where warmup hands over, schedules after warmup and past max_steps, the shortest runs, wsd's default share.
Values by hand from the docstring's formulas."""

from __future__ import annotations

import math

import pytest

from peft_rwkv7.train.schedule import get_lr
from tests.fp_oracle import U64, gamma

REL = gamma(8, U64)  # fp64 on both sides, a few operations each (cos within an ulp)


def lrs(schedule: str, steps, **kw) -> list[float]:
    return [get_lr(s, schedule=schedule, **kw) for s in steps]


def test_cosine_after_warmup_starts_at_lr_and_ends_at_lr_final():
    kw = dict(lr=2.0, lr_final=0.5, max_steps=10, warmup_steps=3)
    # warmup 3 steps (2/3, 4/3, 2), then a half cosine over steps 3..9: span 6
    want = [2 / 3, 4 / 3, 2.0] + [0.5 + 0.75 * (1 + math.cos(math.pi * k / 6)) for k in range(7)]
    assert lrs("cosine", range(10), **kw) == pytest.approx(want, rel=REL)
    assert get_lr(3, schedule="cosine", **kw) == 2.0  # the first step after warmup: lr itself, not above it


def test_schedules_stay_at_lr_final_past_max_steps():
    kw = dict(lr=1.0, lr_final=0.1, max_steps=10, warmup_steps=2)
    assert lrs("cosine", range(9, 15), **kw) == pytest.approx([0.1] * 6, rel=REL)
    assert lrs("wsd", range(9, 15), **kw) == pytest.approx([0.1] * 6, rel=REL)


def test_the_shortest_runs_reach_lr_final_on_their_last_step():
    assert lrs("cosine", range(2), lr=1.0, lr_final=0.0, max_steps=2, warmup_steps=0) == [1.0, 0.0]
    assert lrs("cosine", range(3), lr=1.0, lr_final=0.0, max_steps=3, warmup_steps=1) == [1.0, 1.0, 0.0]
    # wsd: 4 steps x 0.2 rounds to one decay step, which ends at lr_final
    assert lrs("wsd", range(4), lr=1.0, lr_final=0.0, max_steps=4, warmup_steps=0, decay_frac=0.2) == [1, 1, 1, 0]


def test_wsd_decays_over_the_last_fifth_by_default():
    got = lrs("wsd", range(20), lr=1.0, lr_final=0.0, max_steps=20, warmup_steps=0)
    assert got == pytest.approx([1.0] * 16 + [0.75, 0.5, 0.25, 0.0], rel=REL, abs=REL)


def test_an_unknown_schedule_names_itself():
    with pytest.raises(ValueError, match=r"^unknown schedule 'linear'$"):
        get_lr(5, lr=1.0, lr_final=0.0, max_steps=10, warmup_steps=0, schedule="linear")
