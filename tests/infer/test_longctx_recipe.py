"""recipes/passkey.yaml: its data is what `eval --passkey` scores, and it trains (2 steps on a tiny
World-vocabulary model, long-context chunks carrying state); the long-context CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from peft_rwkv7.data import load_tokenizer
from peft_rwkv7.infer import niah
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data/demo/rwkv7-demo.pth"


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_passkey_data_is_what_eval_passkey_scores():
    recipe = yaml.safe_load((ROOT / "recipes/passkey.yaml").read_text())
    assert recipe["train"]["chunk_len"] > 0 and recipe["data"]["ctx_len"] % recipe["train"]["chunk_len"] == 0
    tok = load_tokenizer("world")
    lines = (ROOT / recipe["data"]["path"]).read_text().splitlines()
    assert [json.loads(x) for x in lines[:20]] == niah.passkey_records(20, [64, 96, 128], tok, seed=1, per_doc=2)
    for line in lines[:50]:
        text = json.loads(line)["text"]
        assert text.startswith(niah.PASSKEY.intro) and text.count(niah.PASSKEY.question) == 2
        assert len(tok.encode(text)) + 1 <= recipe["data"]["ctx_len"]


def test_passkey_recipe_trains(tmp_path):
    from peft_rwkv7.model import save_model
    from peft_rwkv7.train.runner import train_from_cli

    save_model(make_model(seed=11, n_layer=2, n_embd=64, head_size=16, vocab_size=65536), tmp_path / "tiny.pth")
    over = {"model.path": tmp_path / "tiny.pth", "train.max_steps": 2, "train.micro_bsz": 2, "train.warmup_steps": 1,
            "train.save_every": 2, "data.ctx_len": 128, "train.chunk_len": 32, "log.progress": "false",
            "out_dir": tmp_path / "run"}
    assert train_from_cli(str(ROOT / "recipes/passkey.yaml"), [f"{k}={v}" for k, v in over.items()]) == 0
    steps = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]


def test_cli_passkey_compare_writes_json_and_png(tmp_path):
    from peft_rwkv7.model import load_model

    model = load_model(DEMO)
    g = torch.Generator().manual_seed(0)
    states = {f"blocks.{i}.att.time_state": torch.randn(blk.att.n_head, blk.att.head_size, blk.att.head_size,
                                                        generator=g) for i, blk in enumerate(model.blocks)}
    torch.save(states, tmp_path / "state.pth")
    out = cli("eval", "--passkey", "--model", DEMO, "--compare", tmp_path / "state.pth", "--lengths", "128,256",
              "--depths", "0,1", "--trials", "1", "--chunk-len", "64", "--plot", tmp_path / "p.png",
              "--out", tmp_path / "p.json", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res == json.loads((tmp_path / "p.json").read_text())
    assert [r["label"] for r in res["runs"]] == ["base", str(tmp_path / "state.pth")]
    for run in res["runs"]:
        assert [(c["ctx"], c["depth"]) for c in run["cells"]] == [(128, 0.0), (128, 1.0), (256, 0.0), (256, 1.0)]
        assert all(set(c) >= {"ctx", "depth", "correct", "logprob"} for c in run["cells"])
    assert res["runs"][0]["cells"][0]["logprob"] != res["runs"][1]["cells"][0]["logprob"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # 15-30 s on a 2-core machine: CI runs it
def test_cli_ctx_curve_and_niah_text_output(tmp_path):
    out = cli("eval", "--ctx-curve", "--model", DEMO, "--data", ROOT / "data/demo/long_docs.jsonl", "--limit", "1",
              "--max-ctx", "256", "--plot", tmp_path / "c.png", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert [b["tokens"] for b in res["buckets"]] == [16] * 16 and res["label"] == "base"
    assert (tmp_path / "c.png").exists()
    out = cli("eval", "--niah", "--model", DEMO, "--lengths", "200", "--depths", "0.5", "--trials", "1",
              "--answer", "blue", "--needle", "The colour of the door is {answer}.",
              "--question", " What is the colour of the door? The colour of the door is")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("base: accuracy") and "0.50" in out.stdout


def test_cli_bad_long_context_input_is_one_line():
    for args, msg in [(["--ctx-curve"], "--ctx-curve needs --data"),
                      (["--niah", "--lengths", "10"], "too short"),
                      (["--passkey", "--depths", "2"], "--depths must lie in [0, 1]"),
                      (["--data", "x.jsonl", "--compare"], "--compare works with"),
                      (["--ctx-curve", "--niah"], "not allowed with"),
                      (["--passkey", "--lambada"], "--lambada does not combine")]:
        out = cli("eval", "--model", DEMO, *args)
        assert out.returncode == 2 and msg in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out)
