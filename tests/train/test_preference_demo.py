"""The shipped preference recipes on the bundled demo model and pairs (minutes each on a 2-core CPU): every
held-out pair ends up preferred, and the tuned model writes ship's-log entries where the base writes
something else. `scripts/bench_preference.py` prints the before/after figures of the README."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peft_rwkv7.train.runner import train_from_cli

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "User: Write the ship's log for day 12.\n\nAssistant:"


def reply(model_path: Path, adapter: Path | None) -> str:
    from peft_rwkv7.adapters import load_adapter
    from peft_rwkv7.data import load_tokenizer
    from peft_rwkv7.infer.generate import generate
    from peft_rwkv7.model import load_model

    model = load_model(model_path)
    if adapter is not None:
        model = load_adapter(model, adapter)
    return "".join(generate(model, load_tokenizer("world"), PROMPT, max_tokens=24, temperature=0.0))


@pytest.mark.slow
@pytest.mark.parametrize("name, styled", [("dpo", True), ("dpo_state", False), ("orpo", True)])
def test_demo_recipe_prefers_the_held_out_chosen_answers(tmp_path, name, styled):
    out = tmp_path / name
    assert train_from_cli(str(ROOT / f"recipes/{name}.yaml"), [f"out_dir={out}", "log.progress=false"]) == 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["reward_acc"] <= 0.5  # DPO starts at a tie; ORPO's base prefers the rejected prose
    final = [r for r in records if "eval_reward_acc" in r][-1]
    # a training outcome, not a rounding bound: the demo promises the tuned model prefers the held-out chosen
    # answer on more than 9 pairs in 10 (54 of 60)
    assert final["eval_reward_acc"] > 0.9 and final["eval_pairs"] == 60, final
    base = ROOT / "data/demo/rwkv7-demo.pth"
    assert "Ship's log" not in reply(base, None)
    if styled:  # LoRA learns the format; the tiny model's state alone gets only fragments of it
        assert reply(base, out).lstrip().startswith("Ship's log"), reply(base, out)
