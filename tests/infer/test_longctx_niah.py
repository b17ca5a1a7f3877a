"""Needle in a haystack / passkey grids: trial layout, scoring = a whole forward, an ideal
retriever scores 1 everywhere through chunked state, JSON/PNG/text outputs, bad input."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from peft_rwkv7.errors import UserError
from peft_rwkv7.infer import niah
from tests.conftest import make_model
from tests.fp_oracle import forward_rounding, fp64_nll_rounding


class ByteTokenizer:
    """id = byte + 1 (0 stays end-of-text): vocabulary 257, enough for tiny test models."""

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 1 for i in ids if i > 0).decode(errors="replace")


class Retriever(nn.Module):
    """An ideal long-context model: predicts the token that followed the longest earlier match of
    the current suffix (up to 12 tokens). Its state is the whole history, carried chunk to chunk."""

    def __init__(self, vocab: int = 257):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls: list[int] = []

    def forward(self, idx, state=None, return_state=False):
        self.calls.append(idx.shape[1])
        hist = [] if state is None else list(state)
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.vocab)
        for t, tok in enumerate(idx[0].tolist()):
            hist.append(tok)
            for k in range(min(12, len(hist) - 1), 0, -1):
                suffix = hist[-k:]
                hits = [i for i in range(len(hist) - k) if hist[i : i + k] == suffix]
                if hits:
                    logits[0, t, hist[hits[-1] + k]] = 10.0
                    break
        return (logits, hist) if return_state else logits


TOK = ByteTokenizer()


def test_trial_layout_puts_the_needle_at_its_depth():
    hay = niah._Hay(niah.generated_haystack(50), TOK)
    spec = niah.NeedleSpec(answer="4242")
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = niah.build_trial(TOK, hay, spec, 2000, depth, random.Random(0))
        assert prompt[0] == 0 and len(prompt) + len(answer) <= 2000
        assert len(prompt) + len(answer) > 2000 - 60  # at most one sentence short
        text = TOK.decode(prompt)
        at = text.index(" The special magic number is 4242.")
        # a sentence boundary (<= 60 tokens off, as above) plus the needle and question (< 40) of ~2000: < 5%
        assert abs(at / len(text) - depth) < 0.1
        assert text.endswith(spec.question) and TOK.decode(answer) == " 4242"
    with pytest.raises(UserError, match="too short"):
        niah.build_trial(TOK, hay, spec, 20, 0.5, random.Random(0))


def test_answer_score_equals_a_whole_forward():
    model = make_model(seed=7, vocab_size=257)
    hay = niah._Hay(niah.generated_haystack(20), TOK)
    prompt, answer = niah.build_trial(TOK, hay, niah.NIAH, 300, 0.3, random.Random(1))
    ok, lp = niah.score_answer(model, prompt, answer, chunk_len=64)
    seq = torch.tensor([[*prompt, *answer]])
    with torch.no_grad():
        every = model(seq[:, :-1])[0]
        logits = every[len(prompt) - 1 :]
    want = torch.log_softmax(logits.double(), -1).gather(-1, seq[0, len(prompt) :, None]).sum().item()
    # chunks of 64 against one forward: two fp32 forwards, each answer token's log-prob moving by at most
    # twice the logits' difference, plus the fp64 log-softmax, summed over the answer's tokens
    M = every.abs().max().item()
    tol = len(answer) * (2 * 2 * forward_rounding(model.config, seq.shape[1]) * M + fp64_nll_rounding(257, M))
    assert lp == pytest.approx(want, abs=tol)
    assert ok == bool((logits.argmax(-1) == seq[0, len(prompt) :]).all())


def test_an_ideal_retriever_finds_every_needle_through_chunked_state():
    model = Retriever()
    res = niah.needle_grid(model, TOK, niah.PASSKEY, lengths=[300, 600], depths=[0.0, 0.5, 1.0],
                           haystack=niah.read_haystack(None, passkey=True), trials=2, chunk_len=50, progress=False)
    assert max(model.calls) <= 50
    assert [(c["ctx"], c["depth"]) for c in res["cells"]] == [(n, d) for n in (300, 600) for d in (0.0, 0.5, 1.0)]
    assert all(c["correct"] == 1.0 and c["trials"] == 2 for c in res["cells"]), res["cells"]
    assert res["accuracy"] == 1.0
    assert all(c["logprob"] < 0 for c in res["cells"])


def test_a_model_without_memory_fails():
    res = niah.needle_grid(make_model(seed=8, vocab_size=257), TOK, lengths=[200], depths=[0.5],
                           haystack=niah.generated_haystack(30), trials=2, progress=False)
    assert res["cells"][0]["correct"] == 0.0 and res["accuracy"] == 0.0


def test_outputs(tmp_path):
    res = niah.needle_grid(Retriever(), TOK, lengths=[200, 400], depths=[0.0, 1.0], trials=1, progress=False)
    runs = [{"label": "base", **res}, {"label": "tuned", **res}]
    niah.plot_grid(runs, str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    text = niah.format_grid(runs)
    assert "tuned: accuracy 1.000" in text and "400" in text
    assert set(res["cells"][0]) >= {"ctx", "depth", "correct", "logprob"}


def test_haystack_files_and_specs(tmp_path):
    (tmp_path / "h.txt").write_text("One thing. Two things! Three?\nFour.")
    assert niah.read_haystack(str(tmp_path / "h.txt")) == ["One thing.", "Two things!", "Three?", "Four."]
    (tmp_path / "h.jsonl").write_text('{"text": "A b. C d."}\n{"text": "E."}\n')
    assert niah.read_haystack(str(tmp_path / "h.jsonl")) == ["A b.", "C d.", "E."]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl"):
        niah.read_haystack(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="no such haystack"):
        niah.read_haystack(str(tmp_path / "absent.txt"))
    spec = niah.make_spec(False, needle="The code is {answer}.", answer="blue")
    assert spec.needle == "The code is {answer}." and spec.answer == "blue"
    with pytest.raises(UserError, match="does not contain the answer"):
        niah.make_spec(False, needle="Nothing here.", answer="blue")
    assert niah.parse_list("1024, 2048", "--lengths", int) == [1024, 2048]
    with pytest.raises(UserError, match="--depths"):
        niah.parse_list("0,half", "--depths", float)
    assert niah.default_lengths(16384) == [1024, 2048, 4096, 8192, 16384]
    assert niah.default_lengths(512) == [512] and niah.default_lengths(3000) == [1024, 2048, 3000]
    with pytest.raises(UserError, match="--depths"):
        niah.needle_grid(Retriever(), TOK, depths=[1.5], progress=False)


def test_passkey_records_render_what_passkey_scores():
    recs = niah.passkey_records(5, [400, 500], TOK, seed=3, per_doc=3)
    for r in recs:
        text = r["text"]
        assert text.startswith(niah.PASSKEY.intro) and text.count(niah.PASSKEY.intro) == 1
        rounds = text.split(niah.PASSKEY.question)
        assert len(rounds) == 4
        for before, after in zip(rounds[:-1], rounds[1:]):
            key = after[1:6]
            assert key.isdigit() and after[6] == "."
            assert f"The pass key is {key}. Remember it. {key} is the pass key." in before
        assert len(TOK.encode(text)) <= 500 * 3


def test_the_cli_checks_refuse_a_grid_longer_than_the_grid_builds():
    # cli_checks (torch-free, checked before any import) keeps its own copy of the limit niah enforces
    from peft_rwkv7 import cli_checks

    assert cli_checks.MAX_GRID_LENGTH == niah.MAX_LENGTH
