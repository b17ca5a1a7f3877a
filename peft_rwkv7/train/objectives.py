"""Preference objectives as pure functions of per-sequence log-probabilities.

For a pair (x, y_w, y_l) — prompt, chosen (preferred) and rejected response — the inputs are, per pair,
`log pi(y | x) = sum_t log pi(y_t | x, y_<t)` over the response tokens and the end-of-text after them
(`losses.sequence_logps`), their token counts |y|, and for DPO the same log-probs under the reference
policy. Each function returns per-pair losses and implicit rewards r_w, r_l; the training step takes
the mean of the losses over every pair of the global batch. Logged: the reward margin r_w - r_l and
the reward accuracy, the share of pairs with r_w > r_l (a tie counts one half: at the start of DPO
every reward is 0 and the accuracy is 0.5, a coin flip).

- DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
  Reward Model", arXiv:2305.18290):
      r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)),   L = -log sigmoid(r_w - r_l).
  At the start pi = pi_ref, so L = ln 2 exactly.
- ORPO (Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
  arXiv:2403.07691): with the length-normalised likelihood P(y|x) = exp(log pi(y|x) / |y|) and
  odds(y|x) = P / (1 - P),
      L = L_SFT + lambda * L_OR,   L_SFT = -log pi(y_w|x) / |y_w|,
      L_OR = -log sigmoid(log odds(y_w|x) - log odds(y_l|x));
  r(x, y) = log odds(y|x), so the margin is the log odds ratio.
- SimPO (Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
  arXiv:2405.14734):
      r(x, y) = beta / |y| * log pi(y|x)   (beta * log pi(y|x) without length normalisation),
      L = -log sigmoid(r_w - r_l - gamma).
- An NLL term on the chosen response (`nll_weight` alpha, for DPO and SimPO; RPO: Pang et al. 2024,
  "Iterative Reasoning Preference Optimization", arXiv:2404.19733; also Llama 3's DPO):
      L + alpha * (-log pi(y_w|x) / |y_w|).
  The pure objectives only move the policy relative to the reference / the rejected response: on
  separable pairs they can be won by pushing the rejected answers down while the chosen ones stay
  unlikely, which leaves what the model generates unchanged. The NLL term also raises the chosen
  answers themselves (ORPO has it built in, with weight 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.0}
# ORPO's log odds need P(y|x) < 1: the mean token log-prob is kept below this (P < 1 - 1e-6).
_MAX_MEAN_LOGP = -1e-6


@dataclass
class PairTerms:
    """Per-pair tensors [B]: the loss and the implicit rewards of the chosen and the rejected response."""

    loss: Tensor
    chosen_reward: Tensor
    rejected_reward: Tensor

    @property
    def margin(self) -> Tensor:
        return self.chosen_reward - self.rejected_reward

    @property
    def correct(self) -> Tensor:
        """1 where r_w > r_l, 0.5 on a tie, 0 otherwise."""
        m = self.margin.detach()
        return (m > 0).float() + 0.5 * (m == 0).float()


def dpo(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float = 0.1) -> PairTerms:
    """DPO: r = beta (log pi - log pi_ref), L = -log sigmoid(r_w - r_l) (see the module docstring)."""
    r_w, r_l = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return PairTerms(-F.logsigmoid(r_w - r_l), r_w, r_l)


def log_odds(mean_logp: Tensor) -> Tensor:
    """log(P / (1 - P)) for log P = mean_logp (< 0): mean_logp - log(1 - exp(mean_logp)), computed as
    log(-expm1(.)) to stay accurate where P is small or close to 1."""
    a = mean_logp.clamp(max=_MAX_MEAN_LOGP)
    return a - torch.log(-torch.expm1(a))


def orpo(chosen: Tensor, rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor,
         lam: float = 0.1) -> PairTerms:
    """ORPO: L = -log pi(y_w|x)/|y_w| + lambda * -log sigmoid(log odds ratio) (see the module docstring)."""
    mean_w, mean_l = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
    r_w, r_l = log_odds(mean_w), log_odds(mean_l)
    return PairTerms(-mean_w - lam * F.logsigmoid(r_w - r_l), r_w, r_l)


def simpo(chosen: Tensor, rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor, beta: float = 2.0,
          gamma: float = 1.0, length_norm: bool = True) -> PairTerms:
    """SimPO: r = beta / |y| log pi(y|x), L = -log sigmoid(r_w - r_l - gamma) (see the module docstring)."""
    if length_norm:
        r_w, r_l = beta * chosen / chosen_tokens.clamp(min=1), beta * rejected / rejected_tokens.clamp(min=1)
    else:
        r_w, r_l = beta * chosen, beta * rejected
    return PairTerms(-F.logsigmoid(r_w - r_l - gamma), r_w, r_l)


@dataclass(frozen=True)
class Objective:
    """A preference objective with its parameters, applied to one micro-batch's per-sequence log-probs."""

    name: str
    beta: float
    lam: float = 0.1
    gamma: float = 1.0
    length_norm: bool = True
    nll_weight: float = 0.0

    @classmethod
    def from_config(cls, tc) -> Objective:
        """From the recipe's train section (objective, beta (None: the objective's default), lambda, gamma,
        length_norm, nll_weight)."""
        beta = DEFAULT_BETA[tc.objective] if tc.beta is None else float(tc.beta)
        return cls(tc.objective, beta, float(getattr(tc, "lambda")), float(tc.gamma), bool(tc.length_norm),
                   float(tc.nll_weight))

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"

    def __call__(self, chosen: Tensor, rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor,
                 ref_chosen: Tensor | None = None, ref_rejected: Tensor | None = None) -> PairTerms:
        if self.name == "dpo":
            if ref_chosen is None or ref_rejected is None:
                raise ValueError("dpo needs the reference policy's log-probs")
            terms = dpo(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        elif self.name == "orpo":
            return orpo(chosen, rejected, chosen_tokens, rejected_tokens, self.lam)
        elif self.name == "simpo":
            terms = simpo(chosen, rejected, chosen_tokens, rejected_tokens, self.beta, self.gamma, self.length_norm)
        else:
            raise ValueError(f"unknown preference objective {self.name!r}")
        if self.nll_weight:
            terms.loss = terms.loss - self.nll_weight * chosen / chosen_tokens.clamp(min=1)
        return terms


__all__ = ["PREFERENCE_OBJECTIVES", "DEFAULT_BETA", "PairTerms", "Objective", "dpo", "orpo", "simpo", "log_odds"]
