"""Shared by tests/kill: the tiny world's recipe overrides, starting and killing commands, and the oracle that
reads what a killed command left (see test_kill_points.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")
FULL = str(ROOT / "recipes/full.yaml")
SEED = int(os.environ.get("KILL_POINTS_SEED", "7041"))
TEMP = re.compile(r"^\..+\.tmp(\.png)?$|^step_\d{6,}\.(tmp|old)$")  # atomic_write's, plot's, a DeepSpeed save's
SIGNALS = {"kill": signal.SIGKILL, "int": signal.SIGINT}
STEPS = 6  # a kill test run's steps (save_every 1: a checkpoint each)


# --- the world: a tiny World-vocabulary model, its data, a trained run ---------------------------------------------

def _overrides(world: Path, out: Path, steps: int = STEPS, **extra) -> list[str]:
    base = {"model.path": world / "tiny.pth", "data.path": world / "train.jsonl",
            "data.eval_path": world / "eval.jsonl", "data.ctx_len": 32, "train.max_steps": steps, "train.micro_bsz": 2,
            "train.grad_accum": 1,
            "train.warmup_steps": 1, "train.save_every": 1, "train.eval_every": 0, "log.progress": "false",
            "out_dir": out, "train.precision": "fp32", "method.state": "true", "train.lr": 3e-3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _digest(paths) -> dict[str, str]:
    out = {}
    for p in paths:
        for f in sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]:
            if f.is_file() and not TEMP.match(f.name):
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# --- running and killing -----------------------------------------------------------------------------------------

def _start(args: list, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    # its own session, so a Ctrl-C goes to the whole process group as a terminal sends it (tokenizer workers too);
    # SIGINT back to its default: a pytest started in the background hands it down ignored
    return subprocess.Popen([sys.executable, "-m", "peft_rwkv7.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _appeared(watch: list[Path], before: set[str]) -> bool:
    for folder in watch:
        try:
            names = {p.name for p in folder.iterdir()}
        except OSError:
            continue
        if names - before:
            return True
    return False


def _kill(proc: subprocess.Popen, sig: int, rng: random.Random, span: float, watch: list[Path]) -> str:
    """Send `sig` at a drawn moment: after a random sleep within (0.3, span) s, or as soon as a new file appears in
    one of `watch` (+0-30 ms). SIGKILL goes to the process alone (kill -9 PID), SIGINT to its group (Ctrl-C).
    Returns the moment, for the failure message."""
    t0 = time.monotonic()
    if rng.random() < 0.5:
        at = rng.uniform(0.3, span)
        while time.monotonic() - t0 < at and proc.poll() is None:
            time.sleep(0.01)
        moment = f"after {at:.2f} s"
    else:
        before = set().union(*({p.name for p in w.iterdir()} if w.is_dir() else set() for w in watch))
        while proc.poll() is None and not _appeared(watch, before) and time.monotonic() - t0 < 3 * span:
            time.sleep(0.005)
        lag = rng.uniform(0, 0.03)
        time.sleep(lag)
        moment = f"at a new file in {[w.name for w in watch]} +{lag * 1000:.0f} ms ({time.monotonic() - t0:.2f} s)"
    if proc.poll() is None:
        if sig == signal.SIGKILL:
            os.kill(proc.pid, sig)
        else:
            os.killpg(proc.pid, sig)
    else:
        moment += " (it had finished)"
    return moment


def _reap(proc: subprocess.Popen) -> tuple[int, str]:
    proc.wait(timeout=300)
    try:  # what a SIGKILL left of the group (forked workers, holding its pipes): the test's own, ended here
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _check_signal_end(sig: int, rc: int, err: str, where: str) -> None:
    if rc == 0:
        return  # it had finished
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL, where
        return
    assert "Traceback" not in err, where
    if rc == -signal.SIGINT:  # landed where Python has no Ctrl-C handler (starting, or exiting after the work)
        return
    last = err.strip().splitlines()[-1] if err.strip() else ""
    # the CLI's Ctrl-C line, or train's: its loop saves the finished steps and says how to go on; the status is the
    # interrupted one either way (it was 2, an input error's, for train)
    assert rc == 130 and (last == "interrupted" or last.startswith("interrupted after step")), (where, rc, last)


# --- the oracle --------------------------------------------------------------------------------------------------

def _read(f: Path) -> None:
    """Read `f` back with its own reader; raises where it is not complete."""
    name = f.name
    if name.endswith((".pth", ".pt")):
        torch.load(f, map_location="cpu", weights_only=False)
    elif name.endswith((".safetensors", ".st")):
        load_file(f)
    elif name.endswith(".json"):
        json.loads(f.read_text())
    elif name.endswith(".yaml"):
        assert isinstance(yaml.safe_load(f.read_text()), dict), f
    elif name.endswith(".png"):
        data = f.read_bytes()
        assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), f
    elif name.endswith(".idx"):
        from peft_rwkv7.data.binidx import MMapIndexedDataset

        MMapIndexedDataset(str(f)[: -len(".idx")])  # the pair, checked against each other


def _check_outputs(outputs: list[Path], ref: dict[str, Path], where: str) -> None:
    """Each output absent or complete; a file that an uninterrupted run also writes is equal to it."""
    for out in outputs:
        files = sorted(out.rglob("*")) if out.is_dir() else [out] if out.exists() else []
        for f in files:
            if f.is_dir():
                continue
            if TEMP.match(f.name):
                continue
            try:
                _read(f)
            except Exception as e:
                raise AssertionError(f"{where}: {f} is not complete ({type(e).__name__}: {e})") from None
            rel = str(f.relative_to(out.parent))
            if rel in ref and f.name not in ("log.jsonl", "loss.png", ".lock") and f.parent.name != "checkpoints":
                assert f.read_bytes() == ref[rel].read_bytes(), f"{where}: {f} differs from an uninterrupted run's"
        if out.is_dir() and (out / "config.json").exists():  # an HF folder that says it is a model is all there
            wanted = {Path(rel).name for rel in ref if Path(rel).parts[0] == out.name}
            missing = wanted - {p.name for p in out.iterdir()}
            assert not missing, f"{where}: {out} has config.json but lacks {sorted(missing)}"


def _reference(cmd: list, outputs: list[Path], cwd: Path) -> tuple[dict[str, Path], float]:
    """Run `cmd` uninterrupted: ({path relative to its output's folder: file}, its seconds)."""
    t0 = time.monotonic()
    rc, err = _reap(_start(cmd, cwd))
    assert rc == 0, err
    ref = {}
    for out in outputs:
        for f in sorted(out.rglob("*")) if out.is_dir() else [out]:
            if f.is_file():
                ref[str(f.relative_to(out.parent))] = f
    return ref, time.monotonic() - t0


