"""The batched GRPO sampler against single-stream `generate`, the sequence forward, and an explicit
nucleus distribution computed by hand in fp64."""

from __future__ import annotations

import math

import pytest
import torch

from peft_rwkv7 import MethodConfig, attach
from peft_rwkv7.errors import UserError
from peft_rwkv7.infer.generate import generate
from peft_rwkv7.infer.sampler import sample_groups, sample_token
from tests.conftest import make_model
from tests.fp_oracle import forward_rounding, gamma

V = 97  # make_model's vocabulary


class CharTokenizer:
    """One character per token, id i <-> chr(32 + i) (end-of-text, 0, is a space: ids and text map both
    ways, so `generate`'s text gives back its tokens)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + i) for i in ids)


TOK = CharTokenizer()
PROMPTS = ["Ship's_log,_day_7.", "Wind", "Q"]  # 18, 4 and 1 tokens; no spaces (id 0)


def greedy_generate(model, prompt: str, n: int) -> list[int]:
    """The single-stream path: `generate` at temperature 0 (no end-of-text stop), back to ids."""
    return TOK.encode("".join(generate(model, TOK, prompt, max_tokens=n, temperature=0.0, stop_at_eot=False)))


def logsoftmax_bound(vocab: int, max_abs: float) -> float:
    """|fp32 log_softmax - exact| per entry: max-shift, V exponentials summed, log, two subtractions
    (gamma_(V+4) of 1 + 2 max|z|, as fp_oracle.fp64_nll_rounding argues), plus the rounding of z itself."""
    return gamma(vocab + 4) * (1 + 2 * max_abs) + gamma(1) * max_abs


def test_sample_token_is_the_renormalised_nucleus():
    z = torch.tensor([2.0, 1.5, 1.4, 0.3, -1.0, -3.0])
    T, top_p, n = 0.7, 0.8, 20000
    p = torch.softmax(z.double() / T, 0)  # by hand: sort, take tokens until their mass reaches top_p
    order = sorted(range(6), key=lambda i: -p[i].item())
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += p[i].item()
    assert kept == [0, 1, 2]  # 0.51 + 0.25 < 0.8, + 0.22 >= 0.8: the example exercises the boundary
    q = torch.zeros(6, dtype=torch.float64)
    q[kept] = p[kept] / p[kept].sum()
    g = torch.Generator().manual_seed(0)
    tok, lp_sampled, lp_scaled, lp_plain = sample_token(z.expand(n, -1), T, top_p, g)
    assert set(tok.tolist()) == set(kept)
    bound = logsoftmax_bound(6, z.abs().max().item() / T)
    assert (lp_sampled.double() - q.log()[tok]).abs().max() <= 3 * bound  # two log-softmaxes, the 2nd on the 1st
    assert (lp_scaled.double() - p.log()[tok]).abs().max() <= bound
    assert (lp_plain.double() - torch.log_softmax(z.double(), 0)[tok]).abs().max() <= bound
    freq = torch.bincount(tok, minlength=6).double() / n
    assert ((freq - q).abs() <= 5 * (q * (1 - q) / n).sqrt() + 1e-12).all()  # 5 sigma per token

    # top_p below the largest probability: only the argmax, with probability 1
    tok, lp_sampled, _, _ = sample_token(z.expand(50, -1), 1.0, 1e-3, g)
    assert set(tok.tolist()) == {0} and (lp_sampled == 0).all()
    # temperature 0: argmax, no draw from the generator, the plain log-prob still reported
    before = g.get_state()
    tok, lp_sampled, lp_scaled, lp_plain = sample_token(z[None], 0.0, 0.9, g)
    assert tok.tolist() == [0] and lp_sampled.item() == lp_scaled.item() == 0.0
    assert torch.equal(g.get_state(), before)
    assert abs(lp_plain.item() - torch.log_softmax(z.double(), 0)[0].item()) <= bound


def test_greedy_rows_equal_single_stream_generate():
    model = make_model(seed=3)
    n = 12
    ro = sample_groups(model, [TOK.encode(p) for p in PROMPTS], G=3, max_new_tokens=n, temperature=0.0, top_p=1.0,
                       generator=torch.Generator(), stop_token_ids=(), prefill_chunk=4)  # 18 tokens: 5 chunks
    assert ro.completion_ids.shape == (9, n) and ro.truncated.all() and not ro.finished.any()
    for p, prompt in enumerate(PROMPTS):
        want = greedy_generate(model, prompt, n)
        for g in range(3):
            assert ro.completions[p * 3 + g] == want, (p, g)
    assert (ro.logp_sampled == 0).all() and (ro.logp_plain < 0).all()
    assert ro.tokens == 9 * n and ro.prefill_seconds > 0 and ro.sample_seconds > 0


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.9), (0.8, 1.0)])
def test_logprobs_equal_the_sequence_forward(temperature, top_p):
    model = make_model(seed=5)
    prompts = [TOK.encode(p) for p in PROMPTS[:2]]
    ro = sample_groups(model, prompts, G=4, max_new_tokens=10, temperature=temperature, top_p=top_p,
                       generator=torch.Generator().manual_seed(1), stop_token_ids=(3, 4))
    assert ro.finished.any()  # some rows stopped early: ragged lengths are scored too
    for r, comp in enumerate(ro.completions):
        prompt = prompts[r // 4]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + comp[:-1]]))[0, len(prompt) - 1 :].double()
        tol = 4 * forward_rounding(model.config, len(prompt) + len(comp)) * logits.abs().max().item()
        tol += 2 * logsoftmax_bound(V, logits.abs().max().item())  # two fp32 forwards, two log-softmaxes
        tgt = torch.tensor(comp)[:, None]
        plain = torch.log_softmax(logits, -1).gather(1, tgt)[:, 0]
        assert (ro.logp_plain[r, : len(comp)].double() - plain).abs().max() <= tol
        scaled = torch.log_softmax(logits / temperature, -1).gather(1, tgt)[:, 0]
        assert (ro.logp_scaled[r, : len(comp)].double() - scaled).abs().max() <= tol / temperature
        if top_p == 1.0:
            assert torch.equal(ro.logp_sampled[r], ro.logp_scaled[r])
        else:  # the nucleus renormalises: each sampled token is at least as likely as without the filter
            slack = logsoftmax_bound(V, 1.0 + ro.logp_scaled[r].abs().max().item())
            assert (ro.logp_sampled[r, : len(comp)] >= ro.logp_scaled[r, : len(comp)] - slack).all()
        assert (ro.logp_plain[r, len(comp) :] == 0).all() and (ro.completion_ids[r, len(comp) :] == 0).all()
    # the outputs are ordinary tensors, not inference tensors: autograd may save them for backward
    (model(ro.completion_ids[:2]).logsumexp(-1) * ro.logp_plain[:2]).sum().backward()


def test_same_seed_same_rollouts_and_generator_state_resumes():
    model = make_model(seed=7)
    prompts = [TOK.encode(p) for p in PROMPTS]

    def run(gen):
        return sample_groups(model, prompts, G=4, max_new_tokens=8, temperature=1.0, top_p=1.0, generator=gen)

    g = torch.Generator().manual_seed(11)
    first = run(g)
    saved = g.get_state()
    second = run(g)
    again = run(torch.Generator().manual_seed(11))
    assert torch.equal(again.completion_ids, first.completion_ids) and torch.equal(again.logp_plain, first.logp_plain)
    resumed = torch.Generator()
    resumed.set_state(saved)
    assert torch.equal(run(resumed).completion_ids, second.completion_ids)
    assert not torch.equal(first.completion_ids, second.completion_ids)
    for p in range(3):  # the G rows of a group diverge (each ~8 tokens from a ~4-nat distribution)
        assert len({tuple(c) for c in first.completions[p * 4 : p * 4 + 4]}) == 4


def test_stop_tokens_per_row_keep_the_other_rows_on_their_path():
    model = make_model(seed=3)
    n = 12
    full = [greedy_generate(model, p, n) for p in PROMPTS]
    stop = full[0][2]  # prompt 0 stops at its 3rd token; the others wherever (if) the token comes
    ro = sample_groups(model, [TOK.encode(p) for p in PROMPTS], G=2, max_new_tokens=n, temperature=0.0, top_p=1.0,
                       generator=torch.Generator(), stop_token_ids=(stop,), decode=TOK.decode)
    lengths = set()
    for p, want in enumerate(full):
        cut = want[: want.index(stop) + 1] if stop in want else want
        lengths.add(len(cut))
        for r in (2 * p, 2 * p + 1):
            assert ro.completions[r] == cut, p  # rows that continue after others left keep their own state
            assert ro.finished[r].item() == (stop in want) and ro.truncated[r].item() == (stop not in want)
            assert ro.texts[r] == TOK.decode(cut[:-1] if stop in want else cut)  # the stop token is left out
    assert len(lengths) > 1 and ro.finished.any() and ro.truncated.any()


def test_stop_strings_end_a_row_mid_token():
    model = make_model(seed=3)
    n = 12

    def decode(ids):  # two characters per token, so a stop string can end inside a token
        return "".join(chr(65 + i % 26) + chr(97 + i // 26) for i in ids)

    full = [greedy_generate(model, p, n) for p in PROMPTS]
    text0 = decode(full[0])
    stop = text0[5:7]  # 2nd char of token 2 and 1st char of token 3: ends inside token 3
    assert text0.find(stop) == 5
    ro = sample_groups(model, [TOK.encode(p) for p in PROMPTS], G=2, max_new_tokens=n, temperature=0.0, top_p=1.0,
                       generator=torch.Generator(), stop_token_ids=(), stop_strings=("@@", stop), decode=decode)
    for p, want in enumerate(full):
        text = decode(want)
        at = text.find(stop)
        ntok = (at + len(stop) - 1) // 2 + 1 if at >= 0 else n  # up to the token holding the stop's last char
        for r in (2 * p, 2 * p + 1):
            assert ro.completions[r] == want[:ntok] and ro.finished[r].item() == (at >= 0)
            assert ro.texts[r] == (text[:at] if at >= 0 else text)
    assert ro.completions[0] == full[0][:4] and ro.texts[0] == text0[:5]


def test_top_p_below_the_top_probability_is_greedy():
    model = make_model(seed=3)
    prompts = [TOK.encode(p) for p in PROMPTS]
    kw = dict(G=2, max_new_tokens=8, generator=torch.Generator().manual_seed(0), stop_token_ids=())
    greedy = sample_groups(model, prompts, temperature=0.0, top_p=1.0, **kw)
    nucleus = sample_groups(model, prompts, temperature=1.0, top_p=1e-4, **kw)
    assert torch.equal(nucleus.completion_ids, greedy.completion_ids) and (nucleus.logp_sampled == 0).all()
    assert torch.equal(nucleus.logp_plain, greedy.logp_plain)


@pytest.mark.parametrize("method", [dict(kind="state"), dict(kind="lora", r=4, alpha=8, dropout=0.5, state=True)])
def test_adapted_model_samples_from_its_trained_state_in_eval_mode(method):
    model = attach(make_model(seed=9), MethodConfig(**method))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_state" in name or "lora_" in name:  # trained: a nonzero start and a LoRA that acts
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.train()  # as the training loop leaves it: dropout on
    ro = sample_groups(model, [TOK.encode(p) for p in PROMPTS], G=2, max_new_tokens=10, temperature=0.0,
                       top_p=1.0, generator=torch.Generator(), stop_token_ids=())
    assert model.training and all(m.training for m in model.modules())  # every flag restored
    zero = make_model(seed=9)  # the same weights without the adapter: a different start, other tokens
    for p, prompt in enumerate(PROMPTS):
        want = greedy_generate(model, prompt, 10)
        assert ro.completions[2 * p] == ro.completions[2 * p + 1] == want
    assert [ro.completions[2 * p] for p in range(3)] != [greedy_generate(zero, p, 10) for p in PROMPTS]


def test_bf16_model_samples():
    model = make_model(seed=3).to(torch.bfloat16)
    ro = sample_groups(model, [TOK.encode(p) for p in PROMPTS], G=3, max_new_tokens=6, temperature=1.0,
                       top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert ro.completion_ids.shape[0] == 9 and torch.isfinite(ro.logp_plain).all()
    assert ((ro.logp_sampled <= 0) & (ro.logp_plain <= 0)).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(G=0), "num_generations must be >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=math.nan), "temperature must be a number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(stop_strings=("x",)), "stop strings need the tokenizer's decode"),
    (dict(stop_strings=("",), decode=TOK.decode), "stop must be non-empty strings"),
    (dict(prompts=[[1, V]]), f"prompt 0: token id {V} outside the model's vocabulary"),
    (dict(prompts=[]), "no prompts"),
])  # fmt: skip
def test_bad_inputs_are_one_line_errors(kwargs, match):
    args = dict(prompts=[[1, 2]], G=2, max_new_tokens=4, temperature=1.0, top_p=1.0, generator=torch.Generator())
    with pytest.raises(UserError, match=match):
        sample_groups(make_model(seed=0), **{**args, **kwargs})


def test_a_generator_per_prompt_makes_its_rows_independent_of_the_batch():
    """With one generator per prompt a prompt's G completions are the same alone or beside other prompts
    (finishing at other steps), and inverse-CDF sampling follows the distribution like multinomial does."""
    model = make_model(seed=7)
    prompts = [TOK.encode(p) for p in PROMPTS]

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = sample_groups(model, prompts, G=3, max_new_tokens=10, temperature=1.0, top_p=0.9,
                             generator=gens([1, 2, 3]), stop_token_ids=(5,))
    for p in range(3):
        alone = sample_groups(model, [prompts[p]], G=3, max_new_tokens=10, temperature=1.0, top_p=0.9,
                              generator=gens([p + 1]), stop_token_ids=(5,))
        # the tokens; their log-probs come from forwards of other batch shapes (equal to rounding, which
        # test_logprobs_equal_the_sequence_forward bounds)
        assert alone.completions == together.completions[3 * p : 3 * p + 3]
    # inverse-CDF draws: frequencies of a fixed distribution within 5 sigma over 20,000 draws
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    p = torch.softmax(logits[0].double(), 0)
    g = gens([5])
    draws = torch.stack([sample_token(logits, 1.0, 1.0, g)[0][0] for _ in range(20000)])
    freq = torch.bincount(draws, minlength=5).double() / 20000
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / 20000).sqrt() + 1e-9).all()
    lengths = together.lengths
    ent = together.entropy
    assert (ent >= 0).all() and (ent <= math.log(V) + 1e-5).all()
    assert all((ent[r, int(n):] == 0).all() and (ent[r, : int(n)] > 0).all() for r, n in enumerate(lengths))
    with pytest.raises(ValueError, match="generators"):
        sample_groups(model, prompts, G=1, max_new_tokens=1, temperature=1.0, top_p=1.0, generator=gens([1]))
