"""`rwkv-peft export --format st|hf|runner-state`: models, adapters and states for other RWKV tools.

- a model (`--model M`, any format), or a base with an adapter merged on the fly (`--model BASE
  --adapter RUN`), as web-rwkv/Ai00 `.st`, an HF (fla-hub) directory or an official `.pth`;
- an adapter alone as `.st` (`--adapter RUN`): a LoRA in web-rwkv's run-time blend layout
  (`blocks.N.<proj>.lora.0` = A^T [in, r], `.lora.1` = B [out, r], fp16; web-rwkv adds
  (alpha / r) * lora.1 @ lora.0^T with the alpha given when loading it), and a trained state as
  the state `.st` Ai00 loads (`blocks.N.att.time_state`, [H, N, N] transposed, fp16);
- a state as RWKV-Runner's state file (`--format runner-state`, `.pth`): exactly one fp32
  `blocks.{i}.att.time_state` [H, N, N] (value-major, as the `.pth` layout) per layer and nothing
  else, the count and H * N = C RWKV-Runner checks.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..model import DTYPES, RWKV7Config, atomic_save, infer_config, read_state_dict
from ..model.formats import FORMAT_NAMES, detect_format, to_st, write_model, write_st
from .files import META_FILE, AdapterFile, check_base, check_output, read_adapter
from .kinds import capability
from .methods import base_fingerprint
from .pth_merge import _describe, merged_state_dict

_STATE_KEY = re.compile(r"blocks\.(\d+)\.att\.time_state")


def merged_model(sd: dict[str, torch.Tensor], source: str, adapter: str | os.PathLike | None,
                 lora_alpha: float | None = None) -> tuple[dict[str, torch.Tensor], AdapterFile | None]:
    """(the model `sd` (read from `source`) with `adapter` merged in fp32, the adapter read); `sd` itself
    when `adapter` is None."""
    if adapter is None:
        return sd, None
    af = read_adapter(adapter, lora_alpha)
    merged, _ = merged_state_dict(sd, af, source)
    return merged, af


def export_model(out: str | os.PathLike, fmt: str, model: str | os.PathLike, adapter: str | os.PathLike | None = None,
                 dtype: str | None = None, lora_alpha: float | None = None) -> str:
    """Write `model` (+ `adapter` merged) as fmt "st" | "hf" | "pth"; returns a summary line.

    dtype (bf16|fp16|fp32) applies to hf/pth and defaults to the model file's; st is fp16.
    """
    base = read_state_dict(model)
    base_dtype = base["emb.weight"].dtype
    sd, af = merged_model(base, str(model), adapter, lora_alpha)
    torch_dtype = DTYPES[dtype] if dtype else (None if fmt == "st" else base_dtype)
    what = f"{model} ({FORMAT_NAMES[detect_format(model)]})"
    if af is not None:
        what = f"{model} + {_describe(af)} from {adapter}"
    source = str(model) if af is None else f"{model} + {adapter}"
    return f"exported {what} to " + write_model(sd, out, fmt, torch_dtype, source=source)


def _run_config(adapter: str | os.PathLike, model: str | os.PathLike | None) -> RWKV7Config | None:
    """The base config: from --model, else from the run directory's adapter.json."""
    if model is not None:
        return infer_config(read_state_dict(model), str(model))
    meta = Path(adapter) / META_FILE if Path(adapter).is_dir() else Path(adapter).with_name(META_FILE)
    try:
        return RWKV7Config(**json.loads(meta.read_text())["base"]["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _states(tensors: dict[str, torch.Tensor], source: str, cfg: RWKV7Config | None) -> dict[str, torch.Tensor]:
    """Every layer's time_state (fp32, [H, N, N]), checked complete and consistent."""
    states = {k: t for k, t in tensors.items() if _STATE_KEY.fullmatch(k)}
    if not states:
        raise UserError(f"{source}: has no blocks.N.att.time_state (train with method.kind: state or state: true)")
    layers = sorted(int(_STATE_KEY.fullmatch(k).group(1)) for k in states)
    n_layer = cfg.n_layer if cfg is not None else len(layers)
    missing = [i for i in range(n_layer) if i not in layers]
    if missing or layers[-1] >= n_layer:
        raise UserError(f"{source}: blocks.{missing[0] if missing else layers[-1]}.att.time_state: a state file needs "
                        f"exactly one time_state for each of the {n_layer} layers")
    shape = tuple(states["blocks.0.att.time_state"].shape)
    want = (cfg.n_head, cfg.head_size, cfg.head_size) if cfg is not None else shape
    for k, t in states.items():
        if tuple(t.shape) != want or len(want) != 3 or want[1] != want[2]:
            raise UserError(f"{source}: {k} is {list(t.shape)}, expected {list(want)} ([H, N, N])")
    return {f"blocks.{i}.att.time_state": states[f"blocks.{i}.att.time_state"].float().contiguous()
            for i in range(n_layer)}  # fmt: skip


def export_runner_state(out: str | os.PathLike, adapter: str | os.PathLike | None = None,
                        model: str | os.PathLike | None = None) -> str:
    """RWKV-Runner's state file from a run (`adapter`) or from a model that carries time_state."""
    if Path(out).suffix.lower() != ".pth":
        raise UserError(f"{out}: RWKV-Runner loads state files ending in .pth")
    if adapter is not None:
        af = read_adapter(adapter)
        cfg = _run_config(adapter, model)
        if model is not None:
            check_base(af, base_fingerprint(read_state_dict(model)), str(model))
        states = _states(af.tensors, str(adapter), cfg)
    elif model is not None:
        sd = read_state_dict(model)
        states = _states(sd, str(model), infer_config(sd, str(model)))
    else:
        raise UserError("export --format runner-state needs --adapter RUN_DIR (a trained state) or --model M")
    atomic_save(states, out)
    H, N, _ = states["blocks.0.att.time_state"].shape
    return (f"exported the state of {adapter or model} to {out} (RWKV-Runner state file: {len(states)} layers x "
            f"time_state [{H}, {N}, {N}] fp32)")


def lora_st_tensors(af: AdapterFile, cfg: RWKV7Config | None) -> tuple[dict[str, torch.Tensor], float]:
    """(canonical lora_A / lora_B tensors for web-rwkv's blend, the alpha to load them with).

    LoRA and PiSSA (its rank-2r delta) as stored; Bone as the exact rank-r factorisation of its
    update, dW = D^T @ E with E[j, i] = 1 where i mod r == j (alpha r: scale 1)."""
    m = af.method
    if m.kind == "full" or m.train_parts:
        raise UserError(f"{af.source}: trains {'every weight' if m.kind == 'full' else ', '.join(m.train_parts)} in "
                        f"full, which web-rwkv's LoRA blend cannot add; export the merged model (--model BASE)")
    if m.kind == "disha" and m.disha_mode == "bat":
        raise UserError(f"{af.source}: a Bat update depends on the base weight and is not a LoRA; export the merged "
                        f"model (--model BASE)")
    if "head" in m.effective_targets():
        raise UserError(f"{af.source}: web-rwkv's LoRA blend adds to block matrices, not the head; export the merged "
                        f"model (--model BASE) or merge it (rwkv-peft merge)")
    if not capability(m).st and m.kind != "disha":
        raise UserError(f"{af.source}: web-rwkv's LoRA blend has no {capability(m).name}; export the merged model "
                        f"(--model BASE) or merge it (rwkv-peft merge)")
    if m.kind in ("lora", "pissa"):
        lora = {k: t for k, t in af.tensors.items() if k.endswith((".lora_A", ".lora_B"))}
        rank = next(t.shape[0] for k, t in lora.items() if k.endswith(".lora_A"))
        return lora, m.lora_scale * rank  # web-rwkv scales by alpha / rank
    if cfg is None:
        raise UserError(f"{af.source}: a Bone export needs the base's shape: give --model BASE or a run directory")
    out = {}
    for k, d in af.tensors.items():
        if not k.endswith(".disha"):
            continue
        module = k[: -len(".disha")]
        n_in = cfg.dim_ffn if module.endswith("ffn.value") else cfg.n_embd
        r = d.shape[0]
        out[module + ".lora_A"] = (torch.arange(n_in)[None, :] % r == torch.arange(r)[:, None]).float()
        out[module + ".lora_B"] = d.t().float()
    return out, float(m.r)


def export_adapter_st(out: str | os.PathLike, adapter: str | os.PathLike, lora_alpha: float | None = None) -> str:
    """An adapter alone as web-rwkv/Ai00 files: the LoRA `.st` and/or the state `.st`; returns a summary."""
    af = read_adapter(adapter, lora_alpha)
    m = af.method
    out = Path(out)
    cfg = _run_config(adapter, None) if m.trains_state or m.kind == "disha" else None
    written = []
    if m.kind != "state":
        lora, alpha = lora_st_tensors(af, cfg)
        write_st(to_st(lora, str(adapter)), out)
        rank = next(t.shape[0] for k, t in lora.items() if k.endswith(".lora_A"))
        written.append(f"{out} (LoRA for web-rwkv's blend, {len(lora) // 2} matrices, rank {rank}: load it with "
                       f"alpha {alpha:g})")
    if m.trains_state:
        state_out = out if m.kind == "state" else out.with_name(out.stem + "-state.st")
        check_output(state_out, adapter=adapter)
        write_st(to_st(_states(af.tensors, str(adapter), cfg), str(adapter)), state_out)
        written.append(f"{state_out} (state file for Ai00/web-rwkv)")
    line = f"exported {_describe(af)} from {adapter} to " + " and ".join(written)
    if m.quant != "none":
        line += f"; it was trained on a {m.quant}-quantized base, web-rwkv adds it to the fp16 base"
    return line


def export(fmt: str, out: str | os.PathLike, adapter: str | os.PathLike | None = None,
           model: str | os.PathLike | None = None, dtype: str | None = None, lora_alpha: float | None = None) -> str:
    """The `rwkv-peft export` dispatcher for the formats of this module (rwkv-peft is pth_merge's)."""
    check_output(out, adapter=adapter, model=model)
    if fmt == "runner-state":
        return export_runner_state(out, adapter, model)
    if fmt not in ("st", "hf", "pth"):
        raise UserError(f"--format: {fmt!r} is not one of st, hf, runner-state, rwkv-peft")
    if model is not None:
        return export_model(out, fmt, model, adapter, dtype, lora_alpha)
    if adapter is None:
        raise UserError(f"export --format {fmt} needs --model M (a model, or the base to merge --adapter into)")
    if fmt != "st":
        raise UserError(f"export --format {fmt} of an adapter needs --model BASE to merge it into (an adapter alone "
                        f"exports as st: web-rwkv's LoRA blend)")
    if dtype is not None:
        raise UserError("--dtype: the .st format is fp16 only")
    return export_adapter_st(out, adapter, lora_alpha)
