"""RNN-mode generation against a plain re-run of the whole sequence for every new token."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.data import load_tokenizer
from peft_rwkv7.errors import UserError
from peft_rwkv7.infer.generate import generate, sample_next
from tests.conftest import make_model


def test_greedy_generation_matches_full_recompute():
    tok = load_tokenizer("world")
    model = make_model(seed=41, n_embd=64, vocab_size=65536).eval()
    prompt = "Ship's log, day 7."
    streamed = list(generate(model, tok, prompt, max_tokens=12, temperature=0.0, stop_at_eot=False))
    text = "".join(streamed)
    ids = tok.encode(prompt)
    expect = []
    with torch.no_grad():
        for _ in range(12):  # independent oracle: no state, the whole sequence every time
            nxt = int(model(torch.tensor([ids + expect]))[0, -1].argmax())
            expect.append(nxt)
    assert text == tok.decode(expect)
    assert len(streamed) > 1  # streamed piece by piece


def test_the_prompt_runs_the_head_on_its_last_position_only():
    """A long prompt's [T, V] logits (4 GiB in bf16 at 32k tokens, V 65536) are not made: the head reads one row."""
    tok = load_tokenizer("world")
    model = make_model(seed=41, n_embd=64, vocab_size=65536).eval()
    rows = []
    model.head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1]))
    prompt = "Ship's log, day 7. " * 8
    text = "".join(generate(model, tok, prompt, max_tokens=3, temperature=0.0, stop_at_eot=False))
    assert len(tok.encode(prompt)) > 40 and rows and all(r.numel() == 1 for r in rows), rows
    ids, expect = tok.encode(prompt), []
    with torch.no_grad():
        for _ in range(3):
            expect.append(int(model(torch.tensor([ids + expect]))[0, -1].argmax()))
    assert text == tok.decode(expect)


@pytest.mark.parametrize("kwargs,match", [({"temperature": float("nan")}, "--temperature must be a number >= 0"),
                                          ({"temperature": -1.0}, "--temperature"), ({"top_p": 0.0}, "--top-p"),
                                          ({"max_tokens": 0}, "--max-tokens")])
def test_bad_sampling_settings_fail_before_any_work(kwargs, match):
    with pytest.raises(UserError, match=match):
        generate(None, None, "x", **kwargs)  # checked at the call, before the model is touched


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.7, g) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn
    assert {sample_next(logits, 1.0, 0.01, g) for _ in range(50)} == {0}
    assert sample_next(logits, 0.0, 0.9, g) == 0
