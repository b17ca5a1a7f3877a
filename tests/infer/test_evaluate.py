"""evaluate(): loss/ppl/tokens against hand computation on a bigram model, against the `rwkv`
package on a real (tiny) RWKV-7, chunked = unchunked, and LAMBADA accuracy on a toy tokenizer."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_rwkv7.errors import UserError
from peft_rwkv7.infer.evaluate import evaluate
from peft_rwkv7.model import RWKV7Config, new_model, save_model
from tests.fp_oracle import U64, fp64_nll_rounding, logits64, loss_rounding


def fp64_loss_tol(table: torch.Tensor) -> float:
    """evaluate's log-softmax runs in fp64 on the fp32 logits (exact in fp64), as does the hand computation."""
    return fp64_nll_rounding(table.shape[-1], table.abs().max().item())


class Bigram(nn.Module):
    """logits[t] = table[idx[t]]: the prediction depends on the current token only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, idx, state=None, return_state=False):
        logits = self.table[idx]
        return (logits, state) if return_state else logits


def _nll(table: list[list[float]], prev: int, nxt: int) -> float:
    row = table[prev]
    return math.log(sum(math.exp(v) for v in row)) - row[nxt]


def test_loss_is_the_mean_over_all_predicted_tokens():
    table = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    docs = [[3, 1, 4, 1, 5], [9, 2], [6], []]
    rows = table.tolist()
    total = sum(_nll(rows, p, n) for d in docs for p, n in zip([0] + d[:-1], d))
    got = evaluate(Bigram(table), docs, batch_size=2, chunk_len=2)
    assert got["tokens"] == 8
    tol = fp64_loss_tol(table)
    assert got["loss"] == pytest.approx(total / 8, abs=tol)
    assert got["ppl"] == pytest.approx(math.exp(total / 8), rel=2 * tol + 2 * U64)  # exp: relative = absolute
    assert got["acc"] is None


def test_empty_data_is_a_user_error():
    with pytest.raises(UserError, match="no tokens"):
        evaluate(Bigram(torch.zeros(4, 4)), [[], []])


def test_tiny_rwkv7_matches_the_rwkv_package_chunked_or_not(tmp_path):
    model = new_model(
        RWKV7Config.new(n_layer=2, n_embd=64, vocab_size=128, head_size=16), seed=3, wkv_backend="reference"
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_model(model, tmp_path / "m.pth", dtype=torch.float32)
    docs = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (9, 4, 13)]

    os.environ["RWKV_V7_ON"] = "1"  # read by the rwkv package at import
    from rwkv.model import RWKV

    oracle = RWKV(model=str(tmp_path / "m"), strategy="cpu fp32")
    total = 0.0
    for d in docs:
        logits, _ = oracle.forward([0] + d[:-1], None, full_output=True)
        total += F.cross_entropy(logits.float(), torch.tensor(d), reduction="sum").item()
    want = total / 26
    whole = evaluate(model, docs, batch_size=2)
    chunked = evaluate(model, docs, batch_size=3, chunk_len=4)
    assert whole["tokens"] == chunked["tokens"] == 26
    # fp32 forwards (ours whole or chunked, the package's) with an fp32 cross-entropy: twice the bound
    max_logit = max(logits64(model, torch.tensor([[0] + d[:-1]])).abs().max().item() for d in docs)
    tol = 2 * loss_rounding(model.config, 13, max_logit, want, 26)
    assert whole["loss"] == pytest.approx(want, abs=tol)
    assert chunked["loss"] == pytest.approx(want, abs=tol)


class ToyTokenizer:
    """Greedy longest match over a few pieces, like the World tokenizer does over bytes."""

    PIECES = {"a": 1, "b": 2, "c": 3, " ": 4, " b": 5, "a ": 6, " c": 7}

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            piece = max((p for p in self.PIECES if text.startswith(p, i)), key=len)
            out.append(self.PIECES[piece])
            i += len(piece)
        return out

    def decode(self, ids: list[int]) -> str:
        inv = {v: k for k, v in self.PIECES.items()}
        return "".join(inv[i] for i in ids if i)


def test_lambada_accuracy_needs_every_last_word_token_greedy():
    tok = ToyTokenizer()
    # Greedy next token after each token; everything else scores lower.
    argmax = {0: 3, 1: 5, 2: 3, 3: 4, 4: 1, 7: 5}
    table = torch.rand(8, 8, generator=torch.Generator().manual_seed(1))
    for prev, nxt in argmax.items():
        table[prev, nxt] = 10.0
    texts = [
        "a b",  # doc [6, 2] ("a " is a piece); scored as [0] + [1] + [5]: after "a" comes " b": right
        "b c",  # [2, 7]: after "b" the model says "c", not " c": wrong
        "c c b",  # [3, 7, 5]: after " c" comes " b": right
        "c ab",  # [3, 4, 1, 2]: " ab" is 3 tokens; " " and "a" right, then "b" wrong (argmax 5)
    ]
    docs = [tok.encode(t) for t in texts]
    assert docs[0] == [6, 2] and docs[3] == [3, 4, 1, 2]
    got = evaluate(Bigram(table), docs, batch_size=3, lambada=True, tokenizer=tok)
    assert got["acc"] == pytest.approx(2 / 4)
    rows = table.tolist()
    total = sum(_nll(rows, p, n) for d in docs for p, n in zip([0] + d[:-1], d))
    assert got["tokens"] == 11
    assert got["loss"] == pytest.approx(total / 11, abs=fp64_loss_tol(table))  # loss uses the documents as given


def test_lambada_without_a_last_word_is_a_user_error():
    with pytest.raises(UserError, match="document 0 has no last word"):
        evaluate(Bigram(torch.zeros(8, 8)), [ToyTokenizer().encode("abc")], lambada=True, tokenizer=ToyTokenizer())
