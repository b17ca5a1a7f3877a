"""A model's embedding is padded past its tokenizer's vocabulary (World: 65536 rows for 65530 tokens, GPT-NeoX 20B:
50304 for 50277). Those rows are no tokens: sampling never draws them, and decoding one is a clear error, not the
text of another token.

The models here make a padding row the likeliest by construction (the final norm's weight zeroed, so every position's
hidden vector is its bias b, and the padding rows of the head set to 50 b / |b|^2: logit 50 there, whatever the
input), so a sampler that drew from every row would draw one at once."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.data import load_tokenizer
from peft_rwkv7.infer.chat import ChatSession
from peft_rwkv7.infer.generate import generate, in_vocab
from peft_rwkv7.infer.sampler import sample_groups, sample_token
from tests.conftest import make_model, shared_file

V, VOCAB = 97, 90  # the model's rows, the tokenizer's ids


class Chars:
    """Ids 0..VOCAB-1 <-> chr(32 + i) (other characters, such as the chat format's newlines, encode as 0); an id
    past the vocabulary fails to decode, as the real tokenizers now do."""

    vocab_size = VOCAB

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 if 32 <= ord(c) < 32 + VOCAB else 0 for c in text]

    def decode(self, ids: list[int]) -> str:
        assert all(0 <= i < VOCAB for i in ids), ids
        return "".join(chr(32 + i) for i in ids)


def padded_model(best_in_vocab: int | None = None, V: int = V, VOCAB: int = VOCAB):
    """make_model whose padding rows VOCAB..V-1 get logit 50 at every position (best_in_vocab: 10, the rest 0)."""
    model = make_model(seed=3, vocab_size=V, n_embd=32, head_size=16)
    with torch.no_grad():
        model.ln_out.weight.zero_()
        b = model.ln_out.bias
        b.copy_(torch.linspace(-1, 1, b.numel()))
        unit = b / b.dot(b)
        model.head.weight.zero_()
        model.head.weight[VOCAB:] = 50 * unit
        if best_in_vocab is not None:
            model.head.weight[best_in_vocab] = 10 * unit
    return model


def test_the_construction_makes_a_padding_row_the_likeliest():
    model = padded_model(best_in_vocab=7)
    logits = model(torch.tensor([[1, 2, 3]]))
    assert torch.allclose(logits[0, :, VOCAB:], torch.full((3, V - VOCAB), 50.0), atol=1e-3)
    assert torch.allclose(logits[0, :, 7], torch.full((3,), 10.0), atol=1e-4)
    assert int(logits[0, -1].argmax()) >= VOCAB


def test_in_vocab_keeps_the_tokenizers_ids():
    z = torch.arange(2 * V, dtype=torch.float32).view(2, V)
    assert torch.equal(in_vocab(z, Chars()), z[:, :VOCAB])
    assert in_vocab(z, object()) is z  # a tokenizer without vocab_size: every row
    big = type("Big", (), {"vocab_size": V + 5})()
    assert in_vocab(z, big) is z


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (1.0, 0.5)])
def test_generate_and_chat_never_draw_a_padding_row(temperature, top_p):
    model = padded_model(best_in_vocab=7)
    text = "".join(generate(model, Chars(), "Hi", max_tokens=12, temperature=temperature, top_p=top_p,
                            stop_at_eot=False))
    assert len(text) == 12  # one character per token: twelve tokens, each decoded (an id >= VOCAB fails)
    if temperature == 0 or top_p == 0.5:  # greedy, or a nucleus of id 7 alone (its mass over 90 ids: ~0.98)
        assert text == chr(32 + 7) * 12
    chat = ChatSession(model, Chars(), max_tokens=6, temperature=temperature, top_p=top_p)
    reply = "".join(chat.ask("Hi"))
    assert chat.last.generated >= 1 and all(32 <= ord(c) < 32 + VOCAB for c in reply)


def test_the_world_tokenizer_and_a_padded_world_model():
    world = load_tokenizer("world")
    model = padded_model(best_in_vocab=5, V=65536, VOCAB=world.vocab_size)
    text = "".join(generate(model, world, "Hi", max_tokens=3, temperature=0))  # was: ValueError, token id 65530
    assert text == world.decode([5, 5, 5])


def _logits(rows: int = 4) -> torch.Tensor:
    z = torch.randn(rows, V, generator=torch.Generator().manual_seed(1))
    z[:, VOCAB:] += 30  # the padding rows hold nearly all the mass
    return z


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
@pytest.mark.parametrize("per_row", [False, True])
def test_sample_token_draws_from_the_tokenizers_ids_renormalised(temperature, top_p, per_row):
    z = _logits()
    gens = [torch.Generator().manual_seed(s) for s in range(4)] if per_row else torch.Generator().manual_seed(0)
    tokens, logq, scaled, plain = sample_token(z, temperature, top_p, gens, vocab=VOCAB)
    assert bool((tokens < VOCAB).all())
    z64 = z.double()
    pick = tokens[:, None]
    # plain and scaled stay over every row: what the training forward scores
    assert torch.allclose(plain.double(), torch.log_softmax(z64, -1).gather(-1, pick)[:, 0], atol=1e-5)
    if temperature == 0:
        assert torch.equal(tokens, z[:, :VOCAB].argmax(-1)) and bool((logq == 0).all())
        return
    assert torch.allclose(scaled.double(), torch.log_softmax(z64 / temperature, -1).gather(-1, pick)[:, 0], atol=1e-5)
    # q: softmax over the first VOCAB ids at this temperature, then the nucleus of that, renormalised (fp64)
    q = torch.softmax(z64[:, :VOCAB] / temperature, -1)
    if top_p < 1:
        for r in range(q.shape[0]):
            p, order = torch.sort(q[r], descending=True)
            before = torch.cumsum(p, 0) - p
            keep = torch.zeros(VOCAB, dtype=torch.bool)
            keep[order[before < top_p]] = True
            q[r] = torch.where(keep, q[r], 0.0) / q[r][keep].sum()
    assert bool((q.gather(-1, pick) > 0).all())
    assert torch.allclose(logq.double(), q.gather(-1, pick).log()[:, 0], atol=1e-5)


def test_sample_token_without_a_vocabulary_takes_every_row():
    z = _logits()
    tokens, logq, scaled, _ = sample_token(z, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert bool((tokens >= VOCAB).all())  # the padding rows' mass is ~1 - 1e-11
    assert torch.allclose(logq, scaled)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grpo_rollouts_never_draw_a_padding_row(temperature):
    model = padded_model(best_in_vocab=7)
    ro = sample_groups(model, [[1, 2, 3], [4]], 3, 10, temperature, 1.0, torch.Generator().manual_seed(0),
                       stop_token_ids=(), decode=Chars().decode, vocab_size=VOCAB)
    assert ro.completion_ids.shape == (6, 10) and bool((ro.completion_ids < VOCAB).all())
    assert all(len(t) == 10 for t in ro.texts)


def test_decoding_an_id_past_the_vocabulary_is_an_error():
    world = load_tokenizer("world")
    for bad in ([65530], [-1], [5, -100]):  # -1 gave the text of token 65529 (128 spaces)
        with pytest.raises(ValueError, match=rf"^token id {bad[-1]} outside the World vocabulary \(0\.\.65529\)$"):
            world.decode(bad)
    neox = load_tokenizer(str(shared_file("20B_tokenizer.json")))
    for bad in ([50277], [-1]):  # 50277 decoded to "", -1 raised OverflowError
        with pytest.raises(ValueError, match=rf"^token id {bad[0]} outside the tokenizer's vocabulary \(0\.\.50276\)$"):
            neox.decode(bad)
    assert neox.decode([0, 50276, 0]) == neox._tok.decode([50276], skip_special_tokens=False)


def test_grpo_scores_rollouts_of_the_tokenizers_ids(tmp_path):
    from contextlib import nullcontext

    from peft_rwkv7.data.prompts import PromptData
    from peft_rwkv7.train.grpo import Scorer
    from peft_rwkv7.train.grpo_config import GrpoConfig

    cfg = GrpoConfig(max_new_tokens=6, stop=[], rewards=[{"fn": "length", "max_tokens": 8, "buffer": 4}])
    data = PromptData(["ab", "c"], [[65, 66], [67]], [{"prompt": "ab"}, {"prompt": "c"}], seed=0, source="p")
    scorer = Scorer(cfg, Chars(), ["prompt"])
    _, ro, _, total, _ = scorer._sample(padded_model(), data, [0, 1], 2, 1.0, torch.Generator().manual_seed(0),
                                        nullcontext)
    assert bool((ro.completion_ids < VOCAB).all()) and len(total) == 4 and all(len(t) == 6 for t in ro.texts)


@pytest.mark.parametrize("kwargs", [{}, {"do_sample": True, "temperature": 1.0}])
def test_lm_eval_generation_never_draws_a_padding_row(kwargs):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from peft_rwkv7.integrations.lm_eval import RWKVPeftLM

    lm = RWKVPeftLM(padded_model(best_in_vocab=7), tokenizer=Chars(), chunk_len=4)
    req = Instance(request_type="generate_until", doc={}, arguments=("Hi", {"until": [], "max_gen_toks": 5, **kwargs}),
                   idx=0)
    (text,) = lm.generate_until([req], disable_tqdm=True)
    assert len(text) == 5
    if not kwargs:
        assert text == chr(32 + 7) * 5
