"""The recipe's `train.grpo` section (train.objective: grpo): how completions are sampled, scored and turned
into the loss. The formulas are in train/grpo_loss.py, the rewards in train/rewards.py. Imports no torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from typing_extensions import Self

from ..config_base import ConfigModel, Number, NumberOrInf, invalid
from .rewards import RewardConfig


class GrpoConfig(ConfigModel):
    """GRPO and its variants (train/grpo_loss.py has the formulas and papers)."""

    section: ClassVar[str] = "train.grpo"

    num_generations: int = Field(8, ge=2, description=(
        "G: completions sampled per prompt; advantages compare them within their group"))
    max_new_tokens: int = Field(64, gt=0, description="most tokens a completion may have")
    temperature: Number = Field(1.0, ge=0, description=(
        "sampling temperature of the rollouts; > 0 in training (a greedy group is one completion N times, which "
        "teaches nothing), 0 = greedy in eval --rewards"))
    top_p: Number = Field(1.0, gt=0, le=1, description="nucleus sampling of the rollouts (1 = off)")
    stop: list[str] = Field(default_factory=lambda: ["\n\n"], description=(
        "strings that end a completion (kept in it), besides the end-of-text token; the World chat format ends "
        "a reply with a blank line"))
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field("dapo", description=(
        "how token losses are averaged: grpo per sequence then over sequences, bnpo over the micro-batch's "
        "tokens, dapo over the step's tokens, dr_grpo by N x max_new_tokens"))
    importance: Literal["token", "sequence"] = Field("token", description=(
        "importance ratio per token (PPO/GRPO) or per sequence (GSPO)"))
    epsilon: Number = Field(0.2, gt=0, lt=1, description="PPO clip: the ratio is clipped at 1 - epsilon")
    epsilon_high: NumberOrInf | None = Field(None, gt=0, description=(
        "upper clip 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); null: epsilon; .inf: no upper clip"))
    num_iterations: int = Field(1, gt=0, description=(
        "optimizer steps per batch of rollouts (mu); more than 1 reuses the rollouts with importance ratios"))
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description=(
        "advantage = reward - group mean, divided by the group's std, the batch's std, or nothing (Dr. GRPO)"))
    beta: Number = Field(0.0, ge=0, description=(
        "weight of the KL to the reference (the method switched off; k3 estimator); 0 runs no reference pass"))
    mask_truncated: bool = Field(False, description="completions cut at max_new_tokens get no loss")
    rewards: list[RewardConfig] = Field(default_factory=list, description=(
        "the rewards, each {fn: NAME, weight: 1.0, ...its keys}: built-ins exact, numeric, regex, json, length, "
        "format, repetition, or module:function / path.py:function (`rwkv-peft eval --rewards` scores them)"))
    pass_threshold: Number = Field(1.0, description=(
        "a completion passes (pass@k in evaluation) when its total reward is at least this"))
    eval_samples: int = Field(1, gt=0, description=(
        "completions per held-out prompt in evaluation: 1 = greedy; k > 1 sampled at the rollout temperature, "
        "pass@1 and pass@k by the unbiased estimator"))

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for i, stop in enumerate(self.stop):
            if not stop:
                raise invalid("{key}: the empty string would end every completion before its first token; give "
                              "non-empty strings, or [] for none", f"stop[{i}]")
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise invalid(f"{{key}} {self.epsilon_high} is below epsilon {self.epsilon}; clip-higher raises the upper "
                          "clip", "epsilon_high")
        return self

    def rewards_from(self, recipe: str | os.PathLike) -> GrpoConfig:
        """These settings with each relative `path.py:function` reward made absolute against the directory of
        `recipe`, the file they were read from (as documented: a run's recipe.yaml then loads the same file)."""
        return self.model_copy(update={"rewards": [r.absolute(Path(recipe).parent) for r in self.rewards]})
