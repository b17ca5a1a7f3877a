"""Multi-process training through DeepSpeed's ZeRO engine.

Launch with `deepspeed` or `torchrun`; they pass rank and world size to every process through
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (the launcher protocol). Each rank reads
its own samples (data.TrainData.batch shards by rank) and writes its own shard of a checkpoint
(train.checkpoint); rank 0 alone tokenizes the data and writes the log, adapter and model files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys

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


def deepspeed_config(recipe: Recipe) -> dict:
    """The DeepSpeed config for the recipe: ZeRO stage/offload, batch shape and clipping.

    DeepSpeed's own mixed precision stays off. Its `bf16` mode casts every parameter of the module to
    bf16, the trained ones included (LoRA factors, state, train_parts would then be stored and updated
    in bf16), and its `torch_autocast` mode tags the parameters of nn.Linear modules, LoRA's among them,
    to have their gradients reduced in bf16. The loop already runs each forward under torch.autocast
    (train.precision) and stores the frozen weights in bf16 itself, so the engine sees an fp32-trained
    model: fp32 gradients, fp32 reduction, fp32 AdamW.

    Gradients are averaged over ranks (all-reduce sum x 1 / world_size, no pre-division); the loop's
    world_size / step_tokens scale turns that average into the step's token-mean loss gradient, and
    clipping acts on the averaged gradient, as a single process clips the whole batch's."""
    tc = recipe.train
    config = {
        "train_micro_batch_size_per_gpu": tc.micro_bsz,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": tc.deepspeed.stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if tc.deepspeed.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return config


def deepspeed_engine(model, optimizer, recipe: Recipe):
    """Wrap model + our AdamW in a DeepSpeed engine (see deepspeed_config)."""
    import deepspeed

    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(recipe))
    return engine, ds_optimizer


def micro_backward(engine, part: torch.Tensor, scale: float, step: int) -> None:
    """Backward of one micro-batch's summed loss `part` times `scale` (its share of the step's mean),
    through the DeepSpeed engine when there is one (it counts micro-batches itself and steps at the last);
    a non-finite loss stops the run naming the step."""
    if not torch.isfinite(part):
        raise FloatingPointError(f"step {step + 1}: loss is {part.item()}")
    if engine is not None:
        engine.backward(part * scale, scale_wrt_gas=False)
        engine.step()
    else:
        (part * scale).backward()


def main_first(dist, make, *, what: str):
    """`make(build=True)` on rank 0 while the other ranks wait, then `make(build=False)` on them.

    For work that only one process should do, such as tokenizing the data into the shared cache: the
    others open what rank 0 wrote. `make(build=False)` returning None means the result is not visible
    here (a cache folder on a node-local disk): that rank then builds its own and says so on stderr.
    If rank 0 fails, every rank stops with its error. The wait is on a gloo group without DeepSpeed's
    10-minute collective timeout, since tokenizing a large corpus can take longer."""
    if dist.world_size == 1:
        return make(build=True)
    result, error = None, None
    if dist.is_main:
        try:
            result = make(build=True)
        except Exception as e:  # noqa: BLE001 - reported to the other ranks, then re-raised
            error = e
    group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    message = [None if error is None else f"rank 0 stopped ({what}): {error}"]
    torch.distributed.broadcast_object_list(message, src=0, group=group)
    torch.distributed.destroy_process_group(group)
    if error is not None:
        raise error
    if message[0] is not None:
        raise UserError(message[0])
    if result is None:
        result = make(build=False)
    if result is None:
        print(f"rank {dist.rank}: {what}: rank 0's result is not visible from this process (a folder on a "
              "node-local disk?); doing it again here", file=sys.stderr, flush=True)
        result = make(build=True)
    return result


def gathered(named_params, stage: int):
    """A context in which ZeRO-3's partitioned trainable tensors are whole on every process, to read them
    (the adapter and model files are single files, as in a one-process run). Other stages: nothing to do.
    Every process must enter it (a collective)."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for _, p in named_params], modifier_rank=None)
