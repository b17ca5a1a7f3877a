"""Evaluation runs the head only where something is scored: rows with a target (sft/chat replies, every token of
text) or an argmax to check (LAMBADA's last word), a bounded number of rows at a time, for this package's model
bare or peft-wrapped. Values against an oracle of each document alone: fp64 logits of the whole sequence
(tests/fp_oracle.logits64), an fp64 log-softmax and argmax written here."""

from __future__ import annotations

import pytest
import torch

import peft_rwkv7.infer.evaluate as evaluate_module
from peft_rwkv7.adapters import MethodConfig, attach
from peft_rwkv7.infer.evaluate import score_sequences
from peft_rwkv7.model import RWKV7Config, new_model
from tests.fp_oracle import forward_rounding, logits64, logp_rounding


def tiny(seed: int = 5):
    model = new_model(RWKV7Config.new(n_layer=2, n_embd=64, vocab_size=96, head_size=16), seed=seed,
                      wkv_backend="reference")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def greedy(model, prefix: list[int], n: int) -> list[int]:
    seq = list(prefix)
    for _ in range(n):
        seq.append(int(logits64(model, torch.tensor([seq]))[0, -1].argmax()))
    return seq


def oracle(model, seq, scored, k):
    """(sum of fp64 log p over scored targets, number scored, every one of the last k targets scored and the
    argmax by a margin over the fp32 forward's bound (None where a margin is too thin to call)) of one
    sequence alone."""
    if len(seq) < 2:
        return 0.0, 0, None
    z = logits64(model, torch.tensor([seq[:-1]]))[0]
    tgt = torch.tensor(seq[1:])
    logp = z.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(z, dim=1)
    flags = torch.tensor(scored) if scored is not None else torch.ones(len(tgt), dtype=torch.bool)
    bound = 2 * forward_rounding(model.config, len(seq)) * z.abs().max().item()
    ok = True
    for t in range(len(tgt) - k, len(tgt)):
        top2 = z[t].topk(2).values
        if (top2[0] - top2[1]).item() <= bound:
            return float(logp[flags].sum()), int(flags.sum()), None
        ok &= bool(flags[t]) and int(z[t].argmax()) == int(tgt[t])
    return float(logp[flags].sum()), int(flags.sum()), ok


def case(model):
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(1, 96, (n,), generator=g).tolist()  # noqa: E731
    seqs = [greedy(model, [0] + rand(6), 3), [0] + rand(11), greedy(model, [0] + rand(2), 2), [0] + rand(4), [0]]
    last_k = [3, 2, 2, 0, 0]
    # sft-like masks: the first half of each sequence's targets is a prompt; one sequence fully scored
    scored = [[i >= (len(s) - 1) // 2 for i in range(len(s) - 1)] for s in seqs]
    scored[1] = [True] * (len(seqs[1]) - 1)
    scored[2][-1] = False  # greedy, but a check on an unscored target is wrong whatever the logits (no head row)
    return seqs, last_k, scored


@pytest.mark.parametrize("wrap", ["bare", "lora on the head"])
@pytest.mark.parametrize("chunk_len", [512, 4])
def test_only_scored_rows_reach_the_head_and_the_values_match_the_oracle(monkeypatch, wrap, chunk_len):
    model = tiny()
    seqs, last_k, scored = case(model)
    want = [oracle(model, s, m, k) for s, m, k in zip(seqs, scored, last_k, strict=True)]
    assert [w[2] for w in want] == [True, False, False, True, None]  # both outcomes (and margins wide enough)
    if wrap != "bare":
        model = attach(model, MethodConfig(kind="lora", r=4, alpha=8, target_modules=["att.key", "head"]))
        model.eval()
    rows = []
    head = model.model.head if wrap != "bare" else model.head
    hook = head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape))
    monkeypatch.setattr(evaluate_module, "_HEAD_ROWS", 5)  # several blocks per chunk
    nll, count, ok = score_sequences(model, seqs, last_k, batch_size=3, chunk_len=chunk_len, scored=scored)
    hook.remove()
    # the rows the head saw: every position with a scored target, nothing else
    need = sum(sum(m) for m in scored)
    assert sum(r[0] for r in rows) == need and all(len(r) == 2 and r[0] <= 5 for r in rows)
    for (lp, n, good), got_nll, got_n, got_ok, s in zip(want, nll, count, ok, seqs, strict=True):
        assert got_n == n
        z = logits64(tiny(), torch.tensor([s[:-1]])).abs().max().item() if len(s) > 1 else 0.0
        assert got_nll == pytest.approx(-lp, abs=logp_rounding(tiny().config, len(s), z, max(n, 1)))
        if good is not None:
            assert got_ok == good


def test_plain_perplexity_takes_no_argmax_over_the_vocabulary(monkeypatch):
    """Without positions to check (no LAMBADA accuracy) no argmax is taken (it cost ~13% of a 0.1B eval); with
    them, the head rows that hold a checked position are."""
    model = tiny()
    seqs, last_k, scored = case(model)  # (greedy sequences: argmax of their own)
    calls = []
    real = torch.Tensor.argmax
    monkeypatch.setattr(torch.Tensor, "argmax", lambda self, *a, **k: calls.append(self.shape) or real(self, *a, **k))
    score_sequences(model, seqs, [0] * len(seqs), batch_size=3, chunk_len=512, scored=scored)
    assert calls == []
    _, _, ok = score_sequences(model, seqs, last_k, batch_size=3, chunk_len=512, scored=scored)
    assert calls and ok[0] is True and ok[1] is False


def test_no_logits_of_a_whole_batch_are_held(monkeypatch):
    """The largest tensor evaluation makes is one block of head rows, not [B, T, V] (the previous path's
    logits of 3 x 40 positions)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else [out]:  # new memory only (not views: the head's W^T)
                if isinstance(t, torch.Tensor) and t.shape and t.shape[-1] == 96 and \
                        t.untyped_storage().data_ptr() not in given:
                    Largest.most = max(Largest.most, t.numel())
            return out

    model = tiny()
    g = torch.Generator().manual_seed(2)
    seqs = [[0] + torch.randint(1, 96, (40,), generator=g).tolist() for _ in range(3)]
    monkeypatch.setattr(evaluate_module, "_HEAD_ROWS", 16)
    with torch.no_grad(), Largest():
        score_sequences(model, seqs, [0, 0, 0], batch_size=3, chunk_len=512)
    assert 0 < Largest.most <= 16 * 96  # one block of 16 rows


def test_bf16_autocast_scores_as_the_whole_logits_path():
    """Training's eval runs under bf16 autocast where train.precision is bf16: the head on selected rows runs in
    bf16 too and gives what the whole [B, T, V] logits give. Both paths share the body; a logit of the same row
    from two bf16 GEMMs differs by at most its fp32 accumulation order (gamma_C of |h|.|w|) and one bf16
    rounding on each side, and a token's NLL by twice the largest logit difference."""
    from torch import nn

    from tests.fp_oracle import UBF16, gamma

    class WholeLogits(nn.Module):  # idx -> logits only: score_sequences' whole-logits path
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, idx, state=None, return_state=False):
            return self.m(idx, state, return_state)

    model = tiny()
    seqs, last_k, scored = case(model)
    rows, dtypes = [], []

    def seen(mod, args, out) -> None:
        rows.append(args[0].shape[0])
        dtypes.append(out.dtype)

    hook = model.head.register_forward_hook(seen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = score_sequences(model, seqs, last_k, batch_size=3, scored=scored)
        n_rows, rows_dtypes = sum(rows), set(dtypes)
        want = score_sequences(WholeLogits(model), seqs, last_k, batch_size=3, scored=scored)
        h = torch.cat([model.hidden(torch.tensor([s[:-1]]))[0][0] for s in seqs if len(s) > 1]).float()
    hook.remove()
    assert rows_dtypes == {torch.bfloat16} and n_rows == sum(sum(m) for m in scored)
    w = model.head.weight.to(torch.bfloat16).float()
    absdot = (h.abs() @ w.abs().t()).max().item()
    per_token = 2 * (2 * UBF16 + gamma(model.config.n_embd)) * absdot
    assert got[1] == want[1]
    for a, b, n in zip(got[0], want[0], got[1], strict=True):
        assert a == pytest.approx(b, abs=n * per_token)
