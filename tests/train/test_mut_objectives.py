"""What tests/train/test_objectives.py left open (found by `scripts/mutation.sh objectives`): the documented
defaults, one-token responses, SimPO's rewards, the reward accuracy of small margins, and the objectives as the
trainer calls them (Objective and Objective.from_config). Every expectation is the paper's formula written out
in float64 with `math`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from peft_rwkv7.train.objectives import Objective, PairTerms, dpo, orpo, simpo

# per pair: log pi(y_w|x), log pi(y_l|x), |y_w|, |y_l|, log pi_ref(y_w|x), log pi_ref(y_l|x); the one-token
# responses make a mean over |y| differ from a division by any other count
PAIRS = [(-1.5, -4.0, 1, 1, -2.0, -3.0), (-0.75, -9.0, 1, 3, -1.25, -8.5), (-12.0, -2.5, 4, 1, -11.0, -2.0)]
# the results are float64 sums of a few terms: 1e-12 is ~1e4 roundings of 2^-53 at magnitudes below 20
TOL = 1e-12


def col(i: int) -> torch.Tensor:
    return torch.tensor([p[i] for p in PAIRS], dtype=torch.float64)


def args(with_ref: bool = True):
    return (col(0), col(1), col(2), col(3)) + ((col(4), col(5)) if with_ref else ())


def nls(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


def log_odds(mean_logp: float) -> float:
    return mean_logp - math.log(-math.expm1(mean_logp))


def want_dpo(beta, w, l, rw, rl):
    return nls(beta * (w - rw) - beta * (l - rl)), beta * (w - rw), beta * (l - rl)


def want_orpo(lam, w, l, nw, nl):
    ow, ol = log_odds(w / nw), log_odds(l / nl)
    return -w / nw + lam * nls(ow - ol), ow, ol


def want_simpo(beta, gamma, w, l, nw, nl, length_norm=True):
    rw, rl = (beta * w / nw, beta * l / nl) if length_norm else (beta * w, beta * l)
    return nls(rw - rl - gamma), rw, rl


def check(terms: PairTerms, want: list[tuple[float, float, float]]):
    for i, (loss, rw, rl) in enumerate(want):
        assert terms.loss[i].item() == pytest.approx(loss, abs=TOL), (i, terms.loss)
        assert terms.chosen_reward[i].item() == pytest.approx(rw, abs=TOL), (i, terms.chosen_reward)
        assert terms.rejected_reward[i].item() == pytest.approx(rl, abs=TOL), (i, terms.rejected_reward)


def test_defaults_are_the_documented_ones():
    """DPO beta 0.1, ORPO lambda 0.1, SimPO beta 2.0, gamma 1.0, length-normalised (module docstring)."""
    check(dpo(col(0), col(1), col(4), col(5)), [want_dpo(0.1, p[0], p[1], p[4], p[5]) for p in PAIRS])
    check(orpo(*args(False)), [want_orpo(0.1, *p[:4]) for p in PAIRS])
    check(simpo(*args(False)), [want_simpo(2.0, 1.0, *p[:4]) for p in PAIRS])


def test_one_token_responses_and_rewards_of_every_objective():
    check(orpo(*args(False), lam=0.4), [want_orpo(0.4, *p[:4]) for p in PAIRS])
    check(simpo(*args(False), beta=1.5, gamma=0.3), [want_simpo(1.5, 0.3, *p[:4]) for p in PAIRS])
    check(simpo(*args(False), beta=1.5, gamma=0.3, length_norm=False),
          [want_simpo(1.5, 0.3, *p[:4], length_norm=False) for p in PAIRS])


def test_reward_accuracy_of_small_margins():
    margins = [0.25, -0.25, 0.0, 1.0, 3.0]
    terms = PairTerms(torch.zeros(5), torch.tensor(margins, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))
    assert terms.margin.tolist() == margins
    assert terms.correct.tolist() == [1.0, 0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("nll_weight", [0.0, 0.5])
def test_objective_calls_each_objective_with_its_parameters(nll_weight):
    beta, lam, gamma = 0.3, 0.7, 0.2
    nll = [nll_weight * -p[0] / p[2] for p in PAIRS]  # alpha * mean NLL of the chosen response
    got = Objective("dpo", beta, lam=lam, gamma=gamma, nll_weight=nll_weight)(*args())
    check(got, [(x[0] + n, x[1], x[2]) for x, n in
                zip([want_dpo(beta, p[0], p[1], p[4], p[5]) for p in PAIRS], nll, strict=True)])
    # ORPO has its NLL term built in (weight 1): nll_weight does not add another
    got = Objective("orpo", beta, lam=lam, gamma=gamma, nll_weight=nll_weight)(*args(False))
    check(got, [want_orpo(lam, *p[:4]) for p in PAIRS])
    for length_norm in (True, False):
        got = Objective("simpo", beta, lam=lam, gamma=gamma, length_norm=length_norm, nll_weight=nll_weight)(
            *args(False))
        check(got, [(x[0] + n, x[1], x[2]) for x, n in
                    zip([want_simpo(beta, gamma, *p[:4], length_norm=length_norm) for p in PAIRS], nll, strict=True)])


def test_objective_refuses_a_missing_reference_and_an_unknown_name():
    obj = Objective("dpo", 0.1)
    for ref in ((col(4), None), (None, col(5)), (None, None)):
        with pytest.raises(ValueError, match=r"^dpo needs the reference policy's log-probs$"):
            obj(*args(False), *ref)
    with pytest.raises(ValueError, match=r"^unknown preference objective 'kto'$"):
        Objective("kto", 0.1)(*args())
    assert [Objective(n, 0.1).needs_reference for n in ("dpo", "orpo", "simpo")] == [True, False, False]


def test_from_config_reads_every_key_and_the_default_beta():
    def tc(**kw):
        base = {"objective": "simpo", "beta": None, "lambda": 0.1, "gamma": 1.0, "length_norm": True,
                "nll_weight": 0.0}
        return SimpleNamespace(**{**base, **kw})

    assert Objective.from_config(tc(objective="dpo")) == Objective("dpo", 0.1, 0.1, 1.0, True, 0.0)
    assert Objective.from_config(tc()) == Objective("simpo", 2.0, 0.1, 1.0, True, 0.0)
    assert Objective.from_config(tc(objective="orpo")) == Objective("orpo", 0.0, 0.1, 1.0, True, 0.0)
    got = Objective.from_config(tc(beta=3, gamma=0.25, length_norm=False, nll_weight=0.5, **{"lambda": 0.75}))
    assert got == Objective("simpo", 3.0, 0.75, 0.25, False, 0.5)
    assert [type(v) for v in (got.beta, got.lam, got.gamma, got.length_norm, got.nll_weight)] == \
        [float, float, float, bool, float]
