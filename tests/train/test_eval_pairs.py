"""`rwkv-peft eval --pairs RECIPE`: reward accuracy and margin on preference pairs for a trained adapter equal
what the trainer's held-out evaluation logged for the same weights, and the base model scores no margin under DPO
(its reward is log pi/pi_ref = 0 for every answer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "peft_rwkv7.cli"]


def run(*args, check=True):
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "dpo"
    run("train", "recipes/dpo.yaml", "train.max_steps=6", "train.eval_every=6", "train.warmup_steps=0",
        f"out_dir={out}")
    return out


@pytest.mark.slow  # 15-30 s on a 2-core machine: CI runs it
def test_pairs_equal_the_trainers_held_out_evaluation(dpo_run):
    logged = [r for r in map(json.loads, (dpo_run / "log.jsonl").read_text().splitlines()) if "eval_reward_acc" in r]
    assert logged and logged[-1]["step"] == 6
    got = json.loads(run("eval", "--model", "data/demo/rwkv7-demo.pth", "--adapter", str(dpo_run), "--data",
                         "data/demo/ship_log_prefs_eval.jsonl", "--pairs", str(dpo_run / "recipe.yaml"),
                         "--json").stdout)
    every = len((ROOT / "data/demo/ship_log_prefs_eval.jsonl").read_text().splitlines())
    assert got["objective"] == "dpo" and got["pairs"] == logged[-1]["eval_pairs"] == every  # every pair, none held out
    # the same pairs, weights and objective: equal up to fp32 summation order (batches of the same size)
    for k in ("reward_acc", "reward_margin", "loss", "chosen_logp", "rejected_logp"):
        assert got[k] == pytest.approx(logged[-1][f"eval_{k}"], rel=1e-4, abs=1e-5), k
    assert got["reward_margin"] != 0


@pytest.mark.slow  # shares the DPO run (20 s) of the test above
def test_base_model_has_no_dpo_margin(dpo_run):
    got = json.loads(run("eval", "--model", "data/demo/rwkv7-demo.pth", "--data",
                         "data/demo/ship_log_prefs_eval.jsonl", "--pairs", str(dpo_run / "recipe.yaml"),
                         "--json").stdout)
    assert got["reward_margin"] == 0 and got["reward_acc"] == 0.5  # every pair a tie: one half each


def test_pairs_refusals_are_one_line():
    bad = run("eval", "--model", "data/demo/rwkv7-demo.pth", "--data", "data/demo/ship_log_prefs_eval.jsonl",
              "--pairs", "recipes/state_tune.yaml", check=False)
    assert bad.returncode == 2 and "preference recipe" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = run("eval", "--model", "data/demo/rwkv7-demo.pth", "--pairs", "recipes/dpo.yaml", check=False)
    assert bad.returncode == 2 and "--pairs needs --data" in bad.stderr
    bad = run("eval", "--model", "data/demo/rwkv7-demo.pth", "--data", "x.jsonl", "--pairs", "recipes/dpo.yaml",
              "--limit", "3", check=False)
    assert bad.returncode == 2 and "--limit does not apply to --pairs" in bad.stderr


@pytest.mark.parametrize("flag, precision, expect", [("auto", "fp32", "fp32"), ("auto", "bf16", "bf16"),
                                                     ("auto", "auto", "auto"), ("bf16", "fp32", "bf16")])
def test_pairs_load_the_model_in_the_recipes_precision(tmp_path, monkeypatch, flag, precision, expect):
    """--dtype auto follows the recipe's train.precision, as the trainer's held-out evaluation ran (an AMX Xeon,
    where auto means bf16 for inference, gave margins 6e-4 off the trainer's fp32 ones); --dtype given wins."""
    from peft_rwkv7 import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes/dpo.yaml").read_text().replace("precision: fp32", f"precision: {precision}"))
    seen = []

    class Loaded(Exception):
        pass

    def load(args, say=True, tokenizer=None):
        seen.append(args.dtype)
        raise Loaded

    monkeypatch.setattr(cli, "_load_for_inference", load)
    with pytest.raises(Loaded):
        cli.main(["--debug", "eval", "--model", "data/demo/rwkv7-demo.pth", "--data",
                  "data/demo/ship_log_prefs_eval.jsonl", "--pairs", str(recipe), "--dtype", flag])
    assert seen == [expect]
