"""Multi-process training through DeepSpeed's ZeRO engine.

Launch with `deepspeed` or `torchrun`; they pass rank and world size to every process through
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (the launcher protocol). Only rank 0
writes files; each rank reads its own samples (data.TrainData.batch shards by rank).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import UserError
from .recipe import Recipe


def launcher_dist(recipe: Recipe):
    """Rank and world size from the launcher, initialising torch.distributed when the recipe asks
    for DeepSpeed; a single process otherwise."""
    from .loop import Dist

    if not recipe.train.deepspeed.stage:
        return Dist()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("train.deepspeed is on: launch with `deepspeed` or `torchrun` (RANK/WORLD_SIZE not set)")
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() and recipe.train.device != "cpu" else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size())


def deepspeed_engine(model, optimizer, recipe: Recipe, device: torch.device):
    """Wrap model + our AdamW in a DeepSpeed engine (ZeRO stage/offload from the recipe)."""
    import deepspeed

    tc = recipe.train
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    config = {
        "train_micro_batch_size_per_gpu": tc.micro_bsz,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": tc.deepspeed.stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": use_bf16 and device.type == "cuda"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if tc.deepspeed.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, ds_optimizer


def gathered(named_params, stage: int):
    """A context in which ZeRO-3's partitioned trainable tensors are whole on every process, for saving
    and restoring them; what rank 0 writes into them is kept on exit. Other stages: nothing to do.
    Every process must enter it (a collective)."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for _, p in named_params], modifier_rank=0)
