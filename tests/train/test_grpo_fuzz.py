"""Fuzzed GRPO inputs (rewards, prompts columns, train.grpo keys, eval --rewards specs): each bad one stops in one
line naming the file / key / row and what is expected, before any sampling where it can; none ends as a traceback,
a NaN loss or a run that silently scores nothing."""

from __future__ import annotations

import contextlib
import json
import textwrap
from pathlib import Path

import pytest

from peft_rwkv7.errors import UserError
from peft_rwkv7.train.rewards import RewardSet
from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import one_line_error as one_line
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")
P2, C2 = ["p0", "p1"], ["c0", "c1"]


@pytest.fixture
def user_rewards(tmp_path) -> Path:
    (tmp_path / "r.py").write_text(textwrap.dedent("""
        import sys
        from peft_rwkv7.errors import UserError

        def huge(prompts, completions, **kw):
            return [1e308] * len(completions)

        def spread(prompts, completions, **kw):  # finite, but its squares overflow float32
            return [1e20 * (i % 2) for i in range(len(completions))]

        def big_int(prompts, completions, **kw):
            return [10 ** 400] * len(completions)

        def one(prompts, completions, **kw):
            return [1.0] * len(completions)

        def none(prompts, completions, **kw):
            return [None] * len(completions)

        def two_lines(prompts, completions, **kw):
            raise UserError("first line\\nsecond line")

        def exits(prompts, completions, **kw):
            sys.exit(3)
    """))
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(2)\n")
    return tmp_path


@pytest.mark.parametrize("fn, needle", [
    ("huge", "returned 1e+308"),  # was: float32 inf, the step's loss NaN ("try a lower train.lr")
    ("spread", "returned 1e+20"),  # was: std inf, every advantage 0: a step that learns nothing
    ("big_int", "a reward is a finite number"),  # was: OverflowError traceback
])
def test_rewards_too_large_for_float32_name_the_reward_and_prompt(fn, needle, user_rewards):
    rewards = RewardSet([{"fn": f"r.py:{fn}"}], base_dir=user_rewards)
    text = one_line(needle, rewards, P2, C2, {})
    assert "train.grpo.rewards[0] (r.py:" in text and "'p" in text


def test_a_weighted_total_too_large_is_refused(user_rewards):
    rewards = RewardSet([{"fn": "r.py:one", "weight": 1e308}, {"fn": "r.py:one", "weight": 1e308}],
                        base_dir=user_rewards)
    one_line("weighted total reward is inf for prompt 'p0'", rewards, P2, C2, {})


def test_a_reward_raising_a_multi_line_user_error_or_exiting_is_one_line(user_rewards):
    text = one_line("first line second line", RewardSet([{"fn": "r.py:two_lines"}], base_dir=user_rewards),
                    P2, C2, {})
    assert text.startswith("train.grpo.rewards[0] (r.py:two_lines)")
    # SystemExit from the function or from its module's import: was the process ending without a word
    one_line("raised SystemExit: 3 (prompt 'p0')", RewardSet([{"fn": "r.py:exits"}], base_dir=user_rewards),
             P2, C2, {})
    one_line("exits_on_import.py failed: SystemExit: 2", RewardSet, [{"fn": "exits_on_import.py:f"}],
             base_dir=user_rewards)


def test_no_reward_applying_to_a_batch_warns_once(user_rewards, capsys):
    rewards = RewardSet([{"fn": "r.py:none"}], base_dir=user_rewards)
    total, _ = rewards(P2, C2, {})
    rewards(P2, C2, {})
    assert total.tolist() == [0.0, 0.0]
    err = capsys.readouterr().err
    assert err.count("warning: train.grpo.rewards: no reward applies to any of 2 completions") == 1
    RewardSet([{"fn": "r.py:one"}, {"fn": "r.py:none"}], base_dir=user_rewards)(P2, C2, {})
    assert capsys.readouterr().err == ""  # one reward applies: no warning


def records(*values, column="answer"):
    return [(f"p.jsonl:{i + 1}", {"prompt": "x", column: v}) for i, v in enumerate(values)]


def test_builtin_columns_are_checked_before_sampling():
    numeric, exact = RewardSet([{"fn": "numeric"}]), RewardSet([{"fn": "exact"}])
    numeric.check_records(records(3, "n/a", None, "#### 12"), "p.jsonl")  # rows without a number: None, as documented
    exact.check_records(records("x", None, 4), "p.jsonl")
    for rewards in (numeric, exact):
        one_line("p.jsonl:2: column 'answer' holds [1, 2] (train.grpo.rewards[0], fn ", rewards.check_records,
                 records(1, [1, 2]), "p.jsonl")
        one_line("p.jsonl:1: column 'answer' holds {'v': 1}", rewards.check_records, records({"v": 1}), "p.jsonl")
    for values in [("", ""), (None, None), ("n/a", True)]:
        one_line("p.jsonl: no record has a number (or a string holding one) in column 'answer', so "
                 "train.grpo.rewards[0] (numeric) would score nothing", numeric.check_records, records(*values),
                 "p.jsonl")
    one_line("no record has an answer", exact.check_records, records(None, None), "p.jsonl")


# ---- through the trainer (tiny model, errors before any sampling)


def grpo(tiny_world, prompts, out, **extra) -> list[str]:
    keys = {"data.path": prompts, "data.kind": "prompts", "data.eval_path": "null", "data.eval_split": 0.0,
            "data.ctx_len": 40, "train.objective": "grpo", "train.grpo.num_generations": 2,
            "train.grpo.max_new_tokens": 4, "train.grpo.rewards": "[{fn: numeric, column: answer}]", **extra}
    return tiny_overrides(tiny_world, out, steps=1, **keys)


def prompts_file(tmp_path, answers) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"day {i}", "answer": a}) + "\n" for i, a in enumerate(answers)))
    return path


@pytest.mark.parametrize("answers, extra, needle", [
    ([1, [2, 3], 4, 5], {}, r"prompts.jsonl:2: column 'answer' holds \[2, 3\]"),
    (["", "", "", ""], {}, r"prompts.jsonl: no record has a number .* in column 'answer'"),
    ([1, 2, 3, 4], {"train.grpo.temperature": 0}, "train.grpo.temperature: 0 samples one greedy completion"),
    ([1, 2, 3, 4], {"train.grpo.stop": "['']"}, r"lora.yaml: train.grpo.stop\[0\]: the empty string"),
], ids=["answer-list", "answers-empty", "greedy", "stop-empty"])
def test_bad_grpo_inputs_stop_before_sampling(answers, extra, needle, tiny_world, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=needle) as e:
        train_from_cli(LORA, grpo(tiny_world, prompts_file(tmp_path, answers), out, **extra))
    assert "\n" not in str(e.value)
    assert not (out / "adapter.safetensors").exists() and not (out / "log.jsonl").exists()


# ---- eval --rewards SPEC


@pytest.mark.parametrize("text, needle", [
    ("train: [1, 2]\n", "train must be a mapping, got [1, 2]"),  # was: AttributeError traceback
    ("data: [1]\ntrain: {grpo: {rewards: [{fn: numeric}]}}\n", "data must be a mapping, got [1]"),  # likewise
    ("- {fn: numeric}\n", "holds a list; a rewards list goes on the command line"),
])
def test_eval_reward_specs_that_are_not_recipes(text, needle, tmp_path):
    from peft_rwkv7.train.reward_eval import reward_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    assert str(spec) in one_line(needle, reward_spec, str(spec))


def test_eval_rewards_checks_the_columns_before_loading_a_model(tmp_path):
    from peft_rwkv7.data import load_tokenizer
    from peft_rwkv7.train.reward_eval import eval_rewards

    def never():
        raise AssertionError("no model is loaded for bad data")

    data = prompts_file(tmp_path, [[1], 2])
    one_line("prompts.jsonl:1: column 'answer' holds [1]", eval_rewards, "[{fn: numeric}]", str(data),
             [("base", never)], load_tokenizer("world"), None)


def test_a_reward_file_is_found_beside_its_recipe_from_any_directory(tmp_path, monkeypatch):
    """Found by fuzzing: `fn: rw.py:f` resolved against the working directory, though the README and RewardConfig
    say "relative to the recipe's directory"; a recipe run from elsewhere said "no such file". Both readers of a
    recipe (train's load_recipe, `eval --rewards RECIPE`) make it absolute against the recipe's folder, so the run's
    own recipe.yaml loads the same file; an absolute path and a module or built-in are kept as written."""
    from peft_rwkv7.train.recipe import load_recipe
    from peft_rwkv7.train.reward_eval import reward_spec

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "rw.py").write_text("def f(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")
    (tmp_path / "abs.py").write_text("def g(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    recipe = exp / "r.yaml"
    recipe.write_text("model: {path: m.pth}\ndata: {path: p.jsonl, kind: prompts}\ntrain:\n  objective: grpo\n"
                      f"  grpo:\n    rewards: [{{fn: rw.py:f}}, {{fn: '{tmp_path / 'abs.py'}:g'}}, {{fn: exact}},"
                      " {fn: os.path:join}]\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    want = [f"{(exp / 'rw.py').resolve()}:f", f"{tmp_path / 'abs.py'}:g", "exact", "os.path:join"]
    for grpo in (load_recipe(str(recipe)).train.grpo, reward_spec(str(recipe))[0]):
        assert [r.fn for r in grpo.rewards] == want
        total, _ = RewardSet(grpo.rewards[:2])(P2, C2, {})
        assert total.tolist() == [3.0, 3.0]


# ---- the prompts file: read once, named in its errors


def test_a_missing_reward_column_names_the_prompts_file(tiny_world, tmp_path):
    """Found by fuzzing: "no column 'answr' in the prompts data" did not say which file (data.path or eval_path)."""
    out = tmp_path / "run"
    path = prompts_file(tmp_path, [1, 2, 3, 4])
    with pytest.raises(UserError) as e:
        train_from_cli(LORA, grpo(tiny_world, path, out, **{"train.grpo.rewards": "[{fn: numeric, column: answr}]"}))
    assert f"no column 'answr' in {path} (its columns: answer)" in str(e.value), str(e.value)


def test_the_prompts_file_is_read_once_and_its_held_out_share_checked_with_it(tmp_path, monkeypatch):
    """load_prompts read the file twice (the second time for its lines' names) and GRPO's column check a third time;
    the records are kept in PromptData. With data.eval_split the held-out share is checked with the rest, in file
    order, as one file: a bad record is found whichever share it fell in, and a column usable only in the held-out
    share is enough."""
    import peft_rwkv7.data.prompts as prompts
    from peft_rwkv7.data import load_tokenizer
    from peft_rwkv7.data.config import DataConfig

    reads = []
    real = prompts.iter_records
    monkeypatch.setattr(prompts, "iter_records", lambda p: reads.append(p) or real(p))
    path = prompts_file(tmp_path, [None, "x", None, [5], None, 7, None, None])
    cfg = DataConfig(path=str(path), kind="prompts", eval_split=0.25)
    data = prompts.make_prompt_data(cfg, load_tokenizer("world"), 0, 100)
    assert reads == [str(path)]
    assert data.num_docs == 6 and data.held_out.num_docs == 2
    whole = [(f"{path}:{i + 1}", {"answer": a}) for i, a in enumerate([None, "x", None, [5], None, 7, None, None])]
    assert data.file_records() == whole and data.held_out.file_records() == whole
    numeric = RewardSet([{"fn": "numeric", "column": "answer"}])
    one_line(f"{path}:4: column 'answer' holds [5]", numeric.check_records, data.held_out.file_records(), str(path))
    ok = prompts_file(tmp_path, [None, None, None, 7])  # one usable answer, in one of the two shares
    part = prompts.make_prompt_data(DataConfig(path=str(ok), kind="prompts", eval_split=0.25),
                                    load_tokenizer("world"), 0, 100)
    for d in (part, part.held_out):
        numeric.check_records(d.file_records(), str(ok))


# ---- rollouts larger than memory


def test_rollouts_that_cannot_fit_in_memory_name_the_keys_that_size_them(tiny_world, tmp_path):
    """Found by fuzzing: num_generations 10**12 (and eval --samples 10**8) ended in the allocator's message, which
    names no key, or a rollout that overcommitted memory until the kernel killed the process. A rollout whose states
    and logits alone (a lower bound of what it holds) exceed the free memory stops before sampling."""
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train_from_cli(LORA, grpo(tiny_world, prompts_file(tmp_path, [1, 2, 3, 4]), out,
                                  **{"train.grpo.num_generations": 10**12}))
    text = str(e.value)
    assert "2 prompts x 1000000000000 completions = 2000000000000 rows sampled at once need over" in text, text
    assert text.endswith("GiB is free; lower train.grpo.num_generations or train.micro_bsz") and "\n" not in text
    assert not (out / "adapter.safetensors").exists()


def test_eval_rewards_with_too_many_samples_names_the_flag(tiny_world, tmp_path, capsys):
    from peft_rwkv7.cli import main

    model = tiny_world[0]
    code = main(["eval", "--model", str(model), "--data", str(prompts_file(tmp_path, [1, 2])), "--rewards",
                 "[{fn: numeric}]", "--samples", str(10**8), "--dtype", "fp32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: 2 prompts x 100000000 completions") and err.endswith(
        "lower --samples") and "\n" not in err, err


def test_an_allocation_failure_while_sampling_names_the_keys(monkeypatch):
    """What the estimate cannot see (the sampler's own buffers, another process taking memory meanwhile): the
    allocator's failure becomes the same one line; any other RuntimeError is left as it is."""
    import torch

    import peft_rwkv7.train.grpo as grpo_mod
    from peft_rwkv7.data import load_tokenizer
    from peft_rwkv7.data.prompts import PromptData
    from peft_rwkv7.model.rwkv7 import RWKV7, RWKV7Config
    from peft_rwkv7.train.grpo_config import GrpoConfig

    model = RWKV7(RWKV7Config.new(n_layer=1, n_embd=32, vocab_size=64, head_size=16))
    data = PromptData(["p"], [[1, 2]], [{"answer": 1}], 0, "p.jsonl")
    scorer = grpo_mod.Scorer(GrpoConfig(rewards=[{"fn": "numeric"}]), load_tokenizer("world"), ["answer"], "p.jsonl")
    for error, caught in [(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                        "memory: you tried to allocate 1 bytes"), True),
                          (RuntimeError("peft_rwkv7 CPU allocator: out of memory allocating 8 bytes"), True),
                          (torch.OutOfMemoryError("CUDA out of memory"), True), (MemoryError(), True),
                          (RuntimeError("shape mismatch"), False)]:
        def fail(*a, error=error, **k):
            raise error

        monkeypatch.setattr(grpo_mod, "sample_groups", fail)
        if caught:
            one_line("1 prompts x 3 completions = 3 rows sampled at once ran out of memory; lower --samples",
                     scorer._sample, model, data, [0], 3, 1.0, torch.Generator(), contextlib.nullcontext, "--samples")
        else:
            with pytest.raises(RuntimeError, match="shape mismatch"):
                scorer._sample(model, data, [0], 3, 1.0, torch.Generator(), contextlib.nullcontext)
