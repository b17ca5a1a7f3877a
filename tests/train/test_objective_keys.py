"""train.objective reads only its own keys: a key the chosen objective does not use, set by the user
(recipe file or override), is refused in one line naming what that objective reads instead."""

from __future__ import annotations

import pytest
import yaml

from peft_rwkv7.errors import UserError
from peft_rwkv7.train.recipe import dump_recipe, load_recipe

# (objective, a key it does not read, a value other than the key's default, what the message names instead)
UNUSED = [
    ("sft", "beta", 0.5, "dpo, simpo"),
    ("sft", "lambda", 0.5, "orpo"),
    ("sft", "gamma", 0.5, "simpo"),
    ("sft", "length_norm", False, "simpo"),
    ("sft", "nll_weight", 0.5, "dpo, simpo"),
    ("dpo", "lambda", 0.5, "DPO reads train.beta"),
    ("dpo", "gamma", 0.5, "DPO reads train.beta"),
    ("dpo", "length_norm", False, "DPO reads train.beta"),
    ("orpo", "beta", 0.5, "ORPO reads train.lambda"),
    ("orpo", "gamma", 0.5, "ORPO reads train.lambda"),
    ("orpo", "length_norm", False, "ORPO reads train.lambda"),
    ("orpo", "nll_weight", 0.5, "ORPO reads train.lambda"),
    ("simpo", "lambda", 0.5, "SimPO reads train.beta"),
]


def recipe_file(tmp_path, objective: str, train: dict | None = None, name: str = "r.yaml"):
    kind = "text" if objective == "sft" else "preference"
    body = {"model": {"path": "m.pth"}, "data": {"path": "d.jsonl", "kind": kind},
            "train": {"objective": objective, **(train or {})}}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(body))
    return str(p)


@pytest.mark.parametrize("objective,key,value,instead", UNUSED, ids=[f"{o}-{k}" for o, k, _, _ in UNUSED])
def test_a_key_the_objective_does_not_read_is_refused(tmp_path, objective, key, value, instead):
    in_file = recipe_file(tmp_path, objective, {key: value})
    on_command_line = recipe_file(tmp_path, objective, name="o.yaml"), [f"train.{key}={value}"]
    for path, over in ((in_file, []), on_command_line):
        with pytest.raises(UserError) as e:
            load_recipe(path, over)
        text = str(e.value)
        assert f"train.{key} is not used by objective {objective}" in text and instead in text, text
        assert "\n" not in text


@pytest.mark.parametrize("objective", ["sft", "dpo", "orpo", "simpo"])
def test_unset_keys_and_the_saved_recipe_load(tmp_path, objective):
    recipe = load_recipe(recipe_file(tmp_path, objective))  # every other key at its default, not set: no error
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_recipe(recipe))  # a run's recipe.yaml writes every key, defaults included
    assert load_recipe(str(saved)) == recipe


@pytest.mark.parametrize("objective,keys", [
    ("dpo", {"beta": 0.2, "nll_weight": 1.0}),
    ("orpo", {"lambda": 0.5}),
    ("simpo", {"beta": 2.5, "gamma": 0.5, "length_norm": False, "nll_weight": 0.2}),
])
def test_the_keys_an_objective_reads_are_taken(tmp_path, objective, keys):
    r = load_recipe(recipe_file(tmp_path, objective, keys))
    assert {k: getattr(r.train, k) for k in keys} == keys


def test_an_unused_key_set_back_to_its_default_is_accepted(tmp_path):
    # recipes/dpo.yaml sets beta and nll_weight; switching it to orpo on the command line needs a way to
    # neutralise them without editing the file: setting them to their defaults (null, 0) does
    r = load_recipe(recipe_file(tmp_path, "dpo", {"beta": 0.1, "nll_weight": 1.0}),
                    ["train.objective=orpo", "train.beta=null", "train.nll_weight=0"])
    assert r.train.objective == "orpo" and r.train.beta is None and r.train.nll_weight == 0
