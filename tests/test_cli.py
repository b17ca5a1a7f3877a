"""Bad inputs through the real CLI: a short clear message, non-zero exit, no traceback, no output left."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from peft_rwkv7.adapters import MethodConfig, attach, save_adapter
    from peft_rwkv7.model import load_model, save_model

    d = tmp_path_factory.mktemp("cli")
    save_model(make_model(seed=21, n_embd=64, vocab_size=65536), d / "base.pth")
    save_model(make_model(seed=22, n_embd=64, vocab_size=65536), d / "other.pth")
    data = (d / "base.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 3])
    torch.save({"weight": torch.zeros(2)}, d / "notrwkv.pth")
    (d / "good.jsonl").write_text('{"text": "hello world"}\n{"text": "more text here"}\n')
    (d / "badline.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (d / "empty.jsonl").write_text("")
    adapted = attach(load_model(d / "base.pth"), MethodConfig(kind="lora", r=2, alpha=4))
    save_adapter(adapted, d / "run", base_path=str(d / "base.pth"))
    (d / "broken.yaml").write_text("model: {path: [x\n")
    return d


def recipe(files: Path, **over) -> list[str]:
    base = {"model.path": files / "base.pth", "data.path": files / "good.jsonl", "data.ctx_len": 16,
            "train.max_steps": 1, "train.micro_bsz": 1, "out_dir": files / "out", "log.progress": "false"}
    base.update(over)
    return ["train", str(ROOT / "recipes/lora.yaml"), *[f"{k}={v}" for k, v in base.items()]]


CASES = {
    "missing model": lambda f: recipe(f, **{"model.path": f / "absent.pth"}),
    "truncated model": lambda f: recipe(f, **{"model.path": f / "truncated.pth"}),
    "non-RWKV model": lambda f: recipe(f, **{"model.path": f / "notrwkv.pth"}),
    "invalid jsonl line": lambda f: recipe(f, **{"data.path": f / "badline.jsonl"}),
    "empty dataset": lambda f: recipe(f, **{"data.path": f / "empty.jsonl"}),
    "unknown recipe key": lambda f: recipe(f, **{"train.learning_rate": 1}),
    "negative lr": lambda f: recipe(f, **{"train.lr": -1e-4}),
    "ctx_len 0": lambda f: recipe(f, **{"data.ctx_len": 0}),
    "unknown method": lambda f: recipe(f, **{"method.kind": "magic"}),
    "missing recipe": lambda f: ["train", f / "nope.yaml"],
    "broken yaml": lambda f: ["train", f / "broken.yaml"],
    "different base": lambda f: ["merge", "--base", f / "other.pth", "--adapter", f / "run", "--out", f / "m.pth"],
    "missing adapter": lambda f: ["merge", "--base", f / "base.pth", "--adapter", f / "nope", "--out", f / "m.pth"],
    "eval missing data": lambda f: ["eval", "--model", f / "base.pth", "--data", f / "nope.jsonl"],
    "data build missing": lambda f: ["data", "build", f / "nope.jsonl", "--out", f / "built"],
    "generate negative": lambda f: ["generate", "--model", f / "base.pth", "--prompt", "hi", "--max-tokens", "-3"],
}
EXPECT = {
    "missing model": "absent.pth", "truncated model": "truncated or corrupt", "non-RWKV model": "not an RWKV-7",
    "invalid jsonl line": "badline.jsonl", "empty dataset": "empty.jsonl", "unknown recipe key": "train.learning_rate",
    "negative lr": "train.lr", "ctx_len 0": "data.ctx_len", "unknown method": "method.kind",
    "missing recipe": "nope.yaml", "broken yaml": "broken YAML", "different base": "other.pth",
    "missing adapter": "nope", "eval missing data": "nope.jsonl", "data build missing": "nope.jsonl",
    "generate negative": "--max-tokens",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(files, case):
    res = cli(*CASES[case](files))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert 1 <= len(lines) <= 2, res.stderr
    assert EXPECT[case] in res.stderr, res.stderr
    assert not (files / "m.pth").exists() and not (files / "built.bin").exists()
    assert not (files / "out" / "checkpoints").exists()


def test_debug_shows_traceback(files):
    res = cli("--debug", "inspect", files / "notrwkv.pth")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_help_is_fast_and_lists_commands():
    res = cli("--help")
    assert res.returncode == 0
    commands = ("train", "merge", "generate", "eval", "data", "inspect", "export", "doctor", "recipes", "init",
                "convert", "chat")
    for cmd in commands:
        assert cmd in res.stdout


def test_version_and_help_with_defaults():
    from peft_rwkv7 import __version__

    res = cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"rwkv-peft {__version__}"
    res = cli("generate", "--help")
    text = " ".join(res.stdout.split())
    for shown in ("tokens to generate at most (default: 200)", "0 = greedy (default: 1.0)", "(default: 0.85)",
                  "(default: world)"):
        assert shown in text, shown
    res = cli("train", "--help")
    assert "recipe" in res.stdout and "dotted key=value overrides" in " ".join(res.stdout.split())


def test_eval_json_on_real_lambada(files):
    from tests.conftest import shared_file

    lambada = shared_file("lambada_test.jsonl")
    res = cli("eval", "--model", files / "base.pth", "--data", lambada, "--json", "--lambada", "--limit", "4")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) == {"loss", "ppl", "tokens", "acc"}
    assert out["tokens"] > 100 and 0.0 <= out["acc"] <= 1.0
    assert abs(out["ppl"] - math.exp(out["loss"])) <= 1e-12 * out["ppl"]  # fp64 exp of the printed fp64 loss


@pytest.mark.slow  # bf16 matmuls run a scalar path on AVX2-only CPUs: 14 s there
def test_eval_in_bf16_is_close_to_fp32(files):
    """--dtype bf16 (with an adapter attached) scores like fp32 up to bf16 rounding of the weights."""
    args = ["eval", "--model", files / "base.pth", "--adapter", files / "run", "--data", files / "good.jsonl", "--json"]
    fp32 = cli(*args, "--dtype", "fp32", "--out", files / "eval_fp32.json")
    bf16 = cli(*args, "--dtype", "bf16", "--device", "cpu")
    assert fp32.returncode == 0 and bf16.returncode == 0, fp32.stderr + bf16.stderr
    a, b = json.loads(fp32.stdout), json.loads(bf16.stdout)
    assert json.loads((files / "eval_fp32.json").read_text()) == a  # --out: the printed result, also on file
    assert a["tokens"] == b["tokens"] and a["loss"] != b["loss"]  # really ran in another dtype
    # an outcome bound, not a rounding count: bf16 weights and activations through the whole eval may move
    # the loss by up to 2% (the rounding itself is bounded per site in tests/train/test_precision.py)
    assert abs(a["loss"] - b["loss"]) <= 0.02 * a["loss"], (a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(files):
    res = cli("generate", "--model", files / "base.pth", "--prompt", "hi", "--device", "cuda")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "--device cuda" in res.stderr
