"""What train/grpo_loss.py's tests had left open (mutation testing, `scripts/mutation.sh grpo_loss`): the clip
metrics at their boundaries, counts of a single token, the defaults, groups of one in the zero-spread share, rewards
of the wrong shape and every refusal's words. Expected values are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from peft_rwkv7.errors import UserError
from peft_rwkv7.train.grpo_loss import advantages, check_group_size, grpo_loss, zero_spread_share


def batch(ratios, adv, mask=None, dtype=torch.float64):
    """logp = 0 at every token, old_logp = -log(ratio): w is exactly `ratios` where they are powers of two."""
    r = torch.tensor(ratios, dtype=dtype)
    logp = torch.zeros_like(r, requires_grad=True)
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    return logp, -torch.log(r), torch.tensor(adv, dtype=dtype), m


def test_the_clip_metrics_count_only_strictly_past_the_range():
    """w exactly at 1 - epsilon or 1 + epsilon_high is not clipped; low needs A < 0 and high A > 0 (A = 0: neither)."""
    # rows: A < 0 at w = 0.5 (the low edge) and w = 0.25 (past it); A = 0 at w = 0.25 and 4; A = 0.5 at w = 0.25
    # (past the low edge, but A > 0: not clipped) and A > 0 at w = 2 (the high edge) and w = 4 (past it)
    logp, old, adv, mask = batch([[0.5, 0.25], [0.25, 4.0], [0.25, 0.25], [2.0, 4.0]], [-1.0, 0.0, 0.5, 1.0])
    _, metrics = grpo_loss(logp, old, None, adv, mask, loss_type="bnpo", epsilon=0.5, epsilon_high=1.0)
    assert metrics["clip_low"].item() == 1 / 8  # row 0, token 1 only
    assert metrics["clip_high"].item() == 1 / 8  # row 3, token 1 only
    assert metrics["clip"].item() == 2 / 8
    assert metrics["ratio"].item() == (0.5 + 0.25 + 0.25 + 4 + 0.25 + 0.25 + 2 + 4) / 8


def test_one_masked_token_counts_as_one():
    """bnpo's token count, dapo's global count and the metrics' mean, each 1: the sum itself."""
    logp, old, adv, mask = batch([[2.0, 1.0]], [3.0], mask=[[1, 0]])
    # one token: w = 2, A = 3, clip range [0.8, 1.2] -> -min(6, 1.2 * 3) = -3.6
    for loss_type, extra in (("bnpo", {}), ("dapo", {"num_items_in_batch": 1}), ("grpo", {})):
        loss, metrics = grpo_loss(logp, old, None, adv, mask, loss_type=loss_type, epsilon=0.2, **extra)
        assert loss.item() == pytest.approx(-3.6, rel=1e-15), loss_type
        assert metrics["ratio"].item() == 2.0 and metrics["clip_high"].item() == 1.0
        assert metrics["tokens"].item() == 1 and metrics["sequences"].item() == 1
        assert metrics["sequences"].dtype == torch.float64


def test_the_defaults_are_dapo_with_epsilon_0_2_and_no_kl():
    logp, old, adv, mask = batch([[2.0, 0.5], [1.0, 1.0]], [1.0, -1.0])
    loss, metrics = grpo_loss(logp, old, None, adv, mask, num_items_in_batch=8)
    # tokens: -min(2, 1.2) = -1.2; -min(0.5, 0.8) = -0.5; A = -1 at w = 1: +1, +1 -> (-1.2 - 0.5 + 1 + 1) / 8
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.0) / 8, rel=1e-15)
    assert "kl" not in metrics and "entropy" not in metrics
    with pytest.raises(ValueError, match=r"^loss_type dapo needs num_items_in_batch \(masked tokens in the global "
                                         r"batch\)$"):
        grpo_loss(logp, old, None, adv, mask)


@pytest.mark.parametrize(("change", "message"), [
    ({"old": torch.zeros(2, 3)}, r"^expected logp, old_logp, mask \[N, T\] and adv \[N\]; got \[2, 2\], \[2, 3\], "
                                 r"\[2, 2\], \[2\]$"),
    ({"mask": torch.ones(2, 3, dtype=torch.bool)}, r"got \[2, 2\], \[2, 2\], \[2, 3\], \[2\]$"),
    ({"adv": torch.zeros(3)}, r"got \[2, 2\], \[2, 2\], \[2, 2\], \[3\]$"),
    ({"logp": torch.zeros(2, 2, 1)}, r"got \[2, 2, 1\], "),
], ids=["old", "mask", "adv", "3-d"])
def test_each_shape_is_checked(change, message):
    logp, old, adv, mask = batch([[1.0, 1.0], [1.0, 1.0]], [1.0, -1.0])
    args = {"logp": logp, "old": old, "adv": adv, "mask": mask, **change}
    with pytest.raises(ValueError, match=message):
        grpo_loss(args["logp"], args["old"], None, args["adv"], args["mask"], num_items_in_batch=4)


def test_the_refusals_words():
    logp, old, adv, mask = batch([[1.0]], [1.0])
    with pytest.raises(ValueError, match=r"^unknown loss_type 'ppo'; expected one of \('grpo', 'dr_grpo', 'dapo', "
                                         r"'bnpo'\)$"):
        grpo_loss(logp, old, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match=r"^beta > 0 needs the reference policy's log-probs \(ref_logp\)$"):
        grpo_loss(logp, old, None, adv, mask, beta=0.1, num_items_in_batch=1)
    with pytest.raises(ValueError, match=r"^loss_type dr_grpo needs max_completion_length \(its constant "
                                         r"normaliser\)$"):
        grpo_loss(logp, old, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match=r"^unknown reward scale 'std'; expected one of \('group', 'batch', "
                                         r"'none'\)$"):
        advantages(torch.ones(2, 2), scale="std")
    with pytest.raises(UserError, match=r"^train.grpo.scale_rewards: 'std' is not one of group, batch, none$"):
        check_group_size(4, "std", "grpo")
    with pytest.raises(UserError, match=r"^train.grpo.loss_type: 'ppo' is not one of grpo, dr_grpo, dapo, bnpo$"):
        check_group_size(4, "group", "ppo")


@pytest.mark.parametrize(("scale", "what"), [("group", "divided by the group's reward std"),
                                             ("batch", "scale_rewards batch"), ("none", "scale_rewards none")])
def test_a_group_of_one_says_what_the_scale_does(scale, what):
    with pytest.raises(UserError) as e:
        check_group_size(1, scale, "dapo")
    assert str(e.value) == (
        "train.grpo.num_generations: 1 leaves nothing to compare: advantages are group-normalised (reward minus the "
        f"mean of its prompt's completions, {what}), so one completion per prompt gets advantage 0 and loss_type dapo "
        "learns nothing; use 2 or more (8 is usual)")


def test_the_default_scale_is_the_groups_std():
    r = torch.tensor([[1.0, 3.0], [0.0, 4.0]], dtype=torch.float64)
    # group 0: mean 2, sample std sqrt(2); group 1: mean 2, std sqrt(8)
    want = [[-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)], [-2 / (math.sqrt(8) + 1e-4),
                                                                      2 / (math.sqrt(8) + 1e-4)]]
    assert torch.allclose(advantages(r), torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)


def test_rewards_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"^rewards are \[P, G\] = \[2, 3\] but num_generations is 2$"):
        advantages(torch.ones(2, 3), num_generations=2)
    assert advantages(torch.ones(2, 3), num_generations=3).shape == (2, 3)
    with pytest.raises(ValueError, match=r"^rewards must be \[P, G\], or \[P \* G\] with num_generations G dividing "
                                         r"it; got \[2, 2, 2\] with num_generations 2$"):
        advantages(torch.ones(2, 2, 2), num_generations=2)


def test_the_zero_spread_share_of_groups_of_one_and_two():
    assert zero_spread_share(torch.tensor([[1.0], [2.0], [5.0]])).item() == 1.0  # one completion: no spread
    assert zero_spread_share(torch.tensor([[1.0, 2.0], [3.0, 3.0]])).item() == 0.5
    share = zero_spread_share(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), num_generations=1)
    assert share.item() == 1.0 and share.dtype == torch.float64
