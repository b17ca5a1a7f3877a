"""web-rwkv/Ai00 `.st`: the converter's layout rules, exact round trips, logits, and bad files.

The rules pinned here are read from `assets/scripts/convert_safetensors.py` (web-rwkv and Ai00;
RWKV-Runner's `backend-python/convert_safetensors.py` is the same): every tensor `.half()`, the key
lower-cased after renaming `lora_A` -> `lora.0` and `lora_B` -> `lora.1`, the last two dimensions
swapped where one of TRANSPOSE_NAMES (below, copied as data from that script's call) is a substring
of the key, and `metadata={"format": "pt"}`.
"""

from __future__ import annotations

import json
import struct

import pytest
import safetensors
import safetensors.torch
import torch

from peft_rwkv7.model import CheckpointError, load_model, read_state_dict, save_model
from peft_rwkv7.model.formats import convert, detect_format
from peft_rwkv7.model.formats.st import read_st, to_st, write_st
from tests.conftest import make_model
from tests.fp_oracle import U16, forward_rounding, stored_rounding

TRANSPOSE_NAMES = ["time_mix_w1", "time_mix_w2", "time_decay_w1", "time_decay_w2", "w1", "w2", "a1", "a2", "g1", "g2",
                   "v1", "v2", "time_state", "lora.0"]  # fmt: skip


def converter_transposes(key: str) -> bool:
    """The converter's test: a substring match of its list against the renamed, lower-cased key."""
    return any(n in key for n in TRANSPOSE_NAMES)


@pytest.fixture(scope="module")
def model_and_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    model = make_model(seed=31, n_layer=3)
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():  # a tuned state, so time_state's transpose is exercised
        for blk in model.blocks:
            blk.att.register_buffer("time_state", torch.randn(4, 16, 16, generator=g))
    save_model(model, d / "m.pth", dtype=torch.float32)
    convert(d / "m.pth", d / "m.st")
    return model, d


def test_st_layout_follows_the_converter(model_and_files):
    model, d = model_and_files
    sd = read_state_dict(d / "m.pth")
    with safetensors.safe_open(str(d / "m.st"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        st = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(st) == set(sd)  # official names (already lower-case), nothing added or dropped
    C, D_w, D_v, D_g = 64, model.config.d_decay, model.config.d_mv, model.config.d_gate
    assert all(t.dtype == torch.float16 for t in st.values())
    # transposed: the time-mix low-rank matrices and the state
    w1, w2 = st["blocks.0.att.w1"], st["blocks.2.att.w2"]
    assert w1.shape == (D_w, C) and torch.equal(w1, sd["blocks.0.att.w1"].half().t())
    assert w2.shape == (C, D_w) and torch.equal(w2, sd["blocks.2.att.w2"].half().t())
    assert st["blocks.1.att.v1"].shape == (D_v, C) and st["blocks.1.att.g2"].shape == (C, D_g)
    ts, ts_pth = st["blocks.1.att.time_state"], sd["blocks.1.att.time_state"]
    assert torch.equal(ts[2, 3, 5], ts_pth[2, 5, 3].half())  # [H, N, N] with the last two swapped
    # not transposed: projections [out, in], FFN, vectors, r_k, embedding and head
    for k in ("blocks.0.att.key.weight", "blocks.1.ffn.key.weight", "blocks.1.ffn.value.weight", "blocks.0.att.x_r",
              "blocks.0.att.w0", "blocks.2.att.r_k", "emb.weight", "head.weight", "blocks.0.ln0.weight"):
        assert st[k].shape == sd[k].shape and torch.equal(st[k], sd[k].half()), k
    assert st["blocks.1.ffn.key.weight"].shape == (256, C) and st["blocks.0.att.x_r"].shape == (1, 1, C)
    for k, t in sd.items():  # every key: exactly the converter's substring rule
        want = t.half().transpose(-2, -1) if converter_transposes(k) else t.half()
        assert st[k].shape == want.shape and torch.equal(st[k], want), k


def test_lora_names_and_transpose_follow_the_converter():
    a, b = torch.randn(4, 64), torch.randn(256, 4)
    st = to_st({"blocks.3.ffn.key.lora_A": a, "blocks.3.ffn.key.lora_B": b})
    assert set(st) == {"blocks.3.ffn.key.lora.0", "blocks.3.ffn.key.lora.1"}
    assert st["blocks.3.ffn.key.lora.0"].shape == (64, 4) and torch.equal(st["blocks.3.ffn.key.lora.0"], a.half().t())
    assert st["blocks.3.ffn.key.lora.1"].shape == (256, 4) and torch.equal(st["blocks.3.ffn.key.lora.1"], b.half())
    assert all(converter_transposes(k) == k.endswith("lora.0") for k in st)


def test_pth_to_st_to_pth_gives_exactly_the_fp16_rounded_tensors(model_and_files, tmp_path):
    model, d = model_and_files
    print(convert(d / "m.st", tmp_path / "back.pth"))
    sd, back = read_state_dict(d / "m.pth"), read_state_dict(tmp_path / "back.pth")
    assert set(back) == set(sd) and detect_format(d / "m.st") == "st"
    worst = {}
    for k, t in sd.items():
        assert back[k].dtype == (torch.float32 if k.endswith("time_state") else torch.float16), k  # as save_model
        assert torch.equal(back[k].float(), t.half().float()), k
        cls = k.split(".", 2)[-1] if k.startswith("blocks.") else k
        worst[cls] = max(worst.get(cls, 0.0), (back[k].float() - t).abs().max().item())
    print("max |fp16 - fp32| per tensor class:", json.dumps({k: f"{v:.2e}" for k, v in sorted(worst.items())}))


def test_bf16_pth_survives_st_exactly_where_fp16_can_hold_it(tmp_path):
    save_model(make_model(seed=32), tmp_path / "b.pth")  # bf16, as the official releases
    convert(tmp_path / "b.pth", tmp_path / "b.st")
    convert(tmp_path / "b.st", tmp_path / "b2.pth", dtype=torch.bfloat16)
    sd, back = read_state_dict(tmp_path / "b.pth"), read_state_dict(tmp_path / "b2.pth")
    for k, t in sd.items():  # bf16 has 8 mantissa bits, fp16 11: exact unless below fp16's normal range
        normal = t.float().abs() >= 2**-14
        assert torch.equal(back[k][normal], t[normal]), k


def test_logits_after_loading_st(model_and_files):
    model, d = model_and_files
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        rounded = load_model(d / "m.pth")
        for p in rounded.state_dict().values():
            p.copy_(p.half().float())
        want16 = rounded(x)
        got = load_model(d / "m.st")(x)
    # The same network as the fp16-rounded weights: two fp32 forwards of it, each within the forward's bound.
    assert (got - want16).abs().max().item() <= 2 * forward_rounding(model.config, x.shape[1]) * want16.abs().max()
    # Against the fp32 original: storing each weight in fp16 moves it by <= 2^-11 relative; on a random
    # projection of the logits that is bounded to first order by the weights' gradients (plus two fp32
    # forwards' rounding, weighted by the projection).
    proj, bound = stored_rounding(model, x, U16)
    fp32 = 2 * forward_rounding(model.config, x.shape[1]) * want.abs().max().item() * proj.abs().sum().item()
    assert 0 < ((got.double() - want.double()) * proj).sum().abs().item() <= bound + fp32


def _st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def test_rwkv6_st_is_one_line_naming_file_and_key(tmp_path):
    v6 = {"emb.weight": torch.zeros(8, 4), "blocks.0.att.time_mix_w1": torch.zeros(4, 160),
          "blocks.0.att.time_decay": torch.zeros(4), "blocks.0.att.time_first": torch.zeros(1, 4)}
    (tmp_path / "v6.st").write_bytes(_st_bytes({k: t.half() for k, t in v6.items()}))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "v6.st")
    msg = str(e.value)
    assert "\n" not in msg and "v6.st" in msg and "RWKV-6" in msg and "blocks.0.att.time_" in msg


def test_truncated_st_names_the_tensor_it_cuts(model_and_files, tmp_path):
    _, d = model_and_files
    data = (d / "m.st").read_bytes()
    (tmp_path / "cut.st").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "cut.st")
    msg = str(e.value)
    assert "\n" not in msg and "cut.st" in msg and "truncated" in msg and "tensor blocks." in msg
    (tmp_path / "stub.st").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"stub\.st: truncated"):
        read_st(tmp_path / "stub.st")
    (tmp_path / "garbage.st").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 20)
    with pytest.raises(CheckpointError, match=r"garbage\.st: not a safetensors file"):
        read_st(tmp_path / "garbage.st")


def test_st_without_a_layer_and_a_lora_file_as_model(model_and_files, tmp_path):
    _, d = model_and_files
    st = safetensors.torch.load_file(str(d / "m.st"))
    del st["blocks.1.att.key.weight"]
    write_st(st, tmp_path / "missing.st")
    with pytest.raises(CheckpointError, match=r"missing\.st: incomplete RWKV-7 checkpoint, missing keys: "
                                              r"blocks\.1\.att\.key\.weight"):
        load_model(tmp_path / "missing.st")
    write_st(to_st({"blocks.0.att.key.lora_A": torch.zeros(2, 64), "blocks.0.att.key.lora_B": torch.zeros(64, 2)}),
             tmp_path / "lora.st")
    with pytest.raises(CheckpointError, match=r"lora\.st: blocks\.0\.att\.key\.lora\.0: this is a LoRA file"):
        load_model(tmp_path / "lora.st")


def test_values_beyond_fp16_are_refused(tmp_path):
    model = make_model(seed=33)
    with torch.no_grad():
        model.head.weight[3, 4] = 1e5
    save_model(model, tmp_path / "big.pth", dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"head\.weight has values beyond the fp16 range"):
        convert(tmp_path / "big.pth", tmp_path / "big.st")
    assert not (tmp_path / "big.st").exists()


def test_a_st_file_is_recognised_without_its_suffix(model_and_files, tmp_path):
    _, d = model_and_files
    (tmp_path / "model.bin").write_bytes((d / "m.st").read_bytes())
    assert detect_format(tmp_path / "model.bin") == "st" and detect_format(d / "m.pth") == "pth"
    assert torch.equal(read_state_dict(tmp_path / "model.bin")["emb.weight"], read_st(d / "m.st")["emb.weight"])
