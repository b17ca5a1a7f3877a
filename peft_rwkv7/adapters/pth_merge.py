"""Fold an adapter into an official RWKV-7 .pth, and export it in RWKV-PEFT's layout.

Merging works on state dicts (no model is built): every changed weight is computed in fp32 as

    lora/pissa:  W' = Wq + (alpha / rank) * B @ A
    bone:        W' = Wq + D^T tiled over the input blocks
    bat:         W'_ab = Wq_ab + Wq_ab @ D_b + D_b

where Wq is the base weight, or for a quantized base the dequantized weight training multiplied
by (for PiSSA the quantized residual, plus the saved start: what was trained). Parameters
trained in full replace their base tensors; a trained initial state becomes
`blocks.N.att.time_state` (fp32), which `load_model` and RWKV-Runner understand.
"""

from __future__ import annotations

import os

import torch

from ..errors import UserError
from ..model import DTYPES, atomic_save, infer_config, read_state_dict
from .config import PEFT_TUNERS, PROJECTIONS
from .disha import bat_delta, bone_delta
from .files import SHARED, AdapterFile, check_base, check_output, read_adapter
from .kinds import capability, capability_key
from .methods import base_fingerprint
from .peft_merge import adapter_module, merged_peft_weight
from .quant import roundtrip
from .tensor_checks import check_adapter_tensors

# Who reads a merged `att.time_state`: rwkv-peft itself (as the default initial state), not the `rwkv`
# pip package, which reads it for RWKV-5/6 only and starts RWKV-7 from zeros.
STATE_NOTE = (
    "; the tuned state is in the file as blocks.N.att.time_state: rwkv-peft (generate, eval, load_model) "
    "starts from it, but the rwkv pip package ignores it for RWKV-7 - pass the run's state.pth as its state "
    "(state[3*i+1] = time_state of layer i); RWKV-Runner and Ai00 load state.pth as a state file"
)


def _is_quantized(af: AdapterFile, proj: str) -> bool:
    m = af.method
    return m.quant != "none" and proj != "head" and not (proj.startswith("ffn.") and "ffn" in m.train_parts)


@torch.no_grad()
def merged_weight(af: AdapterFile, module: str, base: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in] of projection `module` (e.g. "blocks.3.att.key") after merging."""
    m, t = af.method, af.tensors
    proj = module.split(".", 2)[-1]
    train_dtype = DTYPES[af.base_dtype]
    w = base.float()
    a, b = t.get(f"{module}.lora_A"), t.get(f"{module}.lora_B")
    if m.residual_init and _is_quantized(af, proj) and a is not None:
        # Training multiplied by deq(Q(W - s B0 A0)) + s B A: rebuild exactly that residual.
        r, s = m.r, af.lora_scale
        a0, b0 = a[r:], -b[:, r:]
        residual = (w.to(train_dtype).float() - (s * b0) @ a0).to(train_dtype)
        return roundtrip(residual, m.quant) + s * (b[:, :r] @ a[:r])
    if _is_quantized(af, proj):
        w = roundtrip(w.to(train_dtype), m.quant)  # the base as training held it, then quantized
    if m.kind in PEFT_TUNERS or m.use_dora:  # peft's own merge formula (peft_merge)
        prefix = module + "."
        leaves = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
        if not leaves:
            return w
        return merged_peft_weight(m, proj, w, leaves, {k: t[k] for k in SHARED if k in t})
    if a is not None:
        w = w + af.lora_scale * (b @ a)
    d = t.get(f"{module}.disha")
    if d is not None:
        w = w + (bone_delta(d, w.shape[1]) if d.dim() == 2 else bat_delta(w, d))
    return w


def merged_state_dict(base_sd: dict[str, torch.Tensor], af: AdapterFile, source: str = "base") -> tuple[dict, int]:
    """(state dict with fp32 merged tensors and untouched base tensors, number of tensors changed). The base, read
    from `source` (the name its errors give), is checked first: an RWKV-7 checkpoint, the one the adapter was trained
    on; the adapter's tensors against its shapes; the merged tensors finite."""
    cfg = infer_config(base_sd, source)
    check_base(af, base_fingerprint(base_sd), source)
    check_adapter_tensors(af.tensors, af.method, af.source, cfg)
    out = dict(base_sd)
    changed = 0
    adapted = {adapter_module(k) for k in af.tensors} - {None}
    modules = [(f"blocks.{i}.{proj}", proj) for i in range(cfg.n_layer) for proj in PROJECTIONS] + [("head", "head")]
    for module, proj in modules:
        if module in adapted or _is_quantized(af, proj):
            out[f"{module}.weight"] = merged_weight(af, module, base_sd[f"{module}.weight"])
            changed += 1
    for k, t in af.tensors.items():
        if adapter_module(k) is not None or k in SHARED:
            continue
        if not k.endswith(".att.time_state"):
            if k not in base_sd:
                raise UserError(f"{af.source}: {k} is not a tensor of the base model")
            if tuple(t.shape) != tuple(base_sd[k].shape):
                raise UserError(f"{af.source}: {k} is {list(t.shape)}, the base has {list(base_sd[k].shape)}")
        out[k] = t.float()
        changed += 1
    infer_config(out, f"{af.source} merged")  # shapes of every merged tensor (time_state included)
    for k, t in out.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{af.source}: merging gives non-finite values in {k}; the adapter is broken")
    return out, changed


def _describe(af: AdapterFile) -> str:
    m = af.method
    parts = []
    if m.adapter_kind is not None:
        name = capability_key(m) if m.kind == "lora" else m.adapter_kind
        has_alpha = m.kind in ("lora", "pissa", "loha", "lokr", "adalora")
        parts.append(f"{name} r={m.r}" + (f" alpha={m.alpha:g}" if has_alpha else "") if m.kind != "ia3" else name)
    if m.trains_state:
        parts.append("state")
    if m.kind == "full":
        parts.append("full")
    if m.train_parts:
        parts.append("train_parts=" + ",".join(m.train_parts))
    return " + ".join(parts)


def merge_into_pth(
    base_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: str = "bf16",
    lora_alpha: float | None = None,
) -> str:
    """Write base + adapter as an official .pth in `dtype` (bf16|fp16|fp32); returns a summary line.

    fp32 reproduces base+adapter logits to float rounding; bf16 rounds every weight to 8 bits of
    mantissa (relative error <= 2^-9 per weight). time_state is always fp32.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    check_output(out_path, base=base_path, adapter=adapter_path)
    af = read_adapter(adapter_path, lora_alpha)
    base_sd = read_state_dict(base_path)
    merged, changed = merged_state_dict(base_sd, af, str(base_path))
    out_dtype = DTYPES[dtype]
    atomic_save(
        {
            k: t.float().contiguous() if k.endswith(".att.time_state") else t.to(out_dtype).contiguous()
            for k, t in merged.items()
        },
        out_path,
    )
    line = f"merged {_describe(af)} into {out_path} ({dtype}, {changed} tensors changed)"
    if af.method.trains_state:
        line += STATE_NOTE
    if af.method.quant != "none":
        line += (
            f"; base was {af.method.quant}-quantized in training, so the merged weights are the"
            " dequantized base + delta (what was trained)"
        )
    return line


def export_rwkv_peft(run_dir: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """Write a run directory's adapter in RWKV-PEFT's checkpoint layout (fp32 .pth); returns a summary.

    RWKV-PEFT stores no alpha: merge the file with lora_alpha = the alpha printed here (for PiSSA,
    saved as a rank-2r delta, that is 2 * alpha).
    """
    check_output(out_path, adapter=run_dir)
    af = read_adapter(run_dir)
    if af.fingerprint is None:
        raise UserError(f"{run_dir}: already an RWKV-PEFT file; export reads a run directory")
    if "head" in af.method.effective_targets():
        raise UserError(f"{run_dir}: RWKV-PEFT adapts no head; merge it into the base instead "
                        f"(rwkv-peft merge --base BASE --adapter {run_dir} --out MERGED.pth)")
    if not capability(af.method).rwkv_peft:
        raise UserError(f"{run_dir}: RWKV-PEFT has no {capability(af.method).name}; merge it into the base instead "
                        f"(rwkv-peft merge --base BASE --adapter {run_dir} --out MERGED.pth)")
    atomic_save({k: t.contiguous() for k, t in af.tensors.items()}, out_path)
    line = f"exported {_describe(af)} ({len(af.tensors)} tensors) to {out_path}"
    m = af.method
    if m.kind in ("lora", "pissa"):
        rank = m.r * (2 if m.residual_init else 1)
        line += f"; merge it with --lora-alpha {m.lora_scale * rank:g}"
    if m.quant != "none":
        line += f"; it was trained on a {m.quant}-quantized base, which this file does not record"
    return line
