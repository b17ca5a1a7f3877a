"""Kill points: commands killed (SIGKILL) or interrupted (SIGINT, a terminal's Ctrl-C) at random moments.

After each kill: every output is absent or complete (read back by its own reader, and equal to what an uninterrupted
run writes), anything else left behind is a dot-named temp file that the next run ignores, every input is
byte-identical, the run lock does not block, and the same command run again succeeds (train: with --resume, ending
with the uninterrupted run's adapter bit for bit). The kill moment is drawn from a seeded random.Random: a random
sleep, or the moment a temp/output file appears (plus a few ms). KILL_POINTS_SEED=N draws other moments; a failure
message names the seed and the trial. The default run takes a few trials; `-m slow` sweeps more.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[1]
LORA = str(ROOT / "recipes/lora.yaml")
FULL = str(ROOT / "recipes/full.yaml")
SEED = int(os.environ.get("KILL_POINTS_SEED", "7041"))
TEMP = re.compile(r"^\..+\.tmp(\.png)?$|^step_\d{6,}\.(tmp|old)$")  # atomic_write's, plot's, a DeepSpeed save's
SIGNALS = {"kill": signal.SIGKILL, "int": signal.SIGINT}


# --- the world: a tiny World-vocabulary model, its data, a trained run ---------------------------------------------

def _overrides(world: Path, out: Path, steps: int = 6, **extra) -> list[str]:
    base = {"model.path": world / "tiny.pth", "data.path": world / "train.jsonl",
            "data.eval_path": world / "eval.jsonl", "data.ctx_len": 32, "train.max_steps": steps, "train.micro_bsz": 2,
            "train.grad_accum": 1,
            "train.warmup_steps": 1, "train.save_every": 1, "train.eval_every": 0, "log.progress": "false",
            "out_dir": out, "train.precision": "fp32", "method.state": "true", "train.lr": 3e-3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """tiny.pth, train.jsonl, eval.jsonl, big.jsonl (two tokenizer chunks) and `ref/`, an uninterrupted LoRA + state
    run of _overrides (the adapter every killed run must end with)."""
    from peft_rwkv7.model import save_model
    from peft_rwkv7.train.runner import train_from_cli

    d = tmp_path_factory.mktemp("kill_world")
    save_model(make_model(seed=11, n_layer=2, n_embd=64, head_size=16, vocab_size=65536), d / "tiny.pth")
    lines = (ROOT / "data/demo/ship_log.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(itertools.islice(lines, 200)) + "\n")
    (d / "eval.jsonl").write_text("\n".join(lines[-8:]) + "\n")
    big, size = [], 0
    for line in itertools.cycle(lines):  # past data.records.CHUNK_BYTES (4 MiB): two tokenizer worker processes
        big.append(line)
        size += len(line) + 1
        if size > 5 << 20:
            break
    (d / "big.jsonl").write_text("\n".join(big) + "\n")
    assert train_from_cli(LORA, _overrides(d, d / "ref")) == 0
    return d


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


# --- the commands but train ----------------------------------------------------------------------------------------

def _commands(world: Path) -> dict[str, tuple[list, list[str], list[Path]]]:
    """name: (argv with OUT for the output, output names, inputs)."""
    model, run, ev = world / "tiny.pth", world / "ref", world / "eval.jsonl"
    return {
        "merge": (["merge", "--base", model, "--adapter", run, "--out", "OUT/merged.pth"], ["merged.pth"],
                  [model, run]),
        "export-rwkv-peft": (["export", "--adapter", run, "--format", "rwkv-peft", "--out", "OUT/peft.pth"],
                             ["peft.pth"], [run]),
        "export-st": (["export", "--adapter", run, "--format", "st", "--out", "OUT/adapter.st"],
                      ["adapter.st", "adapter-state.st"], [run]),  # lora + state: the state beside the adapter
        "export-hf": (["export", "--adapter", run, "--model", model, "--format", "hf", "--out", "OUT/hf"], ["hf"],
                      [model, run]),
        "export-runner-state": (["export", "--adapter", run, "--format", "runner-state", "--out", "OUT/state.pth"],
                                ["state.pth"], [run]),
        "convert-st": (["convert", model, "OUT/tiny.st"], ["tiny.st"], [model]),
        "convert-pth": (["convert", model, "OUT/tiny16.pth", "--dtype", "fp16"], ["tiny16.pth"], [model]),
        "convert-hf": (["convert", model, "OUT/tiny_hf"], ["tiny_hf"], [model]),
        "eval": (["eval", "--model", model, "--adapter", run, "--data", ev, "--dtype", "fp32", "--out",
                  "OUT/eval.json", "--json"], ["eval.json"], [model, run, ev]),
        "init": (["init", "lora", "--model", model, "--data", world / "train.jsonl", "--out", "OUT/recipe.yaml"],
                 ["recipe.yaml"], [model]),
        "data-build": (["data", "build", world / "big.jsonl", "--out", "OUT/big"], ["big.bin", "big.idx"],
                       [world / "big.jsonl"]),
    }


def _argv(cmd: list) -> list[str]:
    """Outputs go to out/ under the command's own working folder (init writes its path into the recipe)."""
    return [a.replace("OUT", "out") if isinstance(a, str) else str(a) for a in cmd]


def _command_trials(world: Path, tmp_path: Path, name: str, trials: int, seed: int) -> None:
    cmd, names, inputs = _commands(world)[name]
    rng = random.Random(f"{seed}-{name}")
    (tmp_path / "ref").mkdir()
    ref, seconds = _reference(_argv(cmd), [tmp_path / "ref/out" / n for n in names], tmp_path / "ref")
    before = _digest(inputs)
    for trial in range(trials):
        case = tmp_path / f"t{trial}"
        out = case / "out"
        out.mkdir(parents=True)
        sig = SIGNALS[rng.choice(sorted(SIGNALS))]
        proc = _start(_argv(cmd), case)
        moment = _kill(proc, sig, rng, seconds, [out, *(out / n for n in names)])
        rc, err = _reap(proc)
        where = f"{name} trial {trial} (KILL_POINTS_SEED={seed}), {signal.Signals(sig).name} {moment}: rc {rc} {err!r}"
        _check_signal_end(sig, rc, err, where)
        _check_outputs([out / n for n in names], ref, where)
        left = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not TEMP.match(p.name)
                and str(p.relative_to(out)) not in ref]
        assert not left, f"{where}: left {left}"
        assert _digest(inputs) == before, f"{where}: an input changed"
        written = (out / names[0]).exists()
        again = _reap(_start(_argv(cmd), case))
        if name == "init" and written:  # a recipe is never written over
            assert again[0] == 2 and "already exists" in again[1], f"{where}; the rerun: {again[1]}"
        else:
            assert again[0] == 0, f"{where}; the rerun: {again[1]}"
        _check_outputs([out / n for n in names], ref, where)
        for n in names:
            assert (out / n).exists(), f"{where}: the rerun wrote no {n}"


FAST = ["merge", "export-hf", "convert-st", "init", "data-build"]  # eval (12 s a run): in the sweep


@pytest.mark.parametrize("name", FAST)
def test_a_killed_command_leaves_whole_outputs(world, tmp_path, name):
    _command_trials(world, tmp_path, name, trials=1, seed=SEED)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["merge", "export-rwkv-peft", "export-st", "export-hf", "export-runner-state",
                                  "convert-st", "convert-pth", "convert-hf", "eval", "init", "data-build"])
def test_a_killed_command_leaves_whole_outputs_sweep(world, tmp_path, name):
    _command_trials(world, tmp_path, name, trials=6, seed=SEED + 1)


# --- train ---------------------------------------------------------------------------------------------------------

def _check_run_dir(out: Path, where: str) -> None:
    from peft_rwkv7.run_dir import read_log

    _check_outputs([out], {}, where)
    read_log(out)  # a line cut short is skipped, never an error
    for f in out.rglob("*"):
        assert f.is_dir() or not f.name.startswith(".") or TEMP.match(f.name) or f.name == ".lock", where


def _train_trial(world: Path, tmp_path: Path, rng: random.Random, sig: int, trial: int, seed: int) -> None:
    from peft_rwkv7.train.runlock import held

    out = tmp_path / f"run{trial}"
    args = ["train", LORA, *_overrides(world, out)]
    before = _digest([world / "tiny.pth", world / "train.jsonl", world / "eval.jsonl", LORA])
    proc = _start(args, ROOT)
    moment = _kill(proc, sig, rng, 10.0, [out, out / "checkpoints"])
    rc, err = _reap(proc)
    where = f"train trial {trial} (KILL_POINTS_SEED={seed}), {signal.Signals(sig).name} {moment}: rc {rc} {err!r}"
    _check_signal_end(sig, rc, err, where)
    if out.exists():
        _check_run_dir(out, where)
        assert not held(out), f"{where}: the dead run's lock still holds"
    assert _digest([world / "tiny.pth", world / "train.jsonl", world / "eval.jsonl", LORA]) == before, where
    # a run that had finished before the signal (rc 0) is rerun as it is ("nothing to do"): --resume refuses it
    resume = ["--resume"] if rc != 0 and list((out / "checkpoints").glob("step_*.pt")) else []
    res = _reap(_start(args + resume, ROOT))
    assert res[0] == 0, f"{where}; the rerun{resume}: {res[1]}"
    a, b = load_file(world / "ref/adapter.safetensors"), load_file(out / "adapter.safetensors")
    assert set(a) == set(b), where
    for k in a:
        assert torch.equal(a[k], b[k]), f"{where}: {k} differs from the uninterrupted run's"
    assert torch.equal(torch.load(world / "ref/state.pth")["blocks.0.att.time_state"],
                       torch.load(out / "state.pth")["blocks.0.att.time_state"]), where
    _check_run_dir(out, where)


@pytest.mark.parametrize("sig", ["kill", "int"])
def test_a_killed_run_resumes_to_the_same_adapter(world, tmp_path, sig):
    _train_trial(world, tmp_path, random.Random(f"{SEED}-train-{sig}"), SIGNALS[sig], 0, SEED)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_adapter_sweep(world, tmp_path):
    rng = random.Random(f"{SEED}-train-sweep")
    for trial in range(8):
        _train_trial(world, tmp_path, rng, SIGNALS[rng.choice(sorted(SIGNALS))], trial, SEED)


# --- what the sweeps found (each failed before its fix) --------------------------------------------------------------

def test_a_full_run_killed_after_its_last_checkpoint_writes_model_pth_on_resume(world, tmp_path):
    """The last checkpoint comes before the end (eval, model.pth): a run killed between them was taken as finished,
    its model.pth never written (the same command: "nothing to do"; --resume: "the run is finished")."""
    from peft_rwkv7.model import load_model

    out = tmp_path / "full"
    args = ["train", FULL, *_overrides(world, out, steps=2, **{"method.state": "false"})]
    proc = _start(args, ROOT)
    while not (out / "checkpoints/step_000002.pt").exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    rc, err = _reap(proc)
    assert rc == -signal.SIGKILL and not (out / "model.pth").exists(), err
    again = _reap(_start(args, ROOT))
    assert again[0] == 2 and "stopped before it wrote model.pth; add --resume" in again[1], again
    res = _reap(_start([*args, "--resume"], ROOT))
    assert res[0] == 0, res[1]
    load_model(out / "model.pth")
    assert _reap(_start(args, ROOT))[0] == 0  # now finished: the same command is a no-op


def test_a_forked_child_does_not_hold_the_run_lock(tmp_path):
    """The tokenizer's worker processes are forked while the run holds its lock, and flock belongs to the open file:
    a worker that outlived its SIGKILLed run kept the directory locked ("in use by another rwkv-peft train")."""
    import multiprocessing as mp

    from peft_rwkv7.train.runlock import held, run_lock

    fork = mp.get_context("fork")
    started = fork.Event()

    def work():
        started.set()
        time.sleep(60)

    with run_lock(tmp_path / "r"):
        child = fork.Process(target=work)
        child.start()
        assert started.wait(30)
    try:
        assert not held(tmp_path / "r")
    finally:
        child.kill()
        child.join()


def test_a_run_killed_while_tokenizing_leaves_no_lock(world, tmp_path):
    """The same through the CLI: SIGKILL while two worker processes tokenize, then the next run is not refused."""
    import psutil

    from peft_rwkv7.train.runlock import held

    out = tmp_path / "tok"
    env = {**os.environ, "HOME": str(tmp_path)}  # the data cache: a fresh one, the user's left alone
    proc = _start(["train", LORA, *_overrides(world, out, **{"data.path": world / "big.jsonl"})], ROOT, env=env)
    deadline = time.time() + 120
    while len(psutil.Process(proc.pid).children()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        assert not held(out), "the killed run's tokenizer workers hold its lock"
    finally:
        _reap(proc)


def test_ctrl_c_inside_torch_save_is_an_interrupt(tmp_path):
    """A Ctrl-C inside torch.save's zip writer came out as its RuntimeError ("enforce fail at inline_container.cc"):
    merge/convert/export printed "error: ..." (exit 1) instead of "interrupted" (130). Nothing is left behind."""
    from peft_rwkv7.model import atomic_write

    class CtrlCAt:
        def __init__(self, f):
            self.f, self.calls = f, 0

        def write(self, b):
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # an interactive run's
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(tmp_path / "x.pth", lambda f: torch.save({"t": torch.zeros(1 << 16)}, CtrlCAt(f)))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(tmp_path.iterdir()) == []


def test_an_hf_folder_cut_short_is_no_model(world, tmp_path, monkeypatch):
    """config.json makes a folder a model (is_hf_dir): it was written before the tokenizer files, so a convert cut
    short there left a folder that looked complete without them; and one rewritten in part kept the old config."""
    from peft_rwkv7.model.formats import convert, is_hf_dir, tokenizer_files

    out = tmp_path / "hf"
    convert(world / "tiny.pth", out)
    assert is_hf_dir(out)
    real = tokenizer_files.atomic_write

    def cut(path, write):
        if Path(path).name == "special_tokens_map.json":
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(tokenizer_files, "atomic_write", cut)
    for target in (out, tmp_path / "fresh"):  # over a complete folder, and a new one
        with pytest.raises(KeyboardInterrupt):
            convert(world / "tiny.pth", target)
        assert not is_hf_dir(target), target
    monkeypatch.undo()
    convert(world / "tiny.pth", out)  # the same command again
    assert is_hf_dir(out) and (out / "special_tokens_map.json").exists()
