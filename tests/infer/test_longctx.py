"""Loss per position bucket (`eval --ctx-curve`): exact fp64 losses, chunked = whole, flat memory
(no forward pass longer than a chunk), buckets, errors, JSON/PNG outputs."""

from __future__ import annotations

import json

import pytest
import torch

from peft_rwkv7.errors import UserError
from peft_rwkv7.infer.longctx import (
    ctx_curve,
    default_bucket,
    exact_logprobs,
    format_ctx_curve,
    plot_ctx_curve,
    write_json,
)
from tests.conftest import make_model
from tests.fp_oracle import forward_rounding, fp64_nll_rounding


def _docs(n: int, lengths: list[int], vocab: int = 97, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (L,), generator=g).tolist() for L in lengths[:n]]


def _reference(model, docs, max_ctx, bucket):
    """Per-bucket (sum NLL, count) from one whole forward per document, fp64 log-softmax."""
    sums, counts = {}, {}
    with torch.no_grad():
        for d in docs:
            seq = torch.tensor([[0, *d[:max_ctx]]])
            lp = torch.log_softmax(model(seq[:, :-1]).double(), dim=-1)
            nll = -lp.gather(-1, seq[:, 1:, None])[0, :, 0]
            for p, v in enumerate(nll.tolist()):
                sums[p // bucket] = sums.get(p // bucket, 0.0) + v
                counts[p // bucket] = counts.get(p // bucket, 0) + 1
    return sums, counts


def test_exact_logprobs_is_an_fp64_log_softmax_where_fp32_cross_entropy_is_not():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 5000, generator=g) * 2
    targets = torch.randint(0, 5000, (3, 40), generator=g)
    logits.scatter_(-1, targets[..., None], 30.0)  # confident and right: tiny losses
    targets[0, :3] = -1
    want = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    want[0, :3] = 0
    got = exact_logprobs(logits, targets)
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() <= fp64_nll_rounding(5000, logits.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignored", [False, True])
def test_exact_logprobs_on_the_cpu_takes_the_extensions_pass_and_stays_fp64(monkeypatch, dtype, ignored):
    """fp32 and bf16 logits on the CPU: the fp64 log-sum-exp of ops.cpu (no fp64 copy of the rows), every row kept
    (read in place) or some ignored (gathered); the same values as torch's fp64 log-softmax of the same logits."""
    import peft_rwkv7.infer.longctx as longctx

    calls = []
    real = longctx.cpu_ops.logsumexp_f64
    monkeypatch.setattr(longctx.cpu_ops, "logsumexp_f64", lambda rows: calls.append(rows.shape) or real(rows))
    monkeypatch.setattr(longctx, "_CPU_ROWS", 32)  # several calls
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 50, 3000, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 3000, (2, 50), generator=g)
    logits.scatter_(-1, targets[..., None], 25.0)  # confident and right: tiny losses
    if ignored:
        targets[1, 10:30] = -1
    want = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    want[targets < 0] = 0
    got = exact_logprobs(logits, targets)
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() <= fp64_nll_rounding(3000 + 4, logits.abs().max().item())
    assert sum(c[0] for c in calls) == int((targets >= 0).sum()) and all(c[0] <= 32 for c in calls)


@pytest.mark.parametrize("case", ["fp16 logits", "no CPU extension"])
def test_exact_logprobs_without_the_extensions_pass_is_torchs_fp64_log_softmax(monkeypatch, case):
    """The path a GPU, fp16 logits or a machine without the built extension take: torch's fp64 logsumexp on fp64
    copies of the kept rows, in blocks of _ROWS."""
    import peft_rwkv7.infer.longctx as longctx

    monkeypatch.setattr(longctx.cpu_ops, "logsumexp_f64", lambda rows: pytest.fail("the extension's pass ran"))
    if case == "no CPU extension":
        monkeypatch.setattr(longctx.cpu_ops, "is_available", lambda device: False)
    monkeypatch.setattr(longctx, "_ROWS", 16)  # several blocks
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 40, 3000, generator=g) * 3
    targets = torch.randint(0, 3000, (2, 40), generator=g)
    logits.scatter_(-1, targets[..., None], 25.0)  # confident and right: tiny losses
    targets[0, 5:12] = -1
    logits = logits.half() if case == "fp16 logits" else logits
    want = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    want[targets < 0] = 0
    got = exact_logprobs(logits, targets)
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() <= fp64_nll_rounding(3000, logits.abs().max().item())


def test_ctx_curve_equals_an_fp64_computation_on_a_confident_model():
    model = make_model(seed=1, vocab_size=97)
    with torch.no_grad():
        model.head.weight.mul_(40)  # peaked distributions: where fp32 reductions lose ~1e-4 nats
    docs = _docs(3, [60, 45, 20])
    with torch.no_grad():
        seq = torch.tensor([[0, *docs[0]]])
        probs = torch.softmax(model(seq[:, :-1]).double(), -1).max(-1).values
    assert probs.median() > 0.99, "the model is not confident enough for this test"
    res = ctx_curve(model, docs, max_ctx=64, bucket=16, chunk_len=1024, progress=False)
    sums, counts = _reference(model, docs, 64, 16)
    # One document per forward on both sides: the same fp32 logits, so only the fp64 log-softmax rounds.
    with torch.no_grad():
        max_logit = max(model(torch.tensor([[0, *d[:-1]]])).abs().max().item() for d in docs)
    for i, b in enumerate(res["buckets"]):
        assert b["tokens"] == counts.get(i, 0)
        assert b["loss"] == pytest.approx(sums[i] / counts[i], abs=fp64_nll_rounding(97, max_logit))
    assert res["tokens"] == 125 and res["docs"] == 3


def test_chunked_batched_curve_equals_whole_documents_and_reads_at_most_a_chunk():
    model = make_model(seed=2, vocab_size=97)
    docs = _docs(4, [300, 170, 90, 5], seed=2)
    seen = []
    forward = model.forward

    def spy(idx, state=None, return_state=False):
        seen.append(idx.shape[1])
        return forward(idx, state, return_state)

    model.forward = spy
    res = ctx_curve(model, docs, max_ctx=256, bucket=32, chunk_len=24, batch_size=3, progress=False)
    assert max(seen) <= 24 and len(seen) > 256 // 24  # the state carried chunk to chunk, never the whole text
    model.forward = forward
    sums, counts = _reference(model, docs, 256, 32)
    assert [b["start"] for b in res["buckets"]] == list(range(0, 256, 32))
    assert res["buckets"][-1]["end"] == 256
    # Chunks carrying state and batches of 3 against whole documents: two fp32 forwards of one network,
    # logits within twice the forward's bound, which moves a token's NLL by at most twice that (CE is
    # 2-Lipschitz in the max norm), plus the fp64 log-softmax.
    with torch.no_grad():
        max_logit = max(model(torch.tensor([[0, *d[:255]]])).abs().max().item() for d in docs)
    tol = 2 * 2 * forward_rounding(model.config, 256) * max_logit + fp64_nll_rounding(97, max_logit)
    for i, b in enumerate(res["buckets"]):
        assert b["tokens"] == counts[i]
        assert b["loss"] == pytest.approx(sums[i] / counts[i], abs=tol)
    assert res["tokens"] == 256 + 170 + 90 + 5


def test_buckets_no_document_reaches_are_null_and_defaults():
    model = make_model(seed=3, vocab_size=97)
    res = ctx_curve(model, _docs(1, [10]), max_ctx=64, bucket=16, progress=False)
    assert [b["tokens"] for b in res["buckets"]] == [10, 0, 0, 0]
    assert res["buckets"][1]["loss"] is None
    assert default_bucket(16384) == 1024 and default_bucket(8) == 1
    text = format_ctx_curve([{"label": "m", **res}])
    assert "0-16" in text.replace(" ", "") and "-" in text.splitlines()[2]


def test_bad_input_is_a_user_error():
    model = make_model(seed=3, vocab_size=97)
    with pytest.raises(UserError, match="no tokens"):
        ctx_curve(model, [[], []], progress=False)
    with pytest.raises(UserError, match="max-ctx"):
        ctx_curve(model, [[1, 2]], max_ctx=0, progress=False)


def test_model_mode_is_restored():
    model = make_model(seed=4, vocab_size=97).train()
    ctx_curve(model, _docs(1, [8]), max_ctx=8, progress=False)
    assert model.training


def test_json_and_png_outputs(tmp_path):
    model = make_model(seed=5, vocab_size=97)
    res = ctx_curve(model, _docs(2, [40, 30]), max_ctx=40, bucket=10, progress=False)
    write_json(tmp_path / "c.json", res)
    back = json.loads((tmp_path / "c.json").read_text())
    assert set(back["buckets"][0]) == {"start", "end", "loss", "tokens"}
    plot_ctx_curve([{"label": "a", **res}, {"label": "b", **res}], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left

class Peaked(torch.nn.Module):
    """A confident model: logit 10 on token (current + 1) mod V, 0 on the other 65535."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, state=None, return_state=False):
        logits = torch.zeros(*idx.shape, 65536).scatter_(-1, ((idx + 1) % 65536)[..., None], 10.0)
        return (logits, state) if return_state else logits


def test_the_curve_is_exact_where_fp32_reductions_are_not():
    docs = [[(5 + i) % 65536 if i % 7 else 3 for i in range(200)]]  # mostly the predicted token
    res = ctx_curve(Peaked(), docs, max_ctx=200, bucket=200, progress=False)
    seq = torch.tensor([[0, *docs[0]]])
    want = -torch.log_softmax(Peaked()(seq[:, :-1]).double(), -1).gather(-1, seq[:, 1:, None]).mean().item()
    assert res["loss"] == pytest.approx(want, abs=fp64_nll_rounding(65536, 10.0))


def test_eval_loss_is_an_fp64_log_softmax_on_a_confident_model():
    from peft_rwkv7.infer.evaluate import evaluate

    docs = [[(5 + i) % 65536 if i % 7 else 3 for i in range(200)]]
    seq = torch.tensor([[0, *docs[0]]])
    want = -torch.log_softmax(Peaked()(seq[:, :-1]).double(), -1).gather(-1, seq[:, 1:, None]).mean().item()
    assert abs(evaluate(Peaked(), docs)["loss"] - want) <= fp64_nll_rounding(65536, 10.0)
