"""train/losses.py against an fp64 oracle (found by `scripts/mutation.sh losses`: the existing tests compare the
chunked loss with the whole one, so a mistake shared by both went unseen).

The oracle: the model's logits for the whole sequence at once, log-softmax in float64, the label's log-prob
picked and summed by hand over the unmasked positions. It checks the loss arithmetic, not the model."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.train.losses import muon_eligible, param_groups, sequence_logps, sequence_loss, sequence_loss_sum
from tests.conftest import make_model

V, T = 97, 10


@pytest.fixture(scope="module")
def model():
    m = make_model(seed=3, n_layer=2, n_embd=64, head_size=16, vocab_size=V)
    m.set_wkv_backend("reference")  # no kernel build; the oracle runs the same op
    return m


def batch(masked: list[list[int]]):
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, V, (len(masked), T), generator=g)
    labels = torch.randint(0, V, (len(masked), T), generator=g)
    for b, positions in enumerate(masked):
        labels[b, positions] = -100
    return idx, labels


def oracle(model, idx, labels) -> list[float]:
    """sum_t log p(labels[b, t] | idx[b, :t+1]) over labels != -100, in float64 by hand."""
    with torch.no_grad():
        logp = torch.log_softmax(model(idx).double(), dim=-1)
    return [sum(logp[b, t, labels[b, t]].item() for t in range(T) if labels[b, t] != -100)
            for b in range(idx.shape[0])]


# Row 0: 3 masked positions; row 1: none; row 2: all but one (a one-token response).
MASKED = [[0, 1, 5], [], [t for t in range(T) if t != 7]]
# The oracle and the loss see the same fp32 logits; fp32 cross-entropy rounds log-sum-exp (|.| < 10) to
# ~2^-24 * 10 per token, ~10 roundings each, over T tokens: 10 * 10 * 6e-7 < 1e-4.
TOL = 1e-4


@pytest.mark.parametrize("chunk_len", [0, T, 4, 3])
def test_sequence_logps_and_token_counts_equal_the_oracle(model, chunk_len):
    """Whole, one chunk (chunk_len = T) and chunks that do not divide T (4+4+2, 3+3+3+1): the chunks carry the
    state, so they give the whole sequence's log-probs (the carried state adds a few fp32 roundings per chunk)."""
    idx, labels = batch(MASKED)
    with torch.no_grad():
        logps, tokens = sequence_logps(model, idx, labels, chunk_len)
    assert logps.dtype == torch.float32 and tokens.tolist() == [T - 3, T, 1]
    want = oracle(model, idx, labels)
    assert max(abs(a - b) for a, b in zip(logps.tolist(), want, strict=True)) <= TOL, (logps, want)


def test_loss_sum_and_token_mean(model):
    idx, labels = batch(MASKED)
    want = oracle(model, idx, labels)
    with torch.no_grad():
        total = sequence_loss_sum(model, idx, labels).item()
        mean = sequence_loss(model, idx, labels, chunk_len=4).item()
        one = sequence_loss(model, idx[2:], labels[2:]).item()  # a single loss token: its NLL, not half of it
        none = sequence_loss(model, idx[:1], torch.full_like(labels[:1], -100)).item()
    assert abs(total - -sum(want)) <= 3 * TOL
    assert abs(mean - -sum(want) / ((T - 3) + T + 1)) <= TOL
    assert abs(one - -want[2]) <= TOL
    assert none == 0.0  # no loss token: 0, not 0/0


def test_chunk_len_sets_the_forward_calls(model):
    """chunk_len 0 (the default) is one forward over the whole sequence; chunk_len 4 is 4 + 4 + 2 tokens.
    (The values agree either way: what a wrong chunk_len costs is time and memory, seen here as calls.)"""
    idx, labels = batch(MASKED)
    lengths = []

    def counting(x, state, return_state):
        lengths.append(x.shape[1])
        return model(x, state, return_state=return_state)

    with torch.no_grad():
        sequence_loss(counting, idx, labels)
        sequence_loss_sum(counting, idx, labels)
        sequence_logps(counting, idx, labels)
        assert lengths == [T, T, T]
        sequence_loss(counting, idx, labels, 4)
        sequence_loss_sum(counting, idx, labels, 4)
    assert lengths == [T, T, T] + [4, 4, 2] * 2
    # a sequence no longer than chunk_len is one plain forward: chunks are recomputed in backward, it is not
    lengths.clear()
    sequence_loss(counting, idx, labels, T).backward()
    assert lengths == [T]


def test_bf16_logits_are_scored_in_fp32(model):
    """Under bf16 the logits are bf16; the log-probs come from them in fp32 (bf16 would round each token's NLL
    by ~2^-9 of its size, ~1e-2, and the sum of ~20 of them by more)."""
    m16 = make_model(seed=3, n_layer=2, n_embd=64, head_size=16, vocab_size=V).to(torch.bfloat16)
    m16.set_wkv_backend("reference")
    idx, labels = batch(MASKED)
    with torch.no_grad():
        logps, _ = sequence_logps(m16, idx, labels)
    assert logps.dtype == torch.float32
    # the oracle takes the same bf16 logits to float64; fp32 log-softmax of them rounds as in TOL
    assert max(abs(a - b) for a, b in zip(logps.tolist(), oracle(m16, idx, labels), strict=True)) <= TOL


def test_param_groups_weight_decay_by_role():
    a, b, c, d = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(4))
    named = [("blocks.0.att.key.lora_A", a), ("blocks.0.att.time_state", b), ("head.weight", c),
             ("blocks.0.ln1.weight", d)]
    groups = param_groups(named, 0.25)
    assert [([id(p) for p in g["params"]], g["weight_decay"]) for g in groups] == \
        [([id(b), id(d)], 0.0), ([id(a), id(c)], 0.25)]
    only_rest = param_groups(named[1:2], 0.25)
    assert [([id(p) for p in g["params"]], g["weight_decay"]) for g in only_rest] == [([id(b)], 0.0)]


def test_muon_takes_hidden_matrices_only():
    m, v, s = torch.zeros(4, 4), torch.zeros(4), torch.zeros(2, 4, 4)
    assert muon_eligible("blocks.0.att.key.lora_A", m) and muon_eligible("blocks.0.att.w1", m)
    assert muon_eligible("blocks.0.ffn.key.weight", m)
    assert not muon_eligible("emb.weight", m) and not muon_eligible("head.weight", m)
    assert not muon_eligible("blocks.0.att.r_k", m)  # [H, N], a per-head vector set
    assert not muon_eligible("blocks.0.att.x_r", v) and not muon_eligible("blocks.0.att.time_state", s)


@pytest.mark.parametrize("chunk_len", [0, 4])
def test_a_padded_tail_no_row_scores_is_not_run(chunk_len):
    """Right-padded rows (sft/chat, preference pairs): positions after the batch's last scored label change
    nothing (the model is causal) and are not run. The log-probs and every gradient equal the oracle's, which
    runs the whole T; the model sees 6 positions (4 + 2 in chunks of 4), not T; nothing scored runs one."""
    m = make_model(seed=3, n_layer=2, n_embd=64, head_size=16, vocab_size=V)
    m.set_wkv_backend("reference")
    idx, labels = batch([[0, 1] + list(range(6, T)), list(range(4, T))])  # last scored position: 5
    lengths = []

    def counting(x, state=None, return_state=False):
        lengths.append(x.shape[1])
        return m(x, state, return_state=return_state)

    logps, tokens = sequence_logps(_Plain(counting), idx, labels, chunk_len)
    assert lengths == ([4, 2] if chunk_len else [6]) and tokens.tolist() == [4, 4]
    want = oracle(m, idx, labels)
    assert max(abs(a - b) for a, b in zip(logps.tolist(), want, strict=True)) <= TOL
    logps.sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    logp = torch.log_softmax(m(idx).float(), dim=-1)  # the whole T, the same sum by hand
    keep = labels != -100
    logp.gather(2, labels.clamp(min=0)[..., None]).squeeze(2)[keep].sum().backward()
    assert got.keys() == {n for n, p in m.named_parameters() if p.grad is not None} and got
    for n, p in m.named_parameters():
        if p.grad is not None:  # fp32 roundings through 2 layers, relative to the largest entry
            assert (got[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-30, n
    lengths.clear()
    with torch.no_grad():
        assert sequence_loss(_Plain(counting), idx, torch.full_like(labels, -100)).item() == 0.0
    assert lengths == [1]


class _Plain:
    """A callable model without token_nll (sequence_logps's plain-logits path)."""

    def __init__(self, call):
        self.call = call

    def __call__(self, x, state=None, return_state=False):
        return self.call(x, state, return_state)
