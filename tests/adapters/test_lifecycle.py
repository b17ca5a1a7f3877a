"""An attached method in memory: merge (vs the file merge), disable_adapter (vs the base) and detach."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7 import MethodConfig, attach, detach, disable_adapter, merge, merge_into_pth, save_adapter
from peft_rwkv7.model import load_model
from tests.adapters.conftest import make_base

IDX = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(5))
METHODS = [
    dict(kind="lora", state=True),
    dict(kind="pissa"),
    dict(kind="disha"),
    dict(kind="disha", disha_mode="bat", state=True),
    dict(kind="state"),
    dict(kind="pissa", state=True, train_parts=["ln", "time"]),
    dict(kind="lora", quant="nf4"),
    dict(kind="pissa", quant="int8"),
    dict(kind="disha", disha_mode="bat", quant="nf4"),
]


def _id(m: dict) -> str:
    return "-".join(str(v) if not isinstance(v, list) else "+".join(v) for v in m.values())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDX)


@pytest.mark.parametrize("method", METHODS, ids=_id)
def test_merge_in_memory_equals_the_file_merge(method, base_path, load_base, train, tmp_path):
    adapted = attach(load_base(), MethodConfig(**{"r": 8, **method}))
    train(adapted)
    want = logits(adapted)
    save_adapter(adapted, tmp_path / "run", base_path=str(base_path))
    merge_into_pth(base_path, tmp_path / "run", tmp_path / "merged.pth", dtype="fp32")
    from_file = logits(load_model(tmp_path / "merged.pth", wkv_backend="reference"))
    in_memory = merge(adapted)
    assert type(in_memory).__name__ == "RWKV7" and not any(p.requires_grad is False for p in in_memory.parameters())
    got = logits(in_memory)
    # Both are fp32 sums of the same terms in different orders (PiSSA: residual + new vs base + (new - start)):
    # they agree to a few ulp of the largest logit.
    print(f"{_id(method)}: max |logit diff| {(got - from_file).abs().max():.2e} of max |logit| {want.abs().max():.2f}")
    assert (got - from_file).abs().max() <= 1e-6 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(logits(adapted), want)  # the adapted model is left as it was


@pytest.mark.parametrize("method", [m for m in METHODS if not m.get("train_parts")], ids=_id)
def test_disable_adapter_gives_the_base_and_comes_back(method, load_base, train):
    cfg = MethodConfig(**{"r": 8, **method})
    # The base as this method holds it: a fresh, untrained attach (a quantized base computes with its
    # 4/8-bit weights; PiSSA at its start is residual + start). For float bases that is the base itself.
    start = logits(attach(load_base(), cfg))
    if cfg.quant == "none":
        assert (start - logits(load_base())).abs().max() <= 1e-5 * start.abs().max()
    adapted = attach(load_base(), cfg)
    train(adapted)
    tuned = logits(adapted)
    flags = [p.requires_grad for p in adapted.parameters()]
    with disable_adapter(adapted):
        off = logits(adapted)
    assert (off - start).abs().max() <= 1e-5 * start.abs().max()
    assert (tuned - start).abs().max() > 1e-2  # training moved it: the check above can fail
    assert torch.equal(logits(adapted), tuned)
    assert [p.requires_grad for p in adapted.parameters()] == flags


def test_disable_adapter_restores_a_checkpoints_own_state(tmp_path):
    # a base that carries a tuned time_state (a merged state-tuning run) keeps it while the adapter is off
    base = load_model(make_base(tmp_path / "b.pth", seed=3), wkv_backend="reference")
    g = torch.Generator().manual_seed(0)
    for blk in base.blocks:
        blk.att.register_buffer("time_state", torch.randn(4, 16, 16, generator=g) * 0.3)
    want = logits(base)
    adapted = attach(base, MethodConfig(kind="state"))
    with torch.no_grad():
        for blk in adapted.model.blocks:
            blk.att.time_state.add_(1.0)
    with disable_adapter(adapted):
        assert torch.allclose(logits(adapted), want, atol=1e-5)
    model = detach(adapted)
    assert torch.allclose(logits(model), want, atol=1e-5)


def test_full_parts_cannot_be_switched_off(load_base):
    adapted = attach(load_base(), MethodConfig(kind="lora", r=8, train_parts=["ln"]))
    with pytest.raises(ValueError, match="frozen copy"), disable_adapter(adapted):
        pass


@pytest.mark.parametrize("method", [dict(kind="lora", state=True), dict(kind="pissa"), dict(kind="disha"),
                                    dict(kind="disha", disha_mode="bat")], ids=_id)
def test_detach_returns_the_base(method, load_base, train):
    base = logits(load_base())
    adapted = attach(load_base(), MethodConfig(**{"r": 8, **method}))
    train(adapted)
    model = detach(adapted)
    assert type(model).__name__ == "RWKV7"
    assert not any("lora" in n or "disha" in n or "base_layer" in n for n, _ in model.named_parameters())
    assert (logits(model) - base).abs().max() <= 1e-5 * base.abs().max()
    attach(model, MethodConfig(kind="lora", r=4))  # and it takes another method
