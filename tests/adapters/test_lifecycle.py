"""An attached method in memory: merge (vs the file merge), disable_adapter (vs the base) and detach."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7 import MethodConfig, attach, detach, disable_adapter, merge, merge_into_pth, save_adapter
from peft_rwkv7.errors import UserError
from peft_rwkv7.model import load_model
from tests.adapters.conftest import make_base, merge_rounding
from tests.fp_oracle import forward_rounding, logits64

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


def two_forwards(model, scale: torch.Tensor) -> float:
    """How far two fp32 forwards of one network can be apart: twice the forward's rounding bound, relative
    to the largest logit `scale` (PiSSA's start or a detached residual + B0 A0 rebuilds the base weight
    within gamma_(r+1) of its summands, far inside that bound)."""
    return 2 * forward_rounding(model.config, IDX.shape[1]) * scale.abs().max().item()


@pytest.mark.parametrize("method", METHODS, ids=_id)
def test_merge_in_memory_equals_the_file_merge(method, base_path, load_base, train, tmp_path):
    adapted = attach(load_base(), MethodConfig(**{"r": 8, **method}))
    train(adapted)
    want = logits(adapted)
    save_adapter(adapted, tmp_path / "run", base_path=str(base_path))
    merge_into_pth(base_path, tmp_path / "run", tmp_path / "merged.pth", dtype="fp32")
    file_model = load_model(tmp_path / "merged.pth", wkv_backend="reference")
    in_memory = merge(adapted)
    assert type(in_memory).__name__ == "RWKV7" and not any(p.requires_grad is False for p in in_memory.parameters())
    mem_sd, file_sd = in_memory.state_dict(), file_model.state_dict()
    assert mem_sd.keys() == file_sd.keys()
    bound = merge_rounding(tmp_path / "run", base_path, mem_sd)
    for key, w in mem_sd.items():
        assert ((w - file_sd[key]).abs() <= bound[key]).all(), key
    # Logits: each merged model's fp32 forward against the fp64 forward of the in-memory weights. The
    # file's weights are within the bound above (<= gamma_35 relative), far inside the forward's own bound.
    oracle = logits64(in_memory, IDX)
    tol = forward_rounding(in_memory.config, IDX.shape[1]) * oracle.abs().max().item()
    got, from_file = logits(in_memory), logits(file_model)
    assert (got.double() - oracle).abs().max() <= tol
    assert (from_file.double() - oracle).abs().max() <= tol
    # The adapted model computes base x + s B (A x) (or with the dequantized base) instead of (W + s B A) x:
    # a second fp32 forward of the same exact function, so it too lies within the forward's bound.
    assert (want.double() - oracle).abs().max() <= tol
    assert torch.equal(logits(adapted), want)  # the adapted model is left as it was


@pytest.mark.parametrize("method", [m for m in METHODS if not m.get("train_parts")], ids=_id)
def test_disable_adapter_gives_the_base_and_comes_back(method, load_base, train):
    cfg = MethodConfig(**{"r": 8, **method})
    # The base as this method holds it: a fresh, untrained attach (a quantized base computes with its
    # 4/8-bit weights; PiSSA at its start is residual + start). For float bases that is the base itself.
    start = logits(attach(load_base(), cfg))
    tol = two_forwards(load_base(), start)
    if cfg.quant == "none":
        assert (start - logits(load_base())).abs().max() <= tol
    adapted = attach(load_base(), cfg)
    train(adapted)
    tuned = logits(adapted)
    flags = [p.requires_grad for p in adapted.parameters()]
    with disable_adapter(adapted):
        off = logits(adapted)
    assert (off - start).abs().max() <= tol
    assert (tuned - start).abs().max() > 10 * tol  # training moved it: the check above can fail
    assert torch.equal(logits(adapted), tuned)
    assert [p.requires_grad for p in adapted.parameters()] == flags


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_disable_adapter_of_a_residual_start_is_the_base_in_train_mode(init, load_base, train):
    """A start moved into the base is switched off by swapping the start back into A and B: the adapter still runs,
    so its dropout must not (DPO's reference pass runs in train mode). Without dropout off, "off" was the base plus
    noise on the start's term."""
    cfg = MethodConfig(kind="lora", init=init, r=8, dropout=0.5)
    start = logits(attach(load_base(), cfg).eval())
    adapted = attach(load_base(), cfg)
    train(adapted)
    adapted.train()
    with disable_adapter(adapted):
        off = logits(adapted)
    assert adapted.training and all(m.training for m in adapted.modules())  # train mode comes back
    assert (off - start).abs().max() <= two_forwards(load_base(), start)


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
    tol = two_forwards(base, want)
    with disable_adapter(adapted):
        assert (logits(adapted) - want).abs().max() <= tol
    model = detach(adapted)
    assert (logits(model) - want).abs().max() <= tol


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
    assert (logits(model) - base).abs().max() <= two_forwards(model, base)
    attach(model, MethodConfig(kind="lora", r=4))  # and it takes another method


def test_a_save_that_fails_leaves_the_last_save_whole(tmp_path, monkeypatch):
    """save_adapter writes the adapter's tensors and the state tuning's state.pth as one save: where writing the
    state fails (a full disk), adapter.safetensors still holds the save that state.pth belongs to."""
    adapted = attach(load_model(make_base(tmp_path / "b.pth", seed=3), wkv_backend="reference"),
                     MethodConfig(kind="state"))
    run = tmp_path / "run"
    save_adapter(adapted, run)
    before = {n: (run / n).read_bytes() for n in ("adapter.safetensors", "state.pth", "adapter.json")}
    with torch.no_grad():
        for blk in adapted.model.blocks:
            blk.att.time_state.add_(1.0)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"state\.pth: cannot write here \(No space left on device\)"):
        save_adapter(adapted, run)
    monkeypatch.undo()
    assert {n: (run / n).read_bytes() for n in before} == before
    assert sorted(p.name for p in run.iterdir()) == sorted(before)
    save_adapter(adapted, run)  # the next save writes all three
    assert all((run / n).read_bytes() != before[n] for n in ("adapter.safetensors", "state.pth"))
