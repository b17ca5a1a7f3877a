"""Every subcommand checks its paths (and refuses flags its mode ignores) before any work: one line naming
the flag and the path, exit 2, and neither torch nor the model code imported by then."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LORA = str(ROOT / "recipes/lora.yaml")

# One fresh interpreter runs every case in turn: its exit status, its stderr, and the heavy modules
# imported by the end of it (any of them means the command started working before it checked its input).
_PROBE = """
import contextlib, io, json, sys
from peft_rwkv7.cli import main
HEAVY = ("torch", "peft", "deepspeed", "peft_rwkv7.model", "peft_rwkv7.infer.evaluate", "peft_rwkv7.train.loop")
report = {}
for name, argv in json.loads(sys.stdin.read()).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    report[name] = {"rc": rc, "err": err.getvalue(), "heavy": [m for m in HEAVY if m in sys.modules]}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Existing inputs (their content is never read: the bad path of each case is found first), a missing
    file, and a regular file to put outputs under (so their parent cannot be a directory)."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "model.pth").write_bytes(b"")
    (d / "run").mkdir()
    (d / "docs.jsonl").write_text('{"text": "hello"}\n')
    (d / "afile").write_text("")
    return {"model": str(d / "model.pth"), "run": str(d / "run"), "docs": str(d / "docs.jsonl"),
            "missing": str(d / "nope" / "missing.pth"), "under_file": str(d / "afile" / "out.x"), "dir": str(d)}


def _train(p: dict, **over) -> list[str]:
    keys = {"model.path": p["model"], "data.path": p["docs"], "data.eval_path": p["docs"],
            "out_dir": f"{p['dir']}/trained", "log.progress": "false", **over}
    return ["train", LORA, *[f"{k}={v}" for k, v in keys.items()]]


def _cases(p: dict) -> dict[str, tuple[list[str], str, str]]:
    """name -> (argv, the flag the message must name, the path it must name)."""
    m, run, docs, bad, under = p["model"], p["run"], p["docs"], p["missing"], p["under_file"]
    gen = ["generate", "--prompt", "hi"]
    ev = ["eval", "--model", m]
    return {
        "train model.path": (_train(p, **{"model.path": bad}), "model.path", bad),
        "train data.path": (_train(p, **{"data.path": bad}), "data.path", bad),
        "train data.eval_path": (_train(p, **{"data.eval_path": bad}), "data.eval_path", bad),
        "train data.tokenizer": (_train(p, **{"data.tokenizer": bad}), "data.tokenizer", bad),
        "train out_dir": (_train(p, out_dir=under), "out_dir", under),
        "merge --base": (["merge", "--base", bad, "--adapter", run, "--out", f"{p['dir']}/m.pth"], "--base", bad),
        "merge --adapter": (["merge", "--base", m, "--adapter", bad, "--out", f"{p['dir']}/m.pth"], "--adapter", bad),
        "merge --out": (["merge", "--base", m, "--adapter", run, "--out", under], "--out", under),
        "export --adapter": (["export", "--adapter", bad, "--out", f"{p['dir']}/e.pth"], "--adapter", bad),
        "export --model": (["export", "--model", bad, "--format", "st", "--out", f"{p['dir']}/e.st"], "--model", bad),
        "export --out": (["export", "--adapter", run, "--out", under], "--out", under),
        "convert input": (["convert", bad, f"{p['dir']}/c.st"], "INPUT", bad),
        "convert output": (["convert", m, under], "OUTPUT", under),
        "generate --model": ([*gen, "--model", bad], "--model", bad),
        "generate --adapter": ([*gen, "--model", m, "--adapter", bad], "--adapter", bad),
        "generate --tokenizer": ([*gen, "--model", m, "--tokenizer", bad], "--tokenizer", bad),
        "chat --model": (["chat", "--model", bad], "--model", bad),
        "chat --adapter": (["chat", "--model", m, "--adapter", bad], "--adapter", bad),
        "chat --tokenizer": (["chat", "--model", m, "--tokenizer", bad], "--tokenizer", bad),
        "eval --model": (["eval", "--model", bad, "--data", docs], "--model", bad),
        "eval --adapter": ([*ev, "--adapter", bad, "--data", docs], "--adapter", bad),
        "eval --data": ([*ev, "--data", bad], "--data", bad),
        "eval --lambada --data": ([*ev, "--lambada", "--data", bad], "--data", bad),
        "eval --tokenizer": ([*ev, "--data", docs, "--tokenizer", bad], "--tokenizer", bad),
        "eval --ctx-curve --data": ([*ev, "--ctx-curve", "--data", bad], "--data", bad),
        "eval --ctx-curve --plot": ([*ev, "--ctx-curve", "--data", docs, "--plot", under], "--plot", under),
        "eval --niah --haystack": ([*ev, "--niah", "--haystack", bad], "--haystack", bad),
        "eval --niah --out": ([*ev, "--niah", "--out", under], "--out", under),
        "eval --passkey --compare": ([*ev, "--passkey", "--adapter", run, "--compare", run, bad], "--compare", bad),
        "eval --ctx-curve --compare": ([*ev, "--ctx-curve", "--data", docs, "--compare", bad], "--compare", bad),
        "data build input": (["data", "build", bad, "--out", f"{p['dir']}/b"], "INPUT", bad),
        "data build --out": (["data", "build", docs, "--out", under], "--out", under),
        "data build --tokenizer": (["data", "build", docs, "--out", f"{p['dir']}/b", "--tokenizer", bad],
                                   "--tokenizer", bad),
        "inspect path": (["inspect", bad], "PATH", bad),
        # flags the long-context grids do not read
        "niah --data": ([*ev, "--niah", "--data", docs], "--data", "--niah"),
        "passkey --limit": ([*ev, "--passkey", "--limit", "3"], "--limit", "--passkey"),
        "niah --kind": ([*ev, "--niah", "--kind", "sft"], "--kind", "--niah"),
        "passkey --system": ([*ev, "--passkey", "--system", "be brief"], "--system", "--passkey"),
        "ctx-curve --kind": ([*ev, "--ctx-curve", "--data", docs, "--kind", "chat"], "--kind", "--ctx-curve"),
        "ctx-curve --haystack": ([*ev, "--ctx-curve", "--data", docs, "--haystack", docs], "--haystack",
                                 "--ctx-curve"),
        "eval --needle without a grid": ([*ev, "--data", docs, "--needle", "x"], "--needle", "--niah"),
        "eval --plot without a mode": ([*ev, "--data", docs, "--plot", f"{p['dir']}/p.png"], "--plot", "--ctx-curve"),
    }


@pytest.fixture(scope="module")
def report(paths):
    cases = _cases(paths)
    res = subprocess.run([sys.executable, "-c", _PROBE], input=json.dumps({k: v[0] for k, v in cases.items()}),
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(_cases({k: k for k in ("model", "run", "docs", "missing", "under_file",
                                                              "dir")})))
def test_a_bad_input_fails_before_any_work(paths, report, case):
    _, flag, named = _cases(paths)[case]
    got = report[case]
    lines = [ln for ln in got["err"].splitlines() if ln.strip()]
    assert got["rc"] == 2 and len(lines) == 1, got
    assert lines[0].startswith("error: ") and flag in lines[0] and named in lines[0], lines
    assert got["heavy"] == [], f"{case}: imported {got['heavy']} before refusing"
