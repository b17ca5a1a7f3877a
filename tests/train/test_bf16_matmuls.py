"""Where bf16 is chosen, every matmul of a training step takes the bf16 path: forward, the input
gradients through the frozen bf16 weights, the head's fused cross-entropy and the adapters' own products.
One fp32 product would run at fp32 speed (or, on a CPU without native bf16, far slower): recorded at the
aten level during a real `setup` + `train_step`, so nothing is assumed about what autocast does."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peft_rwkv7.train.loop import setup, train_step
from peft_rwkv7.train.recipe import load_recipe
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot"}


class MatmulDtypes(TorchDispatchMode):
    """Counts aten matmuls by (op, operand dtypes); the WKV kernel's own fp32 state math is not an aten op."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            self.seen[name, tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor) and a.dim() >= 1)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", ["state_tune.yaml", "lora.yaml"])
def test_every_matmul_of_a_bf16_step_is_bf16(tiny_world, tmp_path, recipe):
    # head_size 64 models take the fused CPU WKV kernel; the tiny world model (head 16) may use the
    # reference, whose per-step fp32 products are the recurrence's, not a projection's: left out by size
    over = tiny_overrides(tiny_world, tmp_path / "out", steps=1, **{"train.precision": "bf16"})
    run = setup(load_recipe(str(ROOT / "recipes" / recipe), over))
    with MatmulDtypes() as rec:
        train_step(run, 0)
    big = {k: n for k, n in rec.seen.items() if k[0] != "bmm"}
    assert big, "no matmul recorded"
    not_bf16 = {k: n for k, n in big.items() if set(k[1]) != {"torch.bfloat16"}}
    assert not not_bf16, f"matmuls outside bf16: {not_bf16}"
