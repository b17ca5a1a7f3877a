"""The optimizer of a run (`train.optimizer`): AdamW, or Muon for the hidden 2-D matrices plus AdamW for
the rest, as one `torch.optim.Optimizer` (one `param_groups` list for the schedule, one `state_dict` for
checkpoints, so exact resume works the same for both).

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/; at scale: Liu et al. 2025,
"Muon is Scalable for LLM Training", arXiv:2502.16982) replaces the update of a weight matrix W by
the orthogonalised momentum: with B_t = mu B_{t-1} + g_t and Nesterov's g_t + mu B_t,
`W <- W (1 - lr wd) - lr * 0.2 sqrt(max(A, B)) * NS5(g_t + mu B_t)`, NS5 five Newton-Schulz steps
towards U V^T of the SVD. The 0.2 sqrt(max(A, B)) factor (torch's `adjust_lr_fn="match_rms_adamw"`)
gives the update the RMS of an AdamW update, so `train.lr` and `train.weight_decay` mean the same for
both optimizers. Which tensors are matrices for Muon: `losses.muon_eligible` (LoRA A/B, DiSHA Bone
shards, projections and time-mix low-rank maps trained in full); everything else (states, vectors,
embedding, head, Bat shards) is updated by AdamW, as Muon is meant to be used.

LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354;
`train.lora_plus_ratio`): the LoRA B factors train at ratio x the learning rate of everything else, in
param groups of their own (split by weight decay like the others, after them) that carry
`lr_scale` = ratio, which the schedule multiplies by (schedule.set_lr), in either optimizer.

Under `train.deepspeed.offload` the optimizer is DeepSpeed's CPU Adam (decoupled weight decay, as
AdamW) on the fp32 partitions ZeRO keeps in CPU memory: DeepSpeed refuses an optimizer of ours there.
Its C++ op is compiled with ninja on first use (minutes, once; cached in torch's extension folder).
"""

from __future__ import annotations

import sys

import torch

from ..errors import UserError
from .losses import muon_eligible, param_groups

MUON_MOMENTUM = 0.95


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the groups marked `use_muon`, torch.optim.AdamW on the others (either may be
    empty: LoRA has only matrices, state tuning none).

    The inner optimizers share this object's param group dicts and its `state`, so the schedule (setting
    group["lr"], times the group's lr_scale under LoRA+), `state_dict()` and `load_state_dict()` see one optimizer."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], lr: float, betas: tuple[float, float],
                 eps: float, momentum: float = MUON_MOMENTUM) -> None:
        inner: list[torch.optim.Optimizer] = []
        if muon_groups:
            inner.append(torch.optim.Muon([{**g, "use_muon": True} for g in muon_groups], lr=lr, momentum=momentum,
                                          nesterov=True, adjust_lr_fn="match_rms_adamw"))
        if adamw_groups:
            inner.append(torch.optim.AdamW([{**g, "use_muon": False} for g in adamw_groups], lr=lr, betas=betas,
                                           eps=eps))
        self.inner = inner
        super().__init__([g for opt in inner for g in opt.param_groups], {})
        self._bind()

    def _bind(self) -> None:
        """Point the inner optimizers at this object's groups and state (after init and after a load)."""
        for opt in self.inner:
            is_muon = isinstance(opt, torch.optim.Muon)
            opt.param_groups = [g for g in self.param_groups if g["use_muon"] is is_muon]
            opt.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._bind()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.inner:
            opt.step()
        return loss


def cpu_adam_op(announce: bool = False):
    """DeepSpeed's CPU Adam op, compiled on first use; a one-line UserError naming why where it does not build."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if announce:
        print("train.deepspeed.offload: loading DeepSpeed's CPU Adam (compiled with ninja on first use: "
              "minutes, once)", file=sys.stderr, flush=True)
    try:
        return CPUAdamBuilder().load(verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure becomes the one-line refusal
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]  # compiler output follows line 1
        raise UserError(f"train.deepspeed.offload: DeepSpeed's CPU Adam (deepspeed.ops.adam.DeepSpeedCPUAdam) does "
                        f"not build here ({why}); it needs a C++ compiler and ninja (pip install ninja), or run "
                        f"without offload (train.deepspeed.offload=false)") from None


def _powers_from_the_step(optimizer, args, kwargs) -> None:
    """A step pre-hook for DeepSpeedCPUAdam: give its C++ state a fresh start before every step.

    The op keeps beta^t as a float updated by one multiplication per step, but computes it as
    pow(beta, t) when the step count jumps (the first step after a resume): the two differ in the last
    bit (beta2 0.99 at t = 3), so a resumed run would drift from the uninterrupted one. Created afresh,
    the op takes pow(beta, t) at every step (t = 1: 1.0 * beta, the same number), in both runs."""
    g = optimizer.param_groups[0]
    optimizer.ds_opt_adam.create_adam(optimizer.opt_id, g["lr"], g["betas"][0], g["betas"][1], g["eps"],
                                      g["weight_decay"], optimizer.adam_w_mode, False)


def is_lora_b(name: str) -> bool:
    """Whether the trained tensor `name` (as trainable_parameters names it) is a LoRA B factor (LoRA+)."""
    return name.endswith(".lora_B")


def scaled_groups(named, tc) -> list[dict]:
    """`losses.param_groups` of `named` (empty groups kept, as before), then, under train.lora_plus_ratio,
    the LoRA B factors' own groups (empty ones dropped) at lr_scale = ratio. The order is a function of the
    names alone, so a resumed run's optimizer state lines up with its groups."""
    ratio = tc.lora_plus_ratio
    if ratio is None:
        return param_groups(named, tc.weight_decay)
    b = [(n, p) for n, p in named if is_lora_b(n)]
    groups = param_groups([(n, p) for n, p in named if not is_lora_b(n)], tc.weight_decay)
    return groups + [{**g, "lr": tc.lr * ratio, "lr_scale": ratio} for g in param_groups(b, tc.weight_decay)
                     if g["params"]]


def build_optimizer(named, tc, device: torch.device) -> torch.optim.Optimizer:
    """The run's optimizer for the trained tensors `named` [(name, param)] and the recipe's train section."""
    if tc.lora_plus_ratio is not None and not any(is_lora_b(n) for n, _ in named):
        raise UserError("train.lora_plus_ratio: this method trains no LoRA B factor (no tensor named *.lora_B); "
                        "remove train.lora_plus_ratio")
    if tc.deepspeed.offload:  # muon and lora_plus_ratio are refused with offload by the recipe
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        cpu_adam_op()
        optimizer = DeepSpeedCPUAdam(param_groups(named, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                     eps=tc.eps, adamw_mode=True)
        optimizer.register_step_pre_hook(_powers_from_the_step)
        return optimizer
    if tc.optimizer == "adamw":
        # torch's fused AdamW (one kernel per tensor) on CUDA and on the CPU: on 2 CPU cores the default
        # multi-tensor path took 0.59 s a step for 0.1B full fine-tuning's tensors, the fused one 0.13 s
        return torch.optim.AdamW(scaled_groups(named, tc), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                 eps=tc.eps, fused=device.type in ("cuda", "cpu") or None)
    matrices = [(n, p) for n, p in named if muon_eligible(n, p)]
    rest = [(n, p) for n, p in named if not muon_eligible(n, p)]
    muon_groups, adamw_groups = ([g for g in scaled_groups(part, tc) if g["params"]] for part in (matrices, rest))
    return MuonAdamW(muon_groups, adamw_groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)


__all__ = ["MuonAdamW", "build_optimizer", "cpu_adam_op", "is_lora_b", "scaled_groups", "MUON_MOMENTUM"]
