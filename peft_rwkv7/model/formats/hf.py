"""Hugging Face RWKV-7 directories in the fla-hub layout (flash-linear-attention's `RWKV7ForCausalLM`).

Names and shapes follow fla's `utils/convert_from_rwkv7.py` (official key -> fla key):

| official | fla | shape change |
| --- | --- | --- |
| `emb.weight`, `ln_out.*`, `head.weight` | `model.embeddings.weight`, `model.norm.*`, `lm_head.weight` | |
| `blocks.i.ln0/ln1/ln2.*` | `model.layers.i.pre_norm/attn_norm/ffn_norm.*` | |
| `blocks.i.att.{w,a,v}0` | `model.layers.i.attn.{w,a,v}_lora.lora.2.bias` | [1, 1, C] -> [C] |
| `blocks.i.att.{w,a,v,g}1` | `...attn.{w,a,v,g}_lora.lora.0.weight` | [C, D] -> [D, C] (transposed) |
| `blocks.i.att.{w,a,v,g}2` | `...attn.{w,a,v,g}_lora.lora.2.weight` | [D, C] -> [C, D] (transposed) |
| `blocks.i.att.receptance/key/value/output.weight` | `...attn.r_proj/k_proj/v_proj/o_proj.weight` | |
| `blocks.i.att.ln_x.*` | `...attn.g_norm.*` | |
| `blocks.i.att.k_k`, `k_a` | `...attn.k_k`, `k_a` | [1, 1, C] -> [C] |
| `blocks.i.att.x_*`, `r_k` | `...attn.x_*`, `r_k` | unchanged ([1, 1, C], [H, N]) |
| `blocks.i.ffn.x_k` | `...ffn.x_k` | [1, 1, C] -> [C] |
| `blocks.i.ffn.key/value.weight` | `...ffn.key/value.weight` | |
| `blocks.0.att.v0/v1/v2` | dropped (unused; fla's layer 0 has no `v_lora`) | |

`config.json` carries fla's `RWKV7Config` keys (`model_type: rwkv7`). A tuned initial state has no
place in fla's layout; it is written beside the weights as `state.pth` (RWKV-Runner's state file)
and read back from there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

from ..config import CheckpointError, RWKV7Config, expected_shapes, infer_config
from ..io import atomic_save, atomic_write
from .st import read_header

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, STATE_FILE = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "state.pth")  # fmt: skip
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_NORMS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_LORA_SLOT = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}
_OTHER_GENERATIONS = {"rwkv": "RWKV-4", "rwkv5": "RWKV-5", "rwkv6": "RWKV-6"}


def hf_name(key: str) -> str | None:
    """The fla name of an official key (None for layer 0's unused v0/v1/v2 and for time_state)."""
    top = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}  # fmt: skip
    if key in top:
        return top[key]
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", key)
    if m is None:
        raise KeyError(key)
    i, part, rest = m.groups()
    if key.endswith(".att.time_state") or (i == "0" and re.fullmatch(r"v[012]", rest)):
        return None
    base = f"model.layers.{i}."
    if part in _NORMS:
        return base + _NORMS[part] + "." + rest
    if part == "ffn":
        return base + "ffn." + rest
    if re.fullmatch(r"[wavg][012]", rest):
        return base + f"attn.{rest[0]}_lora." + _LORA_SLOT[rest[1]]
    head, _, tail = rest.partition(".")
    return base + "attn." + (_PROJ.get(head, head) + ("." + tail if tail else ""))


def hf_transposed(key: str) -> bool:
    """Whether fla stores the official `key` transposed (the low-rank matrices `{w,a,v,g}{1,2}`)."""
    return re.search(r"\.att\.[wavg][12]$", key) is not None


def _squeezed(key: str) -> bool:
    """[1, 1, C] official vectors that fla stores as [C] (all but the token-shift mixes x_*)."""
    return re.search(r"\.(att\.(w0|a0|v0|k_k|k_a)|ffn\.x_k)$", key) is not None


def hf_tensors(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Official state dict -> fla's names and shapes in `dtype` (time_state and layer 0's v0/v1/v2 left out)."""
    out = {}
    for key, t in sd.items():
        name = hf_name(key)
        if name is None:
            continue
        t = t.detach().to("cpu", dtype)
        if hf_transposed(key):
            t = t.t()
        elif _squeezed(key):
            t = t.reshape(-1)
        out[name] = t.contiguous()
    return out


def hf_config(cfg: RWKV7Config, dtype: torch.dtype) -> dict:
    """config.json for fla's RWKV7Config describing `cfg` (every key its save_pretrained writes)."""
    C, L = cfg.n_embd, cfg.n_layer
    return {
        "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "attn_mode": "chunk", "attn": None,
        "hidden_size": C, "hidden_ratio": cfg.dim_ffn / C, "intermediate_size": cfg.dim_ffn,
        "num_hidden_layers": L, "head_dim": cfg.head_size, "num_heads": cfg.n_head,
        "decay_low_rank_dim": cfg.d_decay, "a_low_rank_dim": cfg.d_aaa, "v_low_rank_dim": cfg.d_mv,
        "gate_low_rank_dim": cfg.d_gate, "value_dim": [C] * L, "vocab_size": cfg.vocab_size,
        "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True, "norm_eps": 1e-5,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None, "initializer_range": 0.02,
        "fuse_norm": True, "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False, "use_l2warp": True,
        "torch_dtype": _HF_DTYPE_NAMES[dtype], "dtype": _HF_DTYPE_NAMES[dtype],  # transformers 4.x / 5.x names
    }  # fmt: skip


def write_hf(sd: dict[str, torch.Tensor], out_dir: str | os.PathLike, dtype: torch.dtype,
             more_files: Callable[[Path], list[str]] | None = None) -> list[str]:
    """Write config.json + model.safetensors (+ state.pth when `sd` has time_state) and `more_files(dir)`'s (the
    tokenizer's); returns the file names. config.json, which makes the folder a model (is_hf_dir), goes first and
    comes back last: a write cut short never leaves a folder that looks complete."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d}: exists and is not a directory (the hf format writes a directory)")
    cfg = infer_config(sd, "model")
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_FILE).unlink(missing_ok=True)  # a folder rewritten in part is no model: never new weights, old config
    blob = safetensors.torch.save(hf_tensors(sd, dtype), metadata={"format": "pt"})
    atomic_write(d / WEIGHTS_FILE, lambda f: f.write(blob))
    written = [WEIGHTS_FILE]
    states = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in sd.items() if k.endswith("time_state")}
    if states:
        atomic_save(states, d / STATE_FILE)
        written.append(STATE_FILE)
    else:
        (d / STATE_FILE).unlink(missing_ok=True)  # never leave another model's state beside these weights
    if more_files is not None:
        written += more_files(d)
    text = (json.dumps(hf_config(cfg, dtype), indent=2) + "\n").encode()
    atomic_write(d / CONFIG_FILE, lambda f: f.write(text))
    return [CONFIG_FILE, *written]


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A directory with a config.json (what `load_model` treats as a Hugging Face model)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file()


def _read_config(d: Path) -> dict:
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: is a directory without {CONFIG_FILE}, expected a model file or an HF model "
                              f"directory")
    try:
        conf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not UTF-8 text (byte {e.start}), expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    mt = conf.get("model_type")
    if mt != "rwkv7":
        older = f" (an {_OTHER_GENERATIONS[mt]} model)" if mt in _OTHER_GENERATIONS else ""
        raise CheckpointError(f"{cfg_path}: model_type is {mt!r}{older}, expected 'rwkv7' (RWKV-7 in the fla-hub "
                              f"layout)")
    if conf.get("attn"):
        raise CheckpointError(f"{cfg_path}: attn: hybrid attention layers are not part of RWKV-7; rwkv-peft loads "
                              f"pure RWKV-7 models")
    for key, want in (("norm_first", True), ("norm_bias", True), ("hidden_act", "sqrelu")):
        if key in conf and conf[key] != want:
            raise CheckpointError(f"{cfg_path}: {key} is {conf[key]!r}; RWKV-7 has {want!r}")
    return conf


def _load_weights(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(fla tensors, {key: file it came from}) from model.safetensors, a sharded index, or pytorch_model.bin."""
    index = d / INDEX_FILE
    if (d / WEIGHTS_FILE).is_file():
        files = [d / WEIGHTS_FILE]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
        files = [d / f for f in sorted(set(weight_map.values()))]
    elif (d / "pytorch_model.bin").is_file():
        sd = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return sd, dict.fromkeys(sd, "pytorch_model.bin")
    else:
        raise CheckpointError(f"{d}: no {WEIGHTS_FILE}, {INDEX_FILE} or pytorch_model.bin")
    tensors, origin = {}, {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{index}: names {f.name}, which is missing")
        read_header(f)  # truncation and header errors, one line naming the tensor
        try:
            part = safetensors.torch.load_file(str(f))
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read as safetensors ({type(e).__name__})") from e
        tensors.update(part)
        origin.update(dict.fromkeys(part, f.name))
    return tensors, origin


def _check_config(conf: dict, cfg: RWKV7Config, cfg_path: Path, shown: dict[str, str]) -> None:
    """Every config.json dimension must match the one read from the weights (`shown`: key -> evidence)."""
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "num_heads", "intermediate_size",
                "decay_low_rank_dim", "a_low_rank_dim", "gate_low_rank_dim", "v_low_rank_dim", "hidden_ratio"):
        said = conf.get(key)
        number, what = ((int, float), "a number") if key == "hidden_ratio" else (int, "an integer")
        if said is not None and (isinstance(said, bool) or not isinstance(said, number)):
            raise CheckpointError(f"{cfg_path}: {key} is {said!r}, expected {what}")
    ffn = conf.get("intermediate_size")
    if ffn is None and conf.get("hidden_ratio") is not None and conf.get("hidden_size") is not None:
        ffn = 32 * ((int(conf["hidden_size"] * conf["hidden_ratio"]) + 31) // 32)  # fla's rounding
    have = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "head_dim": cfg.head_size, "num_heads": cfg.n_head, "intermediate_size": cfg.dim_ffn,
            "decay_low_rank_dim": cfg.d_decay, "a_low_rank_dim": cfg.d_aaa, "gate_low_rank_dim": cfg.d_gate}
    if cfg.n_layer > 1:  # layer 0 has no v_lora
        have["v_low_rank_dim"] = cfg.d_mv
    checks = [(key, value, ffn if key == "intermediate_size" else conf.get(key)) for key, value in have.items()]
    for key, value, said in checks:
        if said is not None and said != value:
            raise CheckpointError(f"{cfg_path}: {key} is {said} but the weights say {value} ({shown[key]})")
    vd = conf.get("value_dim")
    if vd is not None and any(v != cfg.n_embd for v in ([vd] if isinstance(vd, int) else vd)):
        raise CheckpointError(f"{cfg_path}: value_dim is {vd}; RWKV-7 has value_dim = hidden_size ({cfg.n_embd})")


def read_hf(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An fla-hub RWKV-7 directory as an official state dict (tensors keep the file's dtype).

    CheckpointError (one line, naming the file and key) for another architecture, a config.json
    that disagrees with the weights, missing or unknown tensors and wrong shapes.
    """
    d = Path(path)
    conf = _read_config(d)
    tensors, origin = _load_weights(d)
    where = lambda k: f"{origin.get(k, WEIGHTS_FILE)}: {k}"  # noqa: E731
    for need in ("model.embeddings.weight", "model.layers.0.attn.r_k", "model.layers.0.ffn.key.weight"):
        if need not in tensors:
            raise CheckpointError(f"{d / WEIGHTS_FILE}: missing {need}; not an RWKV-7 model in the fla-hub layout")
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    V, C = tensors["model.embeddings.weight"].shape
    H, N = tensors["model.layers.0.attn.r_k"].shape
    lora_dim = lambda n, i=0: tensors.get(f"model.layers.{i}.attn.{n}_lora.lora.0.weight", torch.empty(32)).shape[0]  # noqa: E731
    cfg = RWKV7Config(n_layer=max(layers) + 1, n_embd=C, head_size=N, vocab_size=V,
                      dim_ffn=tensors["model.layers.0.ffn.key.weight"].shape[0], d_decay=lora_dim("w"),
                      d_aaa=lora_dim("a"), d_mv=lora_dim("v", 1), d_gate=lora_dim("g"), layer0_v=False)  # fmt: skip
    shown = {"vocab_size": where("model.embeddings.weight"), "hidden_size": where("model.embeddings.weight"),
             "num_hidden_layers": f"layers 0..{cfg.n_layer - 1} in {WEIGHTS_FILE}",
             "head_dim": where("model.layers.0.attn.r_k"), "num_heads": where("model.layers.0.attn.r_k"),
             "intermediate_size": where("model.layers.0.ffn.key.weight"),
             **{f"{n}_low_rank_dim": where(f"model.layers.{int(s == 'v')}.attn.{s}_lora.lora.0.weight")
                for n, s in (("decay", "w"), ("a", "a"), ("v", "v"), ("gate", "g"))}}  # fmt: skip
    _check_config(conf, cfg, d / CONFIG_FILE, shown)
    sd, used = {}, set()
    for key, shape in expected_shapes(cfg).items():
        name = hf_name(key)
        if name not in tensors:
            raise CheckpointError(f"{d / WEIGHTS_FILE}: missing {name} (official {key})")
        t = tensors[name]
        want = (shape[1], shape[0]) if hf_transposed(key) else (shape[-1],) if _squeezed(key) else shape
        if tuple(t.shape) != tuple(want):
            raise CheckpointError(f"{d / where(name)} is {list(t.shape)}, expected {list(want)} for this config")
        sd[key] = t.t() if hf_transposed(key) else t.reshape(shape)
        used.add(name)
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{d / where(extra[0])}: unexpected tensor for RWKV-7 in the fla-hub layout")
    if (d / STATE_FILE).is_file():
        from ..io import read_state_dict

        states = read_state_dict(d / STATE_FILE)
        bad = [k for k in states if not re.fullmatch(r"blocks\.\d+\.att\.time_state", k)]
        if bad:
            raise CheckpointError(f"{d / STATE_FILE}: {bad[0]}: expected only blocks.N.att.time_state")
        sd.update(states)
    return {k: t.contiguous() for k, t in sd.items()}
