"""Whole sequence == pieces carrying state == token-by-token RNN steps."""

from __future__ import annotations

import torch

from peft_rwkv7.model import LayerState
from tests.conftest import make_model


def test_pieces_and_rnn_steps_equal_whole():
    model = make_model(seed=4, n_layer=3, n_embd=64, head_size=32)
    idx = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(idx)
        state, parts = None, []
        for lo, hi in ((0, 5), (5, 21), (21, 29)):  # three uneven pieces
            logits, state = model(idx[:, lo:hi], state, return_state=True)
            parts.append(logits)
        pieces = torch.cat(parts, dim=1)
        state, steps = None, []
        for t in range(idx.shape[1]):
            logits, state = model.step(idx[:, t], state)
            steps.append(logits)
        rnn = torch.stack(steps, dim=1)
    assert (pieces - whole).abs().max() <= 1e-4
    assert (rnn - whole).abs().max() <= 1e-4


def test_initial_wkv_state_is_used_and_differentiable():
    model = make_model(seed=5)
    H, N = model.config.n_head, model.config.head_size
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    s0 = [torch.zeros(H, N, N, requires_grad=True) for _ in model.blocks]
    state = [LayerState(None, s, None) for s in s0]
    base = model(idx).detach()
    out = model(idx, state)
    assert torch.allclose(out, base, atol=1e-6)  # a zero initial state is the default
    out.square().mean().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in s0)
    with torch.no_grad():
        shifted = model(idx, [LayerState(None, torch.randn(H, N, N) * 0.5, None) for _ in model.blocks])
    assert (shifted - base).abs().max() > 1e-3


def test_grad_checkpointing_gives_same_gradients():
    model = make_model(seed=6)
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    model(idx).square().mean().backward()
    # layer 0's v0/v1/v2 are unused by RWKV-7 and get no gradient
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(plain) == len(list(model.parameters())) - 3
    model.zero_grad()
    model.grad_cp = True
    model(idx).square().mean().backward()
    for n, p in model.named_parameters():
        if n not in plain:
            assert p.grad is None
            continue
        assert torch.allclose(p.grad, plain[n], atol=1e-6, rtol=1e-5), n
