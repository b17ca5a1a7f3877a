"""Each method: exact no-op at init, trainable-parameter counts equal their formulas, the right
parameter groups, config validation, and the DiSHA deltas against hand-written loops."""

from __future__ import annotations

import pytest
import torch
from peft import MissConfig
from peft.tuners.miss import MissLinear
from torch import nn

from peft_rwkv7.adapters import MethodConfig, attach, count_trainable, trainable_parameters
from peft_rwkv7.adapters.disha import bat_delta, bone_delta
from peft_rwkv7.errors import UserError
from tests.fp_oracle import forward_rounding, gamma

R = 8
IDX = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))  # tiny vocab: 128


def _formula(method: dict, c) -> int:
    """Trainable scalars per method, written from the definitions (not from the code)."""
    L, C, F, V, H, N = c.n_layer, c.n_embd, c.dim_ffn, c.vocab_size, c.n_head, c.head_size
    r = method.get("r", R)
    parts = method.get("train_parts", [])
    ffn_full = "ffn" in parts
    # (in, out) of the adapted projections per layer.
    shapes = [(C, C)] * 4 + ([] if ffn_full else [(C, F), (F, C)])
    kind = method["kind"]
    n = 0
    if kind in ("lora", "pissa"):
        n += L * sum(r * (i + o) for i, o in shapes)  # A [r, in] + B [out, r]
    elif kind == "disha" and method.get("disha_mode", "bone") == "bone":
        n += L * sum(r * o for i, o in shapes)  # D [r, out]
    elif kind == "disha":
        n += L * sum((i // r) * r * r for i, o in shapes)  # D [in/r, r, r]
    if kind == "state" or method.get("state"):
        n += L * H * N * N
    group = {
        "emb": V * C,
        "head": V * C,
        "ln": 2 * C + L * 3 * 2 * C + 2 * C,  # ln0; ln1, ln2, ln_x per layer; ln_out
        # layer 0 does not use (so does not train) its v0 [C], v1 [C, d_mv], v2 [d_mv, C]
        "time": L * (11 * C + 2 * C * (c.d_decay + c.d_aaa + c.d_mv + c.d_gate) + H * N) - C - 2 * C * c.d_mv,
        "ffn": L * (C + 2 * C * F),
    }
    if kind == "full":
        return sum(group.values()) + L * 4 * C * C + (L * H * N * N if method.get("state") else 0)
    return n + sum(group[p] for p in parts)


METHODS = [
    dict(kind="lora"),
    dict(kind="pissa"),
    dict(kind="disha"),
    dict(kind="disha", disha_mode="bat"),
    dict(kind="state"),
    dict(kind="lora", state=True, train_parts=["ln", "time"]),
    dict(kind="disha", train_parts=["ffn", "emb", "head"]),
    dict(kind="full"),
    dict(kind="full", state=True),
    dict(kind="lora", quant="nf4"),
    dict(kind="disha", disha_mode="bat", quant="int8", r=16),
]


def _id(m: dict) -> str:
    return "-".join(f"{v if not isinstance(v, list) else '+'.join(v)}" for v in m.values())


@pytest.mark.parametrize("method", METHODS, ids=_id)
def test_trainable_count_matches_formula(method, load_base, tiny_config):
    adapted = attach(load_base(), MethodConfig(**{"r": R, **method}))
    assert count_trainable(adapted) == _formula(method, tiny_config)
    names = [n for n, _ in trainable_parameters(adapted)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("method", [m for m in METHODS if "quant" not in m and m["kind"] != "pissa"], ids=_id)
def test_exact_noop_at_init(method, load_base):
    with torch.no_grad():
        want = load_base()(IDX)
        got = attach(load_base(), MethodConfig(**{"r": R, **method}))(IDX)
    assert torch.equal(got, want)


def test_pissa_starts_at_the_original_output(load_base):
    with torch.no_grad():
        want = load_base()(IDX)
        adapted = attach(load_base(), MethodConfig(kind="pissa", r=R, svd_niter=0))
        got = adapted(IDX)
    # residual + s B0 A0 re-forms W within gamma_(r+1) of its summands, far inside the forward's bound:
    # two fp32 forwards of one network
    assert (got - want).abs().max() <= 2 * forward_rounding(adapted.config, IDX.shape[1]) * want.abs().max()
    a0, b0 = adapted.pissa_init["blocks.0.att.key"]
    assert a0.abs().sum() > 0 and b0.abs().sum() > 0  # the start is the SVD, not zeros


def test_train_parts_select_groups_by_name(load_base):
    adapted = attach(load_base(), MethodConfig(kind="lora", train_parts=["time", "ln"], target_modules=["att.key"]))
    names = {n for n, _ in trainable_parameters(adapted) if n.startswith("blocks.1.")}
    time = {f"blocks.1.att.{n}" for n in (
        "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2",
        "g1", "g2", "k_k", "k_a", "r_k")}  # fmt: skip
    ln = {f"blocks.1.{m}.{p}" for m in ("ln1", "ln2", "att.ln_x") for p in ("weight", "bias")}
    lora = {"blocks.1.att.key.lora_A", "blocks.1.att.key.lora_B"}
    assert names == time | ln | lora


def test_state_tuning_starts_from_a_base_time_state(load_base):
    base = load_base()
    start = torch.randn(4, 16, 16)
    base.blocks[1].att.register_buffer("time_state", start.clone())
    adapted = attach(base, MethodConfig(kind="state"))
    got = dict(trainable_parameters(adapted))
    assert torch.equal(got["blocks.1.att.time_state"], start)
    assert torch.equal(got["blocks.0.att.time_state"], torch.zeros(4, 16, 16))


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(kind="prefix"), "kind"),
        (dict(r=0), "r"),
        (dict(alpha=-1), "alpha"),
        (dict(target_modules=["att.query"]), "target_modules"),
        (dict(quant="int4"), "quant"),
        (dict(kind="full", quant="nf4"), "quant"),
        (dict(train_parts=["attention"]), "train_parts"),
        (dict(disha_mode="lora"), "disha_mode"),
        (dict(target_modules=["ffn.key"], train_parts=["ffn"]), "target_modules"),
    ],
)
def test_config_errors_name_the_field(fields, field):
    with pytest.raises(UserError, match=rf"^method\.{field}: "):
        MethodConfig(**fields).validate()


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(UserError, match="unknown keys rank"):
        MethodConfig.from_dict({"kind": "lora", "rank": 8})


@pytest.mark.parametrize("out_f, in_f, r", [(12, 8, 4), (6, 10, 4)])
def test_bone_delta_matches_peft_miss_and_a_loop(out_f, in_f, r):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(r, out_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    loop = torch.tensor([[d[i % r, o].item() for i in range(in_f)] for o in range(out_f)])
    assert torch.equal(bone_delta(d, in_f), loop)
    layer = MissLinear(nn.Linear(in_f, out_f, bias=False), "default", config=MissConfig(r=r), r=r)
    layer.miss_block["default"].data.copy_(d)
    # peft returns W + dW, rounded once; subtracting W rounds once more: gamma_2 of |W| + |dW|
    got = layer.get_delta_weight_miss("default", w.clone()) - w
    assert ((got - loop).abs() <= gamma(2) * (w.abs() + loop.abs())).all()


def test_bat_delta_matches_a_block_loop():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 8, 12, 4
    w, d = torch.randn(out_f, in_f, generator=g), torch.randn(in_f // r, r, r, generator=g)
    want, scale = torch.zeros(out_f, in_f), torch.zeros(out_f, in_f)
    for a in range(out_f // r):
        for b in range(in_f // r):
            blk = w[a * r : (a + 1) * r, b * r : (b + 1) * r]
            want[a * r : (a + 1) * r, b * r : (b + 1) * r] = blk @ d[b] + d[b]
            scale[a * r : (a + 1) * r, b * r : (b + 1) * r] = blk.abs() @ d[b].abs() + d[b].abs()
    # each: an r-term dot product and an add, in any order within gamma_(r+1) of its terms
    assert ((bat_delta(w, d) - want).abs() <= 2 * gamma(r + 1) * scale).all()
