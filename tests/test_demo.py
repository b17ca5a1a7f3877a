"""The README's main job: state-tune the bundled demo model on the bundled domain, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data/demo/rwkv7-demo.pth"
EVAL = ROOT / "data/demo/ship_log_eval.jsonl"


def cli(*args) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT, timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_demo_model_is_bundled_and_small():
    assert DEMO.exists() and DEMO.stat().st_size <= 20 * 2**20
    out = cli("inspect", DEMO).stdout
    assert "vocab 65536" in out


@pytest.mark.slow
def test_state_tune_recipe_learns_the_domain(tmp_path):
    run = tmp_path / "state_tune"
    cli("train", "recipes/state_tune.yaml", f"out_dir={run}", "log.progress=false")
    before = json.loads(cli("eval", "--model", DEMO, "--data", EVAL, "--json").stdout)
    after = json.loads(cli("eval", "--model", DEMO, "--adapter", run, "--data", EVAL, "--json").stdout)
    assert after["loss"] <= 0.95 * before["loss"], (before, after)  # visibly learns: >= 5% lower loss
    prompt = "Ship's log, day 12."
    tuned = cli("generate", "--model", DEMO, "--adapter", run, "--prompt", prompt, "--max-tokens", "40",
                "--temperature", "0").stdout
    base = cli("generate", "--model", DEMO, "--prompt", prompt, "--max-tokens", "40", "--temperature", "0").stdout
    # words of the log entries that the base model's greedy continuation never reaches
    markers = ("Wind:", "Sea:", "Sky:", "Position:", "knots", "sighted", "deck", "rigging", "bilge", "cargo")
    assert any(m in tuned[len(prompt):] for m in markers), tuned
    assert not any(m in base[len(prompt):] for m in markers), base
