"""The peft tuner kinds in real runs: a run cut and resumed equals the uninterrupted one bit for bit, and bf16
training (frozen base in bf16, adapters fp32) trains and saves an adapter that merges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")
KINDS = {
    "dora": {"method.use_dora": "true"},
    "loha": {"method.kind": "loha"},
    "lokr": {"method.kind": "lokr"},
    "oft": {"method.kind": "oft", "method.r": 16},
    "boft": {"method.kind": "boft", "method.r": 16},
    "ia3": {"method.kind": "ia3"},
    "vera": {"method.kind": "vera", "method.r": 8},
    "lora+head": {"method.target_modules": "[att.key,ffn.value,head]"},
}


def _losses(out: Path) -> list[dict]:
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in records if "loss" in r]


@pytest.mark.parametrize("name", list(KINDS))
def test_a_resumed_run_equals_the_uninterrupted_one(name, tiny_world, tmp_path):
    extra = {**KINDS[name], "method.state": "true", "train.save_every": 2, "train.lr": 3e-3}
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_from_cli(LORA, tiny_overrides(tiny_world, full, steps=4, **extra))
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=4, **extra) + ["train.stop_after=2"])
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=4, **extra), resume=True)
    a, b = load_file(full / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    assert set(a) == set(b) and any(".att.key." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(full) == _losses(cut)


@pytest.mark.parametrize("name", ["dora", "loha", "oft", "ia3", "vera"])
def test_bf16_training_trains_and_merges(name, tiny_world, tmp_path):
    from peft_rwkv7.adapters import load_adapter, merge_into_pth
    from peft_rwkv7.model import load_model

    out = tmp_path / "run"
    train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=3, **KINDS[name], **{"train.precision": "bf16",
                                                                                   "train.lr": 3e-3}))
    losses = [r["loss"] for r in _losses(out)]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["base"]["dtype"] == "bf16"
    tensors = load_file(out / "adapter.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())  # adapters train in fp32
    merge_into_pth(tiny_world[0], out, tmp_path / "merged.pth", dtype="fp32")
    idx = torch.randint(0, 65536, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = load_adapter(load_model(tiny_world[0], wkv_backend="reference"), out)(idx)
        merged = load_model(tmp_path / "merged.pth", wkv_backend="reference")(idx)
    # fp32 forwards of the adapter and its merge: the tiny model's logits differ by rounding only
    assert (adapted - merged).abs().max() <= 1e-5 * adapted.abs().max()
