"""merge and export never write over their own inputs (found by fuzzing the web UI: `export --format rwkv-peft --out
RUN/adapter.safetensors` replaced the run's adapter with RWKV-PEFT's layout and broke the run). An output that is the
base model, the adapter file, the run directory or one of the run's own files is one line, exit 2, and every input
is left byte for byte; a new file inside the run directory (RUN/merged.pth, what `train` suggests) is written."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7 import MethodConfig, attach, load_model, save_adapter, save_model
from peft_rwkv7.cli import main
from tests.conftest import make_model


@pytest.fixture
def files(tmp_path):
    base, run = tmp_path / "base.pth", tmp_path / "run"
    save_model(make_model(seed=6), base, dtype=torch.float32)
    save_adapter(attach(load_model(base), MethodConfig(kind="lora", r=2)), run)
    (run / "recipe.yaml").write_text("out_dir: run\n")
    (run / "checkpoints").mkdir()
    return base, run


def _snapshot(*roots):
    return {p: p.read_bytes() for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()}


CASES = {  # argv (B: the base, R: the run) -> what the line names
    "merge over the adapter": (["merge", "--base", "B", "--adapter", "R", "--out", "R/adapter.safetensors"],
                               "the run R's own adapter.safetensors"),
    "merge over the base": (["merge", "--base", "B", "--adapter", "R", "--out", "B"], "--base B"),
    "merge over the recipe": (["merge", "--base", "B", "--adapter", "R", "--out", "R/recipe.yaml"],
                              "the run R's own recipe.yaml"),
    "rwkv-peft over the adapter": (["export", "--format", "rwkv-peft", "--adapter", "R", "--out",
                                    "R/adapter.safetensors"], "the run R's own adapter.safetensors"),
    "st into the checkpoints": (["export", "--format", "st", "--adapter", "R", "--out", "R/checkpoints/a.st"],
                                "the run R's own checkpoints"),
    "hf over the model": (["export", "--format", "hf", "--model", "B", "--out", "B"], "--model B"),
    "hf over the adapter's json": (["export", "--format", "hf", "--model", "B", "--adapter", "R", "--out",
                                    "R/adapter.json"], "the run R's own adapter.json"),
}


@pytest.mark.parametrize("argv, what", CASES.values(), ids=CASES.keys())
def test_an_output_over_an_input_is_refused_and_nothing_changes(files, capsys, argv, what):
    base, run = files
    before = _snapshot(base, run)

    def sub(a: str) -> str:
        return a.replace("B", str(base)).replace("R", str(run)) if a in ("B", "R") or a[:2] == "R/" else a

    argv = [sub(a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    out = argv[argv.index("--out") + 1]
    what = what.replace("B", str(base)).replace(" R", f" {run}")
    assert err == f"error: {out}: would write over {what}; write the output elsewhere (nothing was written)\n"
    assert _snapshot(base, run) == before


def test_a_new_file_in_the_run_directory_is_written(files, capsys):
    base, run = files
    assert main(["merge", "--base", str(base), "--adapter", str(run), "--out", str(run / "merged.pth")]) == 0, \
        capsys.readouterr().err
    assert main(["export", "--format", "rwkv-peft", "--adapter", str(run), "--out", str(run / "rwkv-peft.pth")]) == 0
    load_model(run / "merged.pth")
