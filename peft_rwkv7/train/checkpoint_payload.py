"""What a one-process training checkpoint holds, checked after it is loaded: a file that holds anything else (written
by another tool, edited, from an older layout) counts as unreadable, so a resume passes it over with a warning
instead of failing inside `restore` (train/checkpoint.py)."""

from __future__ import annotations

import torch


def payload_problem(payload, step: int) -> str | None:
    """Where a loaded one-process checkpoint differs from what save_checkpoint writes, in a few words (None: it does
    not), so that a file holding something else counts as unreadable instead of failing inside restore."""
    def kind(value) -> str:
        return type(value).__name__

    if not isinstance(payload, dict):
        return f"not a dict (a {kind(payload)})"
    for key in ("step", "params", "optimizer", "rng"):
        if key not in payload:
            return f'no "{key}"'
    saved, params, opt, rng = (payload[key] for key in ("step", "params", "optimizer", "rng"))
    if isinstance(saved, bool) or not isinstance(saved, int):
        return f'"step" is a {kind(saved)}, not an int'
    if saved != step:
        return f'"step" is {saved}, the file name says {step}'
    if not isinstance(params, dict):
        return f'"params" is a {kind(params)}, not a dict'
    for name, tensor in params.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            return f'"params" {name!r} is a {kind(tensor)}, not a tensor' if isinstance(name, str) else \
                f'"params" has a name that is a {kind(name)}, not a str'
    if not isinstance(opt, dict):
        return f'"optimizer" is a {kind(opt)}, not a dict'
    groups = opt.get("param_groups")
    if not isinstance(opt.get("state"), dict) or not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        return '"optimizer" lacks an optimizer\'s "state" and "param_groups"'
    if not isinstance(rng, dict):
        return f'"rng" is a {kind(rng)}, not a dict'
    for key, want in (("torch", torch.Tensor), ("python", tuple), ("numpy", tuple), ("cuda", (torch.Tensor, list))):
        if (key in rng or key != "cuda") and not isinstance(rng.get(key), want):  # cuda: only a GPU run's
            return f'"rng" holds no {key} generator state'
    if not isinstance(payload.get("precision"), (str, type(None))):
        return f'"precision" is a {kind(payload["precision"])}, not a str'
    if not isinstance(payload.get("extra", {}), dict):
        return f'"extra" is a {kind(payload["extra"])}, not a dict'
    return None
