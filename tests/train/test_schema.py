"""The config layer: one set of pydantic models gives the checks, the error wording and the key
reference (`rwkv-peft train --print-schema`, README's "Recipe reference")."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from peft_rwkv7.adapters.config import MethodConfig
from peft_rwkv7.cli import main as cli_main
from peft_rwkv7.errors import UserError
from peft_rwkv7.train.recipe import ModelSection, Recipe, dump_recipe, load_recipe, recipe_reference
from peft_rwkv7.train.schema import with_reference

ROOT = Path(__file__).resolve().parents[2]
BASE = "model: {path: m.pth}\ndata: {path: d.jsonl}\n"


def load(tmp_path, text: str, overrides: list[str] | None = None) -> Recipe:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return load_recipe(str(p), overrides)


def test_readme_reference_is_generated_from_the_models():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert with_reference(readme, recipe_reference(markdown=True)) == readme, (
        "README's recipe reference is stale: run python scripts/update_recipe_reference.py")


def test_print_schema_lists_every_key_with_type_default_and_help(capsys):
    assert cli_main(["train", "--print-schema"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split()[0] for line in lines]
    assert "train.deepspeed.stage" in keys and "data.prompt_fields" in keys and "out_dir" in keys
    assert len(keys) == len(set(keys)) == len(lines)
    assert all("  # " in line for line in lines)  # every key has help text
    lr = lines[keys.index("train.lr")]
    assert "a positive number = 0.0001" in lr and "peak learning rate" in lr


def test_reading_a_recipe_imports_neither_torch_nor_peft():
    code = ("import sys; from peft_rwkv7.train.recipe import load_recipe; load_recipe('recipes/lora.yaml'); "
            "print(sorted(m for m in ('torch', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_wkv_backend_choices_are_the_ops_backends():
    from peft_rwkv7.ops import BACKENDS

    assert typing.get_args(ModelSection.model_fields["wkv_backend"].annotation) == BACKENDS


def test_yaml_quirks(tmp_path):
    r = load(tmp_path, BASE + "train: {lr: 1e-4, lr_final: 1e-5}\nlog: {project: 7}\n", ["data.prompt_fields=q"])
    assert (r.train.lr, r.train.lr_final, r.log.project, r.data.prompt_fields) == (1e-4, 1e-5, "7", ["q"])
    assert load(tmp_path, BASE, ["data.path=123"]).data.path == "123"


def test_dump_round_trips(tmp_path):
    r = load_recipe(str(ROOT / "recipes/lora.yaml"), ["method.train_parts=[ln]", "train.deepspeed.stage=2"])
    assert load(tmp_path, dump_recipe(r)) == r
    assert MethodConfig.from_dict(r.method.to_dict()) == r.method


@pytest.mark.parametrize("text, message", [
    ("train: {lr: 1e-4, lr_final: 1e-3}", "train.lr_final must be between 0 and train.lr (0.0001), got 0.001"),
    ("train: {schedule: linear}", "train.schedule must be one of cosine, wsd, constant, got 'linear'"),
    ("train: {lr_final: fast}", "train.lr_final must be a number or null, got 'fast'"),
    ("train: {grad_cp: 1}", "train.grad_cp must be true or false, got 1"),
    ("train: {deepspeed: 2}", "train.deepspeed must be a mapping, got 2"),
    ("train: {chunk_len: 7}", "train.chunk_len 7 must divide data.ctx_len 512"),
    ("log: {wandb: maybe}", "log.wandb must be one of off, offline, online, got 'maybe'"),
    ("model: {wkv_backend: gpu}", "model.wkv_backend must be one of auto, reference, cpu, cuda, triton, got 'gpu'"),
    ("model: {path: m.pth, new: {}}", "model: give either path or new, not both"),
    ("model: {path: ''}", "model.path is required (a local .pth or hf://OWNER/REPO/FILE.pth)"),
    ("model: {path: '', new: {n_embd: 100}}\nmethod: {kind: full}",
     "model.new.n_embd 100 must be a multiple of head_size 32"),
    ("model: {path: '', new: {}}", "model.new (training from scratch) needs method.kind: full"),
    ("method: {r: '8'}", "method.r: expected a positive integer, got '8'"),
    ("method: {kind: full, quant: nf4}", "method.quant: a quantized base cannot be trained in full"),
    ("data: {path: d.jsonl, ctx_len: 0}", "data.ctx_len: must be a positive integer, got 0"),
    ("data: {path: d.jsonl, prompt_fields: [q, 3]}", "data.prompt_fields: must be a non-empty list of field names"),
    ("method: {target_modules: [att.key, att.query]}", "method.target_modules: unknown att.query; expected some of"),
])
def test_errors_name_the_dotted_key_and_what_it_allows(tmp_path, text, message):
    base = {k: v for k, v in (line.split(":", 1) for line in BASE.splitlines())}
    own = {line.split(":", 1)[0] for line in text.splitlines()}
    full = "".join(f"{k}:{v}\n" for k, v in base.items() if k not in own) + text + "\n"
    with pytest.raises(UserError) as e:
        load(tmp_path, full)
    assert str(e.value).startswith(f"{tmp_path / 'r.yaml'}: {message}")
    assert "\n" not in str(e.value)


def test_method_config_fails_at_construction_and_after_assignment():
    with pytest.raises(UserError, match=r"^method\.alpha: expected a positive number, got 0$"):
        MethodConfig(alpha=0)
    cfg = MethodConfig()
    cfg.r = 0  # assignments are not checked; validate() is
    with pytest.raises(UserError, match=r"^adapter\.json: method\.r: expected a positive integer, got 0$"):
        cfg.validate("adapter.json: method")


def test_an_empty_recipe_says_what_a_recipe_needs(tmp_path):
    (tmp_path / "e.yaml").write_text("# nothing yet\n")
    with pytest.raises(UserError, match=r"e\.yaml: the recipe is empty; it needs at least model: and data: sections"):
        load_recipe(str(tmp_path / "e.yaml"))
