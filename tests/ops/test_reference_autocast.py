"""The pure-PyTorch WKV7 (ops/reference.py) carries its state in fp32 under autocast too: autocast would run its
products with the state rounded to bf16. On a GPU the token-by-token step of generation and of GRPO's rollouts
(under the run's bf16 autocast) is this function; on the CPU autocast does the same to it. (The sequence form is
kept in fp32 the same way; its einsums are not autocast on the CPU, so only the step is checked here.)"""

from __future__ import annotations

import torch

from peft_rwkv7.ops.reference import wkv7_step_reference


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, w, k, v, a, b = (torch.randn(shape, generator=g) for _ in range(6))
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
    return r, -torch.nn.functional.softplus(-w) - 0.5, k, v, -kk, kk * torch.sigmoid(b)


def test_the_step_is_fp32_under_bf16_autocast():
    xs = _inputs((2, 3, 16))
    state = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    want = wkv7_step_reference(*xs, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = wkv7_step_reference(*xs, state)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)

