"""GRPO through the runner (train.objective: grpo): a run logs rewards and writes rollouts, step 1 is the on-policy
point (ratio 1, nothing clipped, KL 0 at the start), a cut run resumes bit for bit (the rollout buffer of
num_iterations > 1 included), and bad inputs stop in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_rwkv7.errors import UserError
from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Write the log of day {d}.", "answer": d} for d in (3, 17, 42, 8, 99, 5, 61, 23)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo(tiny_world, prompts, out, steps=2, **extra) -> list[str]:
    keys = {"data.path": prompts, "data.kind": "prompts", "data.eval_path": "null", "data.eval_split": 0.25,
            "data.ctx_len": 40, "train.objective": "grpo", "train.micro_bsz": 2, "train.lr": 3e-3,
            "train.grpo.num_generations": 4, "train.grpo.max_new_tokens": 8,
            "train.grpo.rewards": "[{fn: numeric, column: answer}, {fn: length, max_tokens: 8, buffer: 4}]",
            "log.rollouts_every": 1, **extra}
    return tiny_overrides(tiny_world, out, steps=steps, **keys)


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_a_grpo_run_logs_rewards_and_rollouts_and_step_one_is_on_policy(tiny_world, prompts, tmp_path):
    out = tmp_path / "run"
    train_from_cli(LORA, grpo(tiny_world, prompts, out, **{"train.grpo.beta": 0.04, "method.state": "true"}))
    steps = [r for r in records(out) if "reward" in r and "step" in r and "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    first = steps[0]
    # step 1: old = current policy (ratio 1), nothing clipped; LoRA B = 0 and the base's state: policy ==
    # reference, so the k3 KL is 0 (exp(0) - 0 - 1)
    assert first["clip"] == 0.0 and first["kl"] == 0.0
    for key in ("reward_std", "zero_spread", "completion_len", "reward/numeric", "reward/length", "logp_gap",
                "rollout_s", "update_s", "entropy"):
        assert key in first, key
    # the sampler's plain log-probs and the trainer's recomputed ones: two fp32 forwards of one network
    assert first["logp_gap"] < 1e-3
    rolls = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rolls) == 2 * 2 * 4 and {r["step"] for r in rolls} == {1, 2}
    assert all(r["prompt"].startswith("User: Write the log of day") for r in rolls)
    final = [r for r in records(out) if "eval" in json.dumps(r)]
    assert final, "the held-out prompts were scored"
    assert load_file(out / "adapter.safetensors")


@pytest.mark.parametrize("extra", [{}, {"train.grpo.num_iterations": 2, "train.grpo.loss_type": "grpo",
                                        "method.kind": "state"}], ids=["lora", "state-mu2"])
def test_a_cut_grpo_run_resumes_bit_for_bit(extra, tiny_world, prompts, tmp_path):
    extra = {"train.save_every": 1, **extra}
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_from_cli(LORA, grpo(tiny_world, prompts, full, steps=4, **extra))
    train_from_cli(LORA, grpo(tiny_world, prompts, cut, steps=4, **extra) + ["train.stop_after=3"])
    train_from_cli(LORA, grpo(tiny_world, prompts, cut, steps=4, **extra), resume=True)
    a, b = load_file(full / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def losses(out):
        return [{k: v for k, v in r.items() if not k.endswith("_s") and k not in ("tokens_per_s", "time")}
                for r in records(out) if "loss" in r]  # less the timings and the wall clock

    assert losses(full) == losses(cut)


@pytest.mark.parametrize("extra, needle", [
    ({"train.grpo.rewards": "[{fn: nosuch}]"}, "nosuch"),
    ({"train.grpo.rewards": "[{fn: numeric, tolerance: 1}]"}, "tolerance"),
    ({"train.grpo.num_generations": 1}, "num_generations"),
    ({"train.grpo.rewards": "[{fn: numeric, column: solution}]"}, "solution"),
    ({"data.kind": "sft"}, "data.kind"),
])
def test_bad_grpo_inputs_are_one_line_errors(extra, needle, tiny_world, prompts, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(UserError, match=needle) as e:
        train_from_cli(LORA, grpo(tiny_world, prompts, out, **extra))
    assert "\n" not in str(e.value)
    assert not (out / "adapter.safetensors").exists()


def test_a_prompts_file_without_prompts_and_a_raising_reward_name_themselves(tiny_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answer": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:1.*prompt"):
        train_from_cli(LORA, grpo(tiny_world, bad, tmp_path / "a"))
    good = tmp_path / "p.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"day {d}", "answer": d}) + "\n" for d in range(4)))
    (tmp_path / "boom.py").write_text("def score(prompts, completions, **kw):\n    raise ValueError('boom')\n")
    with pytest.raises(UserError, match="boom.py:score.*day") as e:
        train_from_cli(LORA, grpo(tiny_world, good, tmp_path / "b", **{
            "train.grpo.rewards": f"[{{fn: '{tmp_path / 'boom.py'}:score'}}]"}))
    assert "\n" not in str(e.value)


def test_pass_at_k_is_the_unbiased_estimator():
    from peft_rwkv7.train.grpo import pass_at_k

    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2) / C(5,2)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0


def test_eval_rewards_scores_the_base_and_the_run_as_the_loop_does(tiny_world, prompts, tmp_path, capsys):
    from peft_rwkv7.cli import main

    out = tmp_path / "run"
    train_from_cli(LORA, grpo(tiny_world, prompts, out, steps=1, **{"data.eval_split": 0.0,
                                                                      "data.eval_path": prompts}))
    loop_eval = next(r for r in records(out) if "eval_reward" in r)
    spec = str(out / "recipe.yaml")  # the run's own recipe: its rewards and sampling
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_world[0]), "--rewards", spec, "--data", str(prompts), "--compare",
                 str(out), "--json", "--device", "cpu", "--dtype", "fp32", "--plot", str(tmp_path / "r.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"base", str(out)}
    assert result[str(out)]["reward"] == pytest.approx(loop_eval["eval_reward"], abs=1e-6)
    assert result[str(out)]["pass@1"] == pytest.approx(loop_eval["eval_pass@1"], abs=1e-6)
    assert result["base"]["prompts"] == 8 and (tmp_path / "r.png").stat().st_size > 0
    with pytest.raises(UserError, match="--rewards"):
        main(["eval", "--model", str(tiny_world[0]), "--rewards", "{fn: x}", "--data", str(prompts), "--debug"])


def test_eval_rewards_compare_holds_one_model_at_a_time(tiny_world, prompts, tmp_path, monkeypatch, capsys):
    """`eval --rewards --compare` loads, scores and lets go of each model before the next loads: on a GPU the
    comparison needs one model's memory, not the sum of them."""
    import gc
    import weakref

    from peft_rwkv7 import cli

    alive_at_load, loaded = [], []
    real = cli._load_for_inference

    def spy(args, **kw):
        gc.collect()
        alive_at_load.append(sum(ref() is not None for ref in loaded))
        model = real(args, **kw)
        loaded.append(weakref.ref(model))
        return model

    run = tmp_path / "run"
    train_from_cli(LORA, tiny_overrides(tiny_world, run, steps=1))
    capsys.readouterr()
    monkeypatch.setattr(cli, "_load_for_inference", spy)
    assert cli.main(["eval", "--model", str(tiny_world[0]), "--rewards", "[{fn: length, max_tokens: 8, buffer: 4}]",
                     "--data", str(prompts), "--compare", str(run), str(run), "--json", "--device", "cpu", "--dtype",
                     "fp32", "--samples", "2"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"base", str(run)}
    assert alive_at_load == [0, 0, 0]


def test_init_grpo_writes_a_recipe_that_loads(tmp_path, prompts):
    from peft_rwkv7.train.recipe import load_recipe
    from peft_rwkv7.train.starter import write_starter

    write_starter(str(tmp_path / "g.yaml"), "model.pth", str(prompts), method="grpo")
    recipe = load_recipe(str(tmp_path / "g.yaml"))
    assert recipe.train.objective == "grpo" and recipe.data.kind == "prompts" and recipe.train.grpo.rewards


def test_the_step_is_the_same_however_its_prompts_are_split(tiny_world, prompts, tmp_path):
    """Each prompt's completions come from a generator of its own (seed, generation, global sample number):
    one micro-batch of 4 prompts and 2 x 2 accumulated give the same rollouts, rewards and step-1 loss."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = {"train.grpo.temperature": 1.0, "train.grpo.loss_type": "dapo", "train.grad_clip": 0.0}
    train_from_cli(LORA, grpo(tiny_world, prompts, whole, steps=1, **common, **{"train.micro_bsz": 4}))
    train_from_cli(LORA, grpo(tiny_world, prompts, split, steps=1, **common,
                              **{"train.micro_bsz": 2, "train.grad_accum": 2}))
    a, b = records(whole)[0], records(split)[0]
    for key in ("reward", "reward_std", "completion_len", "zero_spread"):
        assert a[key] == b[key], key
    rolls = [[json.loads(x) for x in (d / "rollouts.jsonl").read_text().splitlines()] for d in (whole, split)]
    assert rolls[0] == rolls[1]
    # dapo: the sum of token losses over the step / its tokens, added up over micro-batches in another order
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.slow
def test_two_processes_take_the_step_of_one(tiny_world, prompts, tmp_path):
    """ZeRO-2 on two CPU processes (2 prompts each) against one process with the same 4 prompts in 2 accumulated
    micro-batches of 2: the same rollouts, so the same rewards, step-1 loss (dapo: the global token sum) and update.

    The one process samples 2 prompts at a time, as each rank does. A prompt's completions draw from its own
    generator whatever the split, but the logits of a batched step are float sums whose rounding depends on how many
    rows the batch has (CPU GEMM: blocks.0.ffn.value gives the same row 1.2e-6 apart in a batch of 16 rows and of 8,
    the logits 1.8e-6), and an inverse-CDF draw over 65536 tokens lands between the two runs' CDF boundaries with
    probability ~4e-3 per draw. With 4 prompts in one batch of 16 rows, completion 4 of "day 17" drew token 28287 (its
    u 0.434699029 on the boundary cdf[28286] 0.434699029) where the batches of 8 drew 28286 (cdf[28286] 0.434699059):
    another completion of 16, and lora_B updates 16% of the largest apart, with DeepSpeed or without it."""
    pytest.importorskip("deepspeed")
    from tests.train.test_deepspeed import run_two_processes

    one, two = tmp_path / "one", tmp_path / "two"
    # a reward that differs between completions (their length in characters), so advantages and the loss are not 0
    common = {"train.grad_clip": 0.0, "train.eps": 1.0, "data.eval_split": 0.0, "data.eval_path": prompts,
              "train.grpo.rewards": "[{fn: length, max_tokens: 60, buffer: 60, unit: chars}]"}
    train_from_cli(LORA, grpo(tiny_world, prompts, one, steps=1, **common,
                              **{"train.micro_bsz": 2, "train.grad_accum": 2}))
    run_two_processes(grpo(tiny_world, prompts, two, steps=1, **common, **{"train.deepspeed.stage": 2}))
    a, b = records(one)[0], records(two)[0]
    assert a["reward_std"] > 0  # advantages are not all 0: the step moves the adapter
    for key in ("reward", "reward_std", "completion_len", "zero_spread", "loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    # rank 0 logs its own rollouts: the one process's first micro-batch (global samples 0 and 1)
    rolls = [[json.loads(x) for x in (d / "rollouts.jsonl").read_text().splitlines()] for d in (one, two)]
    assert len(rolls[0]) == 16 and rolls[0][:8] == rolls[1]
    # The step's update. With train.eps 1, Adam's first step is lr g / (|g| + 1), smooth in the gradient, so the
    # two gradients (one sum in two orders, ~1e-7 relative) give updates equal far within 1e-4 of the largest
    # (a different batch or a gradient scaled by 2 or 1/2 would move them O(1)).
    wa, wb = load_file(one / "adapter.safetensors"), load_file(two / "adapter.safetensors")
    moved = max(wa[k].abs().max().item() for k in wa if k.endswith("lora_B"))
    assert moved > 0
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= 1e-4 * moved, k


def test_grpo_trains_in_bf16(tiny_world, prompts, tmp_path):
    """bf16 autocast (frozen base bf16, adapters fp32): sampling, the loss and the update run; the sampler's and
    the trainer's log-probs still agree to bf16 rounding."""
    out = tmp_path / "bf16"
    train_from_cli(LORA, grpo(tiny_world, prompts, out, steps=2, **{"train.precision": "bf16"}))
    steps = [r for r in records(out) if "loss" in r]
    assert len(steps) == 2 and all(r["logp_gap"] < 0.1 for r in steps)
    assert all(t.dtype == torch.float32 for t in load_file(out / "adapter.safetensors").values())


@pytest.mark.slow
def test_a_cut_grpo_run_under_deepspeed_resumes_bit_for_bit(tiny_world, prompts, tmp_path):
    """Two processes under ZeRO-2 with num_iterations 2, cut after step 3: the rollouts sampled for steps 3 and 4
    are each rank's checkpointed state (extra_rank*.pt beside the rank's RNG), so the resumed step 4 reuses them
    instead of sampling again with the updated policy; the run ends as the uncut one, bit for bit."""
    pytest.importorskip("deepspeed")
    from tests.train.test_deepspeed import run_two_processes

    # a reward that differs between completions (their length in characters): advantages are not all 0, so each
    # step moves the policy and rollouts sampled again after step 3 would differ from the checkpointed ones
    extra = {"train.save_every": 1, "train.grpo.num_iterations": 2, "train.grpo.loss_type": "grpo",
             "train.deepspeed.stage": 2, "train.device": "cpu", "train.grad_clip": 0.0,
             "train.grpo.rewards": "[{fn: length, max_tokens: 60, buffer: 60, unit: chars}]"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_two_processes(grpo(tiny_world, prompts, full, steps=4, **extra))
    run_two_processes(grpo(tiny_world, prompts, cut, steps=4, **extra) + ["train.stop_after=3"])
    assert sorted(p.name for p in (cut / "checkpoints/step_000003").glob("extra_rank*.pt")) == [
        "extra_rank00000.pt", "extra_rank00001.pt"]
    run_two_processes([*grpo(tiny_world, prompts, cut, steps=4, **extra), "--resume"])
    assert all(r["reward_std"] > 0 for r in records(full) if "reward_std" in r)
    a, b = load_file(full / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
