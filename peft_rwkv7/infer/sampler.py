"""Batched RNN sampling of G completions per prompt (GRPO rollouts).

Each prompt is read once by the sequence forward, `prefill_chunk` tokens at a time with the state
carried; its final state (token shifts + WKV state per layer) and last logits are copied G times
(materialised per row, so the rows diverge), and all P*G rows then advance together, one token per
`model.step` (the fused step kernels). A row that stops leaves the batch: its state rows are dropped
with index_select, so the batch only shrinks and no work is spent on finished rows. Row r = p*G + g
is sample g of prompt p.

What a completion holds. Every row ends one of two ways, exactly one of the flags being set:
  finished   it sampled a token of `stop_token_ids` (that token is the completion's last) or its text
             came to contain one of `stop_strings` (the completion ends with the token that completed
             it, so the tokens keep the stop string, possibly with text after it inside that token);
  truncated  it reached `max_new_tokens` without a stop (a stop on the last allowed token is finished).
The tokens keep the stop on purpose: the policy gradient must credit the choice to stop (TRL likewise
scores the EOS token). `texts` (when `decode` is given) are the completions' text cut *before* the stop
(a stop token contributes no text, a stop string and anything after it are left out; vLLM's default),
which is what reward functions read.

Log-probs per sampled token, all fp32 from the step's logits z (the training forward recomputes the
plain one over prompt + completion; the gap between the two is a metric, never part of the update):
  logp_sampled  log q(token), q = the distribution actually sampled from: softmax(z / temperature)
                with top-p applied (the smallest set of most likely tokens whose mass reaches top_p,
                as generate.sample_next keeps) and renormalised over that set; with `vocab_size`, only
                the tokenizer's ids (the first vocab_size) are in q, as generate.in_vocab keeps: a
                model's padding rows past its vocabulary are no tokens;
  logp_scaled   log softmax(z / temperature)[token], no top-p (what TRL's trainer scores);
  logp_plain    log softmax(z)[token].
At temperature 0 sampling is greedy (argmax) and q is a point mass: logp_sampled = logp_scaled = 0.
`entropy` is the entropy of softmax(z) at each drawn position (the policy's, for GRPO's logs).

Randomness: every draw comes from `generator` (torch.multinomial, one call per step over the active
rows), or from one generator per prompt (inverse-CDF, one uniform per row from its prompt's), so saving
the generator states and restoring them reproduces the next rollouts. Sampling runs on
the generator's device: a CPU generator with a CUDA model copies each step's logits to the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..model.rwkv7 import LayerState
from .longctx import DEFAULT_CHUNK, model_device


@dataclass
class Rollouts:
    """P prompts x G samples; row r = p * G + g. Tensors on the CPU, padded to L = the longest completion."""

    completion_ids: torch.Tensor  # [R, L] long, 0 past each row's length
    lengths: torch.Tensor  # [R] long, tokens per completion (the stop token / stop string included)
    logp_sampled: torch.Tensor  # [R, L] fp32 log q(token) under the tempered, top-p-filtered distribution
    logp_scaled: torch.Tensor  # [R, L] fp32 log softmax(z / temperature)(token)
    logp_plain: torch.Tensor  # [R, L] fp32 log softmax(z)(token); all three 0 past the length
    entropy: torch.Tensor  # [R, L] fp32 entropy of softmax(z) where each token was drawn (nats; 0 past the length)
    finished: torch.Tensor  # [R] bool: stopped on a stop token or stop string
    truncated: torch.Tensor  # [R] bool: reached max_new_tokens without a stop (= ~finished)
    texts: list[str] | None  # [R] completion text before the stop, when `decode` was given
    num_prompts: int
    group_size: int
    prefill_seconds: float  # reading the prompts (sequence forward) and copying the states
    sample_seconds: float  # the step loop

    @property
    def completions(self) -> list[list[int]]:
        """Token ids per row, unpadded."""
        return [ids[:n] for ids, n in zip(self.completion_ids.tolist(), self.lengths.tolist())]

    @property
    def mask(self) -> torch.Tensor:
        """[R, L] bool: True at a completion's tokens, False at padding."""
        return torch.arange(self.completion_ids.shape[1])[None] < self.lengths[:, None]

    @property
    def tokens(self) -> int:
        """Tokens generated over all rows."""
        return int(self.lengths.sum())

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.sample_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | Sequence[torch.Generator],
    vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row of logits [B, V] (any float dtype), sampled on `generator`'s device.

    Returns (tokens [B] long, logp_sampled, logp_scaled, logp_plain: [B] fp32, see the module docstring).
    temperature 0: argmax, no draw from the generator. top_p 1: no filtering. `generator` may be one per row:
    each row then draws one uniform number from its own (inverse-CDF sampling), so a row's token does not
    depend on which other rows share the batch. `vocab`: only ids below it are drawn (q renormalised over them;
    logp_scaled and logp_plain stay over every id, as the training forward scores them)."""
    per_row = not isinstance(generator, torch.Generator)
    z = logits.to(device=(generator[0] if per_row else generator).device, dtype=torch.float32)
    plain = torch.log_softmax(z, dim=-1)
    limit = vocab is not None and vocab < z.shape[-1]
    if temperature <= 0:
        tokens = (z[:, :vocab] if limit else z).argmax(dim=-1)
        zero = torch.zeros(tokens.shape, device=z.device)
        return tokens, zero, zero, plain.gather(-1, tokens[:, None])[:, 0]
    scaled = plain if temperature == 1 else torch.log_softmax(z / temperature, dim=-1)
    logq = torch.log_softmax(scaled[:, :vocab], dim=-1) if limit else scaled
    if limit:  # the padding rows at -inf: q over the tokenizer's ids, which top-p then cuts
        logq = torch.cat([logq, logq.new_full((logq.shape[0], z.shape[-1] - vocab), -math.inf)], dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(logq.exp(), dim=-1, descending=True)
        # keep token j (in sorted order) iff the mass of the tokens before it is < top_p: the smallest
        # prefix reaching top_p (the exclusive cumsum, so a token's own mass never counts against it)
        before = torch.cat([sorted_p.new_zeros(sorted_p.shape[0], 1), sorted_p.cumsum(dim=-1)[:, :-1]], dim=-1)
        drop = torch.zeros_like(before, dtype=torch.bool).scatter_(-1, order, before >= top_p)
        logq = torch.log_softmax(logq.masked_fill(drop, -math.inf), dim=-1)
    if per_row:
        cdf = logq.exp().cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=g, device=z.device) for g in generator]) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_max((vocab if limit else z.shape[-1]) - 1)
    else:
        tokens = torch.multinomial(logq.exp(), 1, generator=generator)[:, 0]
    pick = tokens[:, None]
    return tokens, logq.gather(-1, pick)[:, 0], scaled.gather(-1, pick)[:, 0], plain.gather(-1, pick)[:, 0]


def _check(prompts, G, max_new_tokens, temperature, top_p, stop_strings, decode, prefill_chunk, vocab_size) -> None:
    if not prompts:
        raise UserError("sample_groups: no prompts given")
    if prefill_chunk < 1:
        raise UserError(f"sample_groups: prefill_chunk must be >= 1, got {prefill_chunk}")
    if G < 1:
        raise UserError(f"train.grpo.num_generations must be >= 1, got {G}")
    if max_new_tokens < 1:
        raise UserError(f"train.grpo.max_new_tokens must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"train.grpo.temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UserError(f"train.grpo.top_p must be in (0, 1], got {top_p}")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise UserError(f"train.grpo.stop must be non-empty strings, got {list(stop_strings)!r}")
    if stop_strings and decode is None:
        raise UserError("sample_groups: stop strings need the tokenizer's decode function (decode=...)")
    for p, ids in enumerate(prompts):
        bad = [i for i in ids if not 0 <= int(i) < vocab_size]
        if bad:
            raise UserError(f"prompt {p}: token id {bad[0]} outside the model's vocabulary (0..{vocab_size - 1})")


def sample_groups(
    model,
    prompts: Sequence[Sequence[int]],
    G: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | Sequence[torch.Generator],
    stop_token_ids: Sequence[int] = (0,),
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    prefill_chunk: int = DEFAULT_CHUNK,
    vocab_size: int | None = None,
) -> Rollouts:
    """G completions of each prompt (token ids; an empty prompt starts from end-of-text, 0, as `generate`
    does) sampled as one batch. `model` is an RWKV7 or an AdaptedRWKV7 (its own initial state: a trained
    time_state with state tuning), any dtype and device. It runs in eval mode (dropout off); every
    module's train/eval flag is restored afterwards. See the module docstring for what a row holds.
    `generator`: one for the whole batch, or one per prompt (its G rows draw from it alone, so a prompt's
    completions do not depend on the other prompts of the batch: GRPO's rollouts are then the same however
    the step's prompts are split into micro-batches and processes). `vocab_size`: the tokenizer's; only its ids
    are drawn, never the model's padding rows past it (which have no text to decode)."""
    if not isinstance(generator, torch.Generator) and len(generator) != len(prompts):
        raise ValueError(f"sample_groups: {len(generator)} generators for {len(prompts)} prompts")
    _check(prompts, G, max_new_tokens, temperature, top_p, stop_strings, decode, prefill_chunk, model.config.vocab_size)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        tokens, lps, finished, prefill_s, sample_s = _rollout(
            model, [list(p) or [0] for p in prompts], G, max_new_tokens, temperature, top_p, generator,
            set(stop_token_ids), tuple(stop_strings), decode, prefill_chunk, vocab_size,
        )  # fmt: skip
    finally:
        for m, training in modes:
            m.training = training
    # The tensors are made here, outside inference mode, so the trainer may feed them to autograd.
    R, L = len(tokens), max(len(t) for t in tokens)
    ids = torch.zeros(R, L, dtype=torch.long)
    logps = torch.zeros(4, R, L)
    for r, (t, lp) in enumerate(zip(tokens, lps)):
        ids[r, : len(t)] = torch.tensor(t, dtype=torch.long)
        logps[:, r, : len(t)] = torch.tensor(lp, dtype=torch.float32).T
    fin = torch.tensor(finished, dtype=torch.bool)
    return Rollouts(
        completion_ids=ids,
        lengths=torch.tensor([len(t) for t in tokens]),
        logp_sampled=logps[0],
        logp_scaled=logps[1],
        logp_plain=logps[2],
        entropy=logps[3],
        finished=fin,
        truncated=~fin,
        texts=None if decode is None else [_text(t, stop_token_ids, stop_strings, decode) for t in tokens],
        num_prompts=len(prompts),
        group_size=G,
        prefill_seconds=prefill_s,
        sample_seconds=sample_s,
    )


def _text(tokens: list[int], stop_token_ids, stop_strings, decode) -> str:
    """The completion's text before its stop: without a final stop token, cut at the first stop string."""
    if tokens and tokens[-1] in stop_token_ids:
        tokens = tokens[:-1]
    text = decode(tokens)
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the phase timings are the phases' own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _repeat_rows(states: list[list[LayerState]], G: int) -> list[LayerState]:
    """One batch of P*G rows from P batch-1 states, each repeated G times; torch.cat writes every row to
    memory of its own, so the rows evolve independently."""
    return [
        LayerState(*(torch.cat([s[i][f].expand(G, *s[i][f].shape[1:]) for s in states]) for f in range(3)))
        for i in range(len(states[0]))
    ]


@torch.inference_mode()
def _rollout(
    model, prompts, G, max_new_tokens, temperature, top_p, generator, stop_ids, stop_strings, decode, prefill_chunk,
    vocab_size,
):
    """Per row (as Python lists): the tokens, their log-probs [sampled, scaled, plain] per token, whether
    it finished; then the prefill and sampling seconds."""
    device = model_device(model)
    t0 = time.perf_counter()
    last, states = [], []
    for ids in prompts:
        idx, state = torch.tensor([ids], device=device), None  # None: the model's own initial state
        for s in range(0, idx.shape[1], prefill_chunk):
            logits, state = model(idx[:, s : s + prefill_chunk], state, return_state=True)
        last.append(logits[:, -1].clone())  # not a view: the chunk's [1, T, V] logits are freed
        states.append(state)
    logits = torch.cat([lg.expand(G, -1) for lg in last])
    state = _repeat_rows(states, G)
    del last, states
    _sync(device)
    t1 = time.perf_counter()

    R = len(prompts) * G
    tokens: list[list[int]] = [[] for _ in range(R)]
    lps: list[list[list[float]]] = [[] for _ in range(R)]
    finished = [False] * R
    active = list(range(R))  # the row each batch row belongs to
    # a stop string ending in the newest token lies within the text of the last `window` tokens (each >= 1 byte)
    window = max((len(s.encode("utf-8")) for s in stop_strings), default=0) + 2
    for t in range(max_new_tokens):
        gen = generator if isinstance(generator, torch.Generator) else [generator[r // G] for r in active]
        tok, *lp = sample_token(logits, temperature, top_p, gen, vocab_size)
        z = logits.float()
        entropy = -(torch.softmax(z, dim=-1) * torch.log_softmax(z, dim=-1)).sum(dim=-1).to(lp[0].device)
        tok_list, lp_rows = tok.tolist(), torch.stack([*lp, entropy], dim=1).tolist()
        keep = []
        for i, r in enumerate(active):
            tokens[r].append(tok_list[i])
            lps[r].append(lp_rows[i])
            if tok_list[i] in stop_ids or (stop_strings and _has_stop(decode(tokens[r][-window:]), stop_strings)):
                finished[r] = True
            else:
                keep.append(i)
        if not keep or t == max_new_tokens - 1:
            break
        tok = tok.to(device)
        if len(keep) < len(active):  # drop the finished rows from the batch, their state with them
            sel = torch.tensor(keep, device=device)
            state = [type(layer)(*(x.index_select(0, sel) for x in layer)) for layer in state]
            tok = tok.index_select(0, sel)
            active = [active[i] for i in keep]
        logits, state = model.step(tok, state)
    _sync(device)
    return tokens, lps, finished, t1 - t0, time.perf_counter() - t1


def _has_stop(text: str, stop_strings: tuple[str, ...]) -> bool:
    return any(s in text for s in stop_strings)
