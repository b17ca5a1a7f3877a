"""What the GRPO sampler's tests had left open (mutation testing, `scripts/mutation.sh sampler`): the entropy GRPO
logs, a stop string spread over several tokens, a stop string twice in one token, the loop's end once every row has
stopped, a rollout's mask and rates, and the GPU's timing barrier. Expectations are written out by hand or computed
in fp64 from the sequence forward."""

from __future__ import annotations

import math

import pytest
import torch

from peft_rwkv7.infer import sampler
from peft_rwkv7.infer.sampler import Rollouts, sample_groups
from tests.conftest import make_model
from tests.fp_oracle import forward_rounding, gamma
from tests.infer.test_sampler import PROMPTS, TOK, V, greedy_generate, logsoftmax_bound


def test_entropy_is_the_policys_at_each_drawn_position():
    model = make_model(seed=5)
    prompts = [TOK.encode(p) for p in PROMPTS[:2]]
    ro = sample_groups(model, prompts, G=3, max_new_tokens=8, temperature=0.7, top_p=0.9,
                       generator=torch.Generator().manual_seed(3), stop_token_ids=(3,))
    for r, comp in enumerate(ro.completions):
        prompt = prompts[r // 3]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + comp[:-1]]))[0, len(prompt) - 1 :].double()
        logp = torch.log_softmax(logits, -1)
        h = -(logp.exp() * logp).sum(-1)  # of softmax(z): not of the tempered or the nucleus distribution
        # |dH/dz_i| = p_i |log p_i + H|, summing to <= 2H: a logit error e moves H by <= 2 H e; then the fp32
        # log-softmax's own rounding (weighted by p, summing to 1) and the V-term sum's
        e = 4 * forward_rounding(model.config, len(prompt) + len(comp)) * logits.abs().max().item()
        e += logsoftmax_bound(V, logits.abs().max().item())
        tol = 2 * h.max().item() * e + logsoftmax_bound(V, logits.abs().max().item()) + gamma(V) * h.max().item()
        assert (ro.entropy[r, : len(comp)].double() - h).abs().max() <= tol, r
        assert (ro.entropy[r, len(comp) :] == 0).all()
    assert (ro.entropy[ro.mask] > 0.5).all()  # a random model is far from a point mass: the check is not vacuous


def test_a_stop_string_over_several_tokens_ends_the_row():
    """One character per token: a 3-character stop string spans the last 3 tokens, which the sampler must decode
    together (a window of one token never holds it)."""
    model = make_model(seed=3)
    n = 12
    want = greedy_generate(model, PROMPTS[0], n)
    text = TOK.decode(want)
    stop = text[4:7]
    assert text.find(stop) == 4 and len(set(stop)) > 1
    ro = sample_groups(model, [TOK.encode(PROMPTS[0])], G=2, max_new_tokens=n, temperature=0.0, top_p=1.0,
                       generator=torch.Generator(), stop_token_ids=(), stop_strings=(stop,), decode=TOK.decode)
    assert ro.completions == [want[:7], want[:7]] and ro.finished.all()
    assert ro.texts == [text[:4], text[:4]]


def test_the_text_is_cut_at_the_first_stop_in_the_last_token():
    """A token whose text holds the stop string twice (say "\\n\\n" with the stop "\\n"): the text ends before the
    first."""
    model = make_model(seed=3)
    n = 10
    want = greedy_generate(model, PROMPTS[1], n)

    def decode(ids):  # every token's text is its character twice
        return "".join(c + c for c in TOK.decode(ids))

    k = 4
    stop = TOK.decode([want[k]])
    k = want.index(want[k])  # the first token with that character
    ro = sample_groups(model, [TOK.encode(PROMPTS[1])], G=1, max_new_tokens=n, temperature=0.0, top_p=1.0,
                       generator=torch.Generator(), stop_token_ids=(), stop_strings=(stop,), decode=decode)
    assert ro.completions == [want[: k + 1]] and ro.finished.all()
    assert ro.texts == [decode(want[:k])]


def test_the_loop_ends_when_every_row_has_stopped(monkeypatch):
    model = make_model(seed=3)
    n = 12
    want = greedy_generate(model, PROMPTS[0], n)
    stop = want[2]
    k = want.index(stop)  # every row (greedy, one prompt) stops at its (k+1)-th token
    steps = []
    real = model.step
    monkeypatch.setattr(model, "step", lambda tok, state: (steps.append(tok.shape[0]), real(tok, state))[1])
    ro = sample_groups(model, [TOK.encode(PROMPTS[0])], G=3, max_new_tokens=n, temperature=0.0, top_p=1.0,
                       generator=torch.Generator(), stop_token_ids=(stop,))
    assert ro.completions == [want[: k + 1]] * 3
    assert steps == [3] * k  # one step per token after the first (the prompt's logits give it), none after


def test_a_rollouts_mask_and_rates():
    ids = torch.tensor([[5, 0, 0], [6, 7, 0], [8, 9, 1], [0, 0, 0]])
    zeros = torch.zeros(4, 3)
    ro = Rollouts(ids, torch.tensor([1, 2, 3, 0]), zeros, zeros, zeros, zeros, torch.tensor([1, 0, 1, 0]).bool(),
                  torch.tensor([0, 1, 0, 1]).bool(), None, 2, 2, prefill_seconds=0.5, sample_seconds=1.5)
    assert ro.mask.tolist() == [[True, False, False], [True, True, False], [True, True, True], [False] * 3]
    assert ro.completions == [[5], [6, 7], [8, 9, 1], []]
    assert ro.tokens == 6 and ro.seconds == 2.0 and ro.tokens_per_second == 3.0
    instant = Rollouts(ids, torch.tensor([1, 2, 3, 0]), zeros, zeros, zeros, zeros, torch.zeros(4).bool(),
                       torch.ones(4).bool(), None, 2, 2, prefill_seconds=0.0, sample_seconds=0.0)
    assert instant.tokens_per_second == math.inf
    quick = Rollouts(ids, torch.tensor([1, 2, 3, 0]), zeros, zeros, zeros, zeros, torch.zeros(4).bool(),
                     torch.ones(4).bool(), None, 2, 2, prefill_seconds=0.25, sample_seconds=0.25)
    assert quick.tokens_per_second == 12.0  # under a second is a rate too


def test_timings_wait_for_a_gpus_queued_work(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    sampler._sync(torch.device("cpu"))
    assert calls == []
    gpu = torch.device("cuda", 1)
    sampler._sync(gpu)
    assert calls == [gpu]


def test_the_edges_of_the_accepted_settings_run():
    """max_new_tokens 1, prefill_chunk 1, top_p 1 and a prompt holding token 0 are valid, and the rollout says
    how it was made."""
    model = make_model(seed=3)
    ro = sample_groups(model, [[0, 5, 7], [3]], G=2, max_new_tokens=1, temperature=0.0, top_p=1.0,
                       generator=torch.Generator(), stop_token_ids=(), prefill_chunk=1)
    assert ro.completion_ids.shape == (4, 1) and (ro.num_prompts, ro.group_size) == (2, 2)
    assert ro.truncated.all()
    ro = sample_groups(model, [[], [0]], G=1, max_new_tokens=5, temperature=0.0, top_p=1.0,
                       generator=torch.Generator(), stop_token_ids=())
    assert ro.completions[0] == ro.completions[1]  # an empty prompt starts from end-of-text, 0, as generate does


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(prompts=[]), "sample_groups: no prompts given"),
    (dict(prefill_chunk=0), "sample_groups: prefill_chunk must be >= 1, got 0"),
    (dict(top_p=1.5), "train.grpo.top_p must be in (0, 1], got 1.5"),
    (dict(stop_strings=("x",)), "sample_groups: stop strings need the tokenizer's decode function (decode=...)"),
    (dict(prompts=[[1, 2], [3, -1]]), f"prompt 1: token id -1 outside the model's vocabulary (0..{V - 1})"),
], ids=["no-prompts", "chunk", "top-p", "decode", "negative-id"])
def test_each_refusal_in_its_words(kwargs, message):
    from peft_rwkv7.errors import UserError

    args = dict(prompts=[[1, 2]], G=2, max_new_tokens=4, temperature=1.0, top_p=1.0, generator=torch.Generator())
    with pytest.raises(UserError) as e:
        sample_groups(make_model(seed=0), **{**args, **kwargs})
    assert str(e.value) == message


def test_no_step_after_the_last_token_and_the_timings_are_the_phases(monkeypatch):
    import time

    model = make_model(seed=3)
    steps = []
    real = model.step
    monkeypatch.setattr(model, "step", lambda tok, state: (steps.append(tok.shape[0]), real(tok, state))[1])
    t0 = time.perf_counter()
    ro = sample_groups(model, [TOK.encode(PROMPTS[1])], G=2, max_new_tokens=6, temperature=1.0, top_p=1.0,
                       generator=torch.Generator().manual_seed(0), stop_token_ids=())
    wall = time.perf_counter() - t0
    assert steps == [2] * 5  # 6 tokens: the first from the prompt's logits, 5 steps, none after the last
    assert 0 < ro.prefill_seconds < wall and 0 < ro.sample_seconds < wall and ro.seconds <= wall


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_it():
    """Four equally likely tokens (p = 1/4 exactly) at top_p 0.5: two are kept (their mass reaches 0.5), not three."""
    from peft_rwkv7.infer.sampler import sample_token

    for seed in range(8):
        tok, logq, scaled, plain = sample_token(torch.zeros(1, 4), 1.0, 0.5, torch.Generator().manual_seed(seed))
        assert logq.item() == pytest.approx(math.log(0.5), abs=1e-6)
        assert scaled.item() == pytest.approx(math.log(0.25), abs=1e-6) == plain.item()


@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "one-generator"])
def test_the_last_token_is_drawn_as_often_as_its_mass(per_row):
    """Two equally likely tokens, 4000 draws: each within 5 sigma (sigma = sqrt(4000 / 4) ~ 32) of 2000."""
    from peft_rwkv7.infer.sampler import sample_token

    g = torch.Generator().manual_seed(9)
    gen = [g] if per_row else g
    draws = [sample_token(torch.zeros(1, 2), 1.0, 1.0, gen)[0].item() for _ in range(4000)]
    assert abs(draws.count(1) - 2000) <= 5 * math.sqrt(4000 / 4)


def test_bf16_logits_are_sampled_in_fp32():
    """A bf16 model's logits are widened before the softmaxes: the draw and its log-probs are those of the fp32
    copy of the same logits, bit for bit (bf16 softmaxes would round every log-prob to ~3 digits)."""
    from peft_rwkv7.infer.sampler import sample_token

    logits = (3 * torch.randn(3, 50, generator=torch.Generator().manual_seed(4))).bfloat16()
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        a = sample_token(logits, temperature, top_p, torch.Generator().manual_seed(1))
        b = sample_token(logits.float(), temperature, top_p, torch.Generator().manual_seed(1))
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[1].dtype == torch.float32
