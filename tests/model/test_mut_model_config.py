"""model/config.py's pieces the file tests do not pin (found by mutation testing, map `model_config`): the low-rank
widths a fresh model gets (RWKV-LM x070's formulas, checked against the released models' shapes), and how each
older RWKV generation is told apart by its layer-0 time-mix keys (RWKV-LM's v4, v5.0, v5.2 and v6 files). Expected
values are written by hand."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.model.config import CheckpointError, RWKV7Config, infer_config, older_generation


@pytest.mark.parametrize("n_embd, widths", [
    (768, (64, 64, 32, 128)),    # RWKV-7 World 0.1B: w1 [768, 64], a1 [768, 64], v1 [768, 32], g1 [768, 128]
    (2048, (96, 96, 64, 256)),   # RWKV-7 World 1.5B: w1 [2048, 96], a1 [2048, 96], v1 [2048, 64], g1 [2048, 256]
    (2560, (96, 96, 64, 320)),   # RWKV-7 World 2.9B: g1 [2560, 320]
    (64, (32, 32, 32, 32)),      # a tiny test model: every width is at least 32
    (4096, (128, 128, 96, 480)),  # by hand: 1.8*64=115.2 -> 128; 1.3*64=83.2 -> 96; 0.6*4096^0.8=465.6 -> 480
])
def test_a_fresh_models_low_rank_widths_are_rwkv_lms(n_embd, widths):
    cfg = RWKV7Config.new(n_layer=2, n_embd=n_embd, vocab_size=65536)
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == widths
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size, cfg.dim_ffn) == (2, n_embd, 65536, 64, 4 * n_embd)
    assert cfg.layer0_v and cfg.n_head == n_embd // 64


def test_new_takes_its_head_size_and_ffn_width():
    cfg = RWKV7Config.new(3, 96, 50, head_size=32, dim_ffn=200)
    assert (cfg.n_layer, cfg.head_size, cfg.n_head, cfg.dim_ffn, cfg.vocab_size) == (3, 32, 3, 200, 50)
    with pytest.raises(ValueError) as e:
        RWKV7Config.new(1, 100, 50, head_size=64)
    assert str(e.value) == "n_embd 100 is not a multiple of head_size 64"


V4 = ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r", "key.weight", "value.weight",
      "receptance.weight", "output.weight")
V5_0 = ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g", "key.weight",
        "value.weight", "receptance.weight", "gate.weight", "output.weight", "ln_x.weight", "ln_x.bias")
V5_2 = ("time_decay", "time_faaaa", "time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g", "key.weight",
        "value.weight", "receptance.weight", "gate.weight", "output.weight", "ln_x.weight", "ln_x.bias")
V6 = ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g", "time_maa_w1",
      "time_maa_w2", "time_decay", "time_decay_w1", "time_decay_w2", "time_faaaa", "key.weight", "value.weight",
      "receptance.weight", "gate.weight", "output.weight", "ln_x.weight", "ln_x.bias")


@pytest.mark.parametrize("att, want", [
    (V4, "RWKV-4"), (V5_0, "RWKV-5"), (V5_2, "RWKV-5"), (V6, "RWKV-6"),
    # each key alone that decides it
    (("time_first",), "RWKV-4"), (("time_mix_k",), "RWKV-4"), (("time_faaaa",), "RWKV-5"),
    (("time_first", "ln_x.weight"), "RWKV-5"), (("time_maa_x",), "RWKV-6"), (("time_maa_w1", "time_faaaa"), "RWKV-6"),
    # RWKV-7's own keys, and nothing
    (("x_r", "w0", "a0", "k_k", "r_k", "ln_x.weight"), None), ((), None), (("ln_x.weight",), None),
])
def test_each_older_generation_is_told_apart_by_its_time_mix(att, want):
    sd = {f"blocks.0.att.{k}": torch.zeros(1) for k in att}
    assert older_generation({"emb.weight": torch.zeros(1), **sd}) == want


def test_only_layer_0_is_read():
    assert older_generation({"blocks.1.att.time_first": torch.zeros(1), "blocks.10.att.time_maa_x": torch.zeros(1)}) \
        is None


@pytest.mark.parametrize("att, name", [(V4, "RWKV-4"), (V5_2, "RWKV-5"), (V6, "RWKV-6")])
def test_an_older_checkpoint_is_refused_by_name(att, name):
    sd = {"emb.weight": torch.zeros(8, 4), **{f"blocks.0.att.{k}": torch.zeros(1) for k in att}}
    with pytest.raises(CheckpointError) as e:
        infer_config(sd, "old.pth")
    assert str(e.value) == f"old.pth: this is an {name} checkpoint; rwkv-peft works with RWKV-7 (x070) models only"


# ---- infer_config on whole state dicts: a model built on the meta device (shapes only, no memory) is the oracle


def meta_state(n_embd=64, n_layer=3, layer0_v=True, head_size=16) -> tuple[RWKV7Config, dict]:
    import dataclasses

    from peft_rwkv7.model.rwkv7 import RWKV7

    cfg = dataclasses.replace(RWKV7Config.new(n_layer, n_embd, 16, head_size=head_size), layer0_v=layer0_v)
    with torch.device("meta"):
        return cfg, dict(RWKV7(cfg).state_dict())


@pytest.mark.parametrize("layer0_v", [True, False])
def test_the_value_residual_width_and_layer_0_s_v_are_read_from_the_file(layer0_v):
    """An HF-converted or fla file has no v0/v1/v2 at layer 0 (unused there): layer0_v False, and the v width
    (64 at C 2048, not the fallback 32) comes from layer 1's v1."""
    cfg, sd = meta_state(n_embd=2048, layer0_v=layer0_v, head_size=64)
    assert ("blocks.0.att.v1" in sd) is layer0_v and sd["blocks.1.att.v1"].shape == (2048, 64)
    assert infer_config(sd) == cfg and cfg.d_mv == 64 and cfg.layer0_v is layer0_v


def test_a_one_layer_file_without_layer_0_s_v_has_no_value_residual_at_all():
    cfg, sd = meta_state(n_layer=1, layer0_v=False)
    assert not any(k.endswith(("att.v0", "att.v1", "att.v2")) for k in sd)
    assert infer_config(sd) == cfg and cfg.d_mv == 32  # unused; the width a fresh model of this size gets


def test_layer_1_s_value_residual_is_checked_where_layer_0_has_none():
    _, sd = meta_state(layer0_v=False)
    sd["blocks.1.att.v2"] = torch.empty(32, 65, device="meta")
    with pytest.raises(CheckpointError) as e:
        infer_config(sd, "m.pth")
    assert str(e.value) == "m.pth: inconsistent shapes: blocks.1.att.v2 is [32, 65], expected [32, 64]"
    _, sd = meta_state(layer0_v=True)
    del sd["blocks.0.att.v2"]  # a file that has layer 0's v0 and v1 must have its v2 too
    with pytest.raises(CheckpointError, match="incomplete RWKV-7 checkpoint, missing keys: blocks.0.att.v2$"):
        infer_config(sd, "m.pth")


def test_the_refusals_list_at_most_four_keys_and_count_the_rest():
    _, sd = meta_state()
    gone = ["ln_out.weight", "ln_out.bias", "head.weight", "blocks.0.ln1.weight", "blocks.0.ln1.bias"]
    for n, tail in ((5, " (+1 more)"), (4, "")):
        part = {k: v for k, v in sd.items() if k not in gone[:n]}
        with pytest.raises(CheckpointError) as e:
            infer_config(part)  # the default source
        assert str(e.value) == f"checkpoint: not an RWKV-7 checkpoint, missing keys: {', '.join(gone[:4])}{tail}"
    later = ["blocks.2.ln1.weight", "blocks.2.ln1.bias", "blocks.2.ln2.weight", "blocks.2.ln2.bias",
             "blocks.2.att.x_r", "blocks.2.att.x_w"]
    for n, tail in ((6, " (+2 more)"), (5, " (+1 more)"), (4, "")):
        part = {k: v for k, v in sd.items() if k not in later[:n]}
        with pytest.raises(CheckpointError) as e:
            infer_config(part, "m.pth")
        assert str(e.value) == f"m.pth: incomplete RWKV-7 checkpoint, missing keys: {', '.join(later[:4])}{tail}"
    extra = {f"blocks.0.att.extra{i}": torch.empty(1, device="meta") for i in range(5)}
    with pytest.raises(CheckpointError) as e:
        infer_config({**sd, **extra}, "m.pth")
    assert str(e.value) == f"m.pth: unexpected keys for RWKV-7: {', '.join(list(extra)[:4])}"


def test_a_head_layout_that_does_not_cover_the_width_is_named():
    _, sd = meta_state()
    sd = {k: (torch.empty(3, 16, device="meta") if k.endswith("att.r_k") else v) for k, v in sd.items()}
    with pytest.raises(CheckpointError) as e:
        infer_config(sd, "m.pth")
    assert str(e.value) == "m.pth: att.r_k is 3x16 but the embedding width is 64"
