"""A run directory's checkpoint folder, end marker and killed writes' temp files, with the standard library only.

Below both `train` (which writes checkpoints) and `infer` (`inspect` lists them), and light enough for
the CLI to look at a run before torch is imported (the finished-run and resume checks).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

# A run directory's own files: the adapter's (adapters/files.py writes them), the recipe and log (train/logger.py),
# a full fine-tune's model and the loss plot. Named here, below every writer and reader of them.
ADAPTER_FILE, META_FILE, STATE_FILE = "adapter.safetensors", "adapter.json", "state.pth"
RECIPE_FILE, LOG_FILE, MODEL_FILE, PLOT_FILE = "recipe.yaml", "log.jsonl", "model.pth", "loss.png"

CHECKPOINT_NAME = re.compile(r"^step_(\d{6,})(\.pt)?$")
# what a run killed mid-write leaves: atomic_write's temp files of the run's own outputs (model.io.atomic_write:
# `.{name}.{random}.tmp`) and checkpoints, the plot's (`.{name}.tmp.png`), a DeepSpeed save's uncommitted folder
_ATOMIC = (ADAPTER_FILE, META_FILE, STATE_FILE, RECIPE_FILE, LOG_FILE, MODEL_FILE)
_RUN_TEMP = re.compile(rf"^\.({'|'.join(map(re.escape, _ATOMIC))})\.\w+\.tmp$|^\.{re.escape(PLOT_FILE)}\.tmp\.png$")
_CHECKPOINT_TEMP = re.compile(r"^\.step_\d{6,}\.pt\.\w+\.tmp$")
# checkpoint folders cut short: a DeepSpeed save's before its rename (train/checkpoint.save_engine_checkpoint), a
# pruned checkpoint's being deleted (train/checkpoint._prune)
_CHECKPOINT_GARBAGE = re.compile(r"^step_\d{6,}\.(tmp|old)$")


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first: `step_N.pt` files (one process) and
    renamed `step_N/` folders (DeepSpeed)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_NAME.match(p.name)
        if m and (p.is_file() if m.group(2) else p.is_dir()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_stale_temps(run_dir: Path) -> None:
    """Delete the temp files of a run killed mid-write (SIGKILL, power loss: nothing could remove them), and its
    checkpoint folders cut short (remove_checkpoint_garbage). Called by the run that takes the directory up again,
    under its lock: no other writer of these names is running. Best effort: what cannot be removed (another user's
    file, a read-only mount) stays, and the run goes on."""
    run_dir = Path(run_dir)
    for folder, pattern in ((run_dir, _RUN_TEMP), (run_dir / "checkpoints", _CHECKPOINT_TEMP)):
        if folder.is_dir():
            for f in folder.iterdir():
                if pattern.match(f.name) and f.is_file():
                    try:
                        f.unlink()
                    except OSError:  # best effort, as for the folders: the run goes on
                        pass
    remove_checkpoint_garbage(run_dir)


def remove_checkpoint_garbage(run_dir: Path) -> None:
    """Delete the checkpoint folders a kill cut short: a DeepSpeed save before its commit (every rank's shards so
    far, `step_N.tmp/`) and a pruned checkpoint being deleted (`step_N.old/`). Best effort; a link is not followed
    (shutil.rmtree refuses one). Called by train/checkpoint._prune after each save and by remove_stale_temps."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for f in folder.iterdir():
            if _CHECKPOINT_GARBAGE.match(f.name) and f.is_dir():
                shutil.rmtree(f, ignore_errors=True)


ENDING = ".ending"  # a run's marker: its last checkpoint may exist, the end written after it not yet


def mark_ending(run_dir: Path, ending: bool) -> None:
    """Set (before the run's last checkpoint is written) or clear (after its end is) the ENDING marker."""
    marker = Path(run_dir) / ENDING
    if ending:
        marker.touch()
    else:
        marker.unlink(missing_ok=True)


def end_parts(kind: str) -> str:
    """What a run writes after its last checkpoint, for messages."""
    return "final eval, loss plot" + (", model.pth" if kind == "full" else "")


def end_cut_short(run_dir: Path, kind: str, saved: list[tuple[int, Path]]) -> bool:
    """Whether a run whose newest checkpoint is its last step was stopped before its end was written: the final
    eval record, a full fine-tune's model.pth and the loss plot, which come after that checkpoint. The ENDING marker
    says so; for a run written before the marker, a full fine-tune's model.pth missing or older than that checkpoint
    (from before the run was extended). `saved`: the run's list_checkpoints, which every caller has read already.
    `--resume` then takes no step and writes the end."""
    if not saved:
        return False
    if (Path(run_dir) / ENDING).exists():
        return True
    if kind != "full":
        return False
    try:
        return (Path(run_dir) / MODEL_FILE).stat().st_mtime < saved[-1][1].stat().st_mtime
    except OSError:
        return True


def read_log(run_dir: Path) -> list[dict]:
    """log.jsonl's records, in order. A line still being written (no newline yet), broken (not JSON, not UTF-8) or
    not a record (a JSON object whose "step" is an integer and whose loss, eval_loss and time, where present, are
    numbers) is skipped, so a running run, or one killed mid-write or edited by hand, can be read at any moment."""
    import json

    try:
        text = (Path(run_dir) / LOG_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for line in text.split("\n")[:-1]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if _is_record(record):
            out.append(record)
    return out


def _is_record(record) -> bool:
    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    return (isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
            and all(number(record[k]) for k in ("loss", "eval_loss", "time") if k in record))
