"""train/routes.py, what its mutation run (scripts/mutation.sh routes) found untested: auto on a CPU follows the
bf16 check and says so under the recipe's setting name, rank 0 on a GPU says what auto chose, a run begun in bf16
under auto resumes in bf16 whatever the machine measures now (the checkpoint's precision, read back), and a model
without LoRA layers, where fused_lora was never imported, is routed without importing it. The measurements are
injected, so each holds on any machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from peft_rwkv7.ops import precision as ops_precision
from peft_rwkv7.ops import thin_check
from peft_rwkv7.train import routes
from peft_rwkv7.train.distributed import Dist
from peft_rwkv7.train.loop import setup
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.runner import train_from_cli
from tests.conftest import inject_measurement
from tests.ops.test_precision_auto import FAST, SLOW
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
STATE = str(ROOT / "recipes" / "state_tune.yaml")
CPU = torch.device("cpu")


@pytest.mark.parametrize("measured, bf16", [(FAST, True), (SLOW, False)])
def test_auto_on_a_cpu_follows_the_bf16_check_and_names_the_setting(monkeypatch, tmp_path, capsys, measured, bf16):
    taken = inject_measurement(monkeypatch, tmp_path / "cache", ops_precision, "measure_bf16", measured)
    got = routes.decide_precision("auto", CPU, Dist(), {})
    assert got.bf16 is bf16 and got.precision == ("bf16" if bf16 else "fp32")
    assert len(taken) == 1  # measured on this CPU, once
    err = capsys.readouterr().err
    assert err.startswith(f"train.precision: auto chose {got.precision}: "), err
    # forced bf16 on a CPU measured slow: bf16 all the same, with the warning naming the setting
    assert routes.decide_precision("bf16", CPU, Dist(), {}).bf16
    assert ("warning: train.precision: bf16: " in capsys.readouterr().err) is not bf16


def test_on_a_gpu_rank_0_says_what_auto_chose(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(ops_precision, "cuda_bf16_native", lambda: False)
    assert routes.decide_precision("auto", torch.device("cuda"), Dist(), {}) == routes.Routes()
    said = capsys.readouterr().err
    assert said == "train.precision: auto chose fp32: Tesla T4 has no native bf16 (torch would emulate it)\n"


def test_a_run_begun_in_bf16_under_auto_resumes_in_bf16(tiny_world, tmp_path, monkeypatch, capsys):
    """The checkpoint keeps the precision the run computed in; a resume under auto takes it, even where this CPU's
    check (its cache lost) now measures bf16 slow."""
    extra = {"train.save_every": 2, "train.precision": "auto", "train.device": "cpu", "data.eval_path": "null"}
    inject_measurement(monkeypatch, tmp_path / "cache-fast", ops_precision, "measure_bf16", FAST)
    cut = tmp_path / "cut"
    train_from_cli(STATE, tiny_overrides(tiny_world, cut, steps=4, **extra) + ["train.stop_after=2"])
    taken = inject_measurement(monkeypatch, tmp_path / "cache-slow", ops_precision, "measure_bf16", SLOW)
    capsys.readouterr()
    run = setup(load_recipe(STATE, tiny_overrides(tiny_world, cut, steps=4, **extra)), resume=True)
    assert run.computes_in == "bf16"
    assert "train.precision: auto resumes in bf16" in capsys.readouterr().err
    assert len(taken) <= 1  # forced bf16 may measure, to warn; it never decides
    fresh = setup(load_recipe(STATE, tiny_overrides(tiny_world, tmp_path / "fresh", steps=4, **extra)))
    assert fresh.computes_in == "fp32"  # a new run on this CPU: the check's answer


def test_a_model_without_lora_is_routed_without_importing_fused_lora(monkeypatch, tmp_path):
    """State tuning never imports peft: where fused_lora is not loaded there are no LoRA layers, nothing is
    measured, and routing leaves the module unloaded."""
    name = "peft_rwkv7.adapters.fused_lora"
    monkeypatch.delitem(sys.modules, name, raising=False)
    taken = inject_measurement(monkeypatch, tmp_path / "cache", thin_check, "measure_thin", {})
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert routes._lora_layers(model) == []
    assert routes.decide_thin(model, routes.Routes(), CPU, Dist(), {}) == routes.Routes()
    assert name not in sys.modules and taken == []
