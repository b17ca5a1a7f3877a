"""An adapter file's tensors against what its method makes, before anything is merged or exported.

`merge` and `export` work on state dicts and build no model, so nothing else would notice a tensor that the method
does not make: a LoRA pair with one half missing, a factor of another rank than adapter.json's `r` (its scale
alpha / r would be wrong), a module past the model's layers, a time_state of another shape. Loading an adapter onto
a model (`load_adapter`) checks the same through the model's own parameters; these checks need only the shapes.
"""

from __future__ import annotations

import re

import torch

from ..errors import UserError
from ..model.config import RWKV7Config, expected_shapes
from .config import MethodConfig
from .peft_merge import adapter_module

_STATE_KEY = re.compile(r"blocks\.(\d+)\.att\.time_state")


def _projection(module: str) -> str:
    return module.split(".", 2)[-1] if module.startswith("blocks.") else module


def check_adapter_tensors(tensors: dict[str, torch.Tensor], method: MethodConfig, source: str,
                          cfg: RWKV7Config | None = None) -> None:
    """UserError, one line naming `source` and the tensor, where `tensors` are not what `method` makes: a module
    the method does not adapt (or the model does not have), a LoRA pair incomplete, not 2-D or of another rank
    than the method's r (2r for a residual start: PiSSA, OLoRA, LoftQ), a DiSHA update of another shape, a
    time_state without state tuning. With `cfg` (the base's shape) every factor's outer size and each time_state's
    [H, N, N] are checked too. Every tensor must be floating point."""
    shapes = expected_shapes(cfg) if cfg is not None else None
    targets = set(method.effective_targets())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise UserError(f"{source}: {k} has dtype {kind}, expected a floating-point tensor")
        module = adapter_module(k)
        if module is None:
            if (m := _STATE_KEY.fullmatch(k)) is not None:
                _check_state(k, t, int(m[1]), method, source, cfg)
            continue
        proj = _projection(module)
        if shapes is not None and f"{module}.weight" not in shapes:
            raise UserError(f"{source}: {k} adapts {module}, which a model of {cfg.n_layer} layers does not have")
        if proj not in targets:
            what = f"{method.kind} adapting {', '.join(method.effective_targets())}" if targets else method.kind
            raise UserError(f"{source}: {k} adapts {proj}, which this adapter's method ({what}) does not")
        pairs.setdefault(module, {})[k[len(module) + 1:]] = t
    for module, leaves in pairs.items():
        out_in = shapes[f"{module}.weight"] if shapes is not None else None
        if method.kind in ("lora", "pissa"):
            _check_lora(module, leaves, method, source, out_in)
        elif method.kind == "disha":
            _check_disha(module, leaves, method, source, out_in)


def _check_lora(module: str, leaves: dict[str, torch.Tensor], method: MethodConfig, source: str,
                out_in: tuple[int, ...] | None) -> None:
    for leaf in ("lora_A", "lora_B"):
        if leaf not in leaves:
            raise UserError(f"{source}: adapter has no tensor {module}.{leaf}")
    a, b = leaves["lora_A"], leaves["lora_B"]
    rank = method.r * (2 if method.residual_init else 1)
    start = f" (r {method.r}, stored as rank {rank}: the trained factors and the start)" if method.residual_init else ""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise UserError(f"{source}: {module}.lora_A is {list(a.shape)} and lora_B {list(b.shape)}, expected "
                        f"[{rank}, in] and [out, {rank}] for rank {rank}{start}")
    if out_in is not None and (b.shape[0], a.shape[1]) != tuple(out_in):
        raise UserError(f"{source}: {module}.lora_B @ lora_A is [{b.shape[0]}, {a.shape[1]}], the base's "
                        f"{module}.weight is {list(out_in)}")


def _check_disha(module: str, leaves: dict[str, torch.Tensor], method: MethodConfig, source: str,
                 out_in: tuple[int, ...] | None) -> None:
    if set(leaves) != {"disha"}:
        raise UserError(f"{source}: {module} holds {', '.join(sorted(leaves))}, a DiSHA adapter only .disha")
    d, r = leaves["disha"], method.r
    if method.disha_mode == "bone":
        want = [r, out_in[0]] if out_in is not None else None
        ok = d.dim() == 2 and d.shape[0] == r and (want is None or list(d.shape) == want)
        expected = str(want) if want is not None else f"[{r}, out]"
    else:  # bat: D [in / r, r, r]
        want = [out_in[1] // r, r, r] if out_in is not None else None
        ok = d.dim() == 3 and tuple(d.shape[1:]) == (r, r) and (want is None or list(d.shape) == want)
        expected = str(want) if want is not None else f"[in / {r}, {r}, {r}]"
    if not ok:
        raise UserError(f"{source}: {module}.disha is {list(d.shape)}, expected {expected} ({method.disha_mode}, "
                        f"r {r})")


def _check_state(k: str, t: torch.Tensor, layer: int, method: MethodConfig, source: str,
                 cfg: RWKV7Config | None) -> None:
    if not method.trains_state:
        raise UserError(f"{source}: {k} is a trained state, which this adapter's method ({method.kind}) does not "
                        f"train")
    if cfg is None:
        if t.dim() != 3 or t.shape[1] != t.shape[2]:
            raise UserError(f"{source}: {k} is {list(t.shape)}, expected [heads, head_size, head_size]")
        return
    if layer >= cfg.n_layer:
        raise UserError(f"{source}: {k} is for layer {layer}, the model has {cfg.n_layer} layers")
    want = [cfg.n_head, cfg.head_size, cfg.head_size]
    if list(t.shape) != want:
        raise UserError(f"{source}: {k} is {list(t.shape)}, expected {want}")
