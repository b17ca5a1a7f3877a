"""Preference tuning in the training loop: one global-batch loss however the batch is split, exact resume
under AdamW and Muon, bf16, the optimizer split, the shipped recipes, and one-line recipe errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_rwkv7.errors import UserError
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.runner import train_from_cli
from tests.fp_oracle import LOGGED, adam_bound, gamma, logp_rounding
from tests.train.conftest import tiny_overrides
from tests.train.test_preference_oracle import PAIRS, pairs_file

ROOT = Path(__file__).resolve().parents[2]
DPO = str(ROOT / "recipes/dpo.yaml")
# 8 pairs whose responses differ in length by an order of magnitude
MORE = PAIRS + [{"prompt": f"Entry {i}.", "chosen": c, "rejected": r} for i, (c, r) in enumerate([
    ("Aye.", "The old teacher remembered the busy market near the quiet road, and later the river was cold."),
    ("Ship's log, day 2. Wind: south, 4 knots. Sea: slight. Sky: clear. We sighted two whales off the port bow.",
     "no"),
    ("Fog.", "The cook found the map."),
    ("Ship's log, day 5. Position: 12 N, 30 W.", "Position unknown, the lamp was lost and the letter opened."),
])]


def overrides(tiny_world, tmp_path, out, micro_bsz=4, grad_accum=1, steps=3, **extra) -> list[str]:
    data = pairs_file(tmp_path, MORE)
    base = {"data.path": data, "data.eval_path": data, "data.kind": "preference", "data.ctx_len": 48,
            "train.objective": "dpo", "train.micro_bsz": micro_bsz, "train.grad_accum": grad_accum,
            "train.lr": 1e-4, "train.warmup_steps": 0, "train.schedule": "constant", "train.grad_clip": 0.0,
            "train.device": "cpu", "train.nll_weight": 1.0, "method.state": "true"}
    return tiny_overrides(tiny_world, out, steps=steps, **{**base, **extra})


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def step_values(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in records(out) if "lr" in r]


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys() and x
    return max((x[k] - y[k]).abs().max().item() for k in x)


def step_one_logp_tol(tiny_world, ctx_len: int = 48) -> float:
    """How far two splits' step-1 per-sequence log-probs (sums over <= ctx_len tokens) can be apart: twice
    one run's rounding bound (tests/fp_oracle.py: logp_rounding)."""
    from peft_rwkv7.data import load_tokenizer
    from peft_rwkv7.model import load_model

    model, world = load_model(tiny_world[0]), load_tokenizer("world")
    texts = [p["prompt"] + " " + p[side] for p in MORE for side in ("chosen", "rejected")]
    with torch.no_grad():  # the scale of the logits on these texts
        max_logit = max(model(torch.tensor([[0, *world.encode(t)][:ctx_len]])).abs().max().item() for t in texts)
    return 2 * logp_rounding(model.config, ctx_len, max_logit, ctx_len)  # two runs


def assert_one_update(whole: Path, other: Path, tol: float, objective: str) -> None:
    """Step 1 (same start) within the log-prob bound; afterwards the runs' weights differ by Adam's sign
    flips at most (adam_bound), so only the trained tensors are compared there."""
    for key in ("chosen_logp", "rejected_logp"):  # means over the pairs of per-sequence sums
        a, b = step_values(whole, key)[0], step_values(other, key)[0]
        assert abs(a - b) <= tol + 2 * LOGGED, (key, a, b, tol)
    if objective == "dpo":  # policy and reference logps come from one forward each: the margin is exactly 0,
        # and the loss ln 2 + nll_weight (1) x the chosen per-token NLL, within nll_weight x the logp bound
        assert step_values(whole, "reward_margin")[0] == step_values(other, "reward_margin")[0] == 0.0
        assert abs(step_values(whole)[0] - step_values(other)[0]) <= tol + 2 * LOGGED
    assert max_diff(whole, other) <= adam_bound(3) * 1e-4  # train.lr in overrides()


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_micro_batches_and_accumulation_give_one_update(tiny_world, tmp_path, objective):
    runs = {}
    for mb, ga in ((4, 1), (1, 4), (2, 2)):
        out = tmp_path / f"{objective}_{mb}x{ga}"
        # recipes/dpo.yaml's beta and nll_weight are DPO's: another objective sets them back to their defaults
        keys = {} if objective == "dpo" else {"train.beta": "null", "train.nll_weight": 0.0}
        assert train_from_cli(DPO, overrides(tiny_world, tmp_path, out, mb, ga, **{"train.objective": objective,
                                                                                 **keys})) == 0
        runs[(mb, ga)] = out
    whole = runs[(4, 1)]
    tol = step_one_logp_tol(tiny_world)
    for split in ((1, 4), (2, 2)):
        assert_one_update(whole, runs[split], tol, objective)
    if objective == "dpo":  # the policy starts as its reference (nll_weight adds the NLL to ln 2)
        assert step_values(whole, "reward_margin")[0] == 0.0
    assert step_values(whole)[-1] < step_values(whole)[0]
    ev = [r for r in records(whole) if "eval_reward_acc" in r]
    assert len(ev) == 1 and ev[0]["eval_pairs"] == len(MORE)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_equals_uninterrupted(tiny_world, tmp_path, optimizer):
    extra = {"train.optimizer": optimizer, "train.lr": 3e-3, "train.save_every": 2, "method.dropout": 0.1}
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_from_cli(DPO, overrides(tiny_world, tmp_path, full, steps=4, **extra))
    train_from_cli(DPO, overrides(tiny_world, tmp_path, cut, steps=4, **extra) + ["train.stop_after=2"])
    train_from_cli(DPO, overrides(tiny_world, tmp_path, cut, steps=4, **extra), resume=True)
    a, b = load_file(full / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in rs]
    assert strip(records(full)) == strip(records(cut))
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


def test_bf16_starts_at_ln2_and_follows_fp32(tiny_world, tmp_path):
    outs = {}
    for precision in ("fp32", "bf16"):
        outs[precision] = tmp_path / precision
        assert train_from_cli(DPO, overrides(tiny_world, tmp_path, outs[precision], steps=3, **{
            "train.precision": precision, "train.lr": 3e-3, "train.nll_weight": 0.0})) == 0
    bf16, fp32 = step_values(outs["bf16"]), step_values(outs["fp32"])
    # margin exactly 0 at the start: the loss is -log sigmoid(0) = ln 2, rounded at most twice, then logged
    assert abs(bf16[0] - math.log(2)) <= gamma(2) * math.log(2) + LOGGED
    assert step_values(outs["bf16"], "reward_margin")[0] == 0.0
    # not a rounding bound: after step 1 the weights differ (Adam) and training sets the gap; 0.02 nats (3%
    # of ln 2) is the fidelity bf16 promises, step 1's rounding alone is bounded in test_precision
    assert all(abs(x - y) <= 0.02 for x, y in zip(bf16, fp32)), (bf16, fp32)
    assert bf16[-1] < bf16[0]


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_world):
    from peft_rwkv7.adapters import MethodConfig, attach, trainable_parameters
    from peft_rwkv7.model import load_model
    from peft_rwkv7.train.optim import MuonAdamW, build_optimizer

    recipe = load_recipe(DPO, ["train.optimizer=muon", "method.state=true", "method.train_parts=[head,time]"])
    model = attach(load_model(tiny_world[0], dtype=torch.float32), MethodConfig(**recipe.method.model_dump()))
    named = trainable_parameters(model)
    opt = build_optimizer(named, recipe.train, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    by_id = {id(p): n for n, p in named}
    muon = {by_id[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    adamw = {by_id[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert muon and all(n.endswith((".lora_A", ".lora_B", "w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2"))
                        for n in muon), muon
    assert {n for n in muon if n.endswith(".lora_A")} and not any(n.startswith("head") for n in muon)
    assert "head.weight" in adamw and any(n.endswith("time_state") for n in adamw)
    assert any(n.endswith("r_k") for n in adamw) and muon | adamw == set(by_id.values())
    # schedule and checkpoints see one optimizer
    for g in opt.param_groups:
        g["lr"] = 0.5
    assert all(g["lr"] == 0.5 for inner in opt.inner for g in inner.param_groups)


@pytest.mark.parametrize("name", ["dpo", "dpo_state", "orpo"])
def test_shipped_preference_recipes_smoke(tiny_world, tmp_path, name):
    out = tmp_path / name
    data = pairs_file(tmp_path, MORE)
    over = tiny_overrides(tiny_world, out, steps=2, **{"data.path": data, "data.eval_path": data,
                                                       "data.ctx_len": 48})
    assert train_from_cli(str(ROOT / f"recipes/{name}.yaml"), over) == 0
    rs = records(out)
    steps = [r for r in rs if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all({"loss", "reward_margin", "reward_acc", "chosen_logp", "rejected_logp"} <= set(r) for r in steps)
    ev = [r for r in rs if "eval_reward_acc" in r]
    assert len(ev) == 1 and 0 <= ev[0]["eval_reward_acc"] <= 1 and ev[0]["eval_pairs"] == len(MORE)
    assert (out / "adapter.json").exists() and (out / "loss.png").exists()
    assert (out / "state.pth").exists() == (name == "dpo_state")


BASE = "model: {path: m.pth}\ndata: {path: d.jsonl}\n"


@pytest.mark.parametrize("text, expect", [
    ("model: {path: m.pth}\ndata: {path: d.jsonl, kind: text}\ntrain: {objective: dpo}\n",
     "train.objective dpo trains on preference"),
    ("model: {path: m.pth}\ndata: {path: d.jsonl, kind: preference}\n", "data.kind: preference data need"),
    (BASE + "train: {optimizer: muon, deepspeed: {stage: 2}}\n", "train.optimizer: muon is not available"),
    (BASE + "method: {kind: state}\ntrain: {objective: dpo, deepspeed: {stage: 3}}\n",
     "train.deepspeed.stage: dpo with a trained state runs under ZeRO-1/2"),
    (BASE + "method: {kind: pissa}\ntrain: {objective: dpo, deepspeed: {stage: 3}}\n",
     "train.deepspeed.stage: dpo with a start moved into the base (pissa) runs under ZeRO-1/2"),
    (BASE + "method: {kind: lora, init: olora}\ntrain: {objective: dpo, deepspeed: {stage: 3}}\n",
     "train.deepspeed.stage: dpo with a start moved into the base (olora)"),
    (BASE + "train: {objective: kto}\n", "train.objective must be one of sft, dpo, orpo, simpo, grpo"),
    (BASE + "train: {beta: 0}\n", "train.beta"),
])
def test_bad_preference_recipes_name_the_key(tmp_path, text, expect):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_recipe(str(path))
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_preference_objective_on_text_data_is_a_one_line_error(tiny_world, tmp_path):
    over = tiny_overrides(tiny_world, tmp_path / "x", steps=1, **{"train.objective": "dpo", "data.kind": "auto"})
    with pytest.raises(UserError, match="trains on preference pairs"):
        train_from_cli(DPO, over)


@pytest.mark.slow
def test_two_processes_split_the_same_global_batch(tiny_world, tmp_path):
    pytest.importorskip("deepspeed")
    from tests.train.test_deepspeed import run_two_processes

    whole, multi = tmp_path / "4x1", tmp_path / "2x1x2"
    assert train_from_cli(DPO, overrides(tiny_world, tmp_path, whole, 4, 1)) == 0
    run_two_processes(overrides(tiny_world, tmp_path, multi, 2, 1, **{"train.deepspeed.stage": 2}))
    assert_one_update(whole, multi, step_one_logp_tol(tiny_world), "dpo")


@pytest.mark.slow
def test_full_finetuning_dpo_under_zero3_partitions_its_reference(tiny_world, tmp_path):
    """Full fine-tuning's DPO reference is a frozen copy of the whole model. Under ZeRO-3 it is partitioned over
    the ranks as the trained model is (every rank held all of it in fp32: 28 GB a GPU at 7B); the run is still the
    one-process run."""
    pytest.importorskip("deepspeed")
    from tests.train.test_deepspeed import run_two_processes

    full = {"method.kind": "full", "method.state": "false", "train.lr": 1e-5, "train.lr_final": 1e-5}
    whole, multi = tmp_path / "4x1", tmp_path / "2x1x2"
    assert train_from_cli(DPO, overrides(tiny_world, tmp_path, whole, 4, 1, **full)) == 0
    errs = run_two_processes(overrides(tiny_world, tmp_path, multi, 2, 1, **{"train.deepspeed.stage": 3}, **full))
    held = re.search(r"dpo: the frozen reference is partitioned over 2 processes \(ZeRO-3\): this one holds "
                     r"(\d+)% of its weights", errs[0])
    assert held and 45 <= int(held.group(1)) <= 55, errs[0][-2000:]  # half, with ZeRO's padding
    tol = step_one_logp_tol(tiny_world)
    for key in ("chosen_logp", "rejected_logp"):
        assert abs(step_values(whole, key)[0] - step_values(multi, key)[0]) <= tol + 2 * LOGGED, key
    assert step_values(whole, "reward_margin")[0] == step_values(multi, "reward_margin")[0] == 0.0
    assert all(abs(a - b) <= 1e-3 for a, b in zip(step_values(whole), step_values(multi)))
