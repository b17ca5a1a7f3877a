"""`rwkv-peft eval --rewards SPEC --data prompts.jsonl [--samples k] [--compare RUN ...]`: mean reward, pass@1
and pass@k of completions of held-out prompts, for the base and each adapter/state, as JSON and a bar plot.

SPEC is a GRPO recipe (its train.grpo section: rewards, sampling, pass_threshold; its data section: how prompts
are rendered) or the rewards list itself in YAML/JSON (`[{fn: numeric, column: answer}]`, sampling at the
train.grpo defaults). Completions are sampled exactly as the training loop's held-out evaluation samples them
(train/grpo.py evaluate_rewards): greedy for one sample, else k at the rollout temperature from a fixed seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..data.config import DataConfig
from ..errors import UserError
from .grpo_config import GrpoConfig
from .schema import from_dict


def reward_spec(spec: str) -> tuple[GrpoConfig, dict]:
    """(the train.grpo settings, the data section's rendering keys) of SPEC (see the module docstring)."""
    if spec.endswith((".yaml", ".yml")) or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise UserError(f"--rewards: no such recipe {spec}")
        try:
            doc = yaml.safe_load(Path(spec).read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--rewards: {spec} is not valid YAML ({str(e).splitlines()[0]})") from None
        if isinstance(doc, list):
            raise UserError(f"--rewards: {spec} holds a list; a rewards list goes on the command line itself "
                            "(--rewards '[{fn: numeric, column: answer}]'), a file must be a GRPO recipe")
        for section in ("train", "data"):
            if isinstance(doc, dict) and not isinstance(doc.get(section) or {}, dict):
                raise UserError(f"--rewards: {spec}: {section} must be a mapping, got {doc[section]!r}")
        grpo = ((doc.get("train") or {}).get("grpo")) if isinstance(doc, dict) else None
        if not isinstance(grpo, dict) or not grpo.get("rewards"):
            raise UserError(f"--rewards: {spec} has no train.grpo.rewards (a GRPO recipe, or give the rewards list)")
        data = {k: v for k, v in (doc.get("data") or {}).items()
                if k in ("prompt_fields", "prompt_template", "system", "messages_field")}
        return from_dict(GrpoConfig, grpo, source=f"{spec}: train.grpo").rewards_from(spec), data
    try:
        rewards = yaml.safe_load(spec)
    except yaml.YAMLError as e:
        raise UserError(f"--rewards: {spec!r} is neither a recipe file nor a YAML list ({str(e).splitlines()[0]})"
                        ) from None
    if not isinstance(rewards, list) or not rewards:
        raise UserError(f"--rewards: {spec!r} is neither a recipe file nor a list of rewards like "
                        "[{fn: numeric, column: answer}]")
    return from_dict(GrpoConfig, {"rewards": rewards}, source="--rewards"), {}


def eval_rewards(spec: str, data_path: str, models: list[tuple[str, object]], tokenizer, samples: int | None,
                 seed: int = 0, device=None, max_prompt_tokens: int = 4096) -> dict:
    """{label: {reward, pass@1, [pass@k], prompts}} for each (label, model). A model may be a function that loads
    it: each is then loaded, scored and let go before the next (one model in memory at a time). `device`: where
    the prompts go, by default the model's own."""
    import torch

    from ..data.prompts import load_prompts
    from .grpo import Scorer, evaluate_rewards

    cfg, data_keys = reward_spec(spec)
    data_cfg = DataConfig(path=data_path, kind="prompts", **data_keys)
    prompts = load_prompts(data_path, data_cfg, tokenizer, seed, max_prompt_tokens)
    scorer = Scorer(cfg, tokenizer, list(prompts.columns[0]), data_path, eval_rows_from="--samples")
    scorer.rewards.check_records(prompts.file_records(), data_path)
    results = {}
    for label, model in models:
        if not isinstance(model, torch.nn.Module):  # a loader
            model = model()
        where = device or next(model.parameters()).device
        results[label] = evaluate_rewards(scorer, model, prompts, seed, where, samples=samples)
        del model  # before the next one loads
    return results


def plot_rewards(results: dict, path: str | os.PathLike) -> None:
    """Bars of mean reward and pass@1 per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    keys = [k for k in ("reward", "pass@1") if all(k in r for r in results.values())]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(labels) * len(keys), 3.2))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        xs = [i + j * width for i in range(len(labels))]
        bars = ax.bar(xs, [results[lab][key] for lab in labels], width, label=key)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(labels))], labels, fontsize=8)
    ax.set_title(f"held-out prompts ({next(iter(results.values()))['prompts']})")
    ax.legend()
    fig.tight_layout()
    tmp = Path(f"{path}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
