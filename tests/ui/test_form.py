"""The web UI's pure parts, without a browser: the schema-generated form, its overrides and saved YAML, the run
status read from a run directory, the bind/auth refusals and the runner's preflight checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peft_rwkv7.config_base import schema_rows
from peft_rwkv7.errors import UserError
from peft_rwkv7.train.recipe import BUNDLED, Recipe, load_recipe
from peft_rwkv7.train.runlock import held, holder_pid, run_lock
from peft_rwkv7.ui import form
from peft_rwkv7.ui.runs import console_tail, eta_seconds, run_info

ROOT = Path(__file__).resolve().parents[2]
STATE = str(BUNDLED / "state_tune.yaml")


@pytest.fixture(autouse=True)
def _in_checkout(monkeypatch):
    monkeypatch.chdir(ROOT)  # the bundled recipes read data/demo/... from the working directory


def raw_of(specs, values):
    return [form.shown(s, values[s.key]) for s in specs]


def test_every_recipe_key_is_a_field_once():
    specs = form.fields()
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys))
    leaves = {r.key for r in schema_rows(Recipe) if r.type != "a mapping"}
    # model.new (a mapping or null) is one YAML field; its own keys are not separate fields
    assert set(keys) == {k for k in leaves if not k.startswith("model.new.")}
    kinds = {s.key: s for s in specs}
    assert kinds["method.kind"].widget == "choice" and "lora" in kinds["method.kind"].choices
    assert kinds["train.max_steps"].widget == "int" and kinds["train.lr"].widget == "float"
    assert kinds["method.state"].widget == "bool" and kinds["train.beta"].widget == "text"


def test_unchanged_form_is_the_recipe_and_changed_fields_are_the_cli_overrides(tmp_path):
    specs = form.fields()
    values = form.recipe_values(STATE)
    raw = raw_of(specs, values)
    assert form.check(STATE, specs, raw) == ([], None, None)
    keys = [s.key for s in specs]
    raw[keys.index("train.max_steps")] = 30
    raw[keys.index("log.wandb")] = "off"  # YAML 1.1 would read a bare off as false
    raw[keys.index("data.prompt_template")] = "Q: {prompt}\nA:"
    raw[keys.index("method.target_modules")] = "[att.key, ffn.value]"
    extra, err, _ = form.check(STATE, specs, raw)
    assert err is None
    assert sorted(extra) == sorted(['train.max_steps=30', 'data.prompt_template="Q: {prompt}\\nA:"',
                                    'method.target_modules=["att.key", "ffn.value"]'])
    # the command line the preview shows trains exactly this: the CLI parses each override back
    cmd = form.command("state_tune", extra)
    r = load_recipe(STATE, extra)
    assert r.train.max_steps == 30 and r.data.prompt_template == "Q: {prompt}\nA:" and cmd.startswith("rwkv-peft train")
    assert r.method.target_modules == ["att.key", "ffn.value"] and r.log.wandb == "off"


def test_saved_yaml_loads_back_into_the_same_form(tmp_path):
    from peft_rwkv7.ui.train_tab import save_yaml

    specs = form.fields()
    extra = ["train.max_steps=30", "method.kind=lora", "method.r=8", "data.ctx_len=64"]
    path = tmp_path / "mine.yaml"
    assert save_yaml(STATE, extra, str(path)) == str(path)
    assert form.recipe_values(str(path)) == form.recipe_values(STATE, extra)
    assert load_recipe(str(path)).model_dump() == load_recipe(STATE, extra).model_dump()
    assert form.check(str(path), specs, raw_of(specs, form.recipe_values(str(path)))) == ([], None, None)
    with pytest.raises(UserError, match="exists"):  # nothing a user made is overwritten
        save_yaml(STATE, extra, str(path))
    with pytest.raises(UserError, match="train.lr"):  # nor is a recipe saved that would not train
        save_yaml(STATE, ["train.lr=-1"], str(tmp_path / "bad.yaml"))


def test_invalid_value_names_its_field_with_the_cli_message():
    specs = form.fields()
    raw = raw_of(specs, form.recipe_values(STATE))
    keys = [s.key for s in specs]
    raw[keys.index("train.grpo.top_p")] = 1.5
    extra, err, key = form.check(STATE, specs, raw)
    cli = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", "train", STATE, "train.grpo.top_p=1.5"],
                         capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode != 0 and cli.stderr.strip() == f"error: {err}"
    assert key == "train.grpo.top_p" and extra == []  # not train.grpo nor train: the longest key named
    raw = raw_of(specs, form.recipe_values(STATE))
    raw[keys.index("train.lr_final")] = "abc"  # the message names train.lr_final, which contains train.lr
    assert form.check(STATE, specs, raw)[2] == "train.lr_final"
    raw = raw_of(specs, form.recipe_values(STATE))
    raw[keys.index("train.beta")] = "[unclosed"
    assert form.check(STATE, specs, raw)[2] == "train.beta"


def test_run_status_from_the_directory(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"method": {"kind": "lora", "state": True},
                                                     "train": {"max_steps": 4}}))
    recs = [{"step": 1, "loss": 3.0, "time": 100.0}, {"step": 2, "loss": 2.5, "time": 102.0},
            {"step": 2, "eval_loss": 2.7, "time": 102.5}, {"step": 3, "loss": 2.0, "time": 104.0}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 4, "lo')  # mid-write
    (run / "checkpoints" / "step_000002.pt").write_bytes(b"x")
    info = run_info(run)
    assert (info.status, info.step, info.checkpoint, info.loss, info.eval_loss, info.method) == \
        ("stopped", 3, 2, 2.0, 2.7, "lora+state")
    assert eta_seconds(info.records, 4) == pytest.approx(2.0)  # 2 s a step, one step left
    with run_lock(run):
        assert held(run) and run_info(run).status == "running"
        import os

        assert holder_pid(run) == os.getpid()
    assert not held(run)
    (run / "checkpoints" / "step_000004.pt").write_bytes(b"x")
    assert run_info(run).status == "finished"
    (run / "console.log").write_text("start\n 10%|#  | 1/4\r 50%|##  | 2/4\r100%|####| 4/4\ndone\n")
    assert console_tail(run) == "start\n100%|####| 4/4\ndone"


def test_preflight_is_the_cli_refusals(tmp_path):
    from peft_rwkv7.train.runner import preflight

    out = tmp_path / "busy"
    with run_lock(out), pytest.raises(UserError, match="in use by another rwkv-peft train"):
        preflight(STATE, [f"out_dir={out}"])
    with pytest.raises(UserError, match="no_such.jsonl"):
        preflight(STATE, [f"out_dir={tmp_path / 'x'}", f"data.path={tmp_path / 'no_such.jsonl'}"])
    with pytest.raises(UserError, match="nothing to resume"):
        preflight(STATE, [f"out_dir={tmp_path / 'new'}"], resume=True)
    assert preflight(STATE, [f"out_dir={tmp_path / 'new'}"]).out_dir == str(tmp_path / "new")


def test_serving_beyond_this_machine_needs_auth():
    from peft_rwkv7.ui.app import check_bind

    assert check_bind("127.0.0.1", None) is None and check_bind("localhost", None) is None
    assert check_bind("0.0.0.0", "me:pw") == ("me", "pw")
    with pytest.raises(UserError, match="--auth"):
        check_bind("0.0.0.0", None)
    with pytest.raises(UserError, match="USER:PASSWORD"):
        check_bind("127.0.0.1", "nopassword")
    cli = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", "ui", "--host", "0.0.0.0"], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1 and "--auth" in cli.stderr


def test_every_text_has_chinese():
    from peft_rwkv7.ui.texts import EN, ZH

    assert set(EN) == set(ZH)
    assert all(ZH[k] for k in ZH)
    import re

    for k in EN:  # the same placeholders in both
        assert set(re.findall(r"{(\w+)}", EN[k])) == set(re.findall(r"{(\w+)}", ZH[k])), k
