"""Generation runs one token at a time through the CPU step kernels (matvec, vecmat, wkv7_step); with
every method attached and trained, those steps give the logits of the whole sequence (reference op)."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.adapters import MethodConfig, attach
from tests.fp_oracle import forward_rounding

METHODS = {
    "lora": dict(kind="lora", r=4),
    "pissa": dict(kind="pissa", r=4),
    "bone": dict(kind="disha", r=8, disha_mode="bone"),
    "bat": dict(kind="disha", r=8, disha_mode="bat"),
    "lora+state+parts": dict(kind="lora", r=4, state=True, train_parts=["ln", "time"]),
    "lora-nf4": dict(kind="lora", r=4, quant="nf4"),
    "lora-int8": dict(kind="lora", r=4, quant="int8"),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_token_by_token_equals_the_sequence(name, load_base, train):
    if METHODS[name].get("quant", "none") != "none":
        pytest.importorskip("bitsandbytes")
    adapted = attach(load_base(), MethodConfig(**METHODS[name]))
    train(adapted, steps=2)
    idx = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = adapted(idx)[0]
        state, steps = None, []
        for t in range(idx.shape[1]):
            logits, state = adapted(idx[:, t : t + 1], state, return_state=True)
            steps.append(logits[0, -1])
    err = (torch.stack(steps) - whole).abs().max().item()
    # two fp32 forwards of one network (the step kernels and the sequence op): twice the forward's bound
    tol = 2 * forward_rounding(adapted.config, idx.shape[1]) * whole.abs().max().item()
    assert err <= tol, f"{name}: max |diff| {err:.2e} > {tol:.2e}"
