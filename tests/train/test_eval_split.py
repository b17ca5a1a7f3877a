"""A user's own data gets its own eval set: the recipe's eval_path is not applied to other data, and
data.eval_split holds out part of the user's documents."""

from __future__ import annotations

import json

import pytest

from peft_rwkv7.data import load_tokenizer, make_dataset
from peft_rwkv7.errors import UserError
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import ROOT, tiny_overrides

STATE = str(ROOT / "recipes/state_tune.yaml")


def test_overriding_data_path_drops_the_recipes_eval_file():
    assert load_recipe(STATE).data.eval_path == "data/demo/ship_log_eval.jsonl"
    r = load_recipe(STATE, ["data.path=my.jsonl"])
    assert r.data.path == "my.jsonl" and r.data.eval_path is None
    r = load_recipe(STATE, ["data.path=my.jsonl", "data.eval_path=mine_eval.jsonl"])
    assert r.data.eval_path == "mine_eval.jsonl"


def test_held_out_documents_leave_the_training_stream(tiny_world, tmp_path):
    _, train, _ = tiny_world
    recipe = load_recipe(STATE, [f"data.path={train}", "data.ctx_len=32"])
    tok = load_tokenizer("world")
    data = make_dataset(recipe.data, tok, seed=0, vocab_size=65536, progress=False, cache_dir=tmp_path)
    lines = [json.loads(x)["text"] for x in train.read_text().splitlines()]
    assert len(data.held_out) == int(0.02 * len(lines)) == 4 and data.num_docs == len(lines) - 4
    held = {tuple(d) for d in data.held_out}
    originals = {tuple(tok.encode(t)) for t in lines}
    assert held <= originals  # whole documents, as written
    stream = data.tokens.tolist()
    text = ",".join(map(str, stream))
    for d in data.held_out:
        assert ",".join(map(str, d)) not in text  # and gone from what trains
    same = make_dataset(recipe.data, tok, seed=0, vocab_size=65536, progress=False, cache_dir=tmp_path)
    assert same.held_out == data.held_out  # a pure function of the seed: resume sees the same split


def test_training_scores_the_held_out_part(tiny_world, tmp_path):
    out = tmp_path / "r"
    over = [o for o in tiny_overrides(tiny_world, out, steps=2) if not o.startswith("data.eval_path")]
    assert train_from_cli(STATE, over) == 0
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["eval_loss"] > 0


def test_eval_split_of_masked_data_is_refused(tmp_path):
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(60)))
    recipe = load_recipe(STATE, [f"data.path={data}", "data.kind=sft", "data.eval_split=0.1"])
    with pytest.raises(UserError, match="data.eval_split: holds out text or binidx documents"):
        make_dataset(recipe.data, load_tokenizer("world"), seed=0, progress=False, cache_dir=tmp_path)
