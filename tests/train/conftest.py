"""A tiny World-vocabulary model and a small dataset for recipe smoke tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from peft_rwkv7.errors import UserError
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(model .pth, train jsonl, eval jsonl): 2 layers of 64, World vocabulary.

    64 wide because bitsandbytes quantizes in blocks of 64 (qlora recipe)."""
    from peft_rwkv7.model import save_model

    d = tmp_path_factory.mktemp("tiny_world")
    model = make_model(seed=11, n_layer=2, n_embd=64, head_size=16, vocab_size=65536)
    save_model(model, d / "tiny.pth")
    lines = (ROOT / "data/demo/ship_log.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(itertools.islice(lines, 200)) + "\n")
    (d / "eval.jsonl").write_text("\n".join(lines[-8:]) + "\n")
    return d / "tiny.pth", d / "train.jsonl", d / "eval.jsonl"


def tiny_overrides(tiny_world, out_dir, steps=2, **extra) -> list[str]:
    # fp32 unless a test asks otherwise: auto means bf16 on a CPU measured fast at it (ops/precision.py), so the
    # tests' numerics would depend on the machine; tests/ops/test_precision_auto.py tests auto itself.
    model, train, ev = tiny_world
    base = {
        "model.path": model, "data.path": train, "data.eval_path": ev, "data.ctx_len": 32,
        "train.max_steps": steps, "train.micro_bsz": 2, "train.grad_accum": 1, "train.warmup_steps": 1,
        "train.save_every": steps, "train.eval_every": 0, "log.progress": "false", "out_dir": out_dir,
        "train.precision": "fp32",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def one_line_error(match: str, call, *args, **kwargs) -> str:
    """call(*args, **kwargs) raises a UserError of one line holding `match`; its text."""
    with pytest.raises(UserError) as e:
        call(*args, **kwargs)
    text = str(e.value)
    assert "\n" not in text and match in text, text
    return text
