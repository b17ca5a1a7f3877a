"""Kill points: commands killed (SIGKILL) or interrupted (SIGINT, a terminal's Ctrl-C) at random moments.

After each kill: every output is absent or complete (read back by its own reader, and equal to what an uninterrupted
run writes), anything else left behind is a dot-named temp file that the next run ignores, every input is
byte-identical, the run lock does not block, and the same command run again succeeds (train: with --resume, ending
with the uninterrupted run's adapter bit for bit). The kill moment is drawn from a seeded random.Random: a random
sleep, or the moment a temp/output file appears (plus a few ms). KILL_POINTS_SEED=N draws other moments; a failure
message names the seed and the trial. The default run takes a few trials; `-m slow` sweeps more.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import log_records
from tests.kill.support import (
    LORA,
    ROOT,
    SEED,
    SIGNALS,
    STEPS,
    TEMP,
    _check_outputs,
    _check_signal_end,
    _digest,
    _kill,
    _overrides,
    _reap,
    _reference,
    _start,
)

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
    from peft_rwkv7.run_dir import ENDING, read_log

    _check_outputs([out], {}, where)
    read_log(out)  # a line cut short is skipped, never an error
    for f in out.rglob("*"):
        assert f.is_dir() or not f.name.startswith(".") or TEMP.match(f.name) or f.name in (".lock", ENDING), where


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
    # a run that had finished before the signal is rerun as it is ("nothing to do"; --resume refuses a finished run);
    # one stopped before its last checkpoint, or after it but before its end was written (final eval, loss plot:
    # the ENDING marker is there), is finished with --resume
    from peft_rwkv7.run_dir import ENDING, list_checkpoints

    saved = list_checkpoints(out)
    resume = ["--resume"] if saved and (saved[-1][0] < STEPS or (out / ENDING).exists()) else []
    res = _reap(_start(args + resume, ROOT))
    assert res[0] == 0, f"{where}; the rerun{resume}: {res[1]}"
    a, b = load_file(world / "ref/adapter.safetensors"), load_file(out / "adapter.safetensors")
    assert set(a) == set(b), where
    for k in a:
        assert torch.equal(a[k], b[k]), f"{where}: {k} differs from the uninterrupted run's"
    assert torch.equal(torch.load(world / "ref/state.pth")["blocks.0.att.time_state"],
                       torch.load(out / "state.pth")["blocks.0.att.time_state"]), where
    _check_run_dir(out, where)
    assert not (out / ENDING).exists() and (out / "loss.png").is_file(), where
    left = [f.name for f in out.rglob(".*") if f.name != ".lock"]  # the killed writes' temp files are removed too
    assert left == [], (where, left)
    assert log_records(out) == log_records(world / "ref"), f"{where}: log.jsonl differs from the uninterrupted run's"


@pytest.mark.parametrize("sig", ["kill", "int"])
def test_a_killed_run_resumes_to_the_same_adapter(world, tmp_path, sig):
    _train_trial(world, tmp_path, random.Random(f"{SEED}-train-{sig}"), SIGNALS[sig], 0, SEED)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_adapter_sweep(world, tmp_path):
    rng = random.Random(f"{SEED}-train-sweep")
    for trial in range(8):
        _train_trial(world, tmp_path, rng, SIGNALS[rng.choice(sorted(SIGNALS))], trial, SEED)


