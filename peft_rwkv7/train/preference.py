"""Preference tuning inside the training loop: the backward passes of one step, the reference policy,
and the evaluation of held-out pairs. The objectives themselves are pure functions (objectives.py).

A micro-batch holds B pairs as 2B rows (data.preference.PreferenceData.batch: the chosen sides, then the
rejected ones); one forward pass scores both. The loss of a step is the mean of the per-pair losses over
every pair of the global batch, `sum_i L_i / (micro_bsz * grad_accum * world_size)`, however the batch is
split into micro-batches and processes, as the sft loss is one token mean over the whole step.

The reference policy of DPO is no second model: the same network with the method switched off
(`adapters.disable_adapter`: LoRA/DiSHA off, PiSSA at its SVD start, a tuned state back to the base's),
run without gradients. Full fine-tuning and train_parts have no "off": the run keeps a frozen copy made
before the first step (`frozen_reference`), which costs one more copy of the model's weights.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ..adapters import disable_adapter
from ..errors import UserError
from .distributed import micro_backward
from .losses import sequence_logps
from .objectives import Objective, PairTerms

METRICS = ("loss", "reward_margin", "reward_acc", "chosen_logp", "rejected_logp")


def preference_setup(recipe, model) -> tuple[Objective | None, torch.nn.Module | None]:
    """(objective, frozen reference) of a run: (None, None) for sft and grpo; the frozen copy only for DPO with a
    method that cannot be switched off (kind full, train_parts)."""
    if recipe.train.objective in ("sft", "grpo"):
        return None, None
    objective = Objective.from_config(recipe.train)
    copy_needed = objective.needs_reference and needs_frozen_copy(recipe.method)
    return objective, frozen_reference(model) if copy_needed else None


def load_eval_pairs(recipe, data, tokenizer, dist, vocab_size: int):
    """Check that the training data are pairs (data.kind auto may have found another kind) and load the
    held-out pairs of data.eval_path (None without one); rank 0 tokenizes, as for the training data."""
    from ..data import make_dataset
    from .distributed import main_first

    if getattr(data, "kind", None) != "preference":
        raise UserError(f"train.objective: {recipe.train.objective} trains on preference pairs "
                        f"({{prompt, chosen, rejected}}); {recipe.data.path} is not (set data.kind: preference)")
    if not recipe.data.eval_path:
        return None
    cfg = pairs_config(recipe.data, recipe.data.eval_path)
    return main_first(dist, lambda build: make_dataset(cfg, tokenizer, seed=recipe.train.seed, vocab_size=vocab_size,
                                                       progress=False, build=build),
                      what=f"tokenizing {recipe.data.eval_path}")


def pairs_config(data, path):
    """The recipe's data section reading `path` as preference pairs, every pair scored (no held-out part)."""
    return data.model_copy(update={"path": str(path), "eval_path": None, "eval_split": 0.0, "kind": "preference"})


def needs_frozen_copy(method) -> bool:
    """Whether DPO's reference must be a frozen copy: parameters trained in full cannot be switched off."""
    return method.kind == "full" or bool(method.train_parts)


def frozen_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` as it is now (before any step): the reference of full fine-tuning."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def reference_logps(model, reference, idx: torch.Tensor, labels: torch.Tensor, chunk_len: int,
                    precision=contextlib.nullcontext) -> torch.Tensor:
    """log pi_ref(y|x) per row, without gradients: `reference` when given, else `model` with its method off."""
    with torch.no_grad(), precision():
        if reference is not None:
            return sequence_logps(reference, idx, labels, chunk_len)[0]
        with disable_adapter(model):
            return sequence_logps(model, idx, labels, chunk_len)[0]


def pair_terms(objective: Objective, model, reference, idx: torch.Tensor, labels: torch.Tensor, chunk_len: int,
               precision=contextlib.nullcontext) -> tuple[PairTerms, torch.Tensor]:
    """The objective on one micro-batch of pairs: (per-pair terms, policy log-probs [2B])."""
    B = idx.shape[0] // 2
    ref = reference_logps(model, reference, idx, labels, chunk_len, precision) if objective.needs_reference else None
    with precision():
        logps, tokens = sequence_logps(model, idx, labels, chunk_len)
    refs = (ref[:B], ref[B:]) if ref is not None else (None, None)
    return objective(logps[:B], logps[B:], tokens[:B], tokens[B:], *refs), logps


def _sums(terms: PairTerms, logps: torch.Tensor) -> torch.Tensor:
    """Per micro-batch sums of METRICS (float64 [5])."""
    B = logps.shape[0] // 2
    return torch.stack([terms.loss.detach().sum(), terms.margin.detach().sum(), terms.correct.sum(),
                        logps[:B].detach().sum(), logps[B:].detach().sum()]).double().cpu()


def preference_backward(run, step: int, batches) -> dict:
    """The forward and backward passes of one step's micro-batches (this rank's); returns METRICS as means
    over every pair of the global batch. Gradients are scaled so the step's gradient is that of the mean."""
    tc, dist, device = run.recipe.train, run.dist, run.device
    n_pairs = sum(idx.shape[0] // 2 for idx, _ in batches) * dist.world_size
    scale = dist.world_size / n_pairs  # ranks average their gradients (see loop.train_step)
    sums = torch.zeros(len(METRICS), dtype=torch.float64)
    for idx, labels in batches:
        terms, logps = pair_terms(run.objective, run.model, run.reference, idx.to(device), labels.to(device),
                                  tc.chunk_len, run.precision)
        micro_backward(run.engine, terms.loss.sum(), scale, step)
        sums += _sums(terms, logps)
        del terms, logps  # this micro-batch's graph, before the next one's forward (tasks.py: SftTask._micro)
    if dist.world_size > 1:
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
    return dict(zip(METRICS, (sums.cpu() / n_pairs).tolist(), strict=True))


def evaluate_preference(objective: Objective, model, reference, data, micro_bsz: int, chunk_len: int = 0,
                        precision=contextlib.nullcontext) -> dict:
    """METRICS over every pair of `data` (a PreferenceData), as means per pair; the model runs in eval
    mode and is restored. Adds "pairs": how many were scored."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(METRICS), dtype=torch.float64)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for idx, labels in data.in_order(micro_bsz):
                terms, logps = pair_terms(objective, model, reference, idx.to(device), labels.to(device), chunk_len,
                                          precision)
                sums += _sums(terms, logps)
    finally:
        model.train(was_training)
    return {**dict(zip(METRICS, (sums / data.num_docs).tolist(), strict=True)), "pairs": data.num_docs}


def pairs_recipe(recipe_path: str):
    """The Recipe of `eval --pairs RECIPE`, refused in one line unless its objective is dpo, orpo or simpo."""
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path)
    if recipe.train.objective not in ("dpo", "orpo", "simpo"):
        raise UserError(f"--pairs {recipe_path}: train.objective is {recipe.train.objective}; reward accuracy on pairs "
                        "needs a preference recipe (dpo, orpo or simpo: its objective and beta define the reward)")
    return recipe


def eval_pairs(recipe, data_path: str, model, tokenizer, reference=None) -> dict:
    """`rwkv-peft eval --pairs RECIPE --data PAIRS`: METRICS of every pair of `data_path` for `model` (base +
    adapter) under `recipe`'s objective (a Recipe from pairs_recipe: its train.objective, beta, ...; its data
    section renders the pairs), as the trainer's held-out evaluation computes them. DPO's reference is
    `reference` when given (the base model, for methods trained in full) else `model` with its method off."""
    from ..data import make_dataset

    data = make_dataset(pairs_config(recipe.data, data_path), tokenizer, seed=recipe.train.seed, progress=False)
    objective = Objective.from_config(recipe.train)
    return {"objective": objective.name, "beta": objective.beta,
            **evaluate_preference(objective, model, reference, data, recipe.train.micro_bsz, recipe.train.chunk_len)}


__all__ = ["METRICS", "eval_pairs", "pairs_recipe", "pairs_config", "preference_setup", "load_eval_pairs",
           "preference_backward", "evaluate_preference", "pair_terms", "reference_logps", "frozen_reference",
           "needs_frozen_copy"]
