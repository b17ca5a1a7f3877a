"""The preference objectives as pure functions: each against its paper's formula written out in float64
with `math`, on hand-picked log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from peft_rwkv7.train.objectives import Objective, dpo, log_odds, orpo, simpo
from tests.fp_oracle import U64, gamma

# fp64 on both sides: each formula is <= 16 operations (libm's exp/log within 1 ulp: two roundings each) on
# values below 50 in magnitude, so each side is within gamma_16 (fp64) of 50 of the exact value.
TOL = 2 * gamma(16, U64) * 50

# per pair: log pi(y_w|x), log pi(y_l|x), |y_w|, |y_l|, log pi_ref(y_w|x), log pi_ref(y_l|x)
PAIRS = [(-12.0, -30.5, 6, 9, -14.0, -29.0), (-40.25, -8.0, 20, 4, -39.0, -7.5), (-3.0, -3.0, 3, 3, -3.0, -3.0)]


def cols(i: int) -> torch.Tensor:
    return torch.tensor([p[i] for p in PAIRS], dtype=torch.float64)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_matches_the_formula_and_is_ln2_when_policy_is_the_reference():
    beta = 0.3
    t = dpo(cols(0), cols(1), cols(4), cols(5), beta)
    for i, (w, l, _, _, rw, rl) in enumerate(PAIRS):
        margin = beta * (w - rw) - beta * (l - rl)
        assert t.loss[i].item() == pytest.approx(-math.log(sig(margin)), abs=TOL)
        assert t.margin[i].item() == pytest.approx(margin, abs=TOL)
    same = dpo(cols(0), cols(1), cols(0), cols(1), beta)
    assert ((same.loss - math.log(2)).abs() <= TOL).all()  # margin exactly 0; libm's log within an ulp
    assert same.correct.tolist() == [0.5, 0.5, 0.5]  # ties count one half
    assert t.correct.tolist() == [1.0, 0.0, 0.5]


def test_orpo_matches_the_formula():
    lam = 0.25
    t = orpo(cols(0), cols(1), cols(2), cols(3), lam)
    for i, (w, l, nw, nl, _, _) in enumerate(PAIRS):
        pw, pl = math.exp(w / nw), math.exp(l / nl)
        ratio = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        assert t.loss[i].item() == pytest.approx(-w / nw - lam * math.log(sig(ratio)), abs=TOL)
        assert t.margin[i].item() == pytest.approx(ratio, abs=TOL)
    # log odds stay finite and accurate for probabilities near 0 and near 1 (log(1 - e^a) at a = -1e-3 has
    # condition number e^a / (1 - e^a) ~ 1e3: its inputs' roundings grow 1000x, a few operations each side)
    a = torch.tensor([-50.0, -1e-3], dtype=torch.float64)
    assert log_odds(a).tolist() == pytest.approx([-50.0 - math.log1p(-math.exp(-50.0)),
                                                  -1e-3 - math.log(-math.expm1(-1e-3))], abs=1e3 * TOL)


@pytest.mark.parametrize("length_norm", [True, False])
def test_simpo_matches_the_formula(length_norm):
    beta, gamma = 2.0, 0.7
    t = simpo(cols(0), cols(1), cols(2), cols(3), beta, gamma, length_norm)
    for i, (w, l, nw, nl, _, _) in enumerate(PAIRS):
        rw, rl = (beta * w / nw, beta * l / nl) if length_norm else (beta * w, beta * l)
        assert t.loss[i].item() == pytest.approx(-math.log(sig(rw - rl - gamma)), abs=TOL)


def test_nll_weight_adds_the_chosen_mean_nll_and_objective_defaults():
    args = (cols(0), cols(1), cols(2), cols(3), cols(4), cols(5))
    plain = Objective("dpo", beta=0.1)(*args)
    rpo = Objective("dpo", beta=0.1, nll_weight=2.0)(*args)
    assert ((rpo.loss - plain.loss) - (-2.0 * cols(0) / cols(2))).abs().max() <= TOL
    assert torch.equal(rpo.margin, plain.margin)
    with pytest.raises(ValueError, match="reference"):
        Objective("dpo", beta=0.1)(*args[:4])
    assert not Objective("orpo", beta=0.0).needs_reference and Objective("dpo", beta=0.1).needs_reference
