"""The GRPO-family losses against their formulas worked out by hand (python floats, `math`) on a fixed example,
the step-1 identities (ratio 1, nothing clipped, KL 0, the REINFORCE gradient) and the group-size check."""

from __future__ import annotations

import math

import pytest
import torch

from peft_rwkv7.errors import UserError
from peft_rwkv7.train.grpo_loss import advantages, check_group_size, grpo_loss, zero_spread_share
from tests.fp_oracle import U32, U64, gamma

NAN = float("nan")
# fp64 on both sides: each expected value is <= 40 roundings (a log and an exp per ratio, the clip, a sum of <= 9
# terms, a division) of terms below 10 in magnitude, summed 9 at a time: within gamma_40 (fp64) of 100.
TOL = 2 * gamma(40, U64) * 100
EPS, EPS_HIGH = 0.2, 0.28  # clip range [0.8, 1.28]
L_MAX = 5  # dr_grpo's constant: N * L_MAX = 20
GLOBAL_TOKENS = 12  # dapo: the global batch has 3 masked tokens more than this micro-batch's 9

# 4 completions, ragged lengths 3, 2, 1, 3 (9 masked tokens); padding is NaN and must never be read.
MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
ADV = [1.0, -0.5, 2.0, -1.0]
RATIO = [[1.5, 0.5, 4.0], [0.5, 1.2, NAN], [1.25, NAN, NAN], [0.75, 1.5, 1.0]]  # pi_theta / pi_old per token
LOGP = [[-0.5, -1.25, -2.0], [-0.75, -3.0, NAN], [-1.5, NAN, NAN], [-0.25, -1.0, -4.0]]
REF_MINUS_LOGP = [[0.5, -0.25, 1.0], [-1.0, 0.0, NAN], [2.0, NAN, NAN], [0.25, -0.5, 0.75]]


def tensors(dtype=torch.float64):
    logp = torch.tensor(LOGP, dtype=dtype, requires_grad=True)
    old = torch.tensor([[lp - math.log(r) for lp, r in zip(a, b)] for a, b in zip(LOGP, RATIO)], dtype=dtype)
    ref = torch.tensor([[lp + d for lp, d in zip(a, b)] for a, b in zip(LOGP, REF_MINUS_LOGP)], dtype=dtype)
    return logp, old, ref, torch.tensor(ADV, dtype=dtype), torch.tensor(MASK, dtype=torch.bool)


def by_hand(rows: list[list[float]], loss_type: str) -> float:
    """Aggregate per-token terms (one list per completion, its masked tokens only) as each loss type does."""
    total = sum(sum(r) for r in rows)
    if loss_type == "grpo":  # mean per completion, then over the 4 completions
        return (sum(rows[0]) / 3 + sum(rows[1]) / 2 + sum(rows[2]) / 1 + sum(rows[3]) / 3) / 4
    if loss_type == "bnpo":  # over this micro-batch's 3 + 2 + 1 + 3 tokens
        return total / 9
    if loss_type == "dapo":  # over the global batch's tokens
        return total / GLOBAL_TOKENS
    return total / (4 * L_MAX)  # dr_grpo


def k3(d: float) -> float:
    return math.exp(d) - d - 1


# -min(w A, clip(w, 0.8, 1.28) A) per masked token, token-level ratios:
TOKEN_TERMS = [
    [-1.28 * 1.0, -0.5 * 1.0, -1.28 * 1.0],  # A = +1: 1.5 and 4.0 clipped high; 0.5 keeps its (pessimistic) 0.5
    [-(0.8 * -0.5), -(1.2 * -0.5)],  # A = -0.5: 0.5 clipped low to 0.8; 1.2 inside
    [-(1.25 * 2.0)],  # A = +2: 1.25 inside [0.8, 1.28] (outside [0.72, 1.2]: catches swapped epsilons)
    [-(0.8 * -1.0), -(1.5 * -1.0), -(1.0 * -1.0)],  # A = -1: 0.75 clipped low; 1.5 keeps 1.5 (pessimistic)
]
# sequence level (GSPO): s_i = geometric mean of the completion's token ratios, for each of its tokens
S = [(1.5 * 0.5 * 4.0) ** (1 / 3), (0.5 * 1.2) ** (1 / 2), 1.25, (0.75 * 1.5 * 1.0) ** (1 / 3)]
SEQUENCE_TERMS = [
    [-1.28 * 1.0] * 3,  # s_0 = 3^(1/3) = 1.44 > 1.28 with A > 0: clipped high
    [-(0.8 * -0.5)] * 2,  # s_1 = 0.6^(1/2) = 0.77 < 0.8 with A < 0: clipped low
    [-(1.25 * 2.0)],  # s_2 = 1.25 inside
    [-(S[3] * -1.0)] * 3,  # s_3 = 1.125^(1/3) = 1.04 inside
]
TERMS = {"token": TOKEN_TERMS, "sequence": SEQUENCE_TERMS}
# clipped tokens (low, high) out of 9: token level (1,0), (3,0) low and (0,0), (0,2) high; sequence level
# completion 1 (2 tokens) low and completion 0 (3 tokens) high
CLIPPED = {"token": (2 / 9, 2 / 9), "sequence": (2 / 9, 3 / 9)}
MEAN_RATIO = {"token": (1.5 + 0.5 + 4.0 + 0.5 + 1.2 + 1.25 + 0.75 + 1.5 + 1.0) / 9,
              "sequence": (3 * S[0] + 2 * S[1] + 1 * S[2] + 3 * S[3]) / 9}
KL_TERMS = [[k3(0.5), k3(-0.25), k3(1.0)], [k3(-1.0), k3(0.0)], [k3(2.0)], [k3(0.25), k3(-0.5), k3(0.75)]]


def run(loss_type, importance, beta=0.0, dtype=torch.float64, **kw):
    logp, old, ref, adv, mask = tensors(dtype)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type, importance=importance,
                              epsilon=EPS, epsilon_high=EPS_HIGH, beta=beta, max_completion_length=L_MAX,
                              num_items_in_batch=torch.tensor(float(GLOBAL_TOKENS)), **kw)
    return logp, loss, metrics


@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_loss_equals_the_hand_computed_value_with_clipping_on_both_sides(loss_type, importance):
    _, loss, metrics = run(loss_type, importance)
    expected = by_hand(TERMS[importance], loss_type)
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert metrics["policy_loss"].item() == pytest.approx(expected, abs=TOL)
    low, high = CLIPPED[importance]
    assert metrics["clip_low"].item() == pytest.approx(low, abs=TOL)
    assert metrics["clip_high"].item() == pytest.approx(high, abs=TOL)
    assert metrics["clip"].item() == pytest.approx(low + high, abs=TOL)
    assert metrics["ratio"].item() == pytest.approx(MEAN_RATIO[importance], abs=TOL)
    assert metrics["tokens"].item() == 9 and metrics["sequences"].item() == 4


@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_kl_penalty_adds_beta_times_k3(loss_type, importance):
    beta = 0.04
    _, loss, metrics = run(loss_type, importance, beta=beta)
    rows = [[p + beta * k for p, k in zip(pr, kr)] for pr, kr in zip(TERMS[importance], KL_TERMS)]
    assert loss.item() == pytest.approx(by_hand(rows, loss_type), abs=TOL)
    assert metrics["policy_loss"].item() == pytest.approx(by_hand(TERMS[importance], loss_type), abs=TOL)
    assert metrics["kl"].item() == pytest.approx(sum(sum(r) for r in KL_TERMS) / 9, abs=TOL)


# d loss / d logp per masked token, c_i = the loss type's weight of one token of completion i
WEIGHT = {"grpo": [1 / (4 * 3), 1 / (4 * 2), 1 / (4 * 1), 1 / (4 * 3)], "bnpo": [1 / 9] * 4,
          "dapo": [1 / GLOBAL_TOKENS] * 4, "dr_grpo": [1 / (4 * L_MAX)] * 4}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_gradient_off_policy_is_zero_where_clipped(loss_type):
    c = WEIGHT[loss_type]
    # token level: -c_i A_i w_t on unclipped tokens, 0 on clipped ones; plus beta c_i (1 - exp(ref - logp))
    beta = 0.04
    logp, loss, _ = run(loss_type, "token", beta=beta)
    loss.backward()
    policy = [[0.0, -c[0] * 1.0 * 0.5, 0.0], [0.0, -c[1] * -0.5 * 1.2, 0.0], [-c[2] * 2.0 * 1.25, 0.0, 0.0],
              [0.0, -c[3] * -1.0 * 1.5, -c[3] * -1.0 * 1.0]]
    kl = [[beta * c[i] * (1 - math.exp(d)) if MASK[i][t] else 0.0 for t, d in enumerate(row)]
          for i, row in enumerate(REF_MINUS_LOGP)]
    expected = torch.tensor(policy, dtype=torch.float64) + torch.tensor(kl, dtype=torch.float64)
    assert torch.allclose(logp.grad, expected, rtol=0, atol=TOL)
    # sequence level, GSPO's gradient: s_i A_i / T_i sum_t grad logp_t per completion, weighted c_i T_i: the
    # clipped completions 0 and 1 get none
    logp, loss, _ = run(loss_type, "sequence")
    loss.backward()
    expected = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-c[2] * 2.0 * S[2], 0.0, 0.0], [-c[3] * -1.0 * S[3]] * 3]
    assert torch.allclose(logp.grad, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_step_one_ratio_is_one_nothing_clipped_kl_zero_and_the_gradient_is_reinforce(loss_type, importance, dtype):
    g = torch.Generator().manual_seed(0)
    logp = (-5 * torch.rand(4, 3, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    adv = torch.tensor(ADV, dtype=dtype)
    mask = torch.tensor(MASK, dtype=torch.bool)
    old, ref = logp.detach(), logp.detach().clone()  # num_iterations 1; the reference equals the policy
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type, importance=importance, epsilon=EPS,
                              epsilon_high=EPS_HIGH, beta=0.1, max_completion_length=L_MAX,
                              num_items_in_batch=GLOBAL_TOKENS)
    assert abs(metrics["ratio"].item() - 1) <= 1e-6
    assert metrics["clip"].item() == 0 and metrics["clip_low"].item() == 0 and metrics["clip_high"].item() == 0
    assert metrics["kl"].item() == 0
    # l_t = -A_i at w = 1: the loss is the weighted sum of -A_i over tokens, its gradient -c_i A_i per token
    c, n = WEIGHT[loss_type], [3, 2, 1, 3]
    u = U32 if dtype == torch.float32 else U64
    expected_loss = sum(-c[i] * ADV[i] * n[i] for i in range(4))
    assert loss.item() == pytest.approx(expected_loss, abs=gamma(20, u) * 4)
    loss.backward()
    expected = torch.tensor([[-c[i] * ADV[i] * MASK[i][t] for t in range(3)] for i in range(4)], dtype=torch.float64)
    assert torch.allclose(logp.grad.double(), expected, rtol=0, atol=gamma(10, u))


def test_padding_is_never_read_and_dapo_adds_up_over_micro_batches():
    logp, loss, _ = run("dapo", "token", beta=0.04)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert (logp.grad[~torch.tensor(MASK, dtype=torch.bool)] == 0).all()
    # dapo normalises by the global token count: two micro-batches' losses sum to the whole batch's
    logp, old, ref, adv, mask = tensors()
    kw = dict(loss_type="dapo", epsilon=EPS, epsilon_high=EPS_HIGH, num_items_in_batch=9)
    whole, _ = grpo_loss(logp, old, None, adv, mask, **kw)
    parts = [grpo_loss(logp[s], old[s], None, adv[s], mask[s], **kw)[0] for s in (slice(0, 2), slice(2, 4))]
    assert whole.item() == pytest.approx(by_hand(TOKEN_TERMS, "bnpo"), abs=TOL)
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=TOL)


def test_entropy_is_the_masked_mean_and_bad_calls_are_refused():
    logp, old, _, adv, mask = tensors()
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN], [6.0, NAN, NAN], [7.0, 8.0, 9.0]], dtype=torch.float64)
    _, metrics = grpo_loss(logp, old, None, adv, mask, loss_type="bnpo", entropy=ent)
    assert metrics["entropy"].item() == pytest.approx((1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9) / 9, abs=TOL)
    assert "kl" not in metrics
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(logp, old, None, adv, mask, loss_type="dapo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, loss_type="bnpo", beta=0.1)
    with pytest.raises(ValueError, match="importance"):
        grpo_loss(logp, old, None, adv, mask, loss_type="bnpo", importance="seq")


REWARDS = [[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]]  # P = 3 prompts, G = 4


def test_advantages_by_hand():
    r = torch.tensor(REWARDS, dtype=torch.float64)
    # group means 0.5, 2, 0.75; sample stds: sqrt(4 * 0.25 / 3), 0, sqrt((3 * 0.75^2 + 2.25^2) / 3) = 1.5
    sd0, sd2 = math.sqrt(1 / 3), 1.5
    group = [[0.5 / (sd0 + 1e-4), -0.5 / (sd0 + 1e-4), -0.5 / (sd0 + 1e-4), 0.5 / (sd0 + 1e-4)],
             [0.0] * 4,  # zero spread: 0 / (0 + 1e-4)
             [-0.75 / (sd2 + 1e-4)] * 3 + [2.25 / (sd2 + 1e-4)]]
    # batch: the sample std of all 12 rewards: sum 13, sum of squares 27, var = (27 - 13^2 / 12) / 11 = 155 / 132
    sdb = math.sqrt(155 / 132)
    none = [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.75, -0.75, -0.75, 2.25]]
    batch = [[x / (sdb + 1e-4) for x in row] for row in none]
    for scale, expected in (("group", group), ("batch", batch), ("none", none)):
        got = advantages(r, scale)
        assert got.shape == (3, 4)
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=TOL), scale
        flat = advantages(r.flatten(), scale, num_generations=4)  # [P * G], group by group
        assert torch.equal(flat, got)
    assert zero_spread_share(r).item() == pytest.approx(1 / 3, abs=TOL)
    assert zero_spread_share(r.flatten(), num_generations=4).item() == pytest.approx(1 / 3, abs=TOL)
    with pytest.raises(ValueError, match="num_generations"):
        advantages(r.flatten(), "group", num_generations=5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_one_generation_per_prompt_is_refused_in_one_line(scale):
    with pytest.raises(UserError) as e:
        check_group_size(1, scale, "dapo")
    msg = str(e.value)
    assert msg.startswith("train.grpo.num_generations: 1 ") and "group-normalised" in msg and "\n" not in msg
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UserError, match="^train.grpo.num_generations: "):
            check_group_size(bad, scale, "dapo")
    check_group_size(2, scale, "grpo")
    with pytest.raises(UserError, match="^train.grpo.loss_type: "):
        check_group_size(8, scale, "ppo")
    with pytest.raises(UserError, match="^train.grpo.scale_rewards: "):
        check_group_size(8, "std", "dapo")
