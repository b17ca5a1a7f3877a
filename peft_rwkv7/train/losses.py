"""The pieces of a training step that are pure functions: token losses, per-sequence log-probs and the
optimizers' parameter groups."""

from __future__ import annotations

import math
import numbers
import re

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model.rwkv7 import check_labels


def scored_end(labels: torch.Tensor) -> int:
    """One past the last position any row scores (labels [B, T] != -100), at least 1 where T >= 1: the model
    is causal, so the positions after it change no log-prob and no gradient. Right-padded batches (sft/chat,
    preference pairs: each row padded to the longest of its batch or to ctx_len) skip their common tail."""
    cols = (labels != -100).any(dim=0).nonzero()
    return int(cols[-1]) + 1 if cols.numel() else min(1, labels.shape[1])


def sequence_logps(model, idx: torch.Tensor, labels: torch.Tensor, chunk_len: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-probabilities: (logps [B] fp32, tokens [B] int64) with
    `logps[b] = sum_t log p(labels[b, t] | idx[b, :t+1])` over labels != -100 and `tokens[b]` their count.

    Positions after the batch's last scored label are not run (`scored_end`). With chunk_len > 0 the
    sequence runs chunk by chunk carrying token-shift and WKV state; the state keeps its gradient (true
    BPTT through the kernels' state gradient) while each chunk's activations are recomputed in backward, so
    memory is O(chunk_len) instead of O(T)."""

    _check_inputs(model, idx, labels, chunk_len)

    def chunk_logps(x, y, state):
        if hasattr(model, "token_nll"):  # the fused chunked head: no [B, T, V] logits held
            nll, new_state = model.token_nll(x, y, state)
            return -nll.sum(dim=1), new_state
        logits, new_state = model(x, state, return_state=True)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
        return -nll.view(y.shape).sum(dim=1), new_state

    tokens = (labels != -100).sum(dim=1)
    end = scored_end(labels)
    if chunk_len and _zero3_ranks(model):  # every rank runs as many chunks as the one that runs most
        end = _longest_end(end, idx.device)
        idx, labels = _padded(idx, end, 0), _padded(labels, end, -100)
    idx, labels = idx[:, :end], labels[:, :end]
    if not chunk_len or idx.shape[1] <= chunk_len:
        return chunk_logps(idx, labels, None)[0], tokens
    total, state = idx.new_zeros(idx.shape[0], dtype=torch.float32), None
    for lo in range(0, idx.shape[1], chunk_len):
        x, y = idx[:, lo : lo + chunk_len], labels[:, lo : lo + chunk_len]
        part, state = checkpoint(chunk_logps, x, y, state, use_reentrant=False)
        total = total + part
    return total, tokens


def _check_inputs(model, idx, labels, chunk_len) -> None:
    """TypeError/ValueError naming the argument a caller got wrong (shapes and types only: the token ids' values are
    checked by the model, labels' by the loss)."""
    if not callable(model):
        raise TypeError(f"model: expected an RWKV7 or an adapted model, got {type(model).__name__}")
    for name, t in (("idx", idx), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a LongTensor [B, T], got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected [B, T] (a batch of sequences), got shape {tuple(t.shape)}")
    check_labels(labels, idx)  # the model's own: idx's shape, integer ids
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, numbers.Integral) or chunk_len < 0:
        raise ValueError(f"chunk_len: expected an integer >= 0 (0 = the whole sequence at once), got {chunk_len!r}")


def _zero3_ranks(model) -> bool:
    """Whether `model` runs under ZeRO-3 with other processes: each module call then gathers the module's weights
    with a collective, so every rank must make the same calls, chunk for chunk (a rank with more chunks than
    another waits for it forever)."""
    from ..ops import partitioned

    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return False
    parameters = getattr(model, "parameters", None)  # any callable model here (the tests' counting wrappers)
    first = next(parameters(), None) if callable(parameters) else None
    return first is not None and partitioned(first)


def _longest_end(end: int, device: torch.device) -> int:
    """The largest scored end over the ranks (each rank's own micro-batch)."""
    t = torch.tensor([end], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _padded(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """`t` [B, T] right-padded with `value` to `length` columns (unchanged when it has them): a padded tail scores
    nothing and, the model being causal, changes no earlier position."""
    return F.pad(t, (0, length - t.shape[1]), value=value) if t.shape[1] < length else t


def sequence_loss_sum(model, idx: torch.Tensor, labels: torch.Tensor, chunk_len: int = 0) -> torch.Tensor:
    """Sum (fp32 scalar) of next-token cross-entropy over labels != -100. idx, labels: [B, T];
    chunk_len as in sequence_logps."""
    return -sequence_logps(model, idx, labels, chunk_len)[0].sum()


def sequence_loss(model, idx: torch.Tensor, labels: torch.Tensor, chunk_len: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 (see sequence_loss_sum)."""
    return sequence_loss_sum(model, idx, labels, chunk_len) / (labels != -100).sum().clamp(min=1)


# Weight decay by role: the big matrices that map between token and feature spaces (embedding, head,
# the r/k/v/output and FFN projections when trained in full) and every adapter factor (LoRA A/B,
# DiSHA Bone/Bat shards, whatever their rank as tensors) are decayed. The initial state, norms,
# token-shift mixes, decay/bonus vectors and the small time-mix low-rank maps (w1..v2) are not:
# they set the recurrence's dynamics, and RWKV-LM never decays them either.
_DECAYED_WEIGHT = re.compile(r"(^|\.)(emb|head|receptance|key|value|output)\.weight$")
_ADAPTER_FACTOR = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|disha)(\.|$)")


def decays(name: str) -> bool:
    """Whether the trained tensor called `name` (as trainable_parameters names it) gets weight decay."""
    return bool(_DECAYED_WEIGHT.search(name) or _ADAPTER_FACTOR.search(name))


def param_groups(named, weight_decay: float):
    """Two AdamW groups: tensors decayed by role (see `decays`) and the rest. `named`: (name, parameter) pairs,
    e.g. trainable_parameters(model) (a one-pass iterator such as model.named_parameters() is fine)."""
    if isinstance(named, torch.nn.Module):
        raise TypeError(f"param_groups: expected (name, parameter) pairs, got the model ({type(named).__name__}); "
                        "pass trainable_parameters(model)")
    named = list(named)  # read twice below: a generator (model.named_parameters()) would give the second group nothing
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in named):
        raise TypeError("param_groups: expected (name, parameter) pairs such as trainable_parameters(model) gives")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real):
        raise TypeError(f"param_groups: weight_decay must be a number >= 0, got {type(weight_decay).__name__}")
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"param_groups: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    decay = [p for n, p in named if decays(n)]
    rest = [p for n, p in named if not decays(n)]
    groups = [{"params": rest, "weight_decay": 0.0}]
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    return groups


# Muon is for the 2-D weight matrices of hidden layers (Jordan et al. 2024); the embedding and the head
# (token-indexed, not a linear map between hidden spaces) and the per-head bonus r_k [H, N] go to AdamW,
# as do the state [H, N, N], Bat shards [in/r, r, r] and every vector.
_NOT_MUON = re.compile(r"(^|\.)(emb|head)\.weight$|(^|\.)r_k$")


def muon_eligible(name: str, p: torch.Tensor) -> bool:
    """Whether the trained tensor `name` is a hidden 2-D matrix that Muon updates (see _NOT_MUON)."""
    return p.ndim == 2 and not _NOT_MUON.search(name)


__all__ = ["sequence_loss", "sequence_loss_sum", "sequence_logps", "decays", "param_groups", "muon_eligible"]
