"""An attached method in memory: switch it off for a while, take it off, or fold it into a plain RWKV7.

- `disable_adapter(adapted)`: a context in which the model computes what the base computes: LoRA,
  DiSHA off, PiSSA back at its SVD start (residual + start = the original weight), state tuning back
  to the base's default initial state. Trained values are untouched and training resumes after it.
- `detach(adapted)`: the base RWKV7 again, adapters removed (the model is modified in place).
- `merge(adapted)`: a new plain RWKV7 whose weights hold base + adapter, computed by the same
  formulas as the file merge (`merge_into_pth`); the adapted model is left as it was.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import UserError
from ..model import DTYPES, RWKV7, model_from_state_dict
from ..model.rwkv7 import Linear
from .config import PEFT_TUNERS, PROJECTIONS
from .disha import BatLinear, bat_delta, bone_delta
from .files import shared_tensors
from .methods import ATTACHED, AdaptedRWKV7, canonical_name, is_adapter_leaf
from .peft_merge import merged_peft_weight
from .quant import dequantized_weight

_DISABLED = "_adapter_disabled"  # in an AdaptedRWKV7's __dict__ while disable_adapter holds it off


def _is_tuner(layer: nn.Module) -> bool:
    """isinstance(layer, peft's BaseTunerLayer), without importing peft (~5 s with transformers) where nothing
    has: no layer can be one then (state tuning, DiSHA's Bat)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return tuners is not None and isinstance(layer, tuners.BaseTunerLayer)


def _projections(model: RWKV7) -> Iterator[tuple[str, nn.Module]]:
    for i in range(model.config.n_layer):
        for proj in PROJECTIONS:
            name = f"blocks.{i}.{proj}"
            yield name, model.get_submodule(name)
    yield "head", model.head


def _base_of(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if _is_tuner(layer) else getattr(layer, "base_layer", layer)


def _require_adapted(adapted, fn: str) -> None:
    """TypeError for what is no adapted model; UserError for one whose method detach took off already."""
    if not isinstance(adapted, AdaptedRWKV7):
        raise TypeError(f"{fn}: expected an adapted model (what attach or load_adapter returns), got "
                        f"{type(adapted).__name__}")
    if adapted.detached:
        raise UserError(f"{fn}: the method was detached from this model already (detach gave back the base RWKV7); "
                        "attach or load_adapter again")


def _full_parts(adapted: AdaptedRWKV7) -> bool:
    return adapted.method.kind == "full" or bool(adapted.method.train_parts)


@torch.no_grad()
def merged_projection(adapted: AdaptedRWKV7, name: str) -> torch.Tensor:
    """The fp32 weight [out, in] that projection `name` multiplies by, adapter included."""
    layer = adapted.model.get_submodule(name)
    w = dequantized_weight(_base_of(layer))
    m = adapted.method
    if _is_tuner(layer) and (m.kind in PEFT_TUNERS or m.use_dora):
        leaves = {canonical_name(n): p for n, p in layer.named_parameters() if is_adapter_leaf(n)}
        return merged_peft_weight(m, name.split(".", 2)[-1], w, leaves, shared_tensors(adapted))
    if _is_tuner(layer) and hasattr(layer, "lora_A"):
        a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
        w = w + layer.scaling["default"] * (b @ a)  # alpha / r, or alpha / sqrt(r) (rsLoRA)
    elif _is_tuner(layer) and hasattr(layer, "miss_block"):
        w = w + bone_delta(layer.miss_block["default"].float(), w.shape[1])
    elif isinstance(layer, BatLinear):
        w = w + bat_delta(w, layer.disha.float())
    return w


@torch.no_grad()
def merge(adapted: AdaptedRWKV7, dtype: torch.dtype = torch.float32) -> RWKV7:
    """A new RWKV7 (on the adapted model's device, in `dtype`) computing what `adapted` computes.

    Projections: base (dequantized for a quantized base; the residual for PiSSA) + adapter delta;
    parameters trained in full: their trained values; a trained state: `att.time_state`. dtype: a torch float
    dtype or its name (bf16, fp16, fp32)."""
    _require_adapted(adapted, "merge")
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"merge: dtype must be a float dtype (torch.float32, torch.bfloat16, ...) or one of "
                         f"{', '.join(DTYPES)}, got {dtype!r}")
    model = adapted.model
    projections = {f"{n}.weight": merged_projection(adapted, n) for n, _ in _projections(model)}
    sd = {}
    for name, t in model.state_dict().items():
        key = canonical_name(name)
        if any(key.startswith(p[: -len(".weight")] + ".") for p in projections):
            continue  # a projection's own pieces (base layer, adapter, quantization state)
        sd[key] = t
    sd.update(projections)
    for i, blk in enumerate(model.blocks):
        ts = getattr(blk.att, "time_state", None)
        if ts is not None:
            sd[f"blocks.{i}.att.time_state"] = ts.detach().float()
    device = model.emb.weight.device
    return model_from_state_dict({k: v.to(device) for k, v in sd.items()}, dtype=dtype, device=device,
                                 source="merged model", wkv_backend=model.blocks[0].att.wkv_backend)


@contextlib.contextmanager
def disable_adapter(adapted: AdaptedRWKV7) -> Iterator[AdaptedRWKV7]:
    """Within the context `adapted` computes the base model's outputs (see the module docstring).

    Parameters trained in full (kind full, train_parts) have no "off": keep a frozen copy instead. Nested
    contexts are one: the adapter comes back when the outermost ends."""
    _require_adapted(adapted, "disable_adapter")
    if adapted.__dict__.get(_DISABLED):  # already off: an inner context must not switch it back on at its end
        yield adapted
        return
    if _full_parts(adapted):
        raise ValueError("disable_adapter: parameters trained in full (kind full / train_parts) cannot be "
                         "switched off; keep a frozen copy of the base for them")
    model = adapted.model
    grads = {p: p.requires_grad for p in model.parameters()}
    tuner_layers = [m for m in model.modules() if _is_tuner(m)]
    bats = [m for m in model.modules() if isinstance(m, BatLinear)]
    pissa_swaps = []
    dropouts = []  # (the dropout of a residual start's adapter, its training flag)
    states = []
    adapted.__dict__[_DISABLED] = True
    try:
        if adapted.pissa_init:  # off = at the start, where residual + (alpha/r) B0 A0 is the base weight
            for name, (a0, b0) in adapted.pissa_init.items():
                layer = model.get_submodule(name)
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                pissa_swaps.append((a, b, a.data, b.data))
                a.data, b.data = a0.to(a.device), b0.to(b.device)
                # the start's term runs through the adapter: no dropout on it, or "off" is the base plus noise
                drop = layer.lora_dropout["default"]
                dropouts.append((drop, drop.training))
                drop.eval()
        else:
            for layer in tuner_layers:
                layer.enable_adapters(False)
        for bat in bats:
            bat.enabled = False
        if adapted.method.trains_state:
            for blk, base_state in zip(model.blocks, adapted.base_time_states):
                param = blk.att._parameters.pop("time_state")
                states.append((blk.att, param))
                if base_state is not None:
                    blk.att.register_buffer("time_state", base_state, persistent=False)
        yield adapted
    finally:
        adapted.__dict__.pop(_DISABLED, None)
        for a, b, a_data, b_data in pissa_swaps:
            a.data, b.data = a_data, b_data
        for drop, training in dropouts:
            drop.train(training)
        if not adapted.pissa_init:
            for layer in tuner_layers:
                layer.enable_adapters(True)
        for bat in bats:
            bat.enabled = True
        for att, param in states:
            att._buffers.pop("time_state", None)
            att.time_state = param
        for p, flag in grads.items():  # peft's enable_adapters also flips requires_grad
            p.requires_grad_(flag)


@torch.no_grad()
def detach(adapted: AdaptedRWKV7) -> RWKV7:
    """Take the method off: the base RWKV7 (the same module object, modified in place) as it was before
    attach, except that a quantized base comes back dequantized (4/8-bit rounding cannot be undone)
    and parameters trained in full keep their trained values. PiSSA's residual gets its start back."""
    _require_adapted(adapted, "detach")
    model = adapted.model
    for name, layer in list(_projections(model)):
        base = _base_of(layer)
        w = dequantized_weight(base)
        if name in adapted.pissa_init:
            a0, b0 = adapted.pissa_init[name]
            w = w + adapted.method.lora_scale * (b0.to(w.device) @ a0.to(w.device))
        if base is layer and isinstance(layer, nn.Linear) and name not in adapted.pissa_init:
            continue  # untouched
        plain = Linear(w.shape[1], w.shape[0]).to(w.device, adapted.base_dtype)
        plain.weight.copy_(w)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "peft_config"):  # peft's: a later attach starts afresh
        model.__dict__.pop(attr, None)
    if adapted.method.trains_state:
        for blk, base_state in zip(model.blocks, adapted.base_time_states):
            del blk.att.time_state
            if base_state is not None:
                blk.att.register_buffer("time_state", base_state)
    model.requires_grad_(True)
    model.__dict__.pop(ATTACHED, None)
    adapted.detached = True
    return model
