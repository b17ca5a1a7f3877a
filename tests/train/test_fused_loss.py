"""The training losses take the fused chunked head (RWKV7.token_nll -> ops.linear_ce): the same loss and
gradients as cross-entropy on the full logits, without ever holding a [B, T, V] tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from peft_rwkv7.adapters import MethodConfig, attach, trainable_parameters
from peft_rwkv7.ops.linear_ce import CHUNK_ELEMENTS
from peft_rwkv7.train.losses import sequence_logps, sequence_loss
from tests.conftest import make_model
from tests.fp_oracle import forward_rounding, gamma, loss_rounding


def _plain_logps(model, idx, labels):
    """Today's path before the fused head, written out: full logits, fp32 cross-entropy."""
    logits = model(idx)
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(labels.shape).sum(dim=1)


def _lora_state_model(seed):
    model = attach(make_model(seed=seed, n_embd=64, head_size=16), MethodConfig(kind="lora", r=4, alpha=8, state=True))
    named = trainable_parameters(model)
    with torch.no_grad():  # LoRA B and the state off zero so that every gradient path carries something
        for _, p in named:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, named


def test_sequence_logps_fused_equals_the_full_logits_path_in_value_and_gradient():
    model, named = _lora_state_model(seed=61)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 97, (3, 40), generator=g)
    labels = torch.randint(0, 97, (3, 40), generator=g)
    labels[1, :9] = -100
    weights = torch.tensor([1.0, -0.5, 2.0])  # per-sequence weights, as DPO gives them

    def run(fn):
        for _, p in named:
            p.grad = None
        lp = fn()
        (lp * weights).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in named}

    fused, g_fused = run(lambda: sequence_logps(model, idx, labels)[0])
    plain, g_plain = run(lambda: _plain_logps(model, idx, labels))
    with torch.no_grad():
        max_logit = model(idx).abs().max().item()
    # Two fp32 computations of the same numbers (the trunk is the same code; only the head + CE differ):
    # each sequence's log-prob within twice its rounding bound, each gradient within twice the backward's.
    for b in range(3):
        n_tok = int((labels[b] != -100).sum())
        assert abs(fused[b] - plain[b]) <= 2 * loss_rounding(model.config, 40, max_logit, 0, 1) * n_tok
    rel = 2 * (2 * forward_rounding(model.config, 40) + gamma(idx.numel()))
    for n in g_plain:
        assert (g_fused[n] - g_plain[n]).abs().max() <= rel * g_plain[n].abs().max(), n
    assert all(g.abs().sum() > 0 for g in g_fused.values())


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_a_training_step_never_holds_the_full_logits():
    """V = 65536 (the World vocabulary) and T = 1024: the full logits would be 2^26 elements (256 MiB),
    twice the fused op's chunk; forward and backward of the loss stay at or below one chunk."""
    model = attach(make_model(seed=5, n_layer=1, n_embd=32, head_size=16, vocab_size=65536),
                   MethodConfig(kind="state"))
    idx = torch.randint(0, 65536, (1, 1024), generator=torch.Generator().manual_seed(0))
    assert idx.numel() * 65536 == 2 * CHUNK_ELEMENTS
    with _LargestTensor() as seen:
        loss = sequence_loss(model, idx, idx)
        loss.backward()
    assert seen.largest <= CHUNK_ELEMENTS
    with _LargestTensor() as seen_plain:  # the check can fail: the full-logits path trips it
        _plain_logps(model, idx, idx).sum().backward()
    assert seen_plain.largest >= 2 * CHUNK_ELEMENTS


def test_long_context_chunks_take_the_fused_head_too():
    """chunk_len (infctx): each chunk's loss goes through token_nll, and the whole-sequence numbers hold."""
    model, named = _lora_state_model(seed=62)
    g = torch.Generator().manual_seed(9)
    idx = torch.randint(0, 97, (2, 48), generator=g)
    labels = torch.randint(0, 97, (2, 48), generator=g)
    calls = []
    inner = model.model.token_nll
    model.model.token_nll = lambda *a, **k: calls.append(1) or inner(*a, **k)
    loss = sequence_loss(model, idx, labels, chunk_len=16)
    loss.backward()
    assert len(calls) >= 3  # three chunks (more: recomputed in backward)
    del model.model.token_nll
    with torch.no_grad():
        plain = -_plain_logps(model, idx, labels).sum() / labels.numel()
        max_logit = model(idx).abs().max().item()
    assert abs(loss.item() - plain.item()) <= 2 * loss_rounding(model.config, 48, max_logit, plain.item(), 96)
