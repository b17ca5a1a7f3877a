"""Training checkpoints: everything needed to resume a run exactly, committed atomically.

The data position is a pure function of the step (data.TrainData.batch), and so is the learning
rate, so a checkpoint holds the trained tensors, the optimizer state, the step and the RNG states.

One process: `checkpoints/step_000120.pt` (trained tensors by name, optimizer state, step, RNG),
written to a temp file and renamed.

DeepSpeed (any number of processes): `checkpoints/step_000120/` holds DeepSpeed's own sharded engine
checkpoint in `ds/` (each rank writes its ZeRO optimizer partition, under ZeRO-3 its parameter
partition too; nothing is gathered, frozen weights are left out), `rng_rank00000.pt` ... written by
each rank for itself (and `extra_rank00000.pt` ... where the run has more state, e.g. GRPO's rollouts,
which are each rank's own), and `meta.json` (step, processes, ZeRO stage, precision, measured kernel choices,
the trained tensors' names, shapes and dtypes). Every rank writes into `step_000120.tmp/`; after a barrier the
folder's writer writes meta.json and renames the folder. The rename is the commit point: only renamed folders are
checkpoints, so a run killed mid-save keeps its last good one. Old checkpoints are renamed away (and deleted) only
once every out_dir has committed the new one.

The writer is global rank 0 when every process sees the same out_dir. Several machines without a
shared filesystem (train.distributed.Dist.shared_out_dir False) each have their own out_dir: there each
node's local rank 0 is the writer of its node's folders, which hold that node's shards, DeepSpeed's
module states (its `use_node_local_storage`) and a meta.json; resume takes the newest step that every
process finds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..model import atomic_save, atomic_write
from ..run_dir import list_checkpoints, remove_checkpoint_garbage  # list_checkpoints: the loop and tests read it here
from .checkpoint_payload import payload_problem

DS_TAG = "ds"  # DeepSpeed's tag: the engine checkpoint lives in step_N/ds/
META = "meta.json"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        # this process's own device only: get_rng_state_all would open a context on every visible GPU
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], (list, tuple)):  # checkpoints written before: every device's
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])


def has_checkpoint(run_dir: Path, step: int) -> bool:
    return any(s == step for s, _ in list_checkpoints(run_dir))


def _prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0 keeps all) and what killed saves left behind."""
    for _, old in list_checkpoints(run_dir)[:-keep] if keep else []:
        if old.is_dir():
            gone = old.with_name(old.name + ".old")
            os.replace(old, gone)  # never a half-deleted folder under a checkpoint's name
            shutil.rmtree(gone, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    remove_checkpoint_garbage(run_dir)


# --- one process --------------------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, step: int, named_params, optimizer, keep: int = 2,
                    extra: dict | None = None, precision: str | None = None, routes: dict | None = None) -> Path:
    """Write checkpoints/step_{step}.pt and prune all but the newest `keep` (0 keeps all). extra: {name: object
    with state_dict()} of more training state (AdaLoRA's rank allocator, train/adalora.py). precision: what the
    run computes in ("bf16", "fp32"); routes: its measured kernel choices (train/routes.py, JSON); saved_choices
    reads both back."""
    path = Path(run_dir) / "checkpoints" / f"step_{step:06d}.pt"
    payload = {
        "step": step,
        "params": {name: p.detach().cpu().clone() for name, p in named_params},
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "precision": precision,
        "routes": routes,
    }
    if extra:
        payload["extra"] = {name: obj.state_dict() for name, obj in extra.items()}
    atomic_save(payload, path)
    _prune(run_dir, keep)
    return path


def _newest_record(run_dir: Path) -> tuple[int | None, dict]:
    """(step, record) of the checkpoint a resume goes on from, without reading its tensors: a DeepSpeed folder's
    meta.json ({} where it cannot be read: resume says why), or the newest one-process file that reads back as
    resume reads it, loaded with mmap; (None, {}) where there is none."""
    for step, path in reversed(list_checkpoints(run_dir)):
        if path.is_dir():
            try:
                return step, _read_meta(path)
            except UserError:
                return step, {}
        try:
            record = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:
            continue
        if payload_problem(record, step) is None:
            return step, record
    return None, {}


def saved_choices(run_dir: Path) -> tuple[str | None, object]:
    """(precision, routes) the checkpoint a resume of run_dir goes on from was made with, read once: the precision
    ("bf16", "fp32"; None where it has none or does not say, made before it was recorded), in which a resume under
    `train.precision: auto` goes on, and the measured kernel choices (train/routes.py validates them; None)."""
    record = _newest_record(run_dir)[1]
    precision = record.get("precision")
    return (precision if precision in ("bf16", "fp32") else None), record.get("routes")


def resumable_step(run_dir: Path) -> int | None:
    """The step a --resume of run_dir goes on from: its newest checkpoint, or the newest before it where that one
    cannot be read (None: none can; resume says why)."""
    return _newest_record(run_dir)[0]


def _read_checkpoint(path: Path, step: int) -> tuple[dict | None, str]:
    """(payload, "") for a file that reads back as save_checkpoint wrote it, else (None, why it cannot be read)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        # Optimizer and RNG states hold numpy and python objects, so weights_only cannot be used;
        # these files are written by this program into the user's own run directory.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except OSError as e:  # no permission, deleted meanwhile
        return None, e.strerror or type(e).__name__
    except Exception as e:  # what torch.load raises on a file cut short or overwritten (should not happen: atomic)
        return None, f"truncated or corrupt: {type(e).__name__}"
    problem = payload_problem(payload, step)
    return (None, problem) if problem else (payload, "")


def load_latest_checkpoint(run_dir: Path) -> dict | None:
    """The newest readable one-process checkpoint (None: the run has no checkpoint file); each newer file that
    cannot be read is passed over with a warning line on stderr, and where none can be read, a one-line error
    names the newest."""
    skipped = []
    for step, path in reversed(list_checkpoints(run_dir)):
        if path.is_dir():
            continue
        payload, why = _read_checkpoint(path, step)
        if payload is not None:
            for old, reason in skipped:  # left as they are: the user may want to look at them
                print(f"warning: {old}: cannot be read ({reason}); resuming from step {step}", file=sys.stderr,
                      flush=True)
            return payload
        skipped.append((path, why))
    if skipped:
        newest, why = skipped[0]
        raise UserError(f"{newest}: cannot be read ({why}); no readable checkpoint to resume from (train into a "
                        "new out_dir=... to start over)")
    return None


def _check_params(saved: dict[str, list[int]], named_params, source: str) -> None:
    names = [n for n, _ in named_params]
    if sorted(names) != sorted(saved):
        missing = sorted(set(names) ^ set(saved))[:3]
        raise UserError(
            f"{source}: checkpoint does not match this recipe's trainable parameters ({', '.join(missing)})"
        )
    for name, p in named_params:
        shape = list(_full_shape(p))
        if list(saved[name]) != shape:
            raise UserError(f"{source}: checkpoint tensor {name} is {list(saved[name])}, the recipe makes {shape}")


def _check_extra(extra: dict | None, saved_extra: dict, source: str) -> None:
    for name in extra or {}:
        if name not in saved_extra:
            raise UserError(f"{source}: the checkpoint holds no {name} state, which this run needs; resume with the "
                            "run's own recipe or train into a new out_dir")


def restore(payload: dict, named_params, optimizer, source: str, extra: dict | None = None) -> int:
    """Load a one-process checkpoint into the live trainable tensors and optimizer (and each object of
    `extra`, by load_state_dict); returns its step."""
    params = payload["params"]
    _check_params({n: list(t.shape) for n, t in params.items()}, named_params, source)
    saved_extra = payload.get("extra", {})
    _check_extra(extra, saved_extra, source)
    with torch.no_grad():
        for name, p in named_params:
            p.copy_(params[name])
    optimizer.load_state_dict(payload["optimizer"])
    for name, obj in (extra or {}).items():
        obj.load_state_dict(saved_extra[name])
    set_rng_state(payload["rng"])
    return int(payload["step"])


# --- DeepSpeed ----------------------------------------------------------------------------------------

def _full_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO-3 partitions: p itself is empty


def _barrier() -> None:
    torch.distributed.barrier()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_engine_checkpoint(engine, run_dir: Path, step: int, named_params, keep: int, rank: int, world_size: int,
                           stage: int, writer: bool | None = None, precision: str | None = None,
                           extra: dict | None = None, routes: dict | None = None) -> Path:
    """Every process calls this: DeepSpeed's sharded checkpoint + this rank's RNG (and its `extra` state, as
    save_checkpoint's: GRPO's rollouts are each rank's own) into step_N.tmp/, then the folder's writer (default:
    rank 0) commits it by renaming it to step_N/ and, once every writer has, prunes (see the module docstring)."""
    writer = rank == 0 if writer is None else writer
    folder = Path(run_dir) / "checkpoints"
    final, tmp = folder / f"step_{step:06d}", folder / f"step_{step:06d}.tmp"
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)  # what a save killed at this step left
        tmp.mkdir(parents=True)
    _barrier()
    atomic_save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    if extra:
        atomic_save({name: obj.state_dict() for name, obj in extra.items()}, tmp / f"extra_rank{rank:05d}.pt")
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    _barrier()  # every shard is written
    if writer:
        meta = {
            "step": step, "world_size": world_size, "zero_stage": stage, "precision": precision, "routes": routes,
            "params": {n: {"shape": list(_full_shape(p)), "dtype": str(p.dtype).removeprefix("torch.")}
                       for n, p in named_params},
        }
        text = (json.dumps(meta, indent=1) + "\n").encode()
        atomic_write(tmp / META, lambda f: f.write(text))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if final.exists():  # this step was committed before (a repeated save): keep that one
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)  # the commit point
            _fsync(folder)
    _barrier()  # committed in every out_dir when this returns, on every rank
    if writer:
        _prune(run_dir, keep)
    return final


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable checkpoint ({e})") from None


def _load_engine_checkpoint(engine, path: Path, named_params, rank: int, world_size: int, stage: int,
                            extra: dict | None = None) -> int:
    meta = _read_meta(path)
    saved_world, saved_stage = meta["world_size"], meta["zero_stage"]
    if (saved_world, saved_stage) != (world_size, stage):
        raise UserError(
            f"{path}: checkpoint was written by {saved_world} processes under ZeRO-{saved_stage}; resume with "
            f"{saved_world} processes and train.deepspeed.stage={saved_stage} (ZeRO keeps one optimizer shard per "
            f"process), not {world_size} under ZeRO-{stage}"
        )
    _check_params({n: v["shape"] for n, v in meta["params"].items()}, named_params, str(path))
    extra_file = path / f"extra_rank{rank:05d}.pt"
    saved_extra = {}
    if extra and extra_file.exists():  # only a run with extra state reads it
        saved_extra = torch.load(extra_file, map_location="cpu", weights_only=False)
    _check_extra(extra, saved_extra, str(path))
    # Frozen weights are not in the checkpoint (they come from model.path), hence load_module_strict=False;
    # the trained tensors come back from the fp32 ZeRO partitions (load_from_fp32_weights).
    loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
    if loaded is None:
        raise UserError(f"{path}: DeepSpeed found no checkpoint in {path / DS_TAG}")
    for name, obj in (extra or {}).items():
        obj.load_state_dict(saved_extra[name])
    set_rng_state(torch.load(path / f"rng_rank{rank:05d}.pt", map_location="cpu", weights_only=False))
    return int(meta["step"])


# --- resume -------------------------------------------------------------------------------------------

def _found_everywhere(run_dir: Path, found: list[tuple[int, Path]], world_size: int) -> list[tuple[int, Path]]:
    """The newest checkpoint that every process finds in the out_dir it sees (one shared folder, or each
    node's own); the same decision, or the same one-line refusal, on every rank."""
    steps: list = [None] * world_size
    torch.distributed.all_gather_object(steps, [s for s, _ in found])
    common = set.intersection(*(set(s) for s in steps))
    if not common and any(steps):
        lacking = next(r for r, s in enumerate(steps) if set(s) != set(steps[0]))
        raise UserError(f"{run_dir}: no checkpoint is there for every process (rank 0 finds steps {steps[0]}, rank "
                        f"{lacking} {steps[lacking]}); each node must keep the checkpoint folders its processes "
                        f"wrote in its out_dir")
    return [(s, p) for s, p in found if s == max(common)] if common else []


def resume(run_dir: Path, named_params, optimizer, engine=None, stage: int = 0, rank: int = 0,
           world_size: int = 1, extra: dict | None = None) -> int:
    """Restore the newest checkpoint of run_dir into the live trained tensors and optimizer (under
    DeepSpeed: into the engine, every process calls this) and, one process, `extra` (see save_checkpoint);
    returns the step it reached."""
    found = list_checkpoints(run_dir)
    if engine is not None and world_size > 1:
        found = _found_everywhere(run_dir, found, world_size)
    if not found:
        raise UserError(f"{run_dir}: nothing to resume (no checkpoints/); run without --resume")
    step, path = found[-1]
    if path.is_dir():
        if engine is None:
            meta = _read_meta(path)
            raise UserError(
                f"{path}: checkpoint was written with DeepSpeed; resume with train.deepspeed.stage="
                f"{meta['zero_stage']} on {meta['world_size']} processes"
            )
        return _load_engine_checkpoint(engine, path, named_params, rank, world_size, stage, extra)
    if engine is not None:
        raise UserError(f"{path}: checkpoint was written without DeepSpeed; resume without train.deepspeed")
    return restore(load_latest_checkpoint(run_dir), named_params, optimizer, str(run_dir), extra)
