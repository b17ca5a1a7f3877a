"""What adapters/inits.py's tests had left open (mutation testing, `scripts/mutation.sh inits`): the rank's accepted
range at both ends and the words of each refusal, EVA with exactly r calibration rows, and collect_inputs taking the
last rows one by one, naming a missing module and returning an empty [0, in] where no row arrived. Expectations
written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_rwkv7.adapters.inits import collect_inputs, eva_components, loftq_start, olora_start
from peft_rwkv7.errors import UserError


def test_the_rank_may_be_1_or_the_smaller_side_and_nothing_else():
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    for r in (1, 4):
        a, b = olora_start(w, r, alpha=2.0)
        assert a.shape == (r, 4) and b.shape == (6, r)
        a, b = loftq_start(w, r, 1.0, "int8", 1, torch.float32)
        assert a.shape == (r, 4) and b.shape == (6, r)
    for r in (0, 5):
        with pytest.raises(UserError) as e:
            olora_start(w, r, alpha=2.0)
        assert str(e.value) == f"method.r: {r} must be between 1 and 4 for an OLoRA weight of shape [6, 4]"
        with pytest.raises(UserError) as e:
            loftq_start(w, r, 1.0, "int8", 1, torch.float32)
        assert str(e.value) == f"method.r: {r} must be between 1 and 4 for a LoftQ weight of shape [6, 4]"


def test_loftq_names_the_quantizations_it_takes():
    with pytest.raises(UserError) as e:
        loftq_start(torch.ones(4, 4), 2, 1.0, "none", 1, torch.float32)
    assert str(e.value) == "method.quant: LoftQ needs a quantized base (nf4, fp4, int8), got 'none'"


def test_eva_takes_exactly_r_rows_and_names_its_inputs():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = eva_components(x, 3)  # n == r: allowed (the rank check then caps r at min(n, d))
    assert a.shape == (3, 5)
    with pytest.raises(UserError) as e:
        eva_components(x[:, :2], 3)
    assert str(e.value) == "method.r: 3 must be between 1 and 2 for EVA inputs of shape [3, 2]"


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.unused = nn.Linear(3, 3), nn.Linear(5, 7)

    def forward(self, x):  # token ids [B, T] -> floats: each id as a 3-vector
        return self.first(x.float()[..., None].expand(*x.shape, 3))


def test_collect_inputs_takes_the_last_rows_one_at_a_time_and_an_unreached_module_is_empty():
    model = Two()
    batches = [torch.arange(4).view(1, 4), torch.arange(10, 14).view(2, 2), torch.arange(20, 24).view(1, 4)]
    out = collect_inputs(model, ["first", "unused"], batches, max_tokens=5)
    # 4 rows from the first batch, then the 1 row still wanted from the second: id 10
    assert out["first"][:, 0].tolist() == [0, 1, 2, 3, 10]
    assert out["unused"].shape == (0, 5) and out["unused"].dtype == torch.float32
    one = collect_inputs(model, ["first"], batches, max_tokens=1)
    assert one["first"][:, 0].tolist() == [0]
    with pytest.raises(UserError) as e:
        collect_inputs(model, ["first"], batches, max_tokens=0)
    assert str(e.value) == "EVA calibration tokens: 0 must be at least 1"
    with pytest.raises(ValueError) as e:
        collect_inputs(model, ["first", "second"], batches, max_tokens=2)
    assert str(e.value) == "collect_inputs: the model has no submodule 'second'"
