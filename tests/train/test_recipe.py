"""Recipe loading: every shipped recipe parses; bad keys and values are one-line errors."""

from pathlib import Path

import pytest

from peft_rwkv7.errors import UserError
from peft_rwkv7.train.recipe import DEMO_RUNS, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_parse_and_start_with_their_command(path):
    # a recipe that starts from a model the demo makes (runs/..., absent in a fresh checkout) parses on the
    # bundled demo model; tests/train/test_grpo_demo.py checks its missing-run message
    made = any(run in path.read_text() for run in DEMO_RUNS)
    load_recipe(str(path), ["model.path=data/demo/rwkv7-demo.pth"] if made else [])
    assert path.read_text().splitlines()[0] == f"# rwkv-peft train recipes/{path.name}"


def test_overrides_reach_nested_keys(tmp_path):
    over = ["train.lr=3e-4", "method.r=4", "out_dir=x", "train.deepspeed.stage=2"]
    r = load_recipe(str(ROOT / "recipes/lora.yaml"), over)
    assert (r.train.lr, r.method.r, r.out_dir, r.train.deepspeed.stage) == (3e-4, 4, "x", 2)


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


BASE = "model: {path: m.pth}\ndata: {path: d.jsonl}\n"
BAD = {
    "unknown top key": (BASE + "trian: {}\n", "unknown key trian"),
    "unknown nested key": (BASE + "train: {lrr: 1}\n", "unknown key train.lrr"),
    "negative lr": (BASE + "train: {lr: -1}\n", "train.lr must be a positive number"),
    "ctx_len 0": ("model: {path: m.pth}\ndata: {path: d.jsonl, ctx_len: 0}\n", "data.ctx_len"),
    "unknown method": (BASE + "method: {kind: magic}\n", "method.kind"),
    "wrong type": (BASE + "train: {max_steps: lots}\n", "train.max_steps must be an integer"),
    "missing model": ("data: {path: d.jsonl}\n", "missing key model"),
    "broken yaml": ("model: {path: [m.pth\n", "broken YAML"),
    "not a mapping": ("- a\n- b\n", "must be a YAML mapping"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipes_name_the_key(tmp_path, case):
    text, expect = BAD[case]
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, text))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_missing_recipe_file():
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe("nope/missing.yaml")


def test_bad_override_value_is_named(tmp_path):
    with pytest.raises(UserError, match="train.micro_bsz must be a positive integer"):
        load_recipe(write(tmp_path, BASE), ["train.micro_bsz=0"])
