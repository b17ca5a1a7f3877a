"""`rwkv-peft recipes` and `rwkv-peft init`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peft_rwkv7.cli import main
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.starter import resolve_recipe
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_recipes_lists_every_bundled_recipe_with_its_purpose(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    listed = [line.split()[0] for line in out[: len(names)]]
    assert listed == names
    rows = dict(line.split(None, 1) for line in out[: len(names)])
    assert rows["state_tune"].startswith("State tuning: learn only the initial WKV state")
    assert all(len(v) > 10 for v in rows.values())


def test_a_bundled_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_recipe("lora")).resolve() == (ROOT / "recipes/lora.yaml").resolve()
    assert Path(resolve_recipe("lora.yaml")).resolve() == (ROOT / "recipes/lora.yaml").resolve()
    (tmp_path / "lora.yaml").write_text("x")
    assert resolve_recipe("lora.yaml") == "lora.yaml"  # a file of the user's wins
    assert resolve_recipe("nope") == "nope"


@pytest.mark.parametrize("method", ["state", "lora", "qlora"])
def test_init_writes_a_recipe_that_trains(tiny_world, tmp_path, method, capsys):
    model, data, _ = tiny_world
    out = tmp_path / f"{method}.yaml"
    assert main(["init", "--model", str(model), "--data", str(data), "--method", method, "--out", str(out),
                 "--ctx-len", "32"]) == 0
    assert f"rwkv-peft train {out}" in capsys.readouterr().out
    text = out.read_text()
    assert text.startswith(f"# rwkv-peft train {out}\n")
    recipe = load_recipe(str(out))
    assert recipe.model.path == str(model) and recipe.data.path == str(data) and recipe.data.ctx_len == 32
    assert recipe.method.kind == {"qlora": "lora"}.get(method, method)
    assert recipe.method.quant == ("nf4" if method == "qlora" else "none")
    body = yaml.safe_load(text)
    over = [o for o in tiny_overrides(tiny_world, tmp_path / "run", steps=1) if not o.startswith("model.path")]
    assert main(["train", str(out), *over]) == 0 and (tmp_path / "run" / "adapter.json").is_file()
    assert body["out_dir"] == f"runs/{method}"


def test_init_never_overwrites(tmp_path, capsys):
    out = tmp_path / "r.yaml"
    out.write_text("mine\n")
    (tmp_path / "m.pth").touch()  # init checks its model and data are there
    (tmp_path / "d.jsonl").touch()
    assert main(["init", "--model", str(tmp_path / "m.pth"), "--data", str(tmp_path / "d.jsonl"), "--out",
                 str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "mine\n"


def test_a_bundled_recipe_outside_a_checkout_says_where_the_demo_files_are(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/demo here, as for a wheel installed and run elsewhere
    assert main(["train", "lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    for text in ("data/demo/rwkv7-demo.pth", "data/demo/ship_log.jsonl", "data/demo of a rwkv-peft checkout",
                 "model.path=", "data.path="):
        assert text in err, (text, err)
    assert not (tmp_path / "runs").exists()  # refused before anything is written
    # only what is still missing is named: the 0.1B World recipe downloads its model, the demo data stay
    assert main(["train", "world-0.1b-state"]) == 2
    err = capsys.readouterr().err
    assert "data/demo/ship_log.jsonl" in err and "model.path=" not in err and "data.path=" in err, err


def test_a_bundled_recipe_outside_a_checkout_trains_on_the_users_files(tiny_world, tmp_path, monkeypatch):
    model, data, _ = tiny_world
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(resolve_recipe("lora"), [f"model.path={model}", f"data.path={data}"])
    assert (recipe.model.path, recipe.data.path, recipe.data.eval_path) == (str(model), str(data), None)
    recipe = load_recipe(resolve_recipe("pretrain_demo"), [f"data.path={data}"])  # a new model: no model.path
    assert recipe.data.path == str(data)


def test_in_the_checkout_the_bundled_recipes_find_the_demo_files(monkeypatch):
    monkeypatch.chdir(ROOT)
    for name in ("lora", "state_tune", "dpo", "pretrain_demo", "passkey"):
        load_recipe(resolve_recipe(name))
