"""Training checkpoints: everything needed to resume a run exactly, written atomically.

`checkpoints/step_000120.pt` holds the trainable tensors (by name), the optimizer state, the step
and every RNG state. The data position is a pure function of the step (data.TrainData.batch), and
so is the learning rate, so nothing else is needed. Writes go to a temp file and are renamed, so
a SIGKILL at any moment leaves the previous checkpoint intact.

Under DeepSpeed ZeRO each process holds its own partition of the optimizer state (and its own RNG):
every process calls `save_checkpoint`, the partitions are gathered to rank 0, and the one file holds
the list of them, which DeepSpeed's optimizer loads back rank by rank.
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


def _gather_to_main(obj, world_size: int) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (a collective call)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def save_checkpoint(
    run_dir: Path, step: int, named_params, optimizer, keep: int = 2, zero: bool = False, world_size: int = 1
) -> Path | None:
    """Write checkpoints/step_{step}.pt and prune all but the newest `keep` (0 keeps all).

    zero: the optimizer is DeepSpeed's ZeRO optimizer; then every process must call this (it gathers
    each rank's optimizer partition and RNG state) and only rank 0 writes. Returns the path on the
    writing process, None on the others."""
    path = Path(run_dir) / "checkpoints" / f"step_{step:06d}.pt"
    optimizer_state, rng = optimizer.state_dict(), rng_state()
    if zero:
        optimizer_state, rng = _gather_to_main(optimizer_state, world_size), _gather_to_main(rng, world_size)
        if optimizer_state is None:
            return None
    payload = {
        "step": step,
        "params": {name: p.detach().cpu().clone() for name, p in named_params},
        "optimizer": optimizer_state,
        "rng": rng,
        "zero_world_size": world_size if zero else None,
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


def restore(payload: dict, named_params, optimizer, source: str, zero: bool = False, rank: int = 0,
            world_size: int = 1) -> int:
    """Load a checkpoint into the live trainable tensors and optimizer; returns the step reached.

    zero / rank / world_size: as save_checkpoint; a ZeRO checkpoint resumes with the same number of
    processes (each takes its own optimizer partition and RNG state)."""
    saved_world = payload.get("zero_world_size")
    if zero != (saved_world is not None):
        raise UserError(
            f"{source}: checkpoint was written {'with' if saved_world else 'without'} DeepSpeed; "
            f"resume with the same train.deepspeed.stage"
        )
    if zero and saved_world != world_size:
        raise UserError(f"{source}: checkpoint was written by {saved_world} processes; resume with {saved_world}, "
                        f"not {world_size}")
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
    if zero:
        # the fp32 master partitions come from the checkpoint too, so they match the weights exactly
        optimizer.load_state_dict(payload["optimizer"], load_from_fp32_weights=True)
        set_rng_state(payload["rng"][rank])
    else:
        optimizer.load_state_dict(payload["optimizer"])
        set_rng_state(payload["rng"])
    return int(payload["step"])
