"""Long-context evaluation core: exact token log-probabilities, chunked state-carrying forward
passes, and loss per position bucket (`rwkv-peft eval --ctx-curve`).

Everything here reads a sequence chunk by chunk, handing the RNN state (token shift + WKV state
per layer) from one chunk to the next, so memory depends on `chunk_len`, never on the context
length: a 32k-token document costs what a 4k one does. Log-probabilities are computed as an fp64
log-softmax of the model's logits over the vocabulary (the last dimension), so every reported loss
equals an fp64 computation on the same logits.

Shapes: B batch, T time (tokens in a chunk), V vocabulary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..ops import cpu as cpu_ops

EOT = 0
DEFAULT_MAX_CTX = 16384
DEFAULT_CHUNK = 512
_ROWS = 64  # rows of logits converted to fp64 at a time (bounds the extra memory to _ROWS x V doubles)
_CPU_ROWS = 256  # rows per call of the CPU extension's fp64 log-sum-exp (no fp64 copy; a copy only of gathered rows)


def exact_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position as an fp64 log-softmax over the last dimension.

    logits [..., V] (any float dtype), targets [...] (long; negative = ignored, gives 0).
    Returns float64 [...]. Only the rows with a target are converted (prompts and padding are not), in
    blocks, so memory stays near that of `logits`. fp32 and bf16 logits on the CPU take the extension's fp64
    log-sum-exp (ops.cpu.logsumexp_f64: no fp64 copy, one pass a row); others torch's, on an fp64 copy.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = targets.reshape(-1)
    out = torch.zeros(tgt.shape[0], dtype=torch.float64, device=logits.device)
    kept = (tgt >= 0).nonzero().squeeze(1)
    native = (flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.bfloat16)
              and not (flat.requires_grad and torch.is_grad_enabled()) and cpu_ops.is_available(flat.device))
    every = native and kept.shape[0] == flat.shape[0] and flat.is_contiguous()  # rows as they are, no gather
    step = _CPU_ROWS if native else _ROWS
    for s in range(0, kept.shape[0], step):
        at = kept[s : s + step]
        rows = flat[s : s + step] if every else flat.index_select(0, at)
        picked = rows.gather(1, tgt[at][:, None])[:, 0].double()
        lse = cpu_ops.logsumexp_f64(rows) if native else torch.logsumexp(rows.double(), dim=1)
        out[at] = picked - lse
    return out.view(targets.shape)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def chunked_forward(
    model: nn.Module, idx: torch.Tensor, state=None, chunk_len: int = DEFAULT_CHUNK
) -> Iterator[tuple[int, torch.Tensor, list]]:
    """Yield (start, logits [B, t, V], state after the chunk) over idx [B, T], t <= chunk_len.

    `state` is the model's per-layer state (None: the model's initial state); the model must
    accept `model(idx, state, return_state=True)`. No tensor kept here grows with T; a caller that
    drops its `logits` before asking for the next chunk keeps one chunk of logits alive, not two.
    """
    if chunk_len <= 0:
        raise UserError(f"chunk length must be positive, got {chunk_len}")
    for s in range(0, idx.shape[1], chunk_len):
        logits, state = model(idx[:, s : s + chunk_len], state, return_state=True)
        yield s, logits, state
        del logits  # before the next chunk's logits exist: one chunk of logits alive at a time


@torch.no_grad()
def score_continuation(model: nn.Module, seq: Sequence[int], state=None, skip: int = 0,
                       chunk_len: int = DEFAULT_CHUNK) -> tuple[float, bool]:
    """(summed fp64 log p of seq[1 + skip:], whether greedy decoding reproduces every one of them),
    reading seq[:-1] from `state` (None: the model's initial state) chunk by chunk, batch 1.
    Chunks that predict only skipped tokens are read for the state and not scored."""
    device = model_device(model)
    inp = torch.tensor([list(seq[:-1])], dtype=torch.long, device=device)
    tgt = torch.tensor([list(seq[1:])], dtype=torch.long, device=device)
    logprob, greedy = 0.0, True
    for s, logits, _ in chunked_forward(model, inp, state, chunk_len):
        if s + logits.shape[1] > skip:
            lo, t = logits[:, max(skip - s, 0):], tgt[:, max(skip, s) : s + logits.shape[1]]
            logprob += float(exact_logprobs(lo, t).sum())
            greedy &= bool((lo.argmax(dim=-1) == t).all())
            del lo
        del logits  # one chunk of logits alive at a time
    return logprob, greedy


def expand_state(state: list, batch: int) -> list:
    """A batch-1 state repeated to `batch` rows (fields [1, ...] -> [batch, ...]; None stays None)."""
    return [type(st)(*(None if t is None else t.expand(batch, *t.shape[1:]) for t in st)) for st in state]


def default_bucket(max_ctx: int) -> int:
    """Bucket width: max_ctx / 16 (1k buckets for the default 16k), at least 1 token."""
    return max(1, max_ctx // 16)


@torch.no_grad()
def ctx_curve(
    model: nn.Module,
    docs: Sequence[Sequence[int]],
    max_ctx: int = DEFAULT_MAX_CTX,
    bucket: int | None = None,
    chunk_len: int = DEFAULT_CHUNK,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "ctx-curve",
) -> dict:
    """Mean loss per position bucket over long documents, reading each one chunk by chunk.

    docs: token ids per document, without the leading end-of-text; each is scored as
    [0] + doc[:max_ctx] (token 0 first, then every text token predicted). The token at position p
    (p = 0 is the first text token) falls in bucket p // bucket, covering [start, end).
    Returns {"buckets": [{"start", "end", "loss", "tokens"}, ...], "loss", "tokens", "docs",
    "max_ctx", "bucket"}; a bucket no document reaches has loss None and tokens 0. Losses are in
    nats per token (fp64 log-softmax). The model runs in eval mode and is restored afterwards.
    """
    if max_ctx <= 0:
        raise UserError(f"--max-ctx must be positive, got {max_ctx}")
    bucket = default_bucket(max_ctx) if bucket is None else bucket
    if bucket <= 0:
        raise UserError(f"bucket width must be positive, got {bucket}")
    seqs = [[EOT, *list(d)[:max_ctx]] for d in docs]
    seqs = sorted((s for s in seqs if len(s) > 1), key=len, reverse=True)
    if not seqs:
        raise UserError("ctx-curve: no tokens to score (every document is empty)")
    n_buckets = math.ceil(max_ctx / bucket)
    sums = torch.zeros(n_buckets, dtype=torch.float64)
    counts = torch.zeros(n_buckets, dtype=torch.float64)
    device = model_device(model)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(s) - 1 for s in seqs), desc=desc, unit="tok", disable=not progress, leave=False)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(seqs), batch_size):
            batch = seqs[b : b + batch_size]
            T = len(batch[0]) - 1
            inp = torch.full((len(batch), T), EOT, dtype=torch.long)
            tgt = torch.full((len(batch), T), -1, dtype=torch.long)
            for row, s in enumerate(batch):
                inp[row, : len(s) - 1] = torch.tensor(s[:-1])
                tgt[row, : len(s) - 1] = torch.tensor(s[1:])
            inp, tgt = inp.to(device), tgt.to(device)
            for s, logits, _ in chunked_forward(model, inp, None, chunk_len):
                t = tgt[:, s : s + logits.shape[1]]
                nll = -exact_logprobs(logits, t).sum(dim=0).cpu()  # [t] summed over the batch
                n = (t >= 0).sum(dim=0).double().cpu()
                where = torch.arange(s, s + t.shape[1]) // bucket
                sums.index_add_(0, where, nll)
                counts.index_add_(0, where, n)
                bar.update(int(n.sum()))
                del logits  # (see chunked_forward)
    finally:
        bar.close()
        model.train(was_training)
    rows = []
    for i in range(n_buckets):
        c = int(counts[i])
        rows.append({"start": i * bucket, "end": min((i + 1) * bucket, max_ctx),
                     "loss": float(sums[i] / c) if c else None, "tokens": c})
    total = int(counts.sum())
    return {"buckets": rows, "loss": float(sums.sum() / total), "tokens": total, "docs": len(seqs),
            "max_ctx": max_ctx, "bucket": bucket}


def write_json(path: str, obj: dict) -> None:
    """`obj` as indented JSON, written atomically (a reader never sees half a file)."""
    from ..model.io import atomic_write

    text = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(text))


def save_figure(fig, path: str) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import io

    from ..model.io import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ctx_curve(runs: Sequence[dict], path: str, title: str = "loss by position") -> None:
    """One line per run (dicts from ctx_curve with a "label"): mean loss of each bucket at its middle."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for run in runs:
        pts = [((b["start"] + b["end"]) / 2, b["loss"]) for b in run["buckets"] if b["loss"] is not None]
        ax.plot([p for p, _ in pts], [v for _, v in pts], "o-", ms=3, label=run.get("label", "model"))
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def format_ctx_curve(runs: Sequence[dict]) -> str:
    """A text table: one row per bucket, one loss column per run."""
    head = f"{'positions':>15}" + "".join(f"  {r.get('label', 'model')[-18:]:>18}" for r in runs) + f"  {'tokens':>8}"
    lines = [head]
    for i, b in enumerate(runs[0]["buckets"]):
        cells = ""
        for r in runs:
            v = r["buckets"][i]["loss"]
            cells += f"  {'-' if v is None else f'{v:.4f}':>18}"
        lines.append(f"{b['start']:>7}-{b['end']:<7}{cells}  {b['tokens']:>8}")
    lines.append(f"{'all':>15}" + "".join(f"  {r['loss']:>18.4f}" for r in runs) + f"  {runs[0]['tokens']:>8}")
    return "\n".join(lines)
