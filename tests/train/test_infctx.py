"""Long-context training: chunks carrying state give the loss and gradients of the whole sequence
(true backpropagation through the carried state, not a truncated one)."""

from __future__ import annotations

import torch

from peft_rwkv7.adapters import MethodConfig, attach, trainable_parameters
from peft_rwkv7.train.loop import sequence_loss
from tests.conftest import make_model
from tests.fp_oracle import forward_rounding, gamma, loss_rounding


def test_chunked_loss_and_grads_equal_whole_sequence():
    model = attach(make_model(seed=51, n_embd=64, head_size=16), MethodConfig(kind="lora", r=4, alpha=8, state=True))
    named = trainable_parameters(model)
    with torch.no_grad():  # move LoRA B and the state off zero so every gradient path is exercised
        for _, p in named:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 97, (2, 48), generator=g)
    labels = torch.randint(0, 97, (2, 48), generator=g)
    labels[0, :5] = -100  # masked positions count in neither

    def run(chunk_len):
        for _, p in named:
            p.grad = None
        loss = sequence_loss(model, idx, labels, chunk_len)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in named}

    whole, g_whole = run(0)
    chunked, g_chunked = run(16)
    # Two fp32 computations of one loss and its gradient: the loss within twice its rounding bound; each
    # gradient tensor, relative to its largest entry, within twice the backward's (the forward's chain in
    # reverse, x2, plus the sums over the 2 x 48 positions).
    with torch.no_grad():
        max_logit = model(idx).abs().max().item()
    n_tokens = int((labels != -100).sum())
    assert abs(whole - chunked) <= 2 * loss_rounding(model.config, 48, max_logit, whole, n_tokens)
    rel = 2 * (2 * forward_rounding(model.config, 48) + gamma(idx.numel()))
    for n in g_whole:
        assert (g_whole[n] - g_chunked[n]).abs().max() <= rel * g_whole[n].abs().max(), n
    # the first chunk's state gradient depends on later chunks: a detached (truncated) carry would differ
    state_grads = [n for n in g_whole if n.endswith("time_state")]
    assert state_grads and all(g_whole[n].abs().sum() > 0 for n in state_grads)
