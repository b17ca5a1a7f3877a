"""Learning-rate schedules against hand-computed values."""

import math

import pytest

from peft_rwkv7.train.schedule import get_lr
from tests.fp_oracle import U64, gamma

KW = dict(lr=1.0, lr_final=0.01, max_steps=11, warmup_steps=0)
REL = gamma(8, U64)  # fp64 on both sides, a few operations each (cos within an ulp)


def test_warmup_is_linear():
    lrs = [get_lr(s, lr=2.0, lr_final=0.0, max_steps=100, warmup_steps=4, schedule="cosine") for s in range(4)]
    assert lrs == [0.5, 1.0, 1.5, 2.0]


def test_cosine_endpoints_and_midpoint():
    assert get_lr(0, schedule="cosine", **KW) == pytest.approx(1.0, rel=REL)
    assert get_lr(10, schedule="cosine", **KW) == pytest.approx(0.01, rel=REL)
    assert get_lr(5, schedule="cosine", **KW) == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi / 2)), rel=REL)


def test_wsd_holds_then_decays_linearly():
    kw = dict(lr=1.0, lr_final=0.0, max_steps=10, warmup_steps=0, schedule="wsd", decay_frac=0.2)
    assert [get_lr(s, **kw) for s in range(10)] == pytest.approx([1.0] * 8 + [0.5, 0.0], rel=REL, abs=REL)


def test_constant():
    assert {get_lr(s, schedule="constant", **KW) for s in range(11)} == {1.0}
