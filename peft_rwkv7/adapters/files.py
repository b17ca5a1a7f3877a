"""Adapter files: a run directory (`adapter.safetensors` + `adapter.json` [+ `state.pth`]) or a
checkpoint in RWKV-PEFT's layout (`.pth`, canonical names, no metadata).

Tensors are stored under canonical names (see methods.py), fp32. PiSSA is stored as a plain LoRA
delta against the *original* base: rank 2r, lora_A = [A; A0], lora_B = [B, -B0], alpha 2*alpha,
so that (2 alpha / 2r) [B, -B0] [A; A0] = (alpha / r)(B A - B0 A0) and merging needs only the base.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from ..errors import UserError
from ..model import DTYPES, RWKV7, RWKV7Config, atomic_write_all, read_state_dict
from ..run_dir import ADAPTER_FILE, CHECKPOINT_NAME, LOG_FILE, META_FILE, RECIPE_FILE, STATE_FILE
from .config import TARGETS, MethodConfig, part_of
from .methods import AdaptedRWKV7, attach, base_fingerprint, check_attachable, quantized_names, trainable_parameters
from .tensor_checks import check_adapter_tensors

FORMAT, VERSION = "rwkv-peft-adapter", 1
SHARED = ("vera_A", "vera_B")  # VeRA's frozen projections, one copy per adapter (not per layer)
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class AdapterFile:
    """An adapter read from disk. tensors: canonical name -> fp32 tensor (PiSSA as rank-2r delta)."""

    method: MethodConfig
    tensors: dict[str, torch.Tensor]
    source: str
    fingerprint: str | None = None  # base model fingerprint (None for RWKV-PEFT files)
    base_path: str | None = None
    base_dtype: str = "fp32"  # dtype the base was held in while training (PiSSA residual rounding)

    @property
    def lora_scale(self) -> float:
        """Scale of B @ A in the stored delta (alpha / r, alpha / sqrt(r) with rsLoRA; a residual start's
        rank-2r delta keeps the same scale)."""
        return self.method.lora_scale

    def pissa_start(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A0 [r, in], B0 [out, r])} recovered from the rank-2r delta of a residual start (PiSSA,
        OLoRA, LoftQ)."""
        r = self.method.r
        return {
            k[: -len(".lora_A")]: (a[r:], -self.tensors[k[:-1] + "B"][:, r:])
            for k, a in self.tensors.items()
            if k.endswith(".lora_A")
        }


def adapter_tensors(adapted: AdaptedRWKV7) -> dict[str, torch.Tensor]:
    """Everything trained, under canonical names, fp32 on CPU (PiSSA converted to its delta form)."""
    out = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in trainable_parameters(adapted)}
    for name, (a0, b0) in adapted.pissa_init.items():
        out[f"{name}.lora_A"] = torch.cat([out[f"{name}.lora_A"], a0.cpu()], dim=0).contiguous()
        out[f"{name}.lora_B"] = torch.cat([out[f"{name}.lora_B"], -b0.cpu()], dim=1).contiguous()
    out.update(shared_tensors(adapted))
    return out


def shared_tensors(adapted: AdaptedRWKV7) -> dict[str, torch.Tensor]:
    """Frozen tensors an adapter needs beside its trained ones: VeRA's shared random projections."""
    tuner = adapted.tuner
    if tuner is None or not hasattr(tuner, "vera_A"):
        return {}
    return {k: getattr(tuner, k)["default"].detach().to("cpu", torch.float32).contiguous() for k in SHARED}


def save_adapter(adapted: AdaptedRWKV7, run_dir: str | os.PathLike, base_path: str | None = None) -> None:
    """Write adapter.safetensors, state.pth (state tuning) and adapter.json into run_dir, as one save: each file
    written in full before the first replaces its old copy (model.io.atomic_write_all)."""
    if not isinstance(adapted, AdaptedRWKV7):
        raise TypeError(f"save_adapter: expected an adapted model (what attach or load_adapter returns), got "
                        f"{type(adapted).__name__}; a plain RWKV7 is saved with save_model")
    d = Path(run_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file there, no permission
        raise UserError(f"{d}: cannot write an adapter folder here ({e.strerror or e}); choose another path") from None
    cfg = adapted.method
    tensors = adapter_tensors(adapted)
    blob = safetensors.torch.save(tensors)
    files = [(d / ADAPTER_FILE, lambda f: f.write(blob))]
    if cfg.trains_state:
        states = {k: t for k, t in tensors.items() if k.endswith(".att.time_state")}
        files.append((d / STATE_FILE, lambda f: torch.save(states, f)))
    pissa = cfg.residual_init is not None
    rank = cfg.r * (2 if pissa else 1)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "method": cfg.to_dict(),
        "targets": cfg.effective_targets(),
        # What a LoRA merge needs: delta = (alpha / rank) * lora_B @ lora_A (DoRA is not such a delta).
        "lora": {"rank": rank, "alpha": cfg.lora_scale * rank}
        if cfg.kind in ("lora", "pissa") and not cfg.use_dora
        else None,
        "base": {
            "fingerprint": adapted.base_fingerprint,
            "path": None if base_path is None else str(base_path),
            "dtype": _DTYPE_NAMES.get(adapted.base_dtype, "fp32"),
            "config": adapted.config.to_dict(),
        },
        "trainable_parameters": sum(p.numel() for _, p in trainable_parameters(adapted)),
        "quantized_bytes": {"float": adapted.quant_bytes[0], "quantized": adapted.quant_bytes[1]},
    }
    if cfg.kind == "adalora":  # the ranks AdaLoRA's allocator left: nonzero singular values lora_E per matrix
        meta["ranks"] = {k.removesuffix(".lora_E"): int(t.count_nonzero()) for k, t in tensors.items()
                         if k.endswith(".lora_E")}
    text = (json.dumps(meta, indent=2) + "\n").encode()
    # one save's files together: a write that fails replaces none of them (model.io.atomic_write_all)
    atomic_write_all([*files, (d / META_FILE, lambda f: f.write(text))])
    if not cfg.trains_state:
        (d / STATE_FILE).unlink(missing_ok=True)  # never leave another method's state beside this one


def _read_run_dir(d: Path, lora_alpha: float | None) -> AdapterFile:
    meta_path, tensor_path = d / META_FILE, d / ADAPTER_FILE
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise UserError(f"{d}: not an adapter run directory, {p.name} is missing")
    if lora_alpha is not None:
        raise UserError(f"{d}: --lora-alpha is for RWKV-PEFT files; a run directory stores its alpha")
    try:
        meta = json.loads(meta_path.read_text())
    except UnicodeDecodeError as e:
        raise UserError(f"{meta_path}: not UTF-8 text (byte {e.start}), expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{meta_path}: expected format {FORMAT} version {VERSION}")
    if not isinstance(meta.get("method"), dict):
        raise UserError(f"{meta_path}: has no method section")
    method = MethodConfig.from_dict(meta["method"], where=f"{meta_path}: method")
    try:
        tensors = safetensors.torch.load_file(str(tensor_path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{tensor_path}: cannot read ({e})") from e
    fingerprint, base_path, base_dtype, cfg = _base_section(meta.get("base"), meta_path)
    check_adapter_tensors(tensors, method, str(tensor_path), cfg)
    tensors = {k: t.float() for k, t in tensors.items()}  # fp32, as written (an fp16 copy made elsewhere reads too)
    return AdapterFile(method, tensors, str(d), fingerprint, base_path, base_dtype)


def _base_section(base, meta_path: Path) -> tuple[str | None, str | None, str, RWKV7Config | None]:
    """adapter.json's base: (fingerprint, path, the dtype training held it in, its shape), each checked."""
    if base is None:
        return None, None, "fp32", None
    if not isinstance(base, dict):
        raise UserError(f"{meta_path}: base is {type(base).__name__}, expected an object (fingerprint, path, dtype)")
    for key in ("fingerprint", "path"):
        if base.get(key) is not None and not isinstance(base[key], str):
            raise UserError(f"{meta_path}: base.{key} is {base[key]!r}, expected a string")
    dtype = base.get("dtype", "fp32")
    if dtype not in _DTYPE_NAMES.values():
        raise UserError(f"{meta_path}: base.dtype is {dtype!r}, expected one of {', '.join(_DTYPE_NAMES.values())}")
    cfg = base.get("config")
    if cfg is not None:
        try:
            cfg = RWKV7Config(**cfg)
        except TypeError:
            raise UserError(f"{meta_path}: base.config is not a model shape (n_layer, n_embd, ...)") from None
    return base.get("fingerprint"), base.get("path"), dtype, cfg


def _read_rwkv_peft(path: Path, lora_alpha: float | None) -> AdapterFile:
    """Infer the method from an RWKV-PEFT checkpoint's key names and shapes."""
    sd = {k: t.float() for k, t in read_state_dict(path).items()}
    targets, kinds, ranks, parts = set(), set(), set(), set()
    state = False
    for k, t in sd.items():
        mod, _, leaf = k.rpartition(".")
        if leaf in ("lora_A", "lora_B", "disha"):
            proj = mod.split(".", 2)[-1] if mod.startswith("blocks.") else mod
            if proj not in TARGETS:
                raise UserError(f"{path}: {k} adapts {proj}, expected one of {', '.join(TARGETS)}")
            targets.add(proj)
            if leaf == "lora_A":
                kinds.add("lora")
                ranks.add(t.shape[0])
            elif leaf == "disha":
                kinds.add("bone" if t.dim() == 2 else "bat")
                ranks.add(t.shape[0] if t.dim() == 2 else t.shape[-1])
        elif k.endswith(".att.time_state"):
            state = True
        elif (part := part_of(k)) is not None:
            parts.add(part)
        else:
            raise UserError(f"{path}: unexpected key {k} for an RWKV-PEFT adapter checkpoint")
    if len(kinds) > 1 or len(ranks) > 1:
        raise UserError(f"{path}: mixes adapter kinds/ranks ({', '.join(sorted(kinds))}; r {sorted(ranks)})")
    kind = next(iter(kinds), None)
    if kind is None and not state:
        raise UserError(f"{path}: no lora_A/lora_B, disha or time_state keys: not an RWKV-PEFT adapter")
    if kind == "lora" and lora_alpha is None:
        raise UserError(f"{path}: RWKV-PEFT does not store the LoRA alpha; pass --lora-alpha (lora_alpha)")
    fields = {"train_parts": sorted(parts), "r": next(iter(ranks), 16)}
    if kind == "lora":
        fields.update(kind="lora", alpha=float(lora_alpha), state=state)
    elif kind in ("bone", "bat"):
        fields.update(kind="disha", disha_mode=kind, state=state)
    else:
        fields.update(kind="state")
    if targets:
        fields["target_modules"] = [p for p in TARGETS if p in targets]
    method = MethodConfig.from_dict(fields, where=f"{path}: inferred method")
    check_adapter_tensors(sd, method, str(path))
    return AdapterFile(method, sd, str(path))


def read_adapter(path: str | os.PathLike, lora_alpha: float | None = None) -> AdapterFile:
    """A run directory (or its adapter.safetensors/adapter.json) or an RWKV-PEFT `.pth`."""
    p = Path(path)
    if p.is_dir():
        return _read_run_dir(p, lora_alpha)
    if p.name in (ADAPTER_FILE, META_FILE):
        return _read_run_dir(p.parent, lora_alpha)
    if not p.exists():
        raise UserError(f"{p}: no such adapter (expected a run directory or an RWKV-PEFT .pth)")
    if p.parent.name == "checkpoints" and CHECKPOINT_NAME.match(p.name):
        raise UserError(f"{p}: a training checkpoint (for --resume), not an adapter; give the run directory "
                        f"{p.parent.parent}: its adapter is the one of its newest checkpoint")
    return _read_rwkv_peft(p, lora_alpha)


# What a run directory holds of its own: an output written over one of these would break the run
RUN_OWN = (ADAPTER_FILE, META_FILE, STATE_FILE, RECIPE_FILE, LOG_FILE, "checkpoints", "console.log")


def check_output(out: str | os.PathLike, **inputs: str | os.PathLike | None) -> None:
    """UserError (one line, before anything is read or written) where writing `out` would replace an input: a model
    or adapter file given as `inputs` (flag name -> path), a run directory, or one of the run's own files."""
    target = Path(out).resolve()
    for flag, src in inputs.items():
        if src is None:
            continue
        p = Path(src).resolve()
        if target == p or p in target.parents and p.is_dir() and target.relative_to(p).parts[0] in RUN_OWN:
            what = f"--{flag} {src}" if target == p else f"the run {src}'s own {target.relative_to(p).parts[0]}"
            raise UserError(f"{out}: would write over {what}; write the output elsewhere (nothing was written)")


def check_base(af: AdapterFile, fingerprint: str, base_name: str) -> None:
    """UserError (one line, naming both) if the adapter was trained on another base model."""
    if af.fingerprint is not None and af.fingerprint != fingerprint:
        trained = f" ({af.base_path})" if af.base_path else ""
        raise UserError(
            f"{af.source}: adapter was trained on base {af.fingerprint}{trained}, "
            f"but {base_name} is {fingerprint}; use the base model it was trained on"
        )


def load_adapter(model: RWKV7, run_dir_or_file: str | os.PathLike | AdapterFile, lora_alpha: float | None = None,
                 device: torch.device | str | None = None) -> AdaptedRWKV7:
    """Attach a saved adapter (a path, or an AdapterFile read_adapter returned) to a freshly loaded base `model`
    (modified in place); returns it adapted. `device`: as attach's (where a CPU-loaded base goes, a quantized
    one quantized layer by layer onto it: adapters.quant.staging_device).

    The adapted model computes what was trained: for PiSSA the saved SVD start is reused (no new
    SVD), and a quantized base is quantized again exactly as in training.
    """
    check_attachable(model, "load_adapter")
    af = run_dir_or_file if isinstance(run_dir_or_file, AdapterFile) else read_adapter(run_dir_or_file, lora_alpha)
    check_base(af, base_fingerprint(model.state_dict()), "this model")
    pissa = af.method.residual_init is not None
    train_dtype = DTYPES[af.base_dtype]
    if model.emb.weight.dtype == torch.float32 and train_dtype != torch.float32:
        # a base quantized in training from its bf16 copy (train.precision bf16): quantize the same bf16 weights
        # (and round a PiSSA residual to bf16 as training did), as merge does, not the finer fp32 ones
        for name in quantized_names(model, af.method):
            linear = model.get_submodule(name)
            linear.weight.data = linear.weight.data.to(train_dtype)
    adapted = attach(model, af.method, af.pissa_start() if pissa else None, batches=(), device=device)
    used = set()
    if adapted.tuner is not None and hasattr(adapted.tuner, "vera_A"):
        with torch.no_grad():
            for k in SHARED:
                if k not in af.tensors:
                    raise UserError(f"{af.source}: VeRA adapter has no {k} (its shared projection)")
                getattr(adapted.tuner, k)["default"].copy_(af.tensors[k])
                used.add(k)
    with torch.no_grad():
        for name, p in trainable_parameters(adapted):
            src = af.tensors.get(name)
            if src is None:
                raise UserError(f"{af.source}: adapter has no tensor {name}")
            if pissa and name.endswith(".lora_A"):
                src = src[: af.method.r]
            elif pissa and name.endswith(".lora_B"):
                src = src[:, : af.method.r]
            if tuple(src.shape) != tuple(p.shape):
                raise UserError(f"{af.source}: {name} is {list(src.shape)}, this model needs {list(p.shape)}")
            p.copy_(src)
            used.add(name)
    unused = sorted(set(af.tensors) - used)
    if unused:
        raise UserError(f"{af.source}: tensors this method does not use: {', '.join(unused[:4])}")
    return adapted
