"""Whole sequence == pieces carrying state == token-by-token RNN steps."""

from __future__ import annotations

import copy

import torch

from peft_rwkv7.model import LayerState
from tests.conftest import make_model
from tests.fp_oracle import forward_rounding, fp64_forward, gamma, logits64


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
    # Three fp32 computations of the same logits: each within the forward's rounding bound of fp64.
    oracle = logits64(model, idx)
    tol = forward_rounding(model.config, idx.shape[1]) * oracle.abs().max().item()
    for got in (whole, pieces, rnn):
        assert (got.double() - oracle).abs().max() <= tol


def test_initial_wkv_state_is_used_and_differentiable():
    model = make_model(seed=5)
    H, N = model.config.n_head, model.config.head_size
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    s0 = [torch.zeros(H, N, N, requires_grad=True) for _ in model.blocks]
    state = [LayerState(None, s, None) for s in s0]
    base = model(idx).detach()
    out = model(idx, state)
    # a zero initial state is the default: two fp32 forwards of one function, each within the bound of exact
    tol = 2 * forward_rounding(model.config, idx.shape[1]) * base.abs().max().item()
    assert (out - base).abs().max() <= tol
    out.square().mean().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in s0)
    with torch.no_grad():
        shifted = model(idx, [LayerState(None, torch.randn(H, N, N) * 0.5, None) for _ in model.blocks])
    assert (shifted - base).abs().max() > tol  # more than rounding could move it


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
    # Both against the fp64 gradient, per tensor, relative to its largest entry: the backward is the forward's
    # chain of ops in reverse (twice its rounding bound), plus the sums over the batch's 2 x 9 positions.
    exact = copy.deepcopy(model).double()
    exact.zero_grad()
    with fp64_forward():
        exact(idx).square().mean().backward()
    rel = 2 * forward_rounding(model.config, idx.shape[1]) + gamma(idx.numel())
    for (n, p), (_, e) in zip(model.named_parameters(), exact.named_parameters()):
        if n not in plain:
            assert p.grad is None and e.grad is None
            continue
        tol = rel * e.grad.abs().max().item()
        assert (p.grad.double() - e.grad).abs().max() <= tol, n
        assert (plain[n].double() - e.grad).abs().max() <= tol, n
