"""Training checkpoints: everything needed to resume a run exactly, written atomically.

`checkpoints/step_000120.pt` holds the trainable tensors (by name), the optimizer state, the step
and every RNG state. The data position is a pure function of the step (data.TrainData.batch), and
so is the learning rate, so nothing else is needed. Writes go to a temp file and are renamed, so
a SIGKILL at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..model import atomic_save

_NAME = re.compile(r"step_(\d{6,})\.pt$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.search(p.name))]
    return sorted(found)


def has_checkpoint(run_dir: Path, step: int) -> bool:
    return any(s == step for s, _ in list_checkpoints(run_dir))


def save_checkpoint(run_dir: Path, step: int, named_params, optimizer, keep: int = 2) -> Path:
    """Write checkpoints/step_{step}.pt and prune all but the newest `keep` (0 keeps all)."""
    path = Path(run_dir) / "checkpoints" / f"step_{step:06d}.pt"
    payload = {
        "step": step,
        "params": {name: p.detach().cpu().clone() for name, p in named_params},
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
    }
    atomic_save(payload, path)
    if keep:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(run_dir: Path) -> dict | None:
    """The newest readable checkpoint, or None when the run has none."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            # Optimizer and RNG states hold numpy and python objects, so weights_only cannot be used;
            # these files are written by this program into the user's own run directory.
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a damaged file (should not happen with atomic writes): fall back to the one before
            continue
        if payload.get("step") == step:
            return payload
    return None


def restore(payload: dict, named_params, optimizer, source: str) -> int:
    """Load a checkpoint into the live trainable tensors and optimizer; returns the step reached."""
    params = payload["params"]
    names = [n for n, _ in named_params]
    if sorted(names) != sorted(params):
        missing = sorted(set(names) ^ set(params))[:3]
        raise UserError(
            f"{source}: checkpoint does not match this recipe's trainable parameters ({', '.join(missing)})"
        )
    with torch.no_grad():
        for name, p in named_params:
            if params[name].shape != p.shape:
                raise UserError(
                    f"{source}: checkpoint tensor {name} is {list(params[name].shape)}, "
                    f"the recipe makes {list(p.shape)}"
                )
            p.copy_(params[name])
    optimizer.load_state_dict(payload["optimizer"])
    set_rng_state(payload["rng"])
    return int(payload["step"])
