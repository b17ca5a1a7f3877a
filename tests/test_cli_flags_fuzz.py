"""Bad flag values through the CLI in process: one line naming the flag (or file) and what is expected, exit 2,
no traceback, nothing read as 'not given' or as the working directory, no input written over."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from peft_rwkv7.cli import main
from tests.conftest import make_model

BIG = str(2**70)


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    from peft_rwkv7.adapters import MethodConfig, attach, save_adapter
    from peft_rwkv7.model import load_model, save_model

    d = tmp_path_factory.mktemp("flags")
    shape = dict(n_layer=1, n_embd=32, head_size=16)
    save_model(make_model(seed=1, vocab_size=65536, **shape), d / "m.pth")
    save_model(make_model(seed=1, vocab_size=97, **shape), d / "small.pth")
    bad = make_model(seed=1, vocab_size=65536, **shape)
    with torch.no_grad():
        bad.head.weight.fill_(float("nan"))
    save_model(bad, d / "nan.pth")
    save_adapter(attach(load_model(d / "m.pth"), MethodConfig(kind="lora", r=2, alpha=4)), d / "run",
                 base_path=str(d / "m.pth"))
    (d / "docs.jsonl").write_text('{"text": "hello world"}\n{"text": "more text here"}\n')
    (d / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    (d / "noreply.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (d / "afile").write_text("x")
    (d / "sub").mkdir()
    return d


def run(f, argv: list[str], monkeypatch) -> tuple[int, list[str], str]:
    monkeypatch.chdir(f)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith(("--dtype auto", "tokeniz"))]
    return rc, lines, out.getvalue()


GEN = ["generate", "--model", "m.pth", "--prompt", "hi", "--device", "cpu", "--dtype", "fp32", "--max-tokens", "2"]
EV = ["eval", "--model", "m.pth", "--device", "cpu", "--dtype", "fp32"]
INIT = ["init", "--model", "m.pth", "--data", "docs.jsonl"]
CASES = {  # name: (argv, words the one line must hold)
    "seed negative": ([*GEN, "--seed", "-1"], ["--seed", "non-negative"]),
    "seed past 2**64": ([*GEN, "--seed", str(2**64)], ["--seed", "below"]),
    "lora-alpha without adapter": ([*GEN, "--lora-alpha", "4"], ["--lora-alpha", "--adapter"]),
    "lora-alpha nan": ([*GEN, "--adapter", "run", "--lora-alpha", "nan"], ["--lora-alpha", "positive"]),
    "adapter empty": ([*GEN, "--adapter", ""], ["--adapter is empty"]),
    "model empty": (["generate", "--model", "", "--prompt", "hi"], ["--model is empty"]),
    "nan model": ([*GEN[:2], "nan.pth", *GEN[3:]], ["--model nan.pth", "non-finite logits"]),
    "nan model greedy": ([*GEN[:2], "nan.pth", *GEN[3:], "--temperature", "0"], ["nan.pth", "non-finite"]),
    "nan model chat": ([*GEN[:2], "nan.pth", *GEN[3:], "--chat"], ["nan.pth", "non-finite"]),
    "tokenizer past vocab": ([*GEN[:2], "small.pth", *GEN[3:]], ["--tokenizer world", "small.pth", "97"]),
    "eval empty texts": ([*EV, "--data", "blank.jsonl"], ["blank.jsonl", "no tokens to score"]),
    "eval chat without replies": ([*EV, "--data", "noreply.jsonl"], ["noreply.jsonl", "no tokens to score"]),
    "eval limit huge": ([*EV, "--data", "docs.jsonl", "--limit", BIG], ["--limit", "below"]),
    "eval out onto data": ([*EV, "--data", "docs.jsonl", "--out", "docs.jsonl"], ["--out docs.jsonl", "--data"]),
    "eval out empty": ([*EV, "--data", "docs.jsonl", "--out", ""], ["--out is empty"]),
    "eval system on text": ([*EV, "--data", "docs.jsonl", "--system", "be brief"], ["--system", "docs.jsonl"]),
    "eval depths unread": ([*EV, "--data", "docs.jsonl", "--depths", "0.5"], ["--depths", "--niah"]),
    "eval trials unread": ([*EV, "--ctx-curve", "--data", "docs.jsonl", "--trials", "4"], ["--trials", "--ctx-curve"]),
    "eval max-ctx unread": ([*EV, "--data", "docs.jsonl", "--max-ctx", "100"], ["--max-ctx", "--ctx-curve"]),
    "eval chunk-len unread": ([*EV, "--data", "docs.jsonl", "--chunk-len", "100"], ["--chunk-len", "--niah"]),
    "niah lengths empty": ([*EV, "--niah", "--lengths", ""], ["--lengths is empty"]),
    "niah lengths huge": ([*EV, "--niah", "--lengths", BIG], ["--lengths", "at most"]),
    "niah max-ctx huge": ([*EV, "--niah", "--max-ctx", str(2**40)], ["--max-ctx", "at most"]),
    "niah max-ctx beside lengths": ([*EV, "--niah", "--lengths", "64", "--max-ctx", "32"],  # was: --max-ctx ignored
                                    ["--max-ctx does nothing beside --lengths"]),
    "plot not a png": ([*EV, "--ctx-curve", "--data", "docs.jsonl", "--plot", "x.txt"],  # was: a PNG named x.txt
                       ["--plot x.txt", "ending in .png"]),
    "chat system empty": ([*GEN, "--chat", "--system", ""], ["--system is empty"]),  # was: read as no system
    "eval system empty": ([*EV, "--data", "docs.jsonl", "--system", " "], ["--system is empty"]),
    "passkey needle without answer": ([*EV, "--passkey", "--lengths", "64", "--needle", "x"], ["--needle", "{answer}"]),
    "compare empty": ([*EV, "--ctx-curve", "--data", "docs.jsonl", "--compare", ""], ["--compare", "empty"]),
    "rewards empty": ([*EV, "--rewards", "", "--data", "docs.jsonl"], ["--rewards is empty"]),
    "pairs empty": ([*EV, "--pairs", "", "--data", "docs.jsonl"], ["--pairs is empty"]),
    "init missing model": (["init", "--model", "nope.pth", "--data", "docs.jsonl", "--out", "r.yaml"],
                           ["--model nope.pth"]),
    "init missing data": (["init", "--model", "m.pth", "--data", "nope.jsonl", "--out", "r.yaml"],
                          ["--data nope.jsonl"]),
    "init out under a file": ([*INIT, "--out", "afile/r.yaml"], ["--out afile/r.yaml", "not a directory"]),
    "init KIND empty": (["init", "", *INIT[1:], "--out", "r.yaml"], ["KIND is empty"]),
    "init --kind empty": ([*INIT, "--kind", "", "--out", "r.yaml"], ["--kind is empty"]),
    "init out-dir empty": ([*INIT, "--out", "r.yaml", "--out-dir", ""], ["--out-dir is empty"]),
    "init out-dir a file": ([*INIT, "--out", "r.yaml", "--out-dir", "afile"], ["--out-dir afile", "is a file"]),
    "init ctx-len huge": ([*INIT, "--out", "r.yaml", "--ctx-len", BIG], ["--ctx-len", "below"]),
    "data build empty texts": (["data", "build", "blank.jsonl", "--out", "b"], ["blank.jsonl", "every document"]),
    "data build out empty": (["data", "build", "docs.jsonl", "--out", ""], ["--out is empty"]),
    "data build out a directory": (["data", "build", "docs.jsonl", "--out", "sub/"], ["--out sub/", "prefix"]),
    "data build input empty": (["data", "build", "", "--out", "b"], ["INPUT is empty"]),
    "convert input empty": (["convert", "", "x.pth"], ["INPUT is empty"]),
    "convert output empty": (["convert", "m.pth", ""], ["OUTPUT is empty"]),
    "inspect empty": (["inspect", ""], ["PATH is empty"]),
    "export out onto model": (["export", "--model", "m.pth", "--format", "st", "--out", "m.pth"],
                              ["would write over --model m.pth"]),
    "export model empty": (["export", "--model", "", "--format", "st", "--out", "e.st"], ["--model is empty"]),
    "merge lora-alpha nan": (["merge", "--base", "m.pth", "--adapter", "run", "--out", "o.pth", "--lora-alpha", "nan"],
                             ["--lora-alpha must be a positive number, got nan"]),
    "merge lora-alpha negative": (["merge", "--base", "m.pth", "--adapter", "run", "--out", "o.pth",
                                   "--lora-alpha=-2"], ["--lora-alpha must be a positive number, got -2.0"]),
    "export lora-alpha without adapter": (["export", "--model", "m.pth", "--format", "st", "--out", "e.st",
                                           "--lora-alpha", "4"], ["--lora-alpha", "give --adapter"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_flag_is_one_clear_line(f, monkeypatch, case):
    argv, words = CASES[case]
    before = {p.name: p.read_bytes() for p in f.iterdir() if p.is_file()}
    rc, lines, _ = run(f, argv, monkeypatch)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, lines)
    assert all(w in lines[0] for w in words), lines
    assert {p.name: p.read_bytes() for p in f.iterdir() if p.is_file()} == before, "an input was changed"
    assert not (f / "r.yaml").exists() and not (f / "b.bin").exists()


def test_generate_ends_the_prompt_s_line_before_an_error(f, monkeypatch):
    """Found by fuzzing: `generate` writes the prompt to stdout first; an error while generating (here another
    model's tokenizer) printed its stderr line after it, on the prompt's line on a terminal."""
    rc, lines, out = run(f, [*GEN[:2], "small.pth", *GEN[3:]], monkeypatch)
    assert rc == 2 and out == "hi\n" and lines[0].startswith("error: "), (rc, out, lines)


def test_good_flags_still_run(f, monkeypatch):
    assert run(f, [*GEN, "--seed", str(2**64 - 1)], monkeypatch)[0] == 0
    assert run(f, [*GEN, "--adapter", "run"], monkeypatch)[0] == 0
    curve = [*EV, "--ctx-curve", "--data", "docs.jsonl", "--max-ctx", "8", "--chunk-len", "4"]
    assert run(f, curve, monkeypatch)[0] == 0
    assert run(f, [*INIT, "--out", "ok.yaml", "--out-dir", "runs/x"], monkeypatch)[0] == 0
