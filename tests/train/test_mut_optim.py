"""What mutation testing of train/optim.py found untested: DeepSpeed's CPU Adam under train.deepspeed.offload (its op's
build and refusal, its construction, the hook that gives its C++ state a fresh start), and the optimizer's own
settings. DeepSpeed's classes are faked where building them would compile its C++ op (minutes); the expectations
are DeepSpeed's documented arguments and the recipe's values."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.errors import UserError
from peft_rwkv7.train import optim
from peft_rwkv7.train.optim import build_optimizer, cpu_adam_op
from tests.train.test_lora_plus import CPU, SHAPES, tensors, train_config

deepspeed_builder = pytest.importorskip("deepspeed.ops.op_builder")


def _named():
    return [(n, torch.nn.Parameter(t)) for n, t in tensors(steps=0)[0].items()]


def test_cpu_adam_op_builds_quietly_and_says_so_when_asked(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(deepspeed_builder.CPUAdamBuilder, "load", lambda self, **kw: calls.append(kw) or "op")
    assert cpu_adam_op() == "op" and capsys.readouterr().err == ""
    assert cpu_adam_op(announce=True) == "op"
    assert calls == [{"verbose": False}] * 2
    assert capsys.readouterr().err == ("train.deepspeed.offload: loading DeepSpeed's CPU Adam (compiled with ninja on "
                                       "first use: minutes, once)\n")


@pytest.mark.parametrize("error, why", [
    (RuntimeError("  Error building extension 'cpu_adam'\nc++: fatal error ..."),
     "Error building extension 'cpu_adam'"),
    (OSError(), "OSError"),  # no message: the exception's name
    (RuntimeError("x" * 300), "x" * 200),  # line 1 cut at 200 characters
])
def test_a_cpu_adam_op_that_does_not_build_is_one_line(monkeypatch, error, why):
    def fail(self, **kw):
        raise error

    monkeypatch.setattr(deepspeed_builder.CPUAdamBuilder, "load", fail)
    with pytest.raises(UserError) as e:
        cpu_adam_op()
    assert str(e.value) == (f"train.deepspeed.offload: DeepSpeed's CPU Adam (deepspeed.ops.adam.DeepSpeedCPUAdam) "
                            f"does not build here ({why}); it needs a C++ compiler and ninja (pip install ninja), or "
                            f"run without offload (train.deepspeed.offload=false)")
    assert e.value.__suppress_context__  # the build's traceback is not chained onto the user's line


def test_offload_builds_deepspeeds_cpu_adam_with_the_recipes_settings(monkeypatch):
    import deepspeed.ops.adam

    made, built = [], []

    class FakeCpuAdam:
        def __init__(self, groups, **kw):
            made.append((groups, kw))
            self.hooks = []

        def register_step_pre_hook(self, hook):
            self.hooks.append(hook)

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", FakeCpuAdam)
    monkeypatch.setattr(optim, "cpu_adam_op", lambda announce=False: built.append(announce))
    tc = train_config("train.deepspeed.offload=true", "train.beta1=0.8", "train.beta2=0.95", "train.eps=1e-6")
    named = _named()
    opt = build_optimizer(named, tc, CPU)
    assert isinstance(opt, FakeCpuAdam) and built == [False] and opt.hooks == [optim._powers_from_the_step]
    groups, kw = made[0]
    assert kw == {"lr": tc.lr, "betas": (0.8, 0.95), "eps": 1e-6, "adamw_mode": True}
    by_id = {id(p): n for n, p in named}
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] == tc.weight_decay for p in g["params"]}
    assert decayed == {n for n in SHAPES if "lora" in n}  # the factors decayed, the state not (losses.param_groups)


def test_the_hook_gives_cpu_adam_a_fresh_start_from_the_first_groups_settings():
    calls = []

    class Op:
        def create_adam(self, *args):
            calls.append(args)

    class FakeCpuAdam:
        opt_id, adam_w_mode, ds_opt_adam = 7, True, Op()
        param_groups = [{"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1},
                        {"lr": 0.5, "betas": (0.1, 0.2), "eps": 1.0, "weight_decay": 0.0}]

    optim._powers_from_the_step(FakeCpuAdam(), (), {})
    assert calls == [(7, 0.01, 0.9, 0.99, 1e-8, 0.1, True, False)]  # (id, lr, b1, b2, eps, wd, adamw, bias corr.)


def test_adamw_is_torchs_fused_one_with_the_recipes_settings():
    tc = train_config("train.beta1=0.8", "train.beta2=0.95", "train.eps=1e-6")
    opt = build_optimizer(_named(), tc, CPU)
    assert type(opt) is torch.optim.AdamW
    d = opt.defaults
    assert d["fused"] is True and d["betas"] == (0.8, 0.95) and d["eps"] == 1e-6 and d["lr"] == tc.lr
    # a device torch has no fused AdamW for: torch's default implementation
    assert build_optimizer(_named(), tc, torch.device("meta")).defaults["fused"] is None


def test_adamw_on_a_gpu_is_the_fused_one_too():
    # torch's fused AdamW takes CPU tensors as well, so the flag shows here without a GPU
    assert build_optimizer(_named(), train_config(), torch.device("cuda")).defaults["fused"] is True


def test_lora_plus_without_b_factors_is_refused_in_one_line():
    named = [(n, p) for n, p in _named() if "lora_B" not in n]
    with pytest.raises(UserError) as e:
        build_optimizer(named, train_config("train.lora_plus_ratio=4"), CPU)
    assert str(e.value) == ("train.lora_plus_ratio: this method trains no LoRA B factor (no tensor named *.lora_B); "
                            "remove train.lora_plus_ratio")


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_the_b_groups_start_at_ratio_times_lr_before_any_schedule(kind):
    tc = train_config("train.lora_plus_ratio=4", f"train.optimizer={kind}")
    named = _named()
    opt = build_optimizer(named, tc, CPU)
    b_ids = {id(p) for n, p in named if n.endswith("lora_B")}
    for g in opt.param_groups:
        is_b = bool(g["params"]) and all(id(p) in b_ids for p in g["params"])
        assert g["lr"] == (4 * tc.lr if is_b else tc.lr) and g.get("lr_scale", 1) == (4 if is_b else 1)


def test_muon_and_adamw_inside_take_the_recipes_settings():
    tc = train_config("train.optimizer=muon", "train.beta1=0.8", "train.beta2=0.95", "train.eps=1e-6")
    opt = build_optimizer(_named(), tc, CPU)
    muon, adamw = opt.inner
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert muon.defaults["lr"] == adamw.defaults["lr"] == tc.lr
    assert muon.defaults["momentum"] == optim.MUON_MOMENTUM and muon.defaults["nesterov"] is True
    assert muon.defaults["adjust_lr_fn"] == "match_rms_adamw"
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-6


def test_muon_adamw_step_returns_the_closures_loss():
    named = _named()
    opt = build_optimizer(named, train_config("train.optimizer=muon"), CPU)
    for _, p in named:
        p.grad = torch.ones_like(p)
    assert opt.step() is None
    assert opt.step(lambda: torch.is_grad_enabled() and 2.5) == 2.5  # called with autograd on
