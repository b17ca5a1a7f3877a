"""Hugging Face directories in the fla-hub layout: fla's naming rules, exact round trips, logits, bad inputs.

The names, shapes and transposes below are written by hand from flash-linear-attention's
`utils/convert_from_rwkv7.py` (`translate_into_fla`: `[wvag][012]` -> `{x}_lora.lora.{2.bias, 0.weight,
2.weight}`, transposed for 1 and 2; `[1, 1, C]` tensors squeezed except `attn.x_*`; layer 0's
`v0/v1/v2` dropped as unused) and fla's `RWKV7ForCausalLM` parameter list (`fla/layers/rwkv7.py`,
`fla/models/rwkv7/modeling_rwkv7.py`: no `v_lora` on layer 0, `g_lora` without bias).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from peft_rwkv7.model import CheckpointError, load_model, read_state_dict, save_model
from peft_rwkv7.model.formats import convert, detect_format
from tests.conftest import make_model
from tests.fp_oracle import forward_rounding


def fla_keys(n_layer: int) -> set[str]:
    """fla's RWKV7ForCausalLM state-dict keys, by hand."""
    keys = {"model.embeddings.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight",
            "model.layers.0.pre_norm.weight", "model.layers.0.pre_norm.bias"}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        keys |= {p + f"{n}.{w}" for n in ("attn_norm", "ffn_norm", "attn.g_norm") for w in ("weight", "bias")}
        keys |= {p + f"attn.{n}" for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a", "r_k")}
        keys |= {p + f"attn.{n}_proj.weight" for n in "rkvo"}
        for lora in ("w", "a", "g") + (("v",) if i > 0 else ()):
            keys |= {p + f"attn.{lora}_lora.lora.0.weight", p + f"attn.{lora}_lora.lora.2.weight"}
            if lora != "g":
                keys.add(p + f"attn.{lora}_lora.lora.2.bias")
        keys |= {p + "ffn.x_k", p + "ffn.key.weight", p + "ffn.value.weight"}
    return keys


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    model = make_model(seed=41, n_layer=3)
    save_model(model, d / "m.pth", dtype=torch.float32)
    print(convert(d / "m.pth", d / "hf"))
    return model, d


def test_hf_names_shapes_and_transposes_follow_fla(exported):
    model, d = exported
    sd = read_state_dict(d / "m.pth")
    hf = safetensors.torch.load_file(str(d / "hf" / "model.safetensors"))
    assert set(hf) == fla_keys(3)
    cfg = model.config
    C, D_v = cfg.n_embd, cfg.d_mv
    pairs = {  # fla name: (official tensor as fla stores it)
        "model.embeddings.weight": sd["emb.weight"],
        "model.layers.0.pre_norm.bias": sd["blocks.0.ln0.bias"],
        "model.layers.2.attn_norm.weight": sd["blocks.2.ln1.weight"],
        "model.layers.1.ffn_norm.bias": sd["blocks.1.ln2.bias"],
        "model.layers.1.attn.v_lora.lora.0.weight": sd["blocks.1.att.v1"].t(),  # [D_v, C]
        "model.layers.1.attn.v_lora.lora.2.weight": sd["blocks.1.att.v2"].t(),  # [C, D_v]
        "model.layers.1.attn.v_lora.lora.2.bias": sd["blocks.1.att.v0"].reshape(C),
        "model.layers.0.attn.w_lora.lora.2.bias": sd["blocks.0.att.w0"].reshape(C),
        "model.layers.2.attn.g_lora.lora.0.weight": sd["blocks.2.att.g1"].t(),
        "model.layers.0.attn.a_lora.lora.2.weight": sd["blocks.0.att.a2"].t(),
        "model.layers.0.attn.r_proj.weight": sd["blocks.0.att.receptance.weight"],
        "model.layers.2.attn.o_proj.weight": sd["blocks.2.att.output.weight"],
        "model.layers.1.attn.g_norm.bias": sd["blocks.1.att.ln_x.bias"],
        "model.layers.1.attn.k_k": sd["blocks.1.att.k_k"].reshape(C),
        "model.layers.1.attn.x_r": sd["blocks.1.att.x_r"],  # stays [1, 1, C]
        "model.layers.0.attn.r_k": sd["blocks.0.att.r_k"],
        "model.layers.2.ffn.x_k": sd["blocks.2.ffn.x_k"].reshape(C),
        "model.layers.2.ffn.value.weight": sd["blocks.2.ffn.value.weight"],
        "model.norm.weight": sd["ln_out.weight"],
        "lm_head.weight": sd["head.weight"],
    }
    for name, want in pairs.items():
        assert hf[name].shape == want.shape and torch.equal(hf[name], want), name
    assert hf["model.layers.1.attn.v_lora.lora.0.weight"].shape == (D_v, C)
    assert hf["model.layers.1.attn.x_r"].shape == (1, 1, C) and hf["model.layers.1.attn.k_k"].shape == (C,)
    assert all(t.dtype == torch.float32 for t in hf.values())


def test_config_json_has_fla_keys(exported):
    model, d = exported
    conf = json.loads((d / "hf" / "config.json").read_text())
    cfg = model.config
    assert conf["model_type"] == "rwkv7" and conf["architectures"] == ["RWKV7ForCausalLM"]
    assert (conf["hidden_size"], conf["num_hidden_layers"], conf["vocab_size"]) == (64, 3, 97)
    assert (conf["head_dim"], conf["num_heads"], conf["intermediate_size"], conf["hidden_ratio"]) == (16, 4, 256, 4.0)
    assert (conf["decay_low_rank_dim"], conf["a_low_rank_dim"], conf["v_low_rank_dim"], conf["gate_low_rank_dim"]) \
        == (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate)
    assert conf["value_dim"] == [64] * 3 and conf["hidden_act"] == "sqrelu" and conf["norm_eps"] == 1e-5
    assert conf["tie_word_embeddings"] is False and conf["attn"] is None and conf["torch_dtype"] == "float32"


def test_pth_to_hf_to_pth_is_exact_in_fp32(exported, tmp_path):
    model, d = exported
    convert(d / "hf", tmp_path / "back.pth")
    sd, back = read_state_dict(d / "m.pth"), read_state_dict(tmp_path / "back.pth")
    assert set(sd) - set(back) == {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}  # unused: fla drops them
    assert set(back) <= set(sd) and detect_format(d / "hf") == "hf"
    for k, t in back.items():
        assert t.dtype == torch.float32 and torch.equal(t, sd[k]), k
    # a model without layer 0's v tensors goes through with the same key set
    convert(tmp_path / "back.pth", tmp_path / "hf2")
    convert(tmp_path / "hf2", tmp_path / "again.pth")
    again = read_state_dict(tmp_path / "again.pth")
    assert set(again) == set(back) and all(torch.equal(again[k], back[k]) for k in back)


def test_logits_after_loading_hf_equal_the_original(exported):
    model, d = exported
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        err = (load_model(d / "hf")(x) - want).abs().max().item()
    # The weights are equal (test above): two fp32 forwards of one network, each within the forward's bound.
    assert err <= 2 * forward_rounding(model.config, x.shape[1]) * want.abs().max().item()


def test_tuned_state_goes_to_state_pth_and_back(tmp_path):
    model = make_model(seed=42)
    g = torch.Generator().manual_seed(42)
    for blk in model.blocks:
        blk.att.register_buffer("time_state", torch.randn(4, 16, 16, generator=g))
    save_model(model, tmp_path / "s.pth", dtype=torch.bfloat16)
    line = convert(tmp_path / "s.pth", tmp_path / "hf")
    assert "state.pth" in line and (tmp_path / "hf" / "state.pth").is_file()
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["torch_dtype"] == "bfloat16"
    back = read_state_dict(tmp_path / "hf")
    sd = read_state_dict(tmp_path / "s.pth")
    assert torch.equal(back["blocks.1.att.time_state"], sd["blocks.1.att.time_state"])
    assert back["emb.weight"].dtype == torch.bfloat16 and torch.equal(back["emb.weight"], sd["emb.weight"])


def _rewrite_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text())
    conf.update(changes)
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


@pytest.mark.parametrize("changes, pattern", [
    ({"model_type": "llama"}, r"config\.json: model_type is 'llama', expected 'rwkv7'"),
    ({"model_type": "rwkv6"}, r"config\.json: model_type is 'rwkv6' \(an RWKV-6 model\)"),
    ({"hidden_size": 128}, r"config\.json: hidden_size is 128 but the weights say 64 \(model\.safetensors: "
                           r"model\.embeddings\.weight\)"),
    ({"num_hidden_layers": 4}, r"config\.json: num_hidden_layers is 4 but the weights say 3"),
    ({"v_low_rank_dim": 16}, r"config\.json: v_low_rank_dim is 16 but the weights say \d+ \(model\.safetensors: "
                             r"model\.layers\.1\.attn\.v_lora\.lora\.0\.weight\)"),
    ({"attn": {"layers": [1]}}, r"config\.json: attn: hybrid attention"),
])  # fmt: skip
def test_bad_config_is_one_line_naming_file_and_key(exported, tmp_path, changes, pattern):
    _, d = exported
    bad = _rewrite_config(d / "hf", tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_model(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_bad_weights_are_one_line_naming_file_and_key(exported, tmp_path):
    _, d = exported
    hf = safetensors.torch.load_file(str(d / "hf" / "model.safetensors"))
    cases = {
        "missing": ({k: t for k, t in hf.items() if k != "model.layers.2.attn.k_proj.weight"},
                    r"model\.safetensors: missing model\.layers\.2\.attn\.k_proj\.weight \(official "
                    r"blocks\.2\.att\.key\.weight\)"),
        "extra": ({**hf, "model.layers.1.attn.q_proj.weight": torch.zeros(64, 64)},
                  r"model\.safetensors: model\.layers\.1\.attn\.q_proj\.weight: unexpected tensor"),
        "shape": ({**hf, "model.layers.1.attn.w_lora.lora.0.weight": torch.zeros(64, 32)},
                  r"model\.safetensors: model\.layers\.1\.attn\.w_lora\.lora\.0\.weight is \[64, 32\], expected"),
    }
    for name, (tensors, pattern) in cases.items():
        bad = _rewrite_config(d / "hf", tmp_path / name)
        safetensors.torch.save_file(tensors, str(bad / "model.safetensors"))
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_model(bad)
        assert "\n" not in str(e.value), name
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty: is a directory without config\.json"):
        load_model(empty)


def test_world_model_gets_tokenizer_files_that_transformers_loads(tmp_path):
    """What we write for the World vocabulary: the vocab file, our RwkvTokenizer module, tokenizer_config.json
    naming it (fla-hub's class name), special_tokens_map.json and added_tokens.json."""
    transformers = pytest.importorskip("transformers")
    from peft_rwkv7.data import load_tokenizer

    save_model(make_model(seed=43, n_layer=1, n_embd=32, vocab_size=65536), tmp_path / "w.pth")
    line = convert(tmp_path / "w.pth", tmp_path / "hf")
    files = {"rwkv_vocab_v20230424.txt", "hf_rwkv_tokenizer.py", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "config.json", "model.safetensors"}
    assert {p.name for p in (tmp_path / "hf").iterdir()} == files and "tokenizer_config.json" in line
    conf = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert conf["tokenizer_class"] == "RwkvTokenizer"
    assert conf["auto_map"]["AutoTokenizer"] == ["hf_rwkv_tokenizer.RwkvTokenizer", None]
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    world = load_tokenizer("world")
    for text in ("Hello world!\n\nUser: 你好，世界 🌍", "  tabs\tand  spaces ", "def f(x):\n    return x ** 2\n"):
        ids = tok(text)["input_ids"]
        assert ids == world.encode(text) and tok.decode(ids) == text
    assert tok.eos_token_id == 0 and tok.convert_ids_to_tokens(0) == "<|rwkv_tokenizer_end_of_text|>"


def test_the_weights_file_alone_points_to_its_directory(exported):
    _, d = exported
    with pytest.raises(CheckpointError, match=r"model\.safetensors: model\.layers\.\d+\..+ weights file of a Hugging "
                                              r"Face directory; pass the directory"):
        load_model(d / "hf" / "model.safetensors")
