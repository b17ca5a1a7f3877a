"""Training runs as the web UI sees them: run directories on disk, trainer processes started and stopped.

Nothing here holds state the disk does not: a run's status comes from its directory (the run lock says
whether a trainer is alive, the checkpoints and recipe.yaml say how far it got, log.jsonl holds every step),
so a page opened later, or a restarted UI, finds running runs again. A trainer is the CLI itself
(`python -m peft_rwkv7.cli train ...`) in its own process session: closing the page or the UI leaves it
training; Stop sends it SIGINT, which is the CLI's Ctrl-C (a checkpoint of the last step, then exit).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import UserError
from ..run_dir import end_cut_short, list_checkpoints, read_log
from ..train.runlock import held, holder_pid

CONSOLE = "console.log"  # the trainer's stdout and stderr, appended run after run


@dataclass
class RunInfo:
    path: Path
    status: str  # running | finished | stopped
    method: str = "?"
    objective: str = "sft"
    max_steps: int = 0
    step: int = 0  # the last logged step
    checkpoint: int = 0  # the last complete checkpoint's step (what Resume continues from)
    loss: float | None = None
    eval_loss: float | None = None
    records: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def read_recipe(run: Path) -> dict:
    try:
        data = yaml.safe_load((Path(run) / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # damaged or not text: a run with no recipe to show
        return {}
    return data if isinstance(data, dict) else {}


def _section(recipe: dict, key: str) -> dict:
    """recipe[key] when it is a mapping, else {} (a recipe.yaml edited by hand must not stop the runs table)."""
    v = recipe.get(key)
    return v if isinstance(v, dict) else {}


def method_name(recipe: dict) -> str:
    m = _section(recipe, "method")
    kind = str(m.get("kind", "?"))
    extra = [x for x, on in (("state", m.get("state") and kind != "state"), (str(m.get("quant")),
                                                                              m.get("quant") not in (None, "none")))
             if on]
    return "+".join([kind, *extra])


def run_info(run: Path) -> RunInfo:
    run = Path(run)
    recipe = read_recipe(run)
    records = read_log(run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    saved = list_checkpoints(run)
    max_steps = _section(recipe, "train").get("max_steps")
    max_steps = max_steps if isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0 else 0
    checkpoint = saved[-1][0] if saved else 0
    method = _section(recipe, "method")
    if held(run):
        status = "running"
    elif max_steps and checkpoint >= max_steps and not end_cut_short(run, str(method.get("kind")), saved):
        status = "finished"  # (a full run without its model.pth is stopped: --resume writes it)
    else:
        status = "stopped"
    return RunInfo(run, status, method_name(recipe), str(_section(recipe, "train").get("objective", "sft")),
                   max_steps, steps[-1]["step"] if steps else 0, checkpoint,
                   steps[-1]["loss"] if steps else None, evals[-1]["eval_loss"] if evals else None, records)


def list_runs(runs_dir: Path) -> list[RunInfo]:
    """Every run directory (one holding recipe.yaml) directly under `runs_dir`, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    try:
        found = [p for p in root.iterdir() if p.is_dir() and (p / "recipe.yaml").is_file()]
    except OSError:  # unreadable: no runs to show (the table must not stop)
        return []

    def mtime(p: Path) -> float:
        try:
            return (p / "recipe.yaml").stat().st_mtime
        except OSError:  # deleted meanwhile
            return 0.0

    found.sort(key=mtime, reverse=True)
    return [run_info(p) for p in found]


def eta_seconds(records: list[dict], max_steps: int) -> float | None:
    """Seconds left at the pace of the last steps logged (wall clock of log.jsonl's records)."""
    steps = [r for r in records if "loss" in r and "time" in r][-20:]
    if len(steps) < 2 or steps[-1]["step"] <= steps[0]["step"]:
        return None
    per_step = (steps[-1]["time"] - steps[0]["time"]) / (steps[-1]["step"] - steps[0]["step"])
    return max(0.0, per_step * (max_steps - steps[-1]["step"]))


def console_tail(run: Path, lines: int = 12) -> str:
    """The last lines the trainer printed (progress-bar redraws folded to their last state)."""
    try:
        with open(Path(run) / CONSOLE, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    shown = [ln.rsplit("\r", 1)[-1] for ln in text.replace("\r\n", "\n").split("\n")]
    shown = [ln for ln in shown if ln.strip()]
    return "\n".join(shown[-lines:])


class Trainers:
    """Trainer processes this UI started (reaped as they end); Stop works for any running run via its lock."""

    def __init__(self) -> None:
        self.procs: dict[Path, subprocess.Popen] = {}
        self.lock = threading.Lock()  # two Start clicks at once: one trainer per out_dir

    def start(self, recipe: str, overrides: list[str], out_dir: Path, resume: bool = False,
              cwd: Path | None = None) -> subprocess.Popen:
        """`rwkv-peft train RECIPE OVERRIDES [--resume]` in its own session, output appended to out_dir/console.log."""
        out_dir = Path(out_dir)
        with self.lock:
            self.reap()
            if held(out_dir):
                raise UserError(f"{out_dir} is in use by another rwkv-peft train (pid {holder_pid(out_dir)}); wait "
                                "for it or stop it, or train into another out_dir")
            starting = self.starting(out_dir)
            if starting is not None:
                raise UserError(f"{out_dir} is in use by another rwkv-peft train (pid {starting.pid}, starting); wait "
                                "for it or stop it, or train into another out_dir")
            if out_dir.exists() and not out_dir.is_dir():
                raise UserError(f"out_dir {out_dir}: is a file, expected the run directory")
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                return self._spawn(recipe, overrides, out_dir, resume, cwd)
            except OSError as e:
                raise UserError(f"out_dir {out_dir}: cannot be created or written ({e.strerror or e})") from None

    def _spawn(self, recipe: str, overrides: list[str], out_dir: Path, resume: bool,
               cwd: Path | None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "peft_rwkv7.cli", "train", recipe, *overrides, *(["--resume"] if resume else [])]
        with open(out_dir / CONSOLE, "ab") as log:
            log.write(f"$ rwkv-peft train {' '.join([recipe, *overrides] + (['--resume'] if resume else []))}\n"
                      .encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs[out_dir.resolve()] = proc
        return proc

    def wait_started(self, out_dir: Path, timeout: float = 60.0) -> str:
        """Until the trainer holds the lock ("running") or has already ended ("ended": read console.log)."""
        proc = self.procs.get(Path(out_dir).resolve())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if held(out_dir):
                return "running"
            if proc is not None and proc.poll() is not None:
                return "ended"
            time.sleep(0.1)
        return "starting"

    def stop(self, out_dir: Path) -> bool:
        """Ctrl-C for the run training in `out_dir` (it saves its last step and exits); False if none runs there."""
        pid = holder_pid(out_dir)
        if pid is None or not held(out_dir):
            starting = self.starting(out_dir)
            if starting is None:
                return False
            pid = starting.pid  # started here, not yet holding the lock: its Ctrl-C all the same
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return False
        return True

    def starting(self, out_dir: Path) -> subprocess.Popen | None:
        """The trainer started here for `out_dir` that has not taken the run lock yet (the lock file names its
        holder's pid, and keeps naming it after a trainer lets go of it while it exits), or None."""
        self.reap()
        proc = self.procs.get(Path(out_dir).resolve())
        return None if proc is None or holder_pid(out_dir) == proc.pid else proc

    def reap(self) -> None:
        for key, proc in list(self.procs.items()):
            if proc.poll() is not None:
                del self.procs[key]


def delete_run(run: Path) -> None:
    """Remove a run directory; refused while a trainer holds it or where it is not a run directory."""
    run = Path(run)
    if run.is_symlink():  # rmtree refuses a link; deleting what it points at is not what the table shows
        raise UserError(f"{run}: a link to {os.readlink(run)}, not a run directory; nothing deleted")
    if not (run / "recipe.yaml").is_file():
        raise UserError(f"{run}: not a run directory (no recipe.yaml); nothing deleted")
    if held(run):
        raise UserError(f"{run}: a trainer is running there; stop it first")
    try:
        shutil.rmtree(run)
    except OSError as e:
        raise UserError(f"{run}: cannot be deleted ({e.strerror or e}); what is left is still there") from None
