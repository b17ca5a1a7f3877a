"""adapters/pth_merge.py on hand-made adapters (found by `scripts/mutation.sh pth_merge`): the training dtype
of the base, quantized bases with an adapter on some projections only, FFN trained in full beside a quantized
base, the count of changed tensors and the one-line errors.

Expectations: the module docstring's formulas in float64 (W' = W + (alpha / r) B @ A on the fp32 base file), and
for a quantized base "the dequantized weight training multiplied by": `quant.roundtrip` (bitsandbytes' quantize
then dequantize) of the base in the dtype training held it in."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.adapters import MethodConfig
from peft_rwkv7.adapters.files import AdapterFile
from peft_rwkv7.adapters.pth_merge import merged_state_dict, merged_weight
from peft_rwkv7.adapters.quant import roundtrip
from peft_rwkv7.errors import UserError
from peft_rwkv7.model import RWKV7Config, new_model

R, ALPHA = 4, 8.0
S = ALPHA / R


@pytest.fixture(scope="module")
def base_sd():
    """A 2-layer base whose weights are not bf16-representable (fp32 noise on RWKV-LM init)."""
    model = new_model(RWKV7Config.new(n_layer=2, n_embd=64, vocab_size=128, head_size=16), seed=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items()}


def rnd(*shape, seed):
    return 0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lora_tensors(sd, modules, rank):
    out = {}
    for j, m in enumerate(modules):
        o, i = sd[f"{m}.weight"].shape
        out[f"{m}.lora_A"], out[f"{m}.lora_B"] = rnd(rank, i, seed=2 * j), rnd(o, rank, seed=2 * j + 1)
    return out


def af(kind="lora", tensors=None, base_dtype="fp32", **method):
    cfg = MethodConfig(kind=kind, r=R, alpha=ALPHA, **method)
    return AdapterFile(cfg, tensors or {}, "run", base_dtype=base_dtype)


# fp32 merge of |W| < 1 and a rank <= 8 product of 0.1-sized factors: a few roundings of 2^-24 per entry
TOL = 1e-6


@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind,rank", [("lora", R), ("pissa", 2 * R)])  # PiSSA is stored as a rank-2r delta
def test_unquantized_merge_is_the_fp32_base_plus_the_delta(base_sd, base_dtype, kind, rank):
    """Whatever dtype training held the base in, an unquantized merge adds the delta to the base file's weight
    (rounding the base to bf16 would move it by ~2^-9 of its size, 1e3 x TOL)."""
    mod = "blocks.1.att.key"
    t = lora_tensors(base_sd, [mod], rank)
    got = merged_weight(af(kind, t, base_dtype), mod, base_sd[f"{mod}.weight"])
    want = base_sd[f"{mod}.weight"].double() + S * t[f"{mod}.lora_B"].double() @ t[f"{mod}.lora_A"].double()
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() <= TOL


def test_quantized_base_is_rounded_as_training_held_it(base_sd):
    """LoRA on att.key of an nf4 base trained in bf16: att.key is deq(Q(W in bf16)) + s B A; the other
    projections, quantized but without an adapter, are deq(Q(W in bf16)); FFN trained in full is not quantized."""
    pytest.importorskip("bitsandbytes")
    mod = "blocks.0.att.key"
    t = lora_tensors(base_sd, [mod], R)
    a = af("lora", t, "bf16", quant="nf4", target_modules=["att.key"])
    w = base_sd[f"{mod}.weight"]
    held = roundtrip(w.to(torch.bfloat16), "nf4")
    assert not torch.equal(held, roundtrip(w, "nf4"))  # the training dtype shows in the quantized weight
    got = merged_weight(a, mod, w)
    assert (got.double() - (held.double() + S * t[f"{mod}.lora_B"].double() @ t[f"{mod}.lora_A"].double())) \
        .abs().max() <= TOL
    other = "blocks.1.att.receptance"
    assert torch.equal(merged_weight(a, other, base_sd[f"{other}.weight"]),
                       roundtrip(base_sd[f"{other}.weight"].to(torch.bfloat16), "nf4"))
    parts = af("lora", lora_tensors(base_sd, [mod], R), "bf16", quant="nf4", target_modules=["att.key"],
               train_parts=["ffn"])
    for ffn in ("blocks.0.ffn.key", "blocks.1.ffn.value"):
        assert torch.equal(merged_weight(parts, ffn, base_sd[f"{ffn}.weight"]), base_sd[f"{ffn}.weight"])


def test_pissa_on_a_quantized_base_rebuilds_the_trained_residual(base_sd):
    """Training multiplied by deq(Q(W - s B0 A0)) + s B A with the residual in the training dtype (bf16)."""
    pytest.importorskip("bitsandbytes")
    mod = "blocks.0.att.value"
    t = lora_tensors(base_sd, [mod], 2 * R)
    a_, b_ = t[f"{mod}.lora_A"], t[f"{mod}.lora_B"]
    a0, b0 = a_[R:], -b_[:, R:]  # the saved start: A = [A; A0], B = [B, -B0]
    w = base_sd[f"{mod}.weight"]
    residual = (w.to(torch.bfloat16).float() - (S * b0) @ a0).to(torch.bfloat16)
    want = roundtrip(residual, "int8").double() + S * b_[:, :R].double() @ a_[:R].double()
    got = merged_weight(af("pissa", t, "bf16", quant="int8"), mod, w)
    assert (got.double() - want).abs().max() <= TOL


def test_changed_tensors_are_counted_once(base_sd):
    state = {f"blocks.{i}.att.time_state": rnd(4, 16, 16, seed=50 + i) for i in range(2)}
    # LoRA on att.key of both layers + 2 states: 4
    t = {**lora_tensors(base_sd, ["blocks.0.att.key", "blocks.1.att.key"], R), **state}
    out, changed = merged_state_dict(base_sd, af("lora", t, state=True, target_modules=["att.key"]))
    assert changed == 4
    assert {k for k in out if k not in base_sd or not torch.equal(out[k], base_sd[k])} == \
        {"blocks.0.att.key.weight", "blocks.1.att.key.weight", *state}


def test_quantized_projections_without_an_adapter_are_counted_and_full_ffn_once(base_sd):
    """nf4 base, LoRA on att.key, FFN trained in full: 2 layers x 4 quantized attention projections (the FFN is not
    quantized) + 2 x 2 FFN tensors replaced."""
    pytest.importorskip("bitsandbytes")
    ffn = {f"blocks.{i}.ffn.{p}.weight": base_sd[f"blocks.{i}.ffn.{p}.weight"] + 1 for i in range(2)
           for p in ("key", "value")}
    t = {**lora_tensors(base_sd, ["blocks.0.att.key", "blocks.1.att.key"], R), **ffn}
    out, changed = merged_state_dict(base_sd, af("lora", t, quant="nf4", target_modules=["att.key"],
                                                 train_parts=["ffn"]))
    assert changed == 8 + 4
    assert all(torch.equal(out[k], v) for k, v in ffn.items())


def test_bad_adapters_and_bases_are_one_line_errors(base_sd):
    with pytest.raises(UserError, match=r"^run: blocks\.0\.att\.nope is not a tensor of the base model$"):
        merged_state_dict(base_sd, af("lora", {"blocks.0.att.nope": torch.zeros(1)}, train_parts=["time"]))
    with pytest.raises(UserError, match=r"^run: blocks\.0\.att\.x_r is \[3\], the base has \[1, 1, 64\]$"):
        merged_state_dict(base_sd, af("lora", {"blocks.0.att.x_r": torch.zeros(3)}, train_parts=["time"]))
    broken = {k: v for k, v in base_sd.items() if k != "head.weight"}
    with pytest.raises(UserError, match=r"^base: not an RWKV-7 checkpoint, missing keys: head\.weight$"):
        merged_state_dict(broken, af("lora", {}))
    # a state for a third layer of a 2-layer base: named as such (it was "run merged: incomplete RWKV-7 checkpoint")
    with pytest.raises(UserError, match=r"^run: blocks\.2\.att\.time_state is for layer 2, the model has 2 layers$"):
        merged_state_dict(base_sd, af("state", {"blocks.2.att.time_state": torch.zeros(4, 16, 16)}))
