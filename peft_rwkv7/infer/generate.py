"""RNN-mode sampling: the prompt is read in one forward pass, then one token per step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UserError


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from logits [V]: greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_p, dim=-1)
        cut = int((cumulative < top_p).sum()) + 1  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[:cut], sorted_p[:cut])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str,
    max_tokens: int = 200,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
    stop_at_eot: bool = True,
) -> str:
    """Continue `prompt`; `on_text` receives the new text as it becomes decodable (streaming).

    `model` is an RWKV7 or an adapted model: anything with forward(idx, state, return_state=True)."""
    if max_tokens <= 0:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"--temperature must be >= 0 and --top-p in (0, 1], got {temperature}, {top_p}")
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [0]  # an empty prompt starts from end-of-text, as a new document does
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    logits, state = model(torch.tensor([ids], device=device), None, return_state=True)
    logits = logits[0, -1]
    out: list[int] = []
    shown = ""
    for _ in range(max_tokens):
        token = sample_next(logits.cpu(), temperature, top_p, gen)
        if token == 0 and stop_at_eot:
            break
        out.append(token)
        text = tokenizer.decode(out)
        if on_text is not None and not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            on_text(text[len(shown):])
            shown = text
        logits, state = model(torch.tensor([[token]], device=device), state, return_state=True)
        logits = logits[0, -1]
    text = tokenizer.decode(out)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
