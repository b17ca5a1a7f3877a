"""The method's start in a training run: `attach` with what only the run knows, its optimizer steps (AdaLoRA's
rank budget schedule) and its data (EVA's start, from the first training batches)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from ..adapters import attach
from . import adalora


def eva_batches(data, micro_bsz: int) -> Iterator[torch.Tensor]:
    """Token ids [micro_bsz, T] of the run's samples 0, 1, 2, ... in the order the run reads them (`data.batch`
    of step i as one process with grad_accum 1 reads it), without end: `collect_inputs` stops drawing once every
    layer has method.eva_tokens rows. The samples are a pure function of their index (no RNG is drawn), so the
    run reads the same batches whether it starts with EVA or not, and the start does not depend on how a step
    is split into micro-batches and processes."""
    for i in itertools.count():
        yield data.batch(i, 0, micro_bsz, 1)[0]


def attach_for_run(base, recipe, data, resume: bool, device=None):
    """`attach(base, recipe.method)` for a run: AdaLoRA gets train.max_steps, EVA the run's first batches.

    On --resume EVA's pass over the data is skipped (batches=(), as for loading a saved adapter): the
    checkpoint restores the trained lora_A and the RNG state."""
    method = recipe.method
    adalora.check_run(method, recipe.train)
    if method.kind == "lora" and method.init == "eva":
        return attach(base, method, batches=() if resume else eva_batches(data, recipe.train.micro_bsz), device=device)
    return attach(base, method, total_steps=recipe.train.max_steps if method.kind == "adalora" else None,
                  device=device)
