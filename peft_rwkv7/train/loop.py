"""The training loop: `setup` -> `train_step` for each step -> `finish`, each readable on one screen
(nanoGPT-style); `train` runs them with the error handling around.

One optimizer step = grad_accum micro-batches of micro_bsz sequences (per process). The data
position and the learning rate are pure functions of the step, so a checkpoint needs only
trainable tensors, optimizer state and RNG states to resume bit for bit.

`train.objective` sft takes the token-mean loss of the step here; the preference objectives (dpo,
orpo, simpo) take the mean per-pair loss through train/preference.py. Schedule, clipping, optimizer
(train/optim.py: AdamW or Muon), checkpoints and logging are the same for both.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import save_adapter, trainable_parameters
from ..adapters.quant import staging_device
from ..data import load_tokenizer, make_dataset
from ..data.dataset import TrainData
from ..data.prompts import make_prompt_data
from ..errors import Interrupted, UserError
from ..infer.evaluate import load_eval_data
from ..interrupts import ctrl_c_held
from ..model import RWKV7Config, load_model, new_model, pick_device, save_model
from ..model.hub import resolve_model_path
from ..run_dir import MODEL_FILE, end_parts, mark_ending
from . import adalora
from . import checkpoint as ckpt
from . import routes as routes_mod
from .distributed import Dist, gathered, main_first
from .logger import RunLogger
from .losses import decays, param_groups, sequence_loss, sequence_loss_sum
from .memory import CpuBlocks, check_batch_memory, keep_freed_memory
from .method_start import attach_for_run
from .objectives import Objective
from .optim import build_optimizer
from .preference import frozen_reference, load_eval_pairs, needs_frozen_copy, preference_setup
from .recipe import Recipe
from .schedule import get_lr, set_lr
from .tasks import PreferenceTask, SftTask, Task, sum_over_ranks


def build_base(recipe: Recipe, device: torch.device, frozen_dtype: torch.dtype = torch.float32):
    """The base model: loaded from model.path, or new (RWKV-LM init) for pretraining. Returns (model, path).
    `frozen_dtype` is the storage dtype of the weights; what trains is made fp32 after attach."""
    m = recipe.model
    if m.new is not None:
        cfg = RWKV7Config.new(m.new.n_layer, m.new.n_embd, m.new.vocab_size, head_size=m.new.head_size)
        return new_model(cfg, seed=recipe.train.seed, wkv_backend=m.wkv_backend).to(device), None
    path = resolve_model_path(m.path)
    return load_model(path, dtype=frozen_dtype, device=device, wkv_backend=m.wkv_backend), str(path)


@dataclass
class Run:
    """Everything `setup` builds for a run, used by `train_step` and `finish`."""

    recipe: Recipe
    dist: Dist
    device: torch.device
    base: torch.nn.Module
    base_path: str | None
    model: torch.nn.Module
    named: list
    data: object
    eval_docs: list | None
    optimizer: torch.optim.Optimizer
    engine: object | None
    precision: object
    start: int
    logger: RunLogger | None = None
    losses: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # grpo: the step's mean reward
    objective: Objective | None = None  # a preference objective (train.objective dpo/orpo/simpo), else sft
    reference: torch.nn.Module | None = None  # DPO's frozen reference when the method cannot be switched off
    eval_pairs: object | None = None  # held-out preference pairs (data.eval_path, else data.eval_split)
    eval_masks: list | None = None  # per eval document, which tokens are scored (data.eval_split of sft/chat)
    metrics: dict = field(default_factory=dict)  # the last step's loss and metrics (reward margin, ...)
    step_tokens: float = 0.0  # positions the model ran in the last step, all ranks (tasks.Task.tokens_run)
    task: Task = field(default_factory=SftTask)  # the objective (train/tasks.py: SftTask, ...; train/grpo.py)
    routes: routes_mod.Routes = field(default_factory=routes_mod.Routes)  # measured choices, kept in checkpoints

    @property
    def computes_in(self) -> str:
        """"bf16" (autocast) or "fp32": recorded in the run's checkpoints (saved_choices)."""
        return self.routes.precision

    @property
    def out_dir(self) -> Path:
        return Path(self.recipe.out_dir)


def setup(recipe: Recipe, resume: bool = False, dist: Dist | None = None) -> Run:
    """Base model, method, data, optimizer (and DeepSpeed engine), restored from the last checkpoint
    when resuming."""
    dist = dist or Dist()
    tc = recipe.train
    device = pick_device(tc.device, "train.device")
    precision = tc.precision
    saved, saved_routes = ckpt.saved_choices(Path(recipe.out_dir)) if resume else (None, None)
    if precision == "auto" and saved is not None:
        # the run goes on as it began, whatever this machine or device would choose (an exact resume)
        precision = saved
        if dist.is_main:
            print(f"train.precision: auto resumes in {saved}, the precision of the run's checkpoints", file=sys.stderr,
                  flush=True)
    # auto: bf16 on CUDA and fast CPUs; the measured choices are rank 0's (several processes), a resume's as it began
    # (a resume in another precision than its checkpoint's chooses again: those choices were for that one)
    kept = routes_mod.saved(saved_routes) if saved == precision else {}
    routes = routes_mod.decide_precision(precision, device, dist, kept)
    use_bf16 = routes.bf16
    torch.manual_seed(tc.seed)
    # Under bf16 autocast the frozen weights are stored in bf16 too (half the memory); trained
    # tensors always live in fp32 so small updates are not rounded away.
    frozen_dtype = torch.bfloat16 if use_bf16 and recipe.method.kind != "full" else torch.float32
    # a quantized base for a GPU is loaded on the CPU and quantized onto it layer by layer by attach (QLoRA's
    # peak is then the quantized model, not the float one)
    base, base_path = build_base(recipe, staging_device(recipe.method.quant, device), frozen_dtype)
    if use_bf16 and device.type == "cpu":  # products in row chunks where the (cached) bf16 check found them faster
        base.set_bf16_row_chunks(routes.row_chunks)
    base.grad_cp = tc.grad_cp
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    # Several processes: rank 0 (each node's local rank 0 where the cache is not shared) tokenizes while
    # the others wait, then they open it. No random numbers are drawn: the method's start below draws the
    # same ones as before the data existed.
    if tc.objective == "grpo":  # prompts (few, short): every rank reads them itself
        data = make_prompt_data(recipe.data, tokenizer, tc.seed, recipe.data.ctx_len - tc.grpo.max_new_tokens,
                                base.config.vocab_size)
    else:
        data = main_first(dist, lambda build: make_dataset(
            recipe.data, tokenizer, seed=tc.seed, vocab_size=base.config.vocab_size,
            progress=recipe.log.progress and dist.is_main, build=build), what=f"tokenizing {recipe.data.path}")
    # AdaLoRA: the run's steps; EVA: its first batches; a staged base goes to `device` (elsewhere it is there)
    model = attach_for_run(base, recipe, data, resume, device=device)
    # LoRA's thin products: kernel or BLAS (a frozen reference made below is a copy: it routes as the model does)
    routes = routes_mod.decide_thin(model, routes, device, dist, kept)
    named = trainable_parameters(model)
    for _, p in named:
        p.data = p.data.float()
    if not named:
        raise UserError("method: nothing to train (check method.kind and method.train_parts)")
    # A preference objective, and DPO's frozen reference where the method has no "off" (made here, before
    # any step and before a checkpoint is restored).
    objective, reference = preference_setup(recipe, model)
    eval_docs, eval_masks, eval_pairs = None, None, None
    if tc.objective == "grpo":  # rewards on sampled completions (train/grpo.py); a frozen copy where DPO has one
        from .grpo import GrpoTask

        reference = frozen_reference(model) if tc.grpo.beta > 0 and needs_frozen_copy(recipe.method) else None
        task = GrpoTask(recipe, tokenizer, data, dist)
    elif objective is not None:  # preference pairs; held out: data.eval_path's pairs, else data.eval_split's
        eval_pairs = load_eval_pairs(recipe, data, tokenizer, dist, base.config.vocab_size)
        if eval_pairs is None:
            eval_pairs = data.held_out_pairs
        task = PreferenceTask(eval_pairs)
    elif getattr(data, "kind", None) == "preference":
        raise UserError("data.kind: preference pairs need train.objective dpo, orpo or simpo")
    elif recipe.data.eval_path:  # rendered and masked as training renders data.path (sft/chat: loss tokens only)
        held = load_eval_data(recipe.data.eval_path, tokenizer, data_config=recipe.data)
        eval_docs, eval_masks = held.docs, held.masks
    elif data.held_out:  # data.eval_split's documents (sft/chat: scored on their loss tokens)
        eval_docs, eval_masks = data.held_out, data.held_out_masks
    if tc.objective == "sft":
        task = SftTask(eval_docs, eval_masks)
    if dist.is_main:
        print(data_summary(recipe, data, dist.world_size), file=sys.stderr, flush=True)
    if isinstance(data, TrainData):  # GRPO's rollouts are checked as they are sampled (train/grpo.py)
        check_batch_memory(base.config, tc.micro_bsz, recipe.data.ctx_len,
                           (tc.chunk_len or recipe.data.ctx_len) if data.sampling == "get" else None, device)
    optimizer = build_optimizer(named, tc, device)
    engine = None
    if tc.deepspeed.stage:
        from .distributed import deepspeed_engine

        engine, optimizer = deepspeed_engine(model, optimizer, recipe, dist)
        if reference is not None and tc.deepspeed.stage == 3:  # not a whole copy on every rank
            from .distributed import partitioned_reference

            reference = partitioned_reference(reference, recipe, dist)
    run = Run(recipe, dist, device, base, base_path, model, named, data, eval_docs, optimizer, engine,
              _precision_context(device, use_bf16), start=0, objective=objective, reference=reference,
              eval_pairs=eval_pairs, eval_masks=eval_masks, task=task, routes=routes)
    if resume:
        run.start = ckpt.resume(run.out_dir, named, optimizer, engine, stage=tc.deepspeed.stage, rank=dist.rank,
                                world_size=dist.world_size, extra=_extra_state(run))
    return run


def data_summary(recipe: Recipe, data, world_size: int = 1) -> str:
    """One line on what the run will read: documents, tokens, empty ones, and how many epochs the steps
    cover; a warning where one step asks for more samples than the data has (they repeat)."""
    tc = recipe.train
    per_step = tc.micro_bsz * tc.grad_accum * world_size
    epochs = tc.max_steps * per_step / max(data.num_samples, 1)
    grouped = ""
    if getattr(data, "group_by_length", False):  # pad pieces / preference pairs (data.group_by_length)
        grouped = ("; micro-batches grouped by length" if tc.micro_bsz * world_size > 1 else
                   "; data.group_by_length groups nothing with one sample per micro-batch (train.micro_bsz 1)")
    if getattr(data, "kind", None) == "prompts":
        g = tc.grpo
        line = (f"data: {data.num_docs} prompts, {data.num_tokens} tokens; {tc.max_steps} steps x {per_step} prompts "
                f"x {g.num_generations} completions (num_iterations {g.num_iterations}) = "
                f"{tc.max_steps * per_step / g.num_iterations / max(data.num_docs, 1):.3g} epochs")
        if data.held_out is not None:
            line += f"; {data.held_out.num_docs} prompts held out for eval" + (
                "" if recipe.data.eval_path else " (data.eval_split)")
        elif data.eval_note:
            line += f"; {data.eval_note}"
        return line
    if getattr(data, "kind", None) == "preference":
        line = (f"data: {data.num_docs} preference pairs, {data.num_tokens} tokens (both sides), "
                f"{data.truncated} responses cut at ctx_len {recipe.data.ctx_len}; {tc.max_steps} steps x {per_step} "
                f"pairs = {epochs:.3g} epochs{grouped}")
        if data.identical:
            line += f"; {data.identical} pairs have chosen = rejected (they teach nothing)"
        if data.held_out_pairs is not None and not recipe.data.eval_path:
            line += f"; {data.held_out_pairs.num_docs} more pairs held out for eval (data.eval_split)"
        elif data.eval_note:
            line += f"; {data.eval_note}"
        if per_step > data.num_samples:
            line += f"\nwarning: one step takes {per_step} pairs but {data.source} has only {data.num_samples}"
        return line
    line = (f"data: {data.num_docs} documents, {data.num_tokens} tokens, {data.num_samples} samples of "
            f"{recipe.data.ctx_len} tokens per epoch; {tc.max_steps} steps x {per_step} samples = {epochs:.3g} epochs"
            f"{grouped}")
    if data.held_out:
        line += f"; {len(data.held_out)} more documents held out for eval (data.eval_split)"
    elif data.eval_note:
        line += f"; {data.eval_note}"
    if data.empty_docs:
        line += f"; {data.empty_docs} empty documents (no text) add nothing"
    if per_step > data.num_samples:
        line += (f"\nwarning: one step takes {per_step} samples but {data.source} has only {data.num_samples}: "
                 f"samples repeat within a step (lower train.micro_bsz / grad_accum, or add data)")
    return line


def train_step(run: Run, step: int) -> tuple[float, float]:
    """One optimizer step (0-based `step`); returns (the step's loss, its learning rate)."""
    tc = run.recipe.train
    lr = get_lr(step, lr=tc.lr, lr_final=tc.final_lr, max_steps=tc.max_steps, warmup_steps=tc.warmup_steps,
                schedule=tc.schedule, decay_frac=tc.decay_frac)
    set_lr(run.optimizer.param_groups, lr)  # times each group's lr_scale (LoRA+)
    batches = run.task.batches(run, step)
    run.step_tokens = sum_over_ranks(float(run.task.tokens_run(run, batches)), run.dist, run.device)
    run.metrics = run.task.backward(run, step, batches)  # train/tasks.py: one interface
    loss = run.metrics["loss"]
    if (orth := adalora.orth_backward(run.model)) is not None:  # AdaLoRA's penalty, logged beside the loss
        run.metrics = {**run.metrics, "orth_reg": orth}
    if run.engine is None:
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in run.named], tc.grad_clip or float("inf"))
        if not torch.isfinite(gnorm):
            raise FloatingPointError(f"step {step + 1}: gradient norm is {gnorm.item()}")
        run.optimizer.step()
        adalora.update_and_allocate(run.model, step)  # between step and zero_grad, as peft's example
        run.optimizer.zero_grad(set_to_none=True)
    return loss, lr


def train(recipe: Recipe, resume: bool = False, dist: Dist | None = None) -> dict:
    """Run the recipe; returns a summary dict (steps, first/last loss, out_dir, eval)."""
    run = setup(recipe, resume, dist)
    if run.device.type == "cpu":  # a step's CPU tensors: each step reuses the last one's memory (train/memory.py)
        keep_freed_memory()
    blocks = CpuBlocks(enabled=run.device.type == "cpu")  # and without the heap's holes (train/memory.py)
    tc, out_dir = recipe.train, run.out_dir
    run.logger = logger = RunLogger(out_dir, recipe, resume_step=run.start, enabled=run.dist.is_main)
    completed = run.start
    stop_at = min(tc.stop_after, tc.max_steps) if tc.stop_after else tc.max_steps
    try:
        for step in range(run.start, stop_at):
            t0 = time.perf_counter()
            with blocks.step():
                loss, lr = train_step(run, step)
            completed = step + 1  # from here on the step's update is in the weights
            run.losses.append(loss)
            if "reward" in run.metrics:
                run.rewards.append(run.metrics["reward"])
            logger.step(completed, loss, lr, run.step_tokens, time.perf_counter() - t0, extra=run.metrics)
            if tc.eval_every and completed % tc.eval_every == 0 and completed < tc.max_steps:
                result = _run_eval(run)
                if result is not None:
                    logger.eval(completed, result)
            if completed % tc.save_every == 0 or completed in (tc.max_steps, stop_at):
                _save(run, completed)
    except KeyboardInterrupt:
        # A step cut short leaves only gradients behind: drop them and save the completed steps. Under
        # DeepSpeed the ranks are not interrupted at the same point (nor the engine at a step boundary),
        # so they cannot meet in a collective save: they resume from the last periodic checkpoint instead.
        run.optimizer.zero_grad(set_to_none=True)
        if completed > run.start and not ckpt.has_checkpoint(out_dir, completed) and run.engine is None:
            _save(run, completed)
        logger.close()
        saved = ckpt.list_checkpoints(out_dir)
        where = f"checkpoint at step {saved[-1][0]}" if saved else "no checkpoint yet"
        raise Interrupted(
            f"interrupted after step {completed} ({where}); continue with: rwkv-peft train ... --resume"
        ) from None
    except FloatingPointError as e:
        logger.close()
        last = ckpt.list_checkpoints(out_dir)
        kept = f"last good checkpoint: {last[-1][1]}" if last else "no checkpoint was written"
        raise UserError(f"{e}; stopping ({kept}); try a lower train.lr") from None
    finally:
        blocks.close()  # every free block back to the OS; the final eval and a later run use the allocator before
    return finish(run, completed, stopped_early=stop_at < tc.max_steps)


def finish(run: Run, completed: int, stopped_early: bool) -> dict:
    """The end of the run: the final eval, a full model's model.pth, the loss plot; the summary dict."""
    tc = run.recipe.train
    summary = {
        "steps": completed,
        "first_loss": run.losses[0] if run.losses else None,
        "last_loss": run.losses[-1] if run.losses else None,
        "first_reward": run.rewards[0] if run.rewards else None,
        "last_reward": run.rewards[-1] if run.rewards else None,
        "out_dir": str(run.out_dir),
    }
    if stopped_early:
        run.logger.close()
        return {**summary, "stopped_early": True}
    try:
        result = _run_eval(run)
        if result is not None:
            summary["eval"] = result
            run.logger.eval(tc.max_steps, result)
        if run.recipe.method.kind == "full":  # every weight whole, the frozen ones too (ZeRO-3 partitions those too)
            with gathered(list(run.base.named_parameters()), tc.deepspeed.stage):
                if run.dist.is_main:
                    save_model(run.base, run.out_dir / MODEL_FILE)
        run.logger.close(plot=True)
    except KeyboardInterrupt:
        run.logger.close()
        raise Interrupted(f"interrupted after step {completed}, before the run's end was written "
                          f"({end_parts(run.recipe.method.kind)}); finish it with: rwkv-peft train ... --resume"
                          ) from None
    if run.dist.is_main:
        mark_ending(run.out_dir, False)
    return summary


def _precision_context(device: torch.device, use_bf16: bool):
    """A factory of fresh contexts for every forward of the run, training and evaluation alike: bf16
    autocast on the run's device (CPU autocast included), or nothing for fp32."""
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _run_eval(run: Run) -> dict | None:
    """The run's held-out evaluation (the task's: loss/ppl, preference metrics, rewards)."""
    return run.task.evaluate(run)


def _extra_state(run: Run) -> dict:
    """Training state saved beside the optimizer: AdaLoRA's rank allocator, the task's (GRPO's rollouts)."""
    return {**adalora.checkpoint_state(run.model), **run.task.checkpoint_state()}


def _save(run: Run, step: int) -> None:
    """Checkpoint and adapter files. Under DeepSpeed every process takes part: each writes its own shard of
    the engine checkpoint; the adapter is one file as in a one-process run (ZeRO-3: gathered), rank 0 writes."""
    keep, stage, dist = run.recipe.train.keep_checkpoints, run.recipe.train.deepspeed.stage, run.dist
    if step == run.recipe.train.max_steps and dist.is_main:
        mark_ending(run.out_dir, True)  # until finish has written the end that follows this checkpoint
    with ctrl_c_held():  # a Ctrl-C inside torch.save's zip writer would lose the steps: taken once written
        if run.engine is None:
            ckpt.save_checkpoint(run.out_dir, step, run.named, run.optimizer, keep=keep,
                                 extra=_extra_state(run), precision=run.computes_in, routes=run.routes.record())
        else:
            ckpt.save_engine_checkpoint(run.engine, run.out_dir, step, run.named, keep=keep, rank=dist.rank,
                                        world_size=dist.world_size, stage=stage, writer=dist.writes_out_dir,
                                        precision=run.computes_in, extra=_extra_state(run),
                                        routes=run.routes.record())
        with gathered(run.named, stage):
            if dist.is_main:
                save_adapter(run.model, run.out_dir, base_path=run.base_path)


def describe(recipe: Recipe) -> str:
    tc = recipe.train
    m = recipe.method
    what = m.kind + (" + state" if m.trains_state and m.kind != "state" else "")
    if tc.objective != "sft":
        what = f"{tc.objective.upper()} with {what}"
    if tc.objective == "grpo":
        g = tc.grpo
        per_step = (f"{tc.micro_bsz * tc.grad_accum} prompts x {g.num_generations} completions of <= "
                    f"{g.max_new_tokens} tokens")
    else:
        unit = " pairs" if tc.objective != "sft" else ""
        per_step = f"{tc.micro_bsz * tc.grad_accum}{unit} x {recipe.data.ctx_len} tokens"
    return (f"{what} on {recipe.model.path or 'a new model'}: {tc.max_steps} steps x {per_step}, lr {tc.lr:g} "
            f"({tc.schedule}, {tc.optimizer}) -> {recipe.out_dir}")


__all__ = ["train", "setup", "train_step", "finish", "Run", "sequence_loss", "sequence_loss_sum", "decays",
           "param_groups", "get_lr", "describe", "Dist"]
