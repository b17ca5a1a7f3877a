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


def qa_file(path, n: int):
    """n sft records (question/answer) made from the demo ship's log, each one distinct."""
    lines = [json.loads(x)["text"] for x in (ROOT / "data/demo/ship_log.jsonl").read_text().splitlines()[:n]]
    path.write_text("".join(json.dumps({"question": f"Entry {i}: where was the ship?",
                                        "answer": t.rsplit("Position:", 1)[1].strip()}) + "\n"
                            for i, t in enumerate(lines)))
    return path


def chat_file(path, n: int):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Log entry {i}, please."},
                                                     {"role": "assistant", "content": t}]}) + "\n"
                            for i, t in enumerate(
                                json.loads(x)["text"]
                                for x in (ROOT / "data/demo/ship_log.jsonl").read_text().splitlines()[:n])))
    return path


def as_text(tokens) -> str:
    return "," + ",".join(map(str, tokens)) + ","


@pytest.mark.parametrize("kind", ["sft", "chat"])
def test_masked_data_hold_out_whole_documents_with_their_loss_masks(tmp_path, kind):
    from peft_rwkv7.infer.evaluate import load_eval_data

    src = (qa_file if kind == "sft" else chat_file)(tmp_path / f"{kind}.jsonl", 150)
    recipe = load_recipe(STATE, [f"data.path={src}", "data.kind=auto", "data.ctx_len=64"])
    tok = load_tokenizer("world")
    data = make_dataset(recipe.data, tok, seed=0, vocab_size=65536, progress=False, cache_dir=tmp_path / "c")
    # 2% of 150 documents (data.eval_split's default without an eval_path)
    assert len(data.held_out) == 3 and data.num_docs == 147
    # each held-out document is one of the file's records as `rwkv-peft eval --data` renders and masks it
    # (a separate path: records encoded in memory, not the training cache), its scored tokens its replies
    whole = load_eval_data(src, tok)
    assert whole.kind == kind
    expected = {tuple(d): tuple(m) for d, m in zip(whole.docs, whole.masks, strict=True)}
    for doc, mask in zip(data.held_out, data.held_out_masks, strict=True):
        assert expected[tuple(doc)] == tuple(mask)
    # and none of it trains: no held-out document (with its end-of-text) is in the training stream
    stream = as_text(data.tokens.tolist())
    assert all(as_text(d) not in stream for d in data.held_out)
    assert data.num_tokens + sum(map(len, data.held_out)) == sum(map(len, whole.docs))  # nothing else went


def prefs_file(path, n: int):
    path.write_text("".join(json.dumps({"prompt": f"Where was the ship on entry {i}?", "chosen": f"At {i} N.",
                                        "rejected": f"Nobody knows ({i})."}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("name", ["lora", "state_tune"])
def test_overriding_data_path_with_sft_data_holds_out_and_scores_it(tiny_world, tmp_path, capsys, name):
    src = qa_file(tmp_path / "qa.jsonl", 100)
    out = tmp_path / "r"
    given = [f"data.path={src}", "data.kind=sft"]  # state_tune's data are text; lora's auto finds sft
    over = [o for o in tiny_overrides(tiny_world, out, steps=2) if not o.startswith(("data.eval_path", "data.path"))]
    assert train_from_cli(str(ROOT / f"recipes/{name}.yaml"), [*given, *over]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("data: "))
    assert "data: 98 documents" in line and "2 more documents held out for eval (data.eval_split)" in line, line
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["eval_loss"] > 0
    # the eval scored the replies (and end-of-text) of the two held-out records only, as eval --data does
    recipe = load_recipe(str(ROOT / f"recipes/{name}.yaml"), [*given, "data.ctx_len=32"])
    data = make_dataset(recipe.data, load_tokenizer("world"), seed=0, progress=False, cache_dir=tmp_path / "c")
    assert evals[0]["eval_tokens"] == sum(sum(m) for m in data.held_out_masks) > 0


def test_overriding_data_path_with_preference_data_holds_out_pairs_and_scores_them(tiny_world, tmp_path, capsys):
    src = prefs_file(tmp_path / "p.jsonl", 100)
    out = tmp_path / "r"
    over = [o for o in tiny_overrides(tiny_world, out, steps=1) if not o.startswith(("data.eval_path", "data.path"))]
    assert train_from_cli(str(ROOT / "recipes/dpo.yaml"), [f"data.path={src}", *over]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("data: "))
    assert "data: 98 preference pairs" in line and "2 more pairs held out for eval (data.eval_split)" in line, line
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_pairs" in r]
    assert len(evals) == 1 and evals[0]["eval_pairs"] == 2


def test_a_preference_eval_file_is_scored_whole(tmp_path):
    from peft_rwkv7.train.loop import Dist
    from peft_rwkv7.train.preference import load_eval_pairs

    src, ev = prefs_file(tmp_path / "p.jsonl", 100), prefs_file(tmp_path / "e.jsonl", 60)
    recipe = load_recipe(str(ROOT / "recipes/dpo.yaml"), [f"data.path={src}", f"data.eval_path={ev}"])
    tok = load_tokenizer("world")
    data = make_dataset(recipe.data, tok, seed=0, progress=False, cache_dir=tmp_path)
    assert data.num_docs == 100 and data.held_out_pairs is None  # an eval file: nothing held out
    assert load_eval_pairs(recipe, data, tok, Dist(), 65536).num_docs == 60  # and none of it either


def test_an_eval_split_and_an_eval_file_are_one_too_many():
    with pytest.raises(UserError, match=r"data.eval_split: 0.1 holds out .* \(data.eval_path=null holds out instead\)"):
        load_recipe(STATE, ["data.eval_split=0.1"])
    assert load_recipe(STATE, ["data.eval_split=0.1", "data.eval_path=null"]).data.eval_split == 0.1


def test_an_explicit_eval_split_of_sft_data(tmp_path):
    src = qa_file(tmp_path / "qa.jsonl", 60)
    recipe = load_recipe(STATE, [f"data.path={src}", "data.kind=sft", "data.eval_split=0.1"])
    data = make_dataset(recipe.data, load_tokenizer("world"), seed=0, progress=False, cache_dir=tmp_path)
    assert len(data.held_out) == 6 and data.num_docs == 54


def test_preference_data_hold_out_pairs(tmp_path):
    src = prefs_file(tmp_path / "p.jsonl", 100)
    recipe = load_recipe(str(ROOT / "recipes/dpo.yaml"), [f"data.path={src}"])
    assert recipe.data.eval_path is None
    data = make_dataset(recipe.data, load_tokenizer("world"), seed=0, progress=False, cache_dir=tmp_path)
    held = data.held_out_pairs
    assert held.num_docs == 2 and data.num_docs == 98
    # pairs stay whole (chosen and rejected of the same record) and none of them trains
    rows = lambda d: {tuple(d.sequence(k, s)[0].tolist()) for k in range(d.num_docs) for s in (0, 1)}
    held_rows, train_rows = rows(held), rows(data)
    assert len(held_rows) == 4 and not held_rows & train_rows and len(train_rows) == 196
    for k in range(held.num_docs):
        x_w, x_l = held.sequence(k, 0)[0].tolist(), held.sequence(k, 1)[0].tolist()
        n = next(i for i, (a, b) in enumerate(zip(x_w, x_l)) if a != b)
        assert x_w[:n] == x_l[:n] and n > 5  # the same prompt on both sides


def test_too_few_documents_to_hold_out_say_so_in_the_summary(tmp_path):
    from peft_rwkv7.train.loop import data_summary

    src = qa_file(tmp_path / "qa.jsonl", 30)
    tok = load_tokenizer("world")
    recipe = load_recipe(STATE, [f"data.path={src}", "data.kind=sft"])
    data = make_dataset(recipe.data, tok, seed=0, progress=False, cache_dir=tmp_path)
    line = data_summary(recipe, data)
    assert data.held_out == [] and "no eval: 2% of 30 documents is less than one" in line, line
    recipe = load_recipe(STATE, [f"data.path={src}", "data.kind=sft", "data.eval_split=0"])
    data = make_dataset(recipe.data, tok, seed=0, progress=False, cache_dir=tmp_path)
    assert "no eval: data.eval_split is 0 and no data.eval_path" in data_summary(recipe, data)
    recipe = load_recipe(str(ROOT / "recipes/dpo.yaml"), [f"data.path={prefs_file(tmp_path / 'p.jsonl', 30)}"])
    data = make_dataset(recipe.data, tok, seed=0, progress=False, cache_dir=tmp_path)
    assert "no eval: 2% of 30 pairs is less than one" in data_summary(recipe, data)


def test_an_sft_eval_file_is_scored_on_its_replies_as_eval_data_scores_it(tiny_world, tmp_path):
    """data.eval_path with sft records: the run scores the replies (and end-of-text) only, exactly the tokens
    `rwkv-peft eval --data` scores on that file (was: every token, read as {"text"} records)."""
    from peft_rwkv7.infer.evaluate import load_eval_data

    src, held = qa_file(tmp_path / "qa.jsonl", 40), qa_file(tmp_path / "qa_eval.jsonl", 6)
    out = tmp_path / "r"
    over = [o for o in tiny_overrides(tiny_world, out, steps=2) if not o.startswith(("data.eval_path", "data.path"))]
    assert train_from_cli(str(ROOT / "recipes/lora.yaml"), [f"data.path={src}", f"data.eval_path={held}", *over]) == 0
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval_loss" in r]
    expected = load_eval_data(held, load_tokenizer("world"))  # eval --data's rendering and masks
    assert expected.kind == "sft" and expected.masks is not None
    scored = sum(sum(m) for m in expected.masks)
    assert 0 < scored < sum(len(d) for d in expected.docs)  # the prompts are not scored
    assert len(evals) == 1 and evals[0]["eval_tokens"] == scored
