"""The objectives as the loop sees them: one small interface, one implementation per family.

    task.batches(run, step) -> this rank's micro-batches of the step (data positions: a function of the step)
    task.backward(run, step, batches) -> {"loss": the step's loss, ...metrics}; gradients accumulated, scaled so
        the step's gradient is that of one loss over the global batch however it is split
    task.evaluate(run) -> held-out metrics, or None without held-out data
    task.tokens_run(run, batches) -> positions the model runs for this rank's micro-batches (for tokens/s)
    task.checkpoint_state() -> {name: object with state_dict/load_state_dict} saved beside the optimizer

`SftTask` (train.objective sft) and `PreferenceTask` (dpo, orpo, simpo: train/preference.py) are here; GRPO's
is train/grpo.py. `train_step` calls these and nothing objective-specific, so a new objective is one class.
"""

from __future__ import annotations

import contextlib

import torch

from .distributed import micro_backward
from .losses import scored_end, sequence_loss_sum
from .preference import evaluate_preference, preference_backward


def sum_over_ranks(value: float, dist, device: torch.device) -> float:
    if dist.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item()


class Task:
    """What every objective shares: data batches by step, no extra checkpoint state."""

    def batches(self, run, step: int) -> list:
        tc, dist = run.recipe.train, run.dist
        return [run.data.batch(step, micro, tc.micro_bsz, tc.grad_accum, dist.rank, dist.world_size)
                for micro in range(tc.grad_accum)]

    def tokens_run(self, run, batches) -> int:
        """Rows x positions each micro-batch runs: a right-padded batch stops at its last scored position
        (losses.scored_end), so padding past it is not counted; packed text runs every position."""
        return sum(idx.shape[0] * scored_end(labels) for idx, labels in batches)

    def checkpoint_state(self) -> dict:
        return {}

    def backward(self, run, step: int, batches) -> dict:
        raise NotImplementedError

    def evaluate(self, run) -> dict | None:
        raise NotImplementedError


class SftTask(Task):
    """Next-token loss over the data's loss tokens; held out: loss/ppl of the eval documents."""

    def __init__(self, eval_docs=None, eval_masks=None):
        self.eval_docs, self.eval_masks = eval_docs, eval_masks

    def backward(self, run, step: int, batches) -> dict:
        """One global batch, one loss: the sum of token losses over every micro-batch of every rank divided by
        the loss tokens of the whole step, however the batch is split. Ranks average their gradients, so each
        scales its sums by world_size / n_tokens."""
        dist, device = run.dist, run.device
        n_tokens = sum_over_ranks(float(sum(int((y != -100).sum()) for _, y in batches)), dist, device)
        scale = dist.world_size / max(n_tokens, 1.0)
        loss_sum = sum(self._micro(run, idx, labels, scale, step) for idx, labels in batches)
        return {"loss": sum_over_ranks(loss_sum, dist, device) / max(n_tokens, 1.0)}

    @staticmethod
    def _micro(run, idx, labels, scale: float, step: int) -> float:
        """One micro-batch's forward and backward; its summed loss. A function of its own so that nothing of
        this micro-batch's graph outlives it into the next one's forward: a graph still referenced (its saved
        tensors are freed, its nodes are not) keeps small blocks alive between the large ones the next forward
        wants, so the heap grows (0.1B state tuning at ctx 4096, grad_accum 2: peak RSS 10.7 GB instead of 7.2)."""
        with run.precision():
            part = sequence_loss_sum(run.model, idx.to(run.device), labels.to(run.device), run.recipe.train.chunk_len)
        micro_backward(run.engine, part, scale, step)
        return part.item()

    def evaluate(self, run) -> dict | None:
        if self.eval_docs is None:
            return None
        return evaluate_docs(run.model, self.eval_docs, run.precision, self.eval_masks)


class PreferenceTask(Task):
    """DPO, ORPO, SimPO on pairs (train/preference.py); held out: the preference metrics of the eval pairs."""

    def __init__(self, eval_pairs=None):
        self.eval_pairs = eval_pairs

    def backward(self, run, step: int, batches) -> dict:
        return preference_backward(run, step, batches)

    def evaluate(self, run) -> dict | None:
        if self.eval_pairs is None:
            return None
        tc = run.recipe.train
        return evaluate_preference(run.objective, run.model, run.reference, self.eval_pairs, tc.micro_bsz,
                                   tc.chunk_len, run.precision)


def evaluate_docs(model, docs, precision=contextlib.nullcontext, masks=None) -> dict:
    from ..infer.evaluate import evaluate

    was_training = model.training
    model.eval()
    with torch.no_grad(), precision():
        result = evaluate(model, docs, masks=masks)
    model.train(was_training)
    return result


__all__ = ["Task", "SftTask", "PreferenceTask", "evaluate_docs", "sum_over_ranks"]
