"""train/routes.py, what its mutation run (scripts/mutation.sh routes) found untested: auto on a CPU follows the
bf16 check and says so under the recipe's setting name, rank 0 on a GPU says what auto chose, and a model without
LoRA layers, where fused_lora was never imported, is routed without importing it. (That a bf16 run under auto
resumes in bf16 on a CPU now measured slow, which the checkpoint's `Routes.precision` decides, is
tests/ops/test_precision_auto.py's, in the routes map too.) The measurements are injected, so each holds on any
machine."""

from __future__ import annotations

import sys

import pytest
import torch

from peft_rwkv7.ops import precision as ops_precision
from peft_rwkv7.ops import thin_check
from peft_rwkv7.train import routes
from peft_rwkv7.train.distributed import Dist
from tests.conftest import inject_measurement
from tests.ops.test_precision_auto import FAST, SLOW

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
