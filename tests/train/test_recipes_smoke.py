"""Every shipped recipe runs 2 steps on a tiny model and writes a complete run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["state_tune", "lora", "pissa", "disha", "qlora", "infctx", "full", "world-0.1b-state"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_smoke(tiny_world, tmp_path, name, precision):
    extra = {"data.ctx_len": 64, "train.chunk_len": 16} if name == "infctx" else {}
    extra["train.precision"] = precision
    if name == "world-0.1b-state":
        extra.update({"train.grad_accum": 1})
    out = tmp_path / name
    assert train_from_cli(str(ROOT / f"recipes/{name}.yaml"), tiny_overrides(tiny_world, out, **extra)) == 0
    assert (out / "recipe.yaml").exists() and (out / "adapter.json").exists() and (out / "loss.png").exists()
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    meta = json.loads((out / "adapter.json").read_text())
    if name in ("state_tune", "infctx", "world-0.1b-state"):
        assert (out / "state.pth").exists()
    if name == "full":
        assert (out / "model.pth").exists()
    kind = {"state_tune": "state", "infctx": "lora", "qlora": "lora", "world-0.1b-state": "state"}.get(name, name)
    assert meta["method"]["kind"] == kind


def test_pretrain_recipe_smoke(tiny_world, tmp_path):
    over = tiny_overrides(tiny_world, tmp_path / "pt")
    over = [o for o in over if not o.startswith("model.path=")]
    over += ["model.new.n_layer=1", "model.new.n_embd=32", "model.new.head_size=16"]
    assert train_from_cli(str(ROOT / "recipes/pretrain_demo.yaml"), over) == 0
    from peft_rwkv7.model import load_model

    m = load_model(tmp_path / "pt" / "model.pth")
    assert m.config.n_layer == 1 and m.config.vocab_size == 65536
