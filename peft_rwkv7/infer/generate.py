"""RNN-mode sampling: the prompt is read in one forward pass, then one token per step."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..errors import UserError


class NonFiniteLogits(UserError):
    """The model's logits hold NaN or inf: its weights (or an adapter's) are damaged, or its dtype overflowed.
    The CLI names the model (and adapter) in front of this message."""


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from logits [V]: greedy at temperature 0, else nucleus (top-p) sampling with `generator` (the
    logits go to its device: torch.multinomial takes no generator of another device, e.g. a CPU one for GPU
    logits). NonFiniteLogits where they hold NaN or inf (greedy would pick from them silently)."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits("the model produced non-finite logits (NaN or inf): its weights are damaged "
                              "(or overflow in this --dtype)")
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.to(generator.device).float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_p, dim=-1)
        cut = int((cumulative < top_p).sum()) + 1  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[:cut], sorted_p[:cut])
    return int(torch.multinomial(probs, 1, generator=generator))


def in_vocab(logits: torch.Tensor, tokenizer) -> torch.Tensor:
    """The logits of the ids `tokenizer` has (a view). A model's embedding is padded past its vocabulary (World:
    65536 rows for 65530 tokens; GPT-NeoX 20B: 50304 for 50277), and an id past it is no token: sampled, it has
    no text. A tokenizer without `vocab_size` leaves the logits whole."""
    n = getattr(tokenizer, "vocab_size", None)
    return logits[..., :n] if n is not None and n < logits.shape[-1] else logits


def check_sampling(max_tokens: int, temperature: float, top_p: float) -> None:
    """One-line UserErrors for sampling settings (call before loading a model)."""
    if max_tokens <= 0:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")


def generate(
    model,
    tokenizer,
    prompt: str,
    max_tokens: int = 200,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int = 0,
    stop_at_eot: bool = True,
) -> Iterator[str]:
    """Continue `prompt`, yielding the new text piece by piece as it becomes decodable (streaming).

    `model` is an RWKV7 or an adapted model: anything with forward(idx, state, return_state=True).
    The prompt is read in one forward pass (the head on its last position only), then one RNN step per token.
    Join the pieces for the whole text: `"".join(generate(model, tok, "Hello"))`."""
    check_sampling(max_tokens, temperature, top_p)
    return _stream(model, tokenizer, prompt, max_tokens, temperature, top_p, seed, stop_at_eot)


def _stream(model, tokenizer, prompt, max_tokens, temperature, top_p, seed, stop_at_eot) -> Iterator[str]:
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [0]  # an empty prompt starts from end-of-text, as a new document does
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        prompt_ids = torch.tensor([ids], device=device)
        if hasattr(model, "hidden"):  # the head on the last position only: a long prompt's [T, V] logits not held
            h, state = model.hidden(prompt_ids, None)
            logits = model.head_logits(h[:, -1:])
        else:
            logits, state = model(prompt_ids, None, return_state=True)
    logits = logits[0, -1]
    out: list[int] = []
    shown = ""
    for _ in range(max_tokens):
        token = sample_next(in_vocab(logits, tokenizer).cpu(), temperature, top_p, gen)
        if token == 0 and stop_at_eot:
            break
        out.append(token)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            yield text[len(shown):]
            shown = text
        with torch.no_grad():
            logits, state = model(torch.tensor([[token]], device=device), state, return_state=True)
        logits = logits[0, -1]
    text = tokenizer.decode(out)
    if len(text) > len(shown):
        yield text[len(shown):]
