"""Values of the right type but outside what a field can use (inf, NaN, a negative epsilon, a seed no RNG takes, a
number where a string goes, an unhashable train_parts item): each is one line naming the file and the dotted key,
exit 2, before any work; the good values beside each boundary still load."""

from __future__ import annotations

import pytest

from peft_rwkv7.cli import main as cli_main
from peft_rwkv7.errors import UserError
from peft_rwkv7.train.grpo_config import GrpoConfig
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.schema import from_dict

BASE = "model: {path: m.pth}\ndata: {path: d.jsonl}\n"
GRPO = ("model: {path: m.pth}\ndata: {path: p.jsonl, kind: prompts}\n"
        "train: {objective: grpo, grpo: {rewards: [{fn: exact}]}}\n")
QUOTE = " (YAML read a number there: quote it if it is meant as text)"


def _recipe(tmp_path, text: str = BASE) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def _refused(capsys, argv: list[str]) -> str:
    """The one line `rwkv-peft ARGV` prints, after checking exit code 2 and that nothing else was printed."""
    rc = cli_main(argv)
    out, err = capsys.readouterr()
    assert (rc, out) == (2, ""), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ") and "Traceback" not in err and "--debug" not in err, err
    return err[len("error: "):-1]


# key=value -> the message after "{recipe}: "
OVERRIDES = [
    # 1. non-finite floats
    ("train.lr=.inf", "train.lr must be a finite positive number, got inf"),
    ("train.lr=-.inf", "train.lr must be a finite positive number, got -inf"),
    ("train.lr=.nan", "train.lr must be a finite positive number, got nan"),
    ("train.lr=inf", "train.lr must be a finite positive number, got inf"),  # the string, as YAML 1.1's 1e-4
    ("train.lr_final=.inf", "train.lr_final must be a finite number or null, got inf"),
    ("train.lora_plus_ratio=.inf", "train.lora_plus_ratio must be a finite positive number or null, got inf"),
    ("train.decay_frac=.inf", "train.decay_frac must be a number in (0, 1], got inf"),
    ("train.weight_decay=.inf", "train.weight_decay must be a finite number >= 0, got inf"),
    ("train.grad_clip=.inf", "train.grad_clip must be a finite number >= 0, got inf"),
    ("train.beta1=.inf", "train.beta1 must be a number in [0, 1), got inf"),
    ("train.beta2=.nan", "train.beta2 must be a number in [0, 1), got nan"),
    ("train.eps=.inf", "train.eps must be a finite positive number, got inf"),
    ("train.beta=.inf", "train.beta must be a finite positive number or null, got inf"),
    ("train.lambda=.inf", "train.lambda must be a finite number >= 0, got inf"),
    ("train.gamma=.nan", "train.gamma must be a finite number, got nan"),
    ("train.gamma=-.inf", "train.gamma must be a finite number, got -inf"),
    ("train.nll_weight=.inf", "train.nll_weight must be a finite number >= 0, got inf"),
    ("method.alpha=.inf", "method.alpha: expected a finite positive number, got inf"),
    ("method.dropout=.nan", "method.dropout: expected a number in [0, 1), got nan"),
    ("method.adalora.beta1=.inf", "method.adalora.beta1 must be a number in (0, 1), got inf"),
    ("method.adalora.orth_reg_weight=.inf", "method.adalora.orth_reg_weight must be a finite number >= 0, got inf"),
    ("data.eval_split=.inf", "data.eval_split: must be a number in [0, 0.5) or null, got inf"),
    ("train.grpo.temperature=.inf", "train.grpo.temperature must be a finite number >= 0, got inf"),
    ("train.grpo.top_p=.nan", "train.grpo.top_p must be a number in (0, 1], got nan"),
    ("train.grpo.epsilon=.inf", "train.grpo.epsilon must be a number in (0, 1), got inf"),
    ("train.grpo.epsilon_high=.nan", "train.grpo.epsilon_high must be a positive number or null, got nan"),
    ("train.grpo.beta=.inf", "train.grpo.beta must be a finite number >= 0, got inf"),
    ("train.grpo.pass_threshold=-.inf", "train.grpo.pass_threshold must be a finite number, got -inf"),
    # 3. an unhashable train_parts item
    ("method.train_parts=[{a: 1}]", "method.train_parts: [{'a': 1}]: expected a list of emb, head, ln, time, ffn"),
    ("method.train_parts=[[ln]]", "method.train_parts: [['ln']]: expected a list of emb, head, ln, time, ffn"),
    # 4. the seed's range
    ("train.seed=-1", "train.seed must be an integer in [0, 9223372036854775807], got -1"),
    ("train.seed=1180591620717411303424",
     "train.seed must be an integer in [0, 9223372036854775807], got 1180591620717411303424"),
    ("train.seed=9223372036854775808",
     "train.seed must be an integer in [0, 9223372036854775807], got 9223372036854775808"),
    # 5. the optimizer's settings
    ("train.eps=-1.0", "train.eps must be a positive number, got -1.0"),
    ("train.eps=0.0", "train.eps must be a positive number, got 0.0"),
    ("train.beta1=-0.1", "train.beta1 must be a number in [0, 1), got -0.1"),
    ("train.beta2=1.0", "train.beta2 must be a number in [0, 1), got 1.0"),
    ("train.weight_decay=-0.01", "train.weight_decay must be a number >= 0, got -0.01"),
    # 7. every integer field fits int64 (method.r=2**70 was a traceback from torch's allocator)
    ("method.r=1180591620717411303424",
     "method.r is 1180591620717411303424, beyond the 64-bit integers (at most 2**63-1)"),
    ("train.max_steps=9223372036854775808",
     "train.max_steps is 9223372036854775808, beyond the 64-bit integers (at most 2**63-1)"),
    ("method.adalora.target_r=1180591620717411303424",
     "method.adalora.target_r is 1180591620717411303424, beyond the 64-bit integers (at most 2**63-1)"),
    ("train.grpo.max_new_tokens=1180591620717411303424",
     "train.grpo.max_new_tokens is 1180591620717411303424, beyond the 64-bit integers (at most 2**63-1)"),
    # 8. a blank run directory would be the working directory (a run's files among the user's own)
    ("out_dir=''", "out_dir is ''; give the run directory, e.g. runs/my_run"),
    ("out_dir=' '", "out_dir is ' '; give the run directory, e.g. runs/my_run"),
]


@pytest.mark.parametrize("override, message", OVERRIDES, ids=[o for o, _ in OVERRIDES])
def test_a_bad_value_on_the_command_line_is_one_line(tmp_path, capsys, override, message):
    path = _recipe(tmp_path)
    assert _refused(capsys, ["train", path, override]) == f"{path}: {message}"


# 2. a number where a string goes, in a recipe file: YAML's reading is not what was written (0755 is 493)
FILES = [
    ("model: {path: m.pth}\ndata: {path: d.jsonl}\nout_dir: 5\n", "out_dir must be a string, got 5" + QUOTE),
    ("model: {path: m.pth}\ndata: {path: 2024}\n", "data.path: must be a string, got 2024" + QUOTE),
    ("model: {path: 0755}\ndata: {path: d.jsonl}\n", "model.path must be a string, got 493" + QUOTE),
    (BASE.replace("d.jsonl}", "d.jsonl, system: 5}"), "data.system: must be a string or null, got 5" + QUOTE),
    (BASE.replace("d.jsonl}", "d.jsonl, eval_path: 1.5}"), "data.eval_path: must be a string or null, got 1.5" + QUOTE),
    (BASE.replace("d.jsonl}", "d.jsonl, tokenizer: 7}"), "data.tokenizer: must be a string, got 7" + QUOTE),
    (BASE.replace("d.jsonl}", "d.jsonl, text_field: 1.0e+3}"), "data.text_field: must be a string, got 1000.0" + QUOTE),
    (BASE.replace("d.jsonl}", "d.jsonl, prompt_template: 3}"), "data.prompt_template: must be a string, got 3" + QUOTE),
    (GRPO.replace("rewards:", "stop: [5], rewards:"), "train.grpo.stop[0] must be a string, got 5" + QUOTE),
    # a list was refused before; still so, without the hint
    (BASE + "out_dir: [a]\n", "out_dir must be a string, got ['a']"),
    # 6. a reward's weight in a recipe
    (GRPO.replace("{fn: exact}", "{fn: exact, weight: heavy}"),
     "train.grpo.rewards[0].weight must be a number, got 'heavy'"),
    (GRPO.replace("{fn: exact}", "{fn: exact, weight: .inf}"),
     "train.grpo.rewards[0].weight must be a finite number, got inf"),
    # GRPO reads none of the preference keys (was a KeyError)
    (GRPO.replace("objective: grpo,", "objective: grpo, beta: 0.5,"),
     "train.beta is not used by objective grpo (only dpo, simpo read it; GRPO's KL weight is train.grpo.beta); "
     "remove it or set it to null"),
    (GRPO.replace("objective: grpo,", "objective: grpo, lambda: 0.5,"),
     "train.lambda is not used by objective grpo (only orpo read it); remove it or set it to 0.1"),
]


@pytest.mark.parametrize("text, message", FILES, ids=[m.split(" ")[0] for _, m in FILES])
def test_a_bad_value_in_a_recipe_file_is_one_line(tmp_path, capsys, text, message):
    path = _recipe(tmp_path, text)
    assert _refused(capsys, ["train", path]) == f"{path}: {message}"


def test_a_reward_weight_must_be_a_number(tmp_path, capsys):
    (tmp_path / "m.pth").write_bytes(b"")
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    argv = ["eval", "--model", str(tmp_path / "m.pth"), "--data", str(tmp_path / "p.jsonl"), "--rewards"]
    assert _refused(capsys, [*argv, "[{fn: exact, weight: heavy}]"]) == (
        "--rewards: rewards[0].weight must be a number, got 'heavy'")
    assert _refused(capsys, [*argv, "[{fn: exact, weight: .nan}]"]) == (
        "--rewards: rewards[0].weight must be a finite number, got nan")
    with pytest.raises(UserError, match=r"^--rewards: rewards\[0\]\.weight must be a number, got \[1\]$"):
        from_dict(GrpoConfig, {"rewards": [{"fn": "exact", "weight": [1]}]}, source="--rewards")
    assert from_dict(GrpoConfig, {"rewards": [{"fn": "exact", "weight": -2}]}).rewards[0].weight == -2.0


def test_the_good_values_beside_each_boundary_load(tmp_path):
    path = _recipe(tmp_path)
    good = {
        "train.lr": ("1e308", 1e308), "train.eps": ("1e-30", 1e-30), "train.beta1": ("0", 0.0),
        "train.beta2": ("0.999999", 0.999999), "train.weight_decay": ("0", 0.0), "train.grad_clip": ("0", 0.0),
        "train.lr_final": ("0", 0.0), "train.seed": ("9223372036854775807", 2**63 - 1),
        "train.max_steps": ("9223372036854775807", 2**63 - 1),
        "method.alpha": ("1e-9", 1e-9), "method.dropout": ("0.0", 0.0), "data.eval_split": ("0.49", 0.49),
    }
    r = load_recipe(path, [f"{k}={v}" for k, (v, _) in good.items()])
    for key, (_, want) in good.items():
        section, *rest = key.split(".")
        got = getattr(r, section)
        for part in rest:
            got = getattr(got, part)
        assert got == want, key
    assert load_recipe(path, ["train.seed=0"]).train.seed == 0
    assert load_recipe(path, ["train.objective=simpo", "train.gamma=-1e300"]).train.gamma == -1e300
    g = load_recipe(_recipe(tmp_path, GRPO), ["train.grpo.temperature=0", "train.grpo.pass_threshold=-1e9",
                                              "train.grpo.epsilon_high=.inf"]).train.grpo
    # infinity where it means "no limit": GRPO's upper clip
    assert (g.temperature, g.pass_threshold, g.epsilon_high) == (0.0, -1e9, float("inf"))


def test_a_string_key_takes_its_text(tmp_path):
    # in a file, quoted; on the command line, as typed (a shell keeps no quotes): 0755 stays 0755
    r = load_recipe(_recipe(tmp_path, "model: {path: '0755'}\ndata: {path: '2024', system: '5'}\nout_dir: '5'\n"))
    assert (r.model.path, r.data.path, r.data.system, r.out_dir) == ("0755", "2024", "5", "5")
    r = load_recipe(_recipe(tmp_path), ["model.path=0755", "data.path=1e3", "data.system=5", "out_dir=5",
                                        "data.eval_path=1.50", "log.project=007"])
    assert (r.model.path, r.data.path, r.data.system, r.out_dir, r.data.eval_path, r.log.project) == (
        "0755", "1e3", "5", "5", "1.50", "007")
    # null still clears a nullable string key; a number key still reads a number
    r = load_recipe(_recipe(tmp_path, BASE.replace("d.jsonl}", "d.jsonl, system: hi}")), ["data.system=null"])
    assert r.data.system is None
    assert load_recipe(_recipe(tmp_path), ["train.lr=5e-4"]).train.lr == 5e-4
    # a label keeps YAML's number as its text
    assert load_recipe(_recipe(tmp_path, BASE + "log: {project: 7}\n")).log.project == "7"


def test_a_recipe_that_is_not_utf8_text_names_the_file(tmp_path, capsys):
    """It was "'utf-8' codec can't decode byte 0xff in position 0" without the file's name."""
    path = tmp_path / "r.yaml"
    path.write_bytes(b"model: {path: m.pth}\n\xff\xfe")
    assert _refused(capsys, ["train", str(path)]) == f"{path}: not UTF-8 text (byte 21), expected a recipe .yaml file"
