"""GRPO rewards (train/rewards.py, train/rewards_builtin.py): every built-in on hand-worked examples, the weighted
total with None rows, user functions from a file and a module, and each bad input as one line naming it."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from peft_rwkv7.config_base import ConfigModel
from peft_rwkv7.train.rewards import RewardConfig, RewardSet, reward_configs
from peft_rwkv7.train.rewards_builtin import (
    BUILTINS,
    exact_match,
    format_match,
    json_match,
    length_penalty,
    numeric_match,
    regex_match,
    repetition_penalty,
)
from peft_rwkv7.train.schema import from_dict
from tests.train.conftest import one_line_error

P4 = ["p0", "p1", "p2", "p3"]


# ---- built-ins


def test_exact_normalises_case_space_and_trailing_punctuation():
    completions = ["  The  Answer is PARIS. ", "paris!", "Paris, France", "London", "答案。"]
    answers = ["the answer is paris", "Paris", "paris", "paris", "答案"]
    assert exact_match(P4 + ["p4"], completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_exact_with_pattern_takes_the_last_match_and_none_rows():
    completions = ["<answer>x</answer> then <answer> Paris </answer>", "no tags", "<answer>4</answer>"]
    got = exact_match(P4[:3], completions, pattern=r"<answer>(.*?)</answer>", gold=["paris", "paris", None],
                      column="gold")
    assert got == [1.0, 0.0, None]


def test_numeric_reads_the_last_number():
    rows = [  # (completion, answer column, expected): worked by hand
        ("so the total is -12", -12, 1.0),
        ("It costs 1,000 dollars", "1000", 1.0),
        ("3.50", 3.5, 1.0),
        ("no number here", 5, 0.0),
        ("first 7 then 9", 7, 0.0),
        ("first 7 then 9", 9, 1.0),
        ("three quarters: 3/4", 0.75, 1.0),
        ("range 2-3", 3, 1.0),  # a hyphen between digits is no minus sign
        ("0.1", 0.1, 1.0),  # the column's float as written, not its binary value
        ("about 1e3 m", 1000, 1.0),
        ("x2 and v1.5", 2, 0.0),  # digits glued to a word are not numbers
        ("1234", "step one ... #### 1,234", 1.0),  # a GSM8K answer: its last number
        ("12", None, None),
        ("12", "n/a", None),
        ("12", True, None),
    ]
    completions, answers, want = zip(*rows)
    assert numeric_match(["p"] * len(rows), list(completions), answer=list(answers)) == list(want)


def test_numeric_tolerance_is_absolute_and_inclusive():
    completions = ["pi is 3.14", "pi is 3.14", "1.5", "1.5"]
    answers = [3.1416, 3.15, 1.5, 2]  # off by 0.0016, 0.01 (exactly: numbers compare as fractions), 0, 0.5
    assert numeric_match(P4, completions, tol=0.01, answer=answers) == [1.0, 1.0, 1.0, 0.0]
    assert numeric_match(P4, completions, tol=0.001, answer=answers) == [0.0, 0.0, 1.0, 0.0]
    assert numeric_match(P4[:1], ["1.5"], tol=0.5, answer=[1]) == [1.0]  # |1.5 - 1| = 0.5 <= 0.5


def test_regex_search_and_fullmatch():
    completions = ["abc 12", "abc", " 12 \n", "12a"]
    assert regex_match(P4, completions, pattern=r"\d+") == [1.0, 0.0, 1.0, 1.0]
    assert regex_match(P4, completions, pattern=r"\d+", mode="fullmatch") == [0.0, 0.0, 1.0, 0.0]


def test_json_first_object_required_keys_and_whole():
    completions = ['{"a": 1, "b": 2}', 'Sure: {"a": 1} done', 'use {braces} then {"a": 1}', "[1, 2]", "not json",
                   '{"x": {"a": 1}}']
    assert json_match(["p"] * 6, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert json_match(["p"] * 6, completions, required=["a"]) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # top level only
    assert json_match(["p"] * 6, completions, required=["a", "b"]) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert json_match(["p"] * 3, ['Sure: {"a": 1}', '  {"a": 1}\n', "[1]"], whole=True) == [0.0, 1.0, 0.0]


def test_length_ramp_at_its_breakpoints():
    # max_tokens 10, buffer 4: 0 up to 6 tokens, then (6 - L) / 4 down to -1 at 10, -1 beyond
    ids = [[], [1] * 6, [1] * 7, [1] * 8, [1] * 10, [1] * 11]
    got = length_penalty(["p"] * 6, ["c"] * 6, max_tokens=10, buffer=4, completion_ids=ids)
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    # buffer null: 10 // 4 = 2, so 9 tokens are half way down; buffer 0: a step past max_tokens
    assert length_penalty(["p"], ["c"], max_tokens=10, completion_ids=[torch.ones(9)]) == [-0.5]
    assert length_penalty(["p"] * 2, ["c"] * 2, max_tokens=10, buffer=0, completion_ids=[[1] * 10, [1] * 11]) == [
        0.0, -1.0]
    assert length_penalty(["p"], ["abcdefgh"], max_tokens=10, buffer=4, unit="chars") == [-0.5]
    one_line_error("needs the completion_ids column", length_penalty, ["p"], ["c"], max_tokens=10)


def test_format_template():
    template = "<think>...</think><answer>...</answer>"
    completions = [
        "<think>step 1\nstep 2</think>\n<answer>42</answer>",  # newlines inside ... and between the tags
        "  <think></think><answer>x</answer>\n",
        "<answer>42</answer>",
        "<think>a</think><answer>42</answer> trailing",
        "<think>a</think>x<answer>4</answer>",
    ]
    assert format_match(["p"] * 5, completions, template=template) == [1.0, 1.0, 0.0, 0.0, 0.0]
    spaced = "<think>...</think>\n\n<answer>...</answer>"  # whitespace in the template: any, or none
    assert format_match(["p"] * 2, ["<think>a</think> <answer>b</answer>", "<think>a</think><answer>b</answer>"],
                        template=spaced) == [1.0, 1.0]
    # regex characters of the template are literal
    assert format_match(["p"] * 2, ["Answer: (42)", "Answer: 42"], template="Answer: (...)") == [1.0, 0.0]


def test_repetition_share_of_repeated_ngrams():
    texts = ["a b a b a b", "the cat sat on the mat", "a b"]
    # bigrams of "a b a b a b": ab ba ab ba ab -> 2 distinct of 5 -> -(1 - 2/5); the cat sentence repeats none
    assert repetition_penalty(["p"] * 3, texts, n=2) == pytest.approx([-0.6, 0.0, 0.0])
    assert repetition_penalty(["p"], [texts[1]], n=1) == pytest.approx([-1 / 6])  # "the" twice among 6 words
    assert repetition_penalty(["p"], ["aaaa"], n=2, unit="chars") == pytest.approx([-2 / 3])
    got = repetition_penalty(["p"] * 2, ["", ""], n=2, unit="tokens", completion_ids=[[1, 2, 3, 4], [5] * 5])
    assert got == pytest.approx([0.0, -0.75])  # 4 bigrams, 1 distinct


def test_builtin_defaults_match_their_recipe_keys():
    for name, builtin in BUILTINS.items():
        params = inspect.signature(builtin.fn).parameters
        for key, field in builtin.options.model_fields.items():
            default = field.default_factory() if field.default_factory else field.default
            p = params[key]
            assert p.kind is p.KEYWORD_ONLY, (name, key)
            if field.is_required():
                assert p.default is p.empty, (name, key)
            else:
                want = list(p.default) if isinstance(p.default, tuple) else p.default
                assert want == default, (name, key)
        assert builtin.fn.__doc__ and "Range" in builtin.fn.__doc__, name


# ---- combination


def test_weighted_total_and_none_rows():
    rewards = RewardSet([
        {"fn": "numeric", "weight": 2},
        {"fn": "length", "max_tokens": 10, "buffer": 4, "weight": 0.5},
        {"fn": "format", "template": "<answer>...</answer>", "weight": -1},
    ])
    completions = ["<answer>42</answer>", "41", "<answer>7</answer>"]
    columns = {"answer": [42, 42, None], "completion_ids": [[1] * 8, [1] * 3, [1] * 12]}
    total, per_fn = rewards(["p0", "p1", "p2"], completions, columns)
    # row 0: 2*1 + 0.5*(6-8)/4 - 1*1 = 0.75; row 1: 0; row 2: numeric n/a, 0.5*(-1) - 1*1 = -1.5
    assert total.dtype == torch.float32 and total.tolist() == [0.75, 0.0, -1.5]
    assert rewards.names == ["numeric", "length", "format"] and rewards.weights == [2.0, 0.5, -1.0]
    assert per_fn["length"].tolist() == [-0.5, 0.0, -1.0] and per_fn["format"].tolist() == [1.0, 0.0, 1.0]
    numeric = per_fn["numeric"].tolist()
    assert numeric[:2] == [1.0, 0.0] and math.isnan(numeric[2])


def test_a_row_no_reward_applies_to_totals_zero_and_names_are_unique():
    rewards = RewardSet([{"fn": "numeric"}, {"fn": "numeric", "tol": 1}, {"fn": "exact"}])
    assert rewards.names == ["numeric", "numeric_2", "exact"]
    total, per_fn = rewards(["p0", "p1"], ["5", "6"], {"answer": [None, "5"]})
    assert total.tolist() == [0.0, 0.0 + 1.0 + 0.0]  # row 0: nothing applies (TRL's nansum); row 1: |6-5| <= 1
    assert all(math.isnan(v[0]) for v in per_fn.values())


def test_user_rewards_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def score(prompts, completions, scale=1.0, **columns):
            return [scale * len(c) for c in completions]

        def starts(prompts, completions, answer):  # no **kwargs: gets only the columns it names
            return [float(c.startswith(a)) for c, a in zip(completions, answer)]
    """))
    pkg = tmp_path / "site" / "rwkv_peft_test_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub.py").write_text("def half(prompts, completions, **kw):\n    return [0.5, None]\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entries = [{"fn": "my_rewards.py:score", "scale": 2, "weight": 0.5},
               {"fn": f"{tmp_path / 'my_rewards.py'}:starts"},
               {"fn": "rwkv_peft_test_pkg.sub:half", "weight": 4}]
    rewards = RewardSet(entries, base_dir=tmp_path)
    total, per_fn = rewards(["p0", "p1"], ["abc", "x"], {"answer": ["ab", "ab"], "other": [1, 2]})
    # row 0: 0.5 * 2*3 + 1 + 4*0.5 = 6; row 1: 0.5 * 2*1 + 0 + (None) = 1
    assert total.tolist() == [6.0, 1.0]
    assert per_fn["my_rewards.py:score"].tolist() == [6.0, 2.0]
    config = RewardConfig(fn="my_rewards.py:score", scale=2).absolute(tmp_path)
    assert config.fn == f"{(tmp_path / 'my_rewards.py').resolve()}:score" and config.options == {"scale": 2}


def test_numbers_of_other_types_are_rewards(tmp_path):
    (tmp_path / "r.py").write_text("import numpy as np\n"
                                   "def f(prompts, completions, **kw):\n    return [np.float32(0.5), True]\n")
    total, _ = RewardSet([{"fn": "r.py:f"}], base_dir=tmp_path)(["a", "b"], ["c", "d"], {})
    assert total.tolist() == [0.5, 1.0]


def test_importing_rewards_imports_no_torch():
    code = "import sys, peft_rwkv7.train.rewards; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- bad inputs: one line each, naming the entry


def test_bad_recipe_entries():
    where = "train.grpo.rewards"
    text = one_line_error(f"{where}[1].fn: unknown reward 'numric'", reward_configs,
                          [{"fn": "exact"}, {"fn": "numric"}])
    assert "did you mean numeric" in text and "exact, numeric, regex" in text
    assert "module:function" in text and "path.py:function" in text
    one_line_error(f"unknown key {where}[0].tolerance for fn numeric (allowed: fn, weight, column, tol)",
                   reward_configs, [{"fn": "numeric", "tolerance": 1}])
    one_line_error(f"{where}[0].tol must be a number >= 0, got -1", reward_configs, [{"fn": "numeric", "tol": -1}])
    one_line_error(f"missing key {where}[0].pattern", reward_configs, [{"fn": "regex"}])
    one_line_error(f"{where}[0].pattern: '(a' is not a valid regex", reward_configs, [{"fn": "regex", "pattern": "(a"}])
    one_line_error(f"{where}[0].buffer (20) must be at most max_tokens (10)", reward_configs,
                   [{"fn": "length", "max_tokens": 10, "buffer": 20}])
    one_line_error(f"{where}[0] must be a mapping", reward_configs, ["numeric"])
    one_line_error(f"missing key {where}[0].fn", reward_configs, [{"weight": 2}])
    one_line_error(f"{where} must be a non-empty list", reward_configs, [])
    one_line_error("unknown key reward.tolerance", RewardConfig, fn="numeric", tolerance=1)


def test_entries_inside_a_recipe_section_keep_their_dotted_keys():
    class Grpo(ConfigModel):
        rewards: list[RewardConfig]

    class Train(ConfigModel):
        grpo: Grpo

    one_line_error("r.yaml: unknown key grpo.rewards[1].tolerance for fn numeric", from_dict, Train,
                   {"grpo": {"rewards": [{"fn": "exact"}, {"fn": "numeric", "tolerance": 1}]}}, source="r.yaml")
    config = from_dict(Train, {"grpo": {"rewards": [{"fn": "numeric", "tol": 1, "weight": 2}]}})
    assert config.grpo.rewards[0].model_dump() == {"fn": "numeric", "weight": 2.0, "tol": 1}  # saved as written
    assert config.grpo.rewards[0].options == {"column": "answer", "tol": 1.0}


def test_bad_user_functions(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def score(prompts, completions, scale=1.0, **kw):\n    return []\n")
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "needs.py").write_text("import rwkv_peft_no_such_dependency\n")
    (tmp_path / "positional.py").write_text("def f(texts):\n    return []\n")
    where = "train.grpo.rewards[0]"
    cases = [
        ("nope.py:score", f"{where}.fn: 'nope.py:score': no such file {tmp_path / 'nope.py'}"),
        ("my_rewards.py:nosuch", f"{where}.fn: {tmp_path / 'my_rewards.py'} has no function 'nosuch' (its "
                                 "functions: score)"),
        ("broken.py:f", f"{where}.fn: loading {tmp_path / 'broken.py'} failed: SyntaxError"),
        ("needs.py:f", "ModuleNotFoundError: No module named 'rwkv_peft_no_such_dependency'"),
        ("positional.py:f", f"{where}.fn: positional.py:f must take prompts"),
        ("rwkv_peft_no_such_module:f", f"{where}.fn: 'rwkv_peft_no_such_module:f': no module named "
                                       "rwkv_peft_no_such_module on the Python path"),
    ]
    for fn, message in cases:
        one_line_error(message, RewardSet, [{"fn": fn}], base_dir=tmp_path)
    one_line_error(f"unknown key {where}.scael for fn my_rewards.py:score (its keyword parameters: scale)",
                   RewardSet, [{"fn": "my_rewards.py:score", "scael": 2}], base_dir=tmp_path)


BAD_OUTPUTS = textwrap.dedent("""
    def raises(prompts, completions, **kw):
        return [1 / (p != "boom") for p in prompts]

    def short(prompts, completions, **kw):
        return [1.0]

    def text(prompts, completions, **kw):
        return [0.0, "1.0", 0.0]

    def nan(prompts, completions, **kw):
        return [0.0, 0.0, float("nan")]

    def inf(prompts, completions, **kw):
        return [float("-inf"), 0.0, 0.0]

    def scalar(prompts, completions, **kw):
        return 1.0
""")


@pytest.mark.parametrize("fn, message", [
    ("raises", "train.grpo.rewards[1] (r.py:raises) raised ZeroDivisionError: division by zero (prompt 'boom')"),
    ("short", "train.grpo.rewards[1] (r.py:short) returned 1 rewards for 3 completions (first prompt without "
              "its own: 'boom')"),
    ("text", "train.grpo.rewards[1] (r.py:text) returned '1.0' (a str) for prompt 'boom'; a reward is a finite "
             "number or None"),
    ("nan", "train.grpo.rewards[1] (r.py:nan) returned nan for prompt 'ppp"),
    ("inf", "train.grpo.rewards[1] (r.py:inf) returned -inf for prompt 'fine'"),
    ("scalar", "train.grpo.rewards[1] (r.py:scalar) returned float, expected a list of 3 numbers or None"),
])
def test_bad_reward_outputs_name_the_reward_and_the_prompt(tmp_path, fn, message):
    (tmp_path / "r.py").write_text(BAD_OUTPUTS)
    rewards = RewardSet([{"fn": "exact"}, {"fn": f"r.py:{fn}"}], base_dir=tmp_path)
    long_prompt = "p" * 100 + "TAIL"
    text = one_line_error(message, rewards, ["fine", "boom", long_prompt], ["a", "b", "c"],
                          {"answer": ["a", "b", "c"]})
    assert "TAIL" not in text  # prompts are cut to 60 characters


def test_missing_and_clashing_columns():
    rewards = RewardSet([{"fn": "numeric", "column": "answr"}])
    one_line_error("train.grpo.rewards[0].column: no column 'answr' in the prompts data (its columns: answer)",
                   rewards.check_columns, ["answer"])
    one_line_error("train.grpo.rewards[0] (numeric): no column 'answr' in the prompts data", rewards, ["p"], ["1"],
                   {"answer": [1]})
    clash = RewardSet([{"fn": "numeric"}])
    clash.check_columns(["answer"])
    one_line_error("the prompts data's column 'tol' has the name of an argument", clash.check_columns,
                   ["answer", "tol"])
    one_line_error("the prompts data's column 'tol'", clash, ["p"], ["1"], {"answer": [1], "tol": [np.nan]})
