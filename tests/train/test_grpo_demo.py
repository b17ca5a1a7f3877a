"""The GRPO demo recipes (recipes/grpo_*.yaml) start from the state-tuned demo model that the README's first two
commands make (runs/state_tune/merged.pth): without it a bundled recipe stops in one line naming both commands;
the prompts files are what scripts/make_grpo_prompts.py writes, and their rewards score the log's wind."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from peft_rwkv7.errors import UserError
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.rewards import RewardSet

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["grpo_lora", "grpo_state", "grpo_lora_state"]


@pytest.mark.parametrize("name", NAMES)
def test_without_the_state_tuned_model_a_grpo_recipe_names_the_commands_that_make_it(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(ROOT / "data")  # a checkout's demo files, but no runs/
    with pytest.raises(UserError) as e:
        load_recipe(str(ROOT / f"recipes/{name}.yaml"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "runs/state_tune/merged.pth" in msg and "rwkv-peft train recipes/state_tune.yaml" in msg
    assert "rwkv-peft merge --base data/demo/rwkv7-demo.pth --adapter runs/state_tune" in msg
    assert f"rwkv-peft train {name} model.path=YOUR_MODEL.pth" in msg
    # the user's own model: no demo run needed
    assert load_recipe(str(ROOT / f"recipes/{name}.yaml"), ["model.path=data/demo/rwkv7-demo.pth"])
    run = tmp_path / "runs/state_tune"
    run.mkdir(parents=True)
    (run / "merged.pth").write_bytes(b"")
    assert load_recipe(str(ROOT / f"recipes/{name}.yaml")).model.path == "runs/state_tune/merged.pth"


def test_outside_a_checkout_the_missing_demo_data_is_named_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="data/demo/grpo_prompts.jsonl.*from the working directory"):
        load_recipe(str(ROOT / "recipes/grpo_lora.yaml"))


def test_the_prompts_files_are_the_generators_and_the_rewards_score_the_weather(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_grpo_prompts", ROOT / "scripts/make_grpo_prompts.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(gen, "OUT", tmp_path)
    gen.main()
    for name in ("grpo_prompts.jsonl", "grpo_prompts_eval.jsonl"):
        assert (tmp_path / name).read_text() == (ROOT / "data/demo" / name).read_text(), name
    train = [json.loads(x) for x in (ROOT / "data/demo/grpo_prompts.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (ROOT / "data/demo/grpo_prompts_eval.jsonl").read_text().splitlines()]
    day = {r["prompt"].split(",")[1] for r in train}
    assert not day & {r["prompt"].split(",")[1] for r in held}, "held-out days are not trained on"
    recipe = load_recipe(str(ROOT / "recipes/grpo_lora.yaml"), ["model.path=data/demo/rwkv7-demo.pth"])
    rewards = RewardSet(recipe.train.grpo.rewards)
    calm, storm = "Ship's log, day 8, a calm day. Wind:", "Ship's log, day 8, a stormy day. Wind:"
    cases = [  # (prompt, knots column, completion, expected: 0.5 the log's format + 0.5 the prompt's weather)
        (calm, 5, " east, 3 knots", 1.0), (calm, 5, " east, 11 knots", 1.0), (calm, 5, " east, 12 knots", 0.5),
        (calm, 5, " east at 3 knots", 0.5), (storm, 28, " north-west, 22 knots", 1.0),
        (storm, 28, " north-west, 21 knots", 0.5), (storm, 28, " south, 35 knots", 0.5),
        (storm, 28, " heavy swell", 0.0),
    ]
    prompts, knots, completions, want = zip(*cases, strict=True)
    total, _ = rewards(list(prompts), list(completions), {"knots": list(knots), "completion_ids": [[1]] * len(cases)})
    assert total.tolist() == list(want)


def test_the_lora_state_demo_recipe_runs_on_a_tiny_model(tiny_world, tmp_path):
    # the recipes differ only in method and lr (each method under GRPO: tests/train/test_grpo_train.py); this
    # runs their shared prompts, stop string, rewards and held-out eval for 2 steps
    name = "grpo_lora_state"
    from peft_rwkv7.train.runner import train_from_cli
    from tests.train.conftest import tiny_overrides

    out, held = tmp_path / name, tmp_path / "held.jsonl"
    held.write_text("".join((ROOT / "data/demo/grpo_prompts_eval.jsonl").read_text().splitlines(True)[:4]))
    over = tiny_overrides(tiny_world, out, **{"data.path": ROOT / "data/demo/grpo_prompts.jsonl",
                                              "data.eval_path": held})
    assert train_from_cli(str(ROOT / f"recipes/{name}.yaml"), over) == 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert {"reward/regex", "reward/numeric"} <= set(records[0])
    final = [r for r in records if "eval_pass@1" in r]
    assert final and final[-1]["eval_prompts"] == 4 and "eval_pass@8" in final[-1]
    assert (out / "state.pth").exists()
