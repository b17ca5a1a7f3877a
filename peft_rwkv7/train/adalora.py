"""AdaLoRA in the training loop (Zhang et al. 2023, arXiv:2303.10512) on peft's own AdaLoraModel, which attach
keeps as `adapted.tuner`: the orthogonality penalty added to every step's loss, peft's rank allocator called
once per optimizer step, and the allocator's state in the training checkpoint, so a resumed run prunes the
same singular values as an uninterrupted one.

`method.r` is the rank every adapted matrix starts with; the allocator zeroes the least important entries of
each matrix's lora_E (the diagonal of P diag(E) Q) until `method.adalora.target_r` per matrix is left on
average (peft's cubic budget schedule between tinit and max_steps - tfinal).
"""

from __future__ import annotations

import torch

from ..errors import UserError

ADAPTER = "default"  # the name attach gives peft's adapter


def _tuner(adapted):
    """peft's AdaLoraModel of an adapted model, or None for every other method."""
    method = getattr(adapted, "method", None)
    return adapted.tuner if method is not None and method.kind == "adalora" else None


def check_run(method, tc) -> None:
    """One-line UserErrors for an AdaLoRA recipe the rank allocator cannot run (before anything is built)."""
    if method.kind != "adalora":
        return
    a = method.adalora
    if a.target_r > method.r:
        raise UserError(f"method.adalora.target_r: {a.target_r} is above the starting rank method.r={method.r}; "
                        "the allocator only removes rank")
    if a.tinit >= tc.max_steps - a.tfinal:
        raise UserError(f"method.adalora: tinit {a.tinit} and tfinal {a.tfinal} leave no step of rank allocation in "
                        f"train.max_steps={tc.max_steps}; lower them or train longer")
    if tc.deepspeed.stage:
        raise UserError("method.kind: adalora's rank allocator reads every gradient after the optimizer step, which "
                        "DeepSpeed keeps inside its engine; train AdaLoRA without train.deepspeed (one process)")


def orth_penalty(adapted) -> torch.Tensor:
    """AdaLoRA's orthogonality regulariser as peft's `AdaLoraModel.forward` adds it to the loss, a 0-dim tensor:

        orth_reg_weight * mean over every P [r, in] and Q [out, r] of ||P P^T - I||_F, ||Q^T Q - I||_F

    (the Frobenius norm itself, not its square; summed in module order, then divided by the count, the order
    peft computes in, so the value is bitwise peft's)."""
    tuner = _tuner(adapted)
    total, count = 0, 0
    for n, p in tuner.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and ADAPTER in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return tuner.peft_config[ADAPTER].orth_reg_weight * (total / count)


def orth_backward(adapted) -> float | None:
    """Backward of the step's orthogonality penalty (once per optimizer step: the gradient of loss + penalty);
    returns its value for the log, None when the method is not AdaLoRA or the weight is 0."""
    tuner = _tuner(adapted)
    if tuner is None or tuner.peft_config[ADAPTER].orth_reg_weight == 0:
        return None
    penalty = orth_penalty(adapted)
    penalty.backward()
    return penalty.item()


def update_and_allocate(adapted, step: int) -> None:
    """peft's rank allocation for the optimizer step `step` (0-based). Call it after optimizer.step() and before
    zero_grad(): the allocator scores every entry by |p * grad| and masks lora_E in place. That is the order of
    peft's example (examples/conditional_generation/peft_adalora_seq2seq.py: loss.backward(); optimizer.step();
    lr_scheduler.step(); model.base_model.update_and_allocate(global_step); optimizer.zero_grad(); global_step
    += 1, from global_step 0) and of AdaLoraModel.update_and_allocate's docstring."""
    tuner = _tuner(adapted)
    if tuner is not None:
        tuner.update_and_allocate(step)


def ranks(adapted) -> dict[str, int]:
    """{module: rank} the allocator left: nonzero entries of each matrix's lora_E (its delta's rank is at most
    that)."""
    tuner = _tuner(adapted)
    if tuner is None:
        return {}
    suffix = f".lora_E.{ADAPTER}"
    return {n[: -len(suffix)]: int(p.count_nonzero()) for n, p in tuner.model.named_parameters() if n.endswith(suffix)}


class AllocatorState:
    """The rank allocator's state for a training checkpoint: the step count its budget schedule spans
    (total_step), the per-entry sensitivity EMAs (ipt, exp_avg_ipt, exp_avg_unc; fp32 like the parameters,
    keyed by peft's parameter names) and the last rank pattern (peft masks with it during the final tfinal
    steps)."""

    FIELDS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, tuner):
        self.tuner = tuner

    def state_dict(self) -> dict:
        alloc, cfg = self.tuner.rankallocator, self.tuner.peft_config[ADAPTER]
        state = {f: {k: v.detach().cpu().clone() for k, v in getattr(alloc, f).items()} for f in self.FIELDS}
        pattern = None if cfg.rank_pattern is None else {k: list(v) for k, v in cfg.rank_pattern.items()}
        return {"total_step": cfg.total_step, "rank_pattern": pattern, **state}

    def load_state_dict(self, state: dict) -> None:
        alloc, cfg = self.tuner.rankallocator, self.tuner.peft_config[ADAPTER]
        if state["total_step"] != cfg.total_step:
            raise UserError(f"method.kind adalora: the run's rank budget spans train.max_steps={state['total_step']}; "
                            f"resume it with that, not {cfg.total_step}")
        params = dict(self.tuner.model.named_parameters())
        for f in self.FIELDS:
            setattr(alloc, f, {k: v.to(params[k].device) for k, v in state[f].items()})
        cfg.rank_pattern = state["rank_pattern"]


def checkpoint_state(adapted) -> dict[str, AllocatorState]:
    """What a training checkpoint holds beside tensors and optimizer: {"adalora": AllocatorState} or {}."""
    tuner = _tuner(adapted)
    return {} if tuner is None else {"adalora": AllocatorState(tuner)}
