"""Train -> save -> merge -> the `rwkv` package: the merged .pth computes what base + adapter computed.
Also: reloading a run directory, state.pth as an RNN state, mismatched bases, RWKV-PEFT export."""

from __future__ import annotations

import json

import pytest
import torch

from peft_rwkv7.adapters import (
    MethodConfig,
    attach,
    export_rwkv_peft,
    load_adapter,
    merge_into_pth,
    save_adapter,
    trainable_parameters,
)
from peft_rwkv7.errors import UserError
from peft_rwkv7.infer.evaluate import evaluate
from peft_rwkv7.model import load_model, read_state_dict
from tests.adapters.conftest import merge_rounding
from tests.fp_oracle import UBF16, forward_rounding, logits64, loss_rounding

IDX = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(5))

METHODS = [
    dict(kind="lora"),
    dict(kind="pissa"),
    dict(kind="disha"),
    dict(kind="disha", disha_mode="bat"),
    dict(kind="state"),
    dict(kind="lora", state=True),
    dict(kind="pissa", state=True, train_parts=["ln", "time", "emb"]),
    dict(kind="disha", train_parts=["ffn", "head"]),
    dict(kind="full", state=True),
    dict(kind="lora", quant="nf4"),
    dict(kind="pissa", quant="int8"),
    dict(kind="disha", quant="fp4"),
    dict(kind="disha", disha_mode="bat", quant="nf4", state=True),
]


def _id(m: dict) -> str:
    return "-".join(f"{v if not isinstance(v, list) else '+'.join(v)}" for v in m.values())


def fp32_logits_bound(model, idx=IDX) -> float:
    """Two fp32 forwards of one network (any two implementations) differ by at most twice the forward's
    rounding bound, relative to the largest logit of the fp64 forward."""
    return 2 * forward_rounding(model.config, idx.shape[1]) * logits64(model, idx).abs().max().item()


def fp32_loss_bound(model, docs: list[list[int]], loss: float) -> float:
    """Two fp32 computations of one token-mean loss over docs (each scored as [0] + doc) differ by at most
    twice its rounding bound (tests/fp_oracle.py: loss_rounding)."""
    max_logit = max(logits64(model, torch.tensor([[0] + d[:-1]])).abs().max().item() for d in docs)
    T, n = max(len(d) for d in docs), sum(len(d) for d in docs)
    return 2 * loss_rounding(model.config, T, max_logit, loss, n)


def _time_states(path) -> list[torch.Tensor] | None:
    sd = read_state_dict(path)
    ts = [sd[k] for k in sorted(k for k in sd if k.endswith(".att.time_state"))]
    return ts or None


@pytest.mark.parametrize("method", METHODS, ids=_id)
def test_merged_pth_in_rwkv_package_matches_base_plus_adapter(
    method, base_path, load_base, docs, train, rwkv_loss, tmp_path
):
    cfg = MethodConfig(**{"r": 8, **method})
    adapted = attach(load_base(), cfg)
    train(adapted)
    run = tmp_path / "run"
    save_adapter(adapted, run, base_path=str(base_path))
    ours = evaluate(adapted, docs, batch_size=3)

    merged = tmp_path / "merged.pth"
    line = merge_into_pth(base_path, run, merged, dtype="fp32")
    assert ("quantized" in line) == (cfg.quant != "none")
    theirs = rwkv_loss(merged, docs, _time_states(merged))
    merged_model = load_model(merged, wkv_backend="reference")
    # The merged weights are what the adapted model computes with (a quantized base: its dequantized
    # weights), so both losses are fp32 computations of one function.
    assert abs(theirs - ours["loss"]) <= fp32_loss_bound(merged_model, docs, ours["loss"])

    # The run directory alone rebuilds the trained model on a fresh base (PiSSA start, quantized
    # residual and state included), and our loader reads the merged file (time_state too).
    with torch.no_grad():
        want = adapted(IDX)
        again = load_adapter(load_base(), run)(IDX)
        from_merged = merged_model(IDX)
        untrained = load_base()(IDX)
    tol = fp32_logits_bound(merged_model)
    assert (want - untrained).abs().max() > 10 * tol  # training moved the logits: the checks have teeth
    assert (again - want).abs().max() <= tol
    assert (from_merged - want).abs().max() <= tol


def test_state_pth_is_the_rwkv_package_rnn_state(base_path, load_base, train, rwkv_model, tmp_path):
    adapted = attach(load_base(), MethodConfig(kind="state"))
    train(adapted, steps=4, lr=5e-2)
    save_adapter(adapted, tmp_path)
    states = torch.load(tmp_path / "state.pth", weights_only=True)
    assert sorted(states) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    model = rwkv_model(base_path)
    rnn = []
    for i in range(2):
        assert states[f"blocks.{i}.att.time_state"].shape == (4, 16, 16)
        assert states[f"blocks.{i}.att.time_state"].dtype == torch.float32
        rnn += [torch.zeros(64), states[f"blocks.{i}.att.time_state"].clone(), torch.zeros(64)]
    tokens = IDX[0].tolist()
    theirs, _ = model.forward(tokens, rnn, full_output=True)
    with torch.no_grad():
        ours = adapted(IDX[:1])[0]
        untuned = load_base()(IDX[:1])[0]
    tol = fp32_logits_bound(adapted, IDX[:1])  # the package's RNN and our sequence forward, both fp32
    assert (theirs - ours).abs().max() <= tol
    assert (ours - untuned).abs().max() > 10 * tol


def test_adapter_on_another_base_is_refused(base_path, other_base_path, load_base, tmp_path):
    adapted = attach(load_base(), MethodConfig(kind="lora", r=4))
    save_adapter(adapted, tmp_path / "run", base_path=str(base_path))
    fp = json.loads((tmp_path / "run" / "adapter.json").read_text())["base"]["fingerprint"]
    with pytest.raises(UserError) as e:
        load_adapter(load_base(other_base_path), tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg and fp in msg and str(base_path) in msg
    with pytest.raises(UserError, match=f"{fp}.*{other_base_path.name}"):
        merge_into_pth(other_base_path, tmp_path / "run", tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


def test_fingerprint_survives_a_bf16_copy_of_the_base(base_path, load_base, tmp_path):
    from peft_rwkv7.model import save_model

    bf16 = tmp_path / "base_bf16.pth"
    save_model(load_base(), bf16, dtype=torch.bfloat16)
    adapted = attach(load_base(bf16), MethodConfig(kind="lora", r=4))
    save_adapter(adapted, tmp_path / "run")
    load_adapter(load_base(bf16), tmp_path / "run")  # the bf16 file, loaded as fp32: same base


def test_missing_or_broken_adapter_files(base_path, load_base, tmp_path):
    adapted = attach(load_base(), MethodConfig(kind="lora", r=4))
    save_adapter(adapted, tmp_path / "run")
    (tmp_path / "run" / "adapter.json").unlink()
    with pytest.raises(UserError, match="adapter.json is missing"):
        load_adapter(load_base(), tmp_path / "run")
    with pytest.raises(UserError, match="no such adapter"):
        merge_into_pth(base_path, tmp_path / "nothing.pth", tmp_path / "out.pth")


@pytest.mark.parametrize(
    "method",
    [
        dict(kind="lora", r=4, alpha=12),
        dict(kind="pissa", r=4),
        dict(kind="disha", disha_mode="bat", state=True, train_parts=["ln"]),
    ],
    ids=["lora", "pissa", "bat+state+ln"],
)
def test_rwkv_peft_export_merges_like_the_run_dir(method, base_path, load_base, train, tmp_path):
    cfg = MethodConfig(**method)
    adapted = attach(load_base(), cfg)
    train(adapted)
    save_adapter(adapted, tmp_path / "run")
    line = export_rwkv_peft(tmp_path / "run", tmp_path / "rwkv_peft.pth")
    exported = torch.load(tmp_path / "rwkv_peft.pth", weights_only=True)
    merge_into_pth(base_path, tmp_path / "run", tmp_path / "a.pth", dtype="fp32")
    alpha = None
    if cfg.kind in ("lora", "pissa"):
        rank = cfg.r * (2 if cfg.kind == "pissa" else 1)  # PiSSA exports as a rank-2r delta
        assert exported["blocks.0.att.receptance.lora_A"].shape == (rank, 64)  # [r, in]
        assert exported["blocks.1.ffn.key.lora_B"].shape == (256, rank)  # [out, r]
        alpha = cfg.alpha * (2 if cfg.kind == "pissa" else 1)
        assert f"--lora-alpha {alpha:g}" in line
        with pytest.raises(UserError, match="lora-alpha"):
            merge_into_pth(base_path, tmp_path / "rwkv_peft.pth", tmp_path / "b.pth")
    else:
        assert exported["blocks.0.ffn.key.disha"].shape == (64 // cfg.r, cfg.r, cfg.r)  # [in/r, r, r]
        assert exported["blocks.1.att.time_state"].shape == (4, 16, 16)
        assert "blocks.1.att.ln_x.weight" in exported
    merge_into_pth(base_path, tmp_path / "rwkv_peft.pth", tmp_path / "b.pth", dtype="fp32", lora_alpha=alpha)
    a, b = read_state_dict(tmp_path / "a.pth"), read_state_dict(tmp_path / "b.pth")
    assert a.keys() == b.keys()
    bound = merge_rounding(tmp_path / "run", base_path, a)  # the same sums, in whatever order
    for k in a:
        assert ((a[k] - b[k]).abs() <= bound[k]).all(), k
    # The exported file also loads as an adapter onto the base and computes the same logits.
    with torch.no_grad():
        want = adapted(IDX)
        got = load_adapter(load_base(), tmp_path / "rwkv_peft.pth", lora_alpha=alpha)(IDX)
    assert (got - want).abs().max() <= fp32_logits_bound(load_model(tmp_path / "a.pth", wkv_backend="reference"))


def test_bf16_merge_rounds_within_bf16_precision(base_path, load_base, train, tmp_path):
    adapted = attach(load_base(), MethodConfig(kind="lora", r=4))
    train(adapted)
    save_adapter(adapted, tmp_path / "run")
    merge_into_pth(base_path, tmp_path / "run", tmp_path / "fp32.pth", dtype="fp32")
    merge_into_pth(base_path, tmp_path / "run", tmp_path / "bf16.pth")
    a, b = read_state_dict(tmp_path / "fp32.pth"), read_state_dict(tmp_path / "bf16.pth")
    for k in a:
        assert b[k].dtype == torch.bfloat16
        # one round-to-nearest to bf16 (same exponent range as fp32): at most 2^-8 relative
        assert ((b[k].float() - a[k]).abs() <= UBF16 * a[k].abs()).all(), k


def test_trainable_names_are_rwkv_peft_keys(load_base):
    adapted = attach(load_base(), MethodConfig(kind="lora", r=4, target_modules=["att.key"], state=True))
    assert [n for n, _ in trainable_parameters(adapted)] == [
        "blocks.0.att.time_state", "blocks.0.att.key.lora_A", "blocks.0.att.key.lora_B",
        "blocks.1.att.time_state", "blocks.1.att.key.lora_A", "blocks.1.att.key.lora_B",
    ]  # fmt: skip


def test_merged_state_is_ignored_by_the_rwkv_package_and_merge_says_so(base_path, load_base, train, rwkv_model,
                                                                       tmp_path):
    # What the merge message and the README say, pinned: the rwkv package reads time_state for RWKV-5/6
    # only, so a merged RWKV-7 file gives the base's logits there, while rwkv-peft starts from the state.
    adapted = attach(load_base(), MethodConfig(kind="state"))
    train(adapted, steps=4, lr=5e-2)
    save_adapter(adapted, tmp_path / "run")
    line = merge_into_pth(base_path, tmp_path / "run", tmp_path / "merged.pth", dtype="fp32")
    assert "rwkv pip package ignores it for RWKV-7" in line and "state.pth" in line
    tokens = IDX[0].tolist()
    theirs, _ = rwkv_model(tmp_path / "merged.pth").forward(tokens, None, full_output=True)
    base, _ = rwkv_model(base_path).forward(tokens, None, full_output=True)
    with torch.no_grad():
        ours = load_model(tmp_path / "merged.pth", wkv_backend="reference")(IDX[:1])[0]
    exact = logits64(load_base(), IDX[:1])[0]  # the base's logits, in fp64
    tol = forward_rounding(adapted.config, IDX.shape[1]) * exact.abs().max().item()
    assert (theirs.double() - exact).abs().max() <= tol and (base.double() - exact).abs().max() <= tol
    assert (ours - theirs).abs().max() > 10 * tol
