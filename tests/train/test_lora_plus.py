"""LoRA+ (train.lora_plus_ratio): the LoRA B factors train at ratio x lr in their own param groups, under AdamW
and Muon, through the schedule, across a resume; methods without B factors are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peft_rwkv7.errors import UserError
from peft_rwkv7.train.checkpoint import load_latest_checkpoint
from peft_rwkv7.train.optim import MUON_MOMENTUM, build_optimizer
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.schedule import get_lr, set_lr
from tests.fp_oracle import gamma
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")
RATIO = 16.0  # a power of two: ratio * lr is exact, so group lrs compare with ==
CPU = torch.device("cpu")
# trained tensors as trainable_parameters names them: LoRA A [r, in], B [out, r] of two projections, a state
SHAPES = {"blocks.0.att.time_state": (2, 4, 4),
          "blocks.0.att.receptance.lora_A": (4, 16), "blocks.0.att.receptance.lora_B": (16, 4),
          "blocks.0.att.key.lora_A": (4, 16), "blocks.0.att.key.lora_B": (16, 4)}
STATE, A_NAMES, B_NAMES = ["blocks.0.att.time_state"], [n for n in SHAPES if "lora_A" in n], [
    n for n in SHAPES if "lora_B" in n]


def train_config(*extra: str):
    return load_recipe(LORA, ["train.lr=1e-2", "train.weight_decay=0.1", "train.warmup_steps=4",
                              "train.max_steps=8", *extra]).train


def tensors(seed: int = 0, steps: int = 4):
    g = torch.Generator().manual_seed(seed)
    init = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    grads = [{n: torch.randn(s, generator=g) for n, s in SHAPES.items()} for _ in range(steps)]
    return init, grads


def schedule_lr(tc, step: int) -> float:
    return get_lr(step, lr=tc.lr, lr_final=tc.final_lr, max_steps=tc.max_steps, warmup_steps=tc.warmup_steps,
                  schedule=tc.schedule, decay_frac=tc.decay_frac)


def run(make, tc, init, grads, on_step=None):
    """`make(named)`'s optimizer through len(grads) steps of the schedule (set_lr, as the loop does; a no-op on
    an optimizer that sets its own lrs and shows no param_groups); returns the tensors at the end.
    `on_step(optimizer, named, lr)` looks at each step's groups before it is taken."""
    named = [(n, torch.nn.Parameter(init[n].clone())) for n in SHAPES]
    opt = make(named)
    for step, grad in enumerate(grads):
        lr = schedule_lr(tc, step)
        set_lr(opt.param_groups, lr)
        if on_step:
            on_step(opt, named, lr)
        for n, p in named:
            p.grad = grad[n].clone()
        opt.step()
    return {n: p.detach().clone() for n, p in named}


def by_name(named, names):
    return [p for n, p in named if n in names]


def test_adamw_first_step_moves_b_ratio_times():
    tc, plain_tc = train_config(f"train.lora_plus_ratio={RATIO}"), train_config()
    init, grads = tensors(steps=1)
    ours = run(lambda named: build_optimizer(named, tc, CPU), tc, init, grads)
    plain = run(lambda named: build_optimizer(named, plain_tc, CPU), plain_tc, init, grads)
    lr = tc.lr / tc.warmup_steps  # the schedule's first step

    # torch's AdamW with the groups and their lrs written out: B at ratio x lr, decayed like A; the state undecayed
    class Explicit:
        def __init__(self, named):
            self.adamw = torch.optim.AdamW([
                {"params": by_name(named, STATE), "weight_decay": 0.0, "lr": lr},
                {"params": by_name(named, A_NAMES), "weight_decay": tc.weight_decay, "lr": lr},
                {"params": by_name(named, B_NAMES), "weight_decay": tc.weight_decay, "lr": RATIO * lr}],
                betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=True)  # the implementation build_optimizer takes on CPU
            self.param_groups, self.step = [], self.adamw.step  # set_lr finds no groups here

    ref = run(Explicit, tc, init, grads)
    for n in SHAPES:
        assert torch.equal(ours[n], ref[n]), n
        if n not in B_NAMES:
            assert torch.equal(ours[n], plain[n]), n  # everything but B as without LoRA+
    for n in B_NAMES:
        # Adam's first step from zero moments is lr * g / (|g| + eps) (m / sqrt(v) with both bias-corrected),
        # after the decoupled decay p * lr * wd: both linear in lr, so B's move is ratio x the plain one. Each
        # fp32 result rounds the decay, the update and the difference (a few u of |p| + |move|, both runs).
        p0, g = init[n].double(), grads[0][n].double()
        want = -RATIO * lr * (tc.weight_decay * p0 + g / (g.abs() + tc.eps))
        moved, moved_plain = ours[n].double() - p0, plain[n].double() - p0
        bound = gamma(4) * (1 + RATIO) * (p0.abs() + want.abs())
        assert ((moved - want).abs() <= bound).all(), n
        assert ((moved - RATIO * moved_plain).abs() <= bound).all(), n


def test_muon_groups_keep_the_ratio_through_the_schedule():
    tc = train_config(f"train.lora_plus_ratio={RATIO}", "train.optimizer=muon")
    init, grads = tensors(steps=4)
    seen = []

    def check(opt, named, lr):  # after the schedule set this step's lr
        b_params = {id(p) for p in by_name(named, B_NAMES)}
        is_b = [all(id(p) in b_params for p in g["params"]) for g in opt.param_groups]
        assert any(is_b) and not all(is_b)
        for g, b in zip(opt.param_groups, is_b, strict=True):
            assert g["lr"] == (RATIO * lr if b else lr), (b, g["use_muon"])
        seen.append(lr)

    ours = run(lambda named: build_optimizer(named, tc, CPU), tc, init, grads, on_step=check)
    assert len(set(seen)) == 4  # warmup: four different rates

    # torch's Muon on A and B (B at ratio x lr), AdamW on the state, the schedule's lr set by hand
    class Explicit:
        def __init__(self, named):
            self.muon = torch.optim.Muon([{"params": by_name(named, A_NAMES), "weight_decay": tc.weight_decay},
                                          {"params": by_name(named, B_NAMES), "weight_decay": tc.weight_decay}],
                                         lr=tc.lr, momentum=MUON_MOMENTUM, nesterov=True,
                                         adjust_lr_fn="match_rms_adamw")
            self.adamw = torch.optim.AdamW(by_name(named, STATE), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                                           weight_decay=0.0)
            self.param_groups, self.steps = [], 0  # set_lr finds no groups here

        def step(self):
            lr = schedule_lr(tc, self.steps)
            self.steps += 1
            self.muon.param_groups[0]["lr"], self.muon.param_groups[1]["lr"] = lr, RATIO * lr
            self.adamw.param_groups[0]["lr"] = lr
            self.muon.step()
            self.adamw.step()

    ref = run(Explicit, tc, init, grads)
    for n in SHAPES:
        assert torch.equal(ours[n], ref[n]), n


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_run_with_lora_plus_resumes_exactly(tiny_world, tmp_path, optimizer):
    from safetensors.torch import load_file

    from peft_rwkv7.train.runner import train_from_cli

    extra = {"method.state": "true", "train.lr": 3e-3, "train.lora_plus_ratio": RATIO, "train.optimizer": optimizer,
             "train.warmup_steps": 2, "train.save_every": 2}
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_from_cli(LORA, tiny_overrides(tiny_world, full, steps=4, **extra))
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=4, **extra) + ["train.stop_after=2"])
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=4, **extra), resume=True)
    a, b = load_file(full / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    assert set(a) == set(b) and any(k.endswith(".lora_B") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit
    # the loop's schedule kept the ratio: the B groups (lr_scale) stepped last at ratio x the others' lr
    groups = load_latest_checkpoint(cut)["optimizer"]["param_groups"]
    b_lrs = {g["lr"] for g in groups if "lr_scale" in g}
    other_lrs = {g["lr"] for g in groups if "lr_scale" not in g}
    assert len(b_lrs) == 1 and len(other_lrs) == 1 and b_lrs == {RATIO * lr for lr in other_lrs}
    assert {g["lr_scale"] for g in groups if "lr_scale" in g} == {RATIO}


@pytest.mark.parametrize("kind", ["state", "full", "disha"])
def test_methods_without_lora_b_are_refused(kind):
    with pytest.raises(UserError, match=rf"train\.lora_plus_ratio: method\.kind {kind} has no LoRA B factor") as e:
        load_recipe(LORA, [f"method.kind={kind}", "train.lora_plus_ratio=16"])
    assert "\n" not in str(e.value)


def test_bad_ratio_and_offload_are_refused():
    for bad in ("0", "-2"):
        with pytest.raises(UserError, match=r"train\.lora_plus_ratio must be a positive number"):
            load_recipe(LORA, [f"train.lora_plus_ratio={bad}"])
    with pytest.raises(UserError, match=r"train\.lora_plus_ratio is not available with train\.deepspeed\.offload"):
        load_recipe(LORA, ["train.lora_plus_ratio=16", "train.deepspeed.stage=2", "train.deepspeed.offload=true"])
    assert load_recipe(LORA, ["train.lora_plus_ratio=16", "method.kind=pissa"]).train.lora_plus_ratio == RATIO
    # a method whose tensors turn out to hold no *.lora_B (none of the kinds above; a guard for new kinds)
    named = [("blocks.0.att.time_state", torch.nn.Parameter(torch.zeros(2, 4, 4)))]
    with pytest.raises(UserError, match=r"train\.lora_plus_ratio: this method trains no LoRA B factor"):
        build_optimizer(named, train_config("train.lora_plus_ratio=16"), CPU)
