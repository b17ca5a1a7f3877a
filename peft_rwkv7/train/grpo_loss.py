"""GRPO-family policy losses as pure functions of rewards and per-token log-probabilities.

A rollout batch holds P prompts with G sampled completions each (a group), N = P * G rows laid out group by
group: row p * G + g is completion g of prompt p (the layout of `repeat_interleave(G)`). Completion i has one
scalar reward r_i and T_i tokens o_{i,1..T_i}; the trainer's forward gives the per-token log-probs
log pi_theta(o_{i,t} | q, o_{i,<t}) as [N, T] (padded to T, `mask` 1 on the tokens that get loss), the rollout's
policy pi_old gives `old_logp` (with one update per rollout batch, num_iterations = 1, that is `logp.detach()`)
and the reference policy pi_ref gives `ref_logp`. These definitions follow TRL's GRPOTrainer
(`trl/trainer/grpo_trainer.py`, `_generate_and_score_completions` and `_compute_loss`; its GRPOConfig documents
`scale_rewards`, `loss_type`, `importance_sampling_level`).

Advantages, one per completion and the same for each of its tokens (`advantages`):
- scale "group" (GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models", arXiv:2402.03300, sec. 4.1.2):  A_i = (r_i - mean_g(r)) / (std_g(r) + eps),
  mean and std over the G completions of i's group.
- scale "batch" (mean from the group, std over the whole batch: Liu et al. 2025, "Part I: Tricks or Traps? A
  Deep Dive into RL for LLM Reasoning" (Lite PPO), arXiv:2508.08221; TRL's scale_rewards="batch"):
      A_i = (r_i - mean_g(r)) / (std_batch(r) + eps),   std over all P * G rewards.
- scale "none" (Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
  arXiv:2503.20783, which shows dividing by std_g weights prompts by their difficulty):  A_i = r_i - mean_g(r).
  std is the sample standard deviation (Bessel's n - 1) and eps = 1e-4, as TRL has them. A group whose G rewards
  are all equal has A = 0 for every completion: it teaches nothing (`zero_spread_share` logs their share).
  Every scale subtracts the group mean, so G = 1 gives A = 0 always (`check_group_size` refuses it).

Importance ratio of token t of completion i:
- token level (GRPO; PPO's ratio, Schulman et al. 2017, arXiv:1707.06347):
      w_{i,t} = pi_theta(o_{i,t}) / pi_old(o_{i,t}) = exp(logp_{i,t} - old_logp_{i,t}).
- sequence level (GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071):
      s_i = (pi_theta(o_i) / pi_old(o_i))^(1 / T_i) = exp(1/T_i sum_t (logp_{i,t} - old_logp_{i,t})),
  used for every token in the paper's GSPO-token form (sg = stop-gradient, TRL's "sequence_token"):
      w_{i,t} = sg[s_i] * pi_theta(o_{i,t}) / sg[pi_theta(o_{i,t})] = exp(sg[log s_i] + logp_{i,t} - sg[logp_{i,t}]).
  Its value is s_i; its gradient is sg[s_i] grad logp_{i,t}. With one advantage per completion this is GSPO's own
  gradient, s_i A_i / T_i sum_t grad logp_{i,t}, under every aggregation below (all weigh a completion's tokens
  alike), while a clipped completion still loses all of its gradient.

Per-token loss, the PPO clipped surrogate with DAPO's asymmetric "clip-higher" bounds (Yu et al. 2025, "DAPO: An
Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476), plus the KL penalty to the
reference with Schulman's k3 estimator (http://joschu.net/blog/kl-approx.html; DeepSeekMath sec. 4.1.1),
which is >= 0 and 0 exactly where logp = ref_logp:
      l_{i,t} = -min(w_{i,t} A_i, clip(w_{i,t}, 1 - epsilon, 1 + epsilon_high) A_i) + beta * k3_{i,t},
      k3_{i,t} = exp(ref_logp_{i,t} - logp_{i,t}) - (ref_logp_{i,t} - logp_{i,t}) - 1.
The clip is active (and the token's policy gradient 0) where w < 1 - epsilon with A < 0 ("low") or
w > 1 + epsilon_high with A > 0 ("high"); the other sides keep the unclipped, pessimistic term.
At step 1 of a rollout batch w = 1 exactly, nothing is clipped and grad l_{i,t} = -A_i grad logp_{i,t}: the
REINFORCE gradient with a group baseline.

Aggregation over the masked tokens, T_i = sum_t mask_{i,t} (`loss_type`):
- grpo (Shao et al. 2024):      L = 1/N sum_i 1/T_i sum_t l_{i,t}  (mean per completion, then over completions)
- bnpo:                          L = sum_{i,t} l_{i,t} / sum_i T_i   (tokens of this micro-batch)
- dapo (Yu et al. 2025):  L = sum_{i,t} l_{i,t} / T_global, T_global = `num_items_in_batch`, the masked
  tokens of the whole global batch (every micro-batch of every process of the optimizer step). The sums of
  this loss over the micro-batches and processes then add up to the global batch's token mean, however the batch
  is split (TRL divides T_global by the process count because DDP averages the processes' gradients).
- dr_grpo (Liu et al. 2025):      L = sum_{i,t} l_{i,t} / (N * L_max), L_max = `max_completion_length`.
grpo, bnpo and dr_grpo are means over this micro-batch: the caller averages them over micro-batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peft_rwkv7.errors import UserError

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
IMPORTANCE_LEVELS = ("token", "sequence")
REWARD_SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the reward std before dividing (TRL's value): a zero-spread group gets A = 0, not 0/0


def check_group_size(num_generations: int, scale: str, loss_type: str) -> None:
    """Refuse a group size, reward scale or loss type the losses cannot use (UserError, one line).

    Every reward scale subtracts the group's mean reward, so a group of one completion has advantage 0 whatever
    its reward: G = 1 trains nothing (only the KL term would move the policy)."""
    if scale not in REWARD_SCALES:
        raise UserError(f"train.grpo.scale_rewards: {scale!r} is not one of {', '.join(REWARD_SCALES)}")
    if loss_type not in LOSS_TYPES:
        raise UserError(f"train.grpo.loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise UserError(f"train.grpo.num_generations: {num_generations!r} is not a whole number >= 2")
    if num_generations == 1:
        what = "divided by the group's reward std" if scale == "group" else f"scale_rewards {scale}"
        raise UserError(
            f"train.grpo.num_generations: 1 leaves nothing to compare: advantages are group-normalised (reward minus "
            f"the mean of its prompt's completions, {what}), so one completion per prompt gets advantage 0 and "
            f"loss_type {loss_type} learns nothing; use 2 or more (8 is usual)")


def _grouped(rewards: Tensor, num_generations: int | None) -> Tensor:
    if rewards.dim() == 2:
        if num_generations is not None and num_generations != rewards.shape[1]:
            raise ValueError(f"rewards are [P, G] = {list(rewards.shape)} but num_generations is {num_generations}")
        return rewards
    if rewards.dim() != 1 or num_generations is None or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be [P, G], or [P * G] with num_generations G dividing it; got "
                         f"{list(rewards.shape)} with num_generations {num_generations}")
    return rewards.view(-1, num_generations)


def advantages(rewards: Tensor, scale: str = "group", eps: float = STD_EPS,
               num_generations: int | None = None) -> Tensor:
    """Group-relative advantages [P, G] of rewards [P, G] (or [P * G], group by group, with `num_generations`).

    A = (r - mean_group(r)) / (std + eps) with std the sample std of the group ("group") or of the whole batch
    ("batch"), or A = r - mean_group(r) ("none"); see the module docstring for the papers. Needs G >= 2 (group)
    and P * G >= 2 (batch): `check_group_size` refuses G = 1 beforehand."""
    r = _grouped(rewards, num_generations)
    if scale not in REWARD_SCALES:
        raise ValueError(f"unknown reward scale {scale!r}; expected one of {REWARD_SCALES}")
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    std = r.std(dim=1, keepdim=True) if scale == "group" else r.std()  # torch.std: Bessel's n - 1
    return centred / (std + eps)


def zero_spread_share(rewards: Tensor, num_generations: int | None = None) -> Tensor:
    """Share (0-d tensor in [0, 1]) of groups whose rewards are all equal (std within 1e-8 of 0, as TRL tests):
    their advantages are 0 under every scale, so they add nothing to the policy gradient."""
    r = _grouped(rewards, num_generations)
    std = r.std(dim=1) if r.shape[1] > 1 else torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    return torch.isclose(std, torch.zeros_like(std)).to(r.dtype).mean()


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, adv: Tensor, mask: Tensor, *,
              loss_type: str = "dapo", importance: str = "token", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, max_completion_length: int | None = None,
              num_items_in_batch: Tensor | float | None = None, entropy: Tensor | None = None,
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO-family loss of one micro-batch (see the module docstring for every formula).

    logp [N, T]: the trainer's per-token log-probs of the completion tokens (carries the gradient);
    old_logp [N, T]: the rollout policy's (detached; `logp.detach()` when num_iterations = 1);
    ref_logp [N, T] or None: the reference policy's (needed when beta > 0; when given with beta = 0 the KL is
    only logged); adv [N]: one advantage per completion; mask [N, T] (bool or 0/1): the tokens that get loss;
    epsilon / epsilon_high: the clip range [1 - epsilon, 1 + epsilon_high] (epsilon_high None: = epsilon);
    max_completion_length: dr_grpo's constant L_max; num_items_in_batch: dapo's global count of masked tokens;
    entropy [N, T] or None: per-token entropies, only logged.
    Values at masked-off positions are never read (they may be NaN). Computes in at least float32.

    Returns (loss 0-d, metrics) with detached 0-d metrics: "policy_loss" (the loss without the KL term),
    "kl" (mean k3 over masked tokens; with ref_logp), "ratio" (mean w), "clip_low", "clip_high", "clip"
    (shares of masked tokens with the clip active, see the module docstring), "entropy" (with entropy),
    "tokens" (masked tokens) and "sequences" (N)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if importance not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance level {importance!r}; expected one of {IMPORTANCE_LEVELS}")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape or adv.shape != logp.shape[:1]:
        raise ValueError(f"expected logp, old_logp, mask [N, T] and adv [N]; got {list(logp.shape)}, "
                         f"{list(old_logp.shape)}, {list(mask.shape)}, {list(adv.shape)}")
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs the reference policy's log-probs (ref_logp)")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type dr_grpo needs max_completion_length (its constant normaliser)")
    if loss_type == "dapo" and num_items_in_batch is None:
        raise ValueError("loss_type dapo needs num_items_in_batch (masked tokens in the global batch)")
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)

    dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.bool()
    mf = m.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # Masked-off positions are replaced by 0 before any exp, so padding (even NaN or inf) neither shows in a sum
    # nor turns a zero gradient into 0 * inf = NaN on the way back.
    lp = torch.where(m, logp.to(dtype), zero)
    log_ratio = torch.where(m, lp - old_logp.to(dtype), zero)
    tokens_per_row = mf.sum(dim=1)
    if importance == "token":
        log_w = log_ratio
    else:  # GSPO-token: value log s_i, gradient that of logp_{i,t}
        log_s = log_ratio.sum(dim=1) / tokens_per_row.clamp(min=1)
        log_w = log_s.detach()[:, None] + lp - lp.detach()
    w = torch.exp(log_w)
    a = adv.to(dtype)[:, None]
    policy = -torch.minimum(w * a, torch.clamp(w, 1 - eps_low, 1 + eps_high) * a)

    kl = None
    if ref_logp is not None:
        d = torch.where(m, ref_logp.to(dtype), zero) - lp
        kl = torch.exp(d) - d - 1
    per_token = policy + beta * kl if beta else policy

    def aggregate(x: Tensor) -> Tensor:
        x = x * mf
        if loss_type == "grpo":
            return (x.sum(dim=1) / tokens_per_row.clamp(min=1)).mean()
        if loss_type == "bnpo":
            return x.sum() / tokens_per_row.sum().clamp(min=1)
        if loss_type == "dapo":
            return x.sum() / torch.as_tensor(num_items_in_batch, dtype=dtype, device=x.device).clamp(min=1)
        return x.sum() / (x.shape[0] * max_completion_length)  # dr_grpo

    loss = aggregate(per_token)
    n_tok = tokens_per_row.sum()

    def token_mean(x: Tensor) -> Tensor:
        return (x.detach().to(dtype) * mf).sum() / n_tok.clamp(min=1)

    with torch.no_grad():
        low = ((w < 1 - eps_low) & (a < 0)).to(dtype)
        high = ((w > 1 + eps_high) & (a > 0)).to(dtype)
        metrics = {
            "policy_loss": aggregate(policy.detach()),
            "ratio": token_mean(w),
            "clip_low": token_mean(low),
            "clip_high": token_mean(high),
            "clip": token_mean(low + high),
            "tokens": n_tok,
            "sequences": torch.tensor(float(logp.shape[0]), dtype=dtype, device=logp.device),
        }
        if kl is not None:
            metrics["kl"] = token_mean(kl)
        if entropy is not None:
            metrics["entropy"] = token_mean(torch.where(m, entropy.to(dtype), zero))
    return loss, metrics


__all__ = ["LOSS_TYPES", "IMPORTANCE_LEVELS", "REWARD_SCALES", "STD_EPS", "check_group_size", "advantages",
           "zero_spread_share", "grpo_loss"]
