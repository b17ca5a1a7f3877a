"""Learning-rate schedules as pure functions of the step (nanoGPT's get_lr, generalised), and how the
step's rate reaches the optimizer's param groups (`set_lr`: each group at its own multiple, `lr_scale`)."""

from __future__ import annotations

import math


def get_lr(step: int, *, lr: float, lr_final: float, max_steps: int, warmup_steps: int, schedule: str,
           decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup from lr/warmup to lr over `warmup_steps`, then
    - cosine: lr -> lr_final along a half cosine until max_steps;
    - wsd: constant lr, then the last `decay_frac` of the steps decay linearly to lr_final;
    - constant: lr throughout.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(max_steps - warmup_steps - 1, 1)
        progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
        return lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(int(round(max_steps * decay_frac)), 1)
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return lr
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        return lr + (lr_final - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def set_lr(param_groups, lr: float) -> None:
    """Give every optimizer param group the step's learning rate `lr` times its "lr_scale" (1 where the group
    has none; LoRA+ gives the LoRA B groups train.lora_plus_ratio, train/optim.py), so warmup and decay move
    all groups together and keep their ratios."""
    for group in param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
