"""Multi-process training through DeepSpeed's ZeRO engine, on one machine or several.

Launch with `deepspeed` or `torchrun`; they pass rank and world size to every process through
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (the launcher protocol). Each rank reads
its own samples (data.TrainData.batch shards by rank) and writes its own shard of a checkpoint
(train.checkpoint); global rank 0 alone writes the log, adapter and model files.

Several machines need not share a filesystem. At the start every node's local rank 0 leaves a probe
file in out_dir and in the data cache folder, and every process says whose probes it sees: a folder
all of them see is shared (global rank 0 tokenizes into it, commits checkpoints in it), a folder each
node sees alone is the node's own (its local rank 0 tokenizes the node's cache, commits the node's
checkpoint shards and keeps a copy of the run's recipe.yaml for the resume checks); anything in
between is refused in one line.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..run_dir import RECIPE_FILE
from .recipe import Recipe, dump_recipe

PROBE = ".rwkv-peft-probe"  # out_dir/.rwkv-peft-probe-{token}-{rank}, for the moment of the check


@dataclass
class Dist:
    """Where this process stands in a multi-process run (rank 0 of 1 when single), and which of its
    folders the other processes see (see the module docstring)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    shared_out_dir: bool = True  # False: each node has its own out_dir (its own checkpoint shards)
    shared_cache: bool = True  # False: each node has its own data cache (its local rank 0 tokenizes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_out_dir(self) -> bool:
        """Whether this process creates and commits the checkpoint folders of the out_dir it sees."""
        return self.is_main if self.shared_out_dir else self.local_rank == 0


def launcher_dist(recipe: Recipe) -> Dist:
    """Rank and world size from the launcher, initialising torch.distributed when the recipe asks
    for DeepSpeed; a single process otherwise. Refuses (one line) several processes without DeepSpeed,
    and train.deepspeed.offload where DeepSpeed's CPU Adam cannot be built."""
    ds = recipe.train.deepspeed
    if ds.offload and not ds.stage:
        raise UserError("train.deepspeed.offload: offloading the optimizer is a ZeRO feature; set "
                        "train.deepspeed.stage to 1, 2 or 3 (and launch with deepspeed or torchrun)")
    if not ds.stage:
        world = os.environ.get("WORLD_SIZE", "1")
        if world != "1":
            raise UserError(f"launched as {world} processes (WORLD_SIZE) but train.deepspeed.stage is 0: each would "
                            "train the whole run alone; multi-process training runs through ZeRO, set "
                            "train.deepspeed.stage=1, 2 or 3 (or start a single process)")
        return Dist()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("train.deepspeed is on: launch with `deepspeed` or `torchrun` (RANK/WORLD_SIZE not set)")
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() and recipe.train.device != "cpu" else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # deepspeed.init_distributed requires (or sets) it
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist = Dist(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                local_rank=local_rank)
    if ds.offload:  # built (or refused, on every process) now, before any data or model work
        from .optim import cpu_adam_op

        error = None
        try:
            cpu_adam_op(announce=dist.is_main)
        except UserError as e:
            error = str(e)
        _raise_anywhere(dist, error)
    if dist.world_size > 1:
        from ..data.dataset import DEFAULT_CACHE_DIR

        token = [uuid.uuid4().hex[:12]]
        torch.distributed.broadcast_object_list(token, src=0)
        out_dir = Path(recipe.out_dir)
        dist.shared_out_dir = folder_is_shared(out_dir, "out_dir", token[0], dist)
        dist.shared_cache = folder_is_shared(DEFAULT_CACHE_DIR.expanduser(), "the data cache", token[0], dist)
        if not dist.shared_out_dir:
            if dist.local_rank == 0 and not dist.is_main:  # what the resume checks of this node read
                from .logger import atomic_write_text

                atomic_write_text(out_dir / RECIPE_FILE, dump_recipe(recipe))
            if dist.is_main:
                print(f"out_dir {out_dir} is each node's own (not shared between the nodes): each node keeps its "
                      "processes' checkpoint shards there; the log, adapter and model files are on rank 0's node; "
                      "resume with every node's out_dir as the run left it", file=sys.stderr, flush=True)
    return dist


def close_dist() -> None:
    """The end of a run that finished on every rank: the ranks wait for each other, then the process groups go.

    Without it, gloo's worker threads could still hold ZeRO-3's last gathers when the interpreter finalises, and
    a rank whose run had finished died there with SIGABRT ("terminate called without an active exception",
    pytorch#190489). Not after an error: a rank that failed can leave the others inside a collective, where a
    barrier would wait for ever."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _raise_anywhere(dist: Dist, error: str | None) -> None:
    """Every process calls this with its error (or None): the first one, if any, is raised on all of them."""
    errors: list = [None] * dist.world_size
    torch.distributed.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise UserError(first if first == error else f"{first} (on another process)")


def on_rank0(dist: Dist, decide: Callable[[], object]) -> object:
    """decide() on rank 0 alone, its answer on every rank (one process: decide()). An error on rank 0 stops every
    rank: there as raised, elsewhere as a one-line UserError."""
    if dist.world_size == 1:
        return decide()
    box: list = [None, None]
    error: BaseException | None = None
    if dist.is_main:
        try:
            box[0] = decide()
        except Exception as e:  # noqa: BLE001 - told to the other ranks, then re-raised
            error, box[1] = e, str(e) or type(e).__name__
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise UserError(f"{box[1]} (on rank 0)")
    return box[0]


def folder_is_shared(folder: Path, what: str, token: str, dist: Dist) -> bool:
    """Every process calls this: True when every process sees the probe files every node's local rank 0
    writes into `folder` (one folder for all), False when each sees exactly one (its node's own folder);
    a UserError (on every process) when some share it and others do not."""
    mine = folder / f"{PROBE}-{token}-{dist.rank}"
    error = None
    if dist.local_rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            mine.touch()
        except OSError as e:
            error = f"{what} {folder}: cannot be written by rank {dist.rank} ({e.strerror or e})"
    torch.distributed.barrier()
    seen = sorted(int(p.name.rsplit("-", 1)[1]) for p in folder.glob(f"{PROBE}-{token}-*")) if folder.is_dir() else []
    views: list = [None] * dist.world_size
    torch.distributed.all_gather_object(views, (dist.local_rank, seen))  # every process has looked
    if dist.local_rank == 0:
        mine.unlink(missing_ok=True)
    _raise_anywhere(dist, error)
    return sharing(folder, what, views)


def sharing(folder: Path, what: str, views: list[tuple[int, list[int]]]) -> bool:
    """The decision of folder_is_shared from every rank's (local rank, ranks whose probes it sees)."""
    leaders = [r for r, (local_rank, _) in enumerate(views) if local_rank == 0]
    if all(seen == leaders for _, seen in views):
        return True
    if all(len(seen) == 1 and seen[0] in leaders for _, seen in views) and all(views[r][1] == [r] for r in leaders):
        return False
    odd = next(r for r, (_, seen) in enumerate(views) if seen != leaders)
    raise UserError(f"{what} {folder} is shared by some nodes and not others (rank {odd} sees the files of ranks "
                    f"{views[odd][1]}, the nodes' local rank 0 are {leaders}): give every node the same shared folder, "
                    f"or each node a folder of its own")


def deepspeed_config(recipe: Recipe, node_local_out_dir: bool = False) -> dict:
    """The DeepSpeed config for the recipe: ZeRO stage/offload, batch shape and clipping; with
    `node_local_out_dir` (each node its own out_dir) every node's local rank 0 writes the engine's
    module states into its node's checkpoint and each rank reads only its own shard back.

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
    if tc.deepspeed.offload:  # the optimizer is then DeepSpeed's CPU Adam (train/optim.py)
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if node_local_out_dir:
        config["checkpoint"] = {"use_node_local_storage": True}
    return config


def external_weights(model) -> None:
    """ZeRO-3 gathers a weight only for its own module's call. Adapter layers read weights they do not call a
    module for: the frozen base weight (DiSHA's Bat, adapters/disha.py, multiplies it; peft's LoHa and LoKr
    read its shape), and peft's factors held in nn.ParameterDicts (Bone/MiSS, LoHa, LoKr, BOFT, IA3, VeRA:
    modules themselves, never called). DeepSpeed is told these belong to the layer's call. (The fused LoRA
    layer and ops.wkv_output take their module-calling paths under ZeRO-3 instead.)"""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Module) and isinstance(getattr(base, "weight", None), torch.nn.Parameter):
            register_external_parameter(module, base.weight)
        for child in module.children():
            if isinstance(child, (torch.nn.ParameterDict, torch.nn.ParameterList)):
                for p in child.parameters():
                    register_external_parameter(module, p)


def deepspeed_engine(model, optimizer, recipe: Recipe, dist: Dist):
    """Wrap model + the run's optimizer in a DeepSpeed engine (see deepspeed_config)."""
    import deepspeed

    config = deepspeed_config(recipe, node_local_out_dir=not dist.shared_out_dir)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if recipe.train.deepspeed.stage == 3:
        external_weights(engine.module)
    return engine, ds_optimizer


def partitioned_reference(reference, recipe: Recipe, dist: Dist):
    """A frozen reference model (DPO's, GRPO's: a copy of a model trained in full) partitioned over the ranks by
    ZeRO-3 as the trained model is: an engine without optimizer, its weights whole only inside their modules' calls.
    Returns the partitioned module."""
    import deepspeed

    config = deepspeed_config(recipe, node_local_out_dir=not dist.shared_out_dir)
    config.pop("gradient_clipping")
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    external_weights(engine.module)
    if dist.is_main:
        params = list(engine.module.parameters())
        held = sum(p.ds_tensor.numel() for p in params) / max(1, sum(p.ds_numel for p in params))
        print(f"{recipe.train.objective}: the frozen reference is partitioned over {dist.world_size} processes "
              f"(ZeRO-3): this one holds {held:.0%} of its weights", file=sys.stderr, flush=True)
    return engine.module.eval()


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


def main_first(dist: Dist, make, *, what: str):
    """`make(build=True)` on the processes that prepare the data cache while the others wait, then
    `make(build=False)` on the others.

    For work that only one process per cache folder should do, such as tokenizing the data: global rank 0
    when the cache folder is shared, else every node's local rank 0 for its node (dist.shared_cache); the
    others open what was written. `make(build=False)` returning None means the result is still not visible
    here: that rank then builds its own and says so on stderr. If a builder fails, every rank stops with its
    error. The wait is on a gloo group without DeepSpeed's 10-minute collective timeout, since tokenizing a
    large corpus can take longer."""
    if dist.world_size == 1:
        return make(build=True)
    builds = dist.is_main if dist.shared_cache else dist.local_rank == 0
    result, error = None, None
    if builds:
        try:
            result = make(build=True)
        except Exception as e:  # noqa: BLE001 - reported to the other ranks, then re-raised
            error = e
    group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    messages: list = [None] * dist.world_size
    torch.distributed.all_gather_object(
        messages, None if error is None else f"rank {dist.rank} stopped ({what}): {error}", group=group)
    torch.distributed.destroy_process_group(group)
    if error is not None:
        raise error
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise UserError(first)
    if result is None:
        result = make(build=False)
    if result is None:
        print(f"rank {dist.rank}: {what}: the cache its builder wrote is not visible from this process; "
              "doing it again here", file=sys.stderr, flush=True)
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
