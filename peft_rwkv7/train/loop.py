"""The training loop: setup -> train -> save, readable top to bottom (nanoGPT-style).

One optimizer step = grad_accum micro-batches of micro_bsz sequences (per process). The data
position and the learning rate are pure functions of the step, so a checkpoint needs only
trainable tensors, optimizer state and RNG states to resume bit for bit.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..adapters import attach, save_adapter, trainable_parameters
from ..data import load_eval_docs, load_tokenizer, make_dataset
from ..errors import UserError
from ..model import RWKV7Config, load_model, new_model, pick_device, save_model
from ..model.hub import resolve_model_path
from . import checkpoint as ckpt
from .distributed import gathered, main_first
from .logger import RunLogger
from .recipe import Recipe
from .schedule import get_lr


@dataclass
class Dist:
    """Where this process stands in a multi-process run (rank 0 of 1 when single)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def build_base(recipe: Recipe, device: torch.device, frozen_dtype: torch.dtype = torch.float32):
    """The base model: loaded from model.path, or new (RWKV-LM init) for pretraining. Returns (model, path).
    `frozen_dtype` is the storage dtype of the weights; what trains is made fp32 after attach."""
    m = recipe.model
    if m.new is not None:
        cfg = RWKV7Config.new(m.new.n_layer, m.new.n_embd, m.new.vocab_size, head_size=m.new.head_size)
        return new_model(cfg, seed=recipe.train.seed, wkv_backend=m.wkv_backend).to(device), None
    path = resolve_model_path(m.path)
    return load_model(path, dtype=frozen_dtype, device=device, wkv_backend=m.wkv_backend), str(path)


def sequence_loss_sum(model, idx: torch.Tensor, labels: torch.Tensor, chunk_len: int = 0) -> torch.Tensor:
    """Sum (fp32 scalar) of next-token cross-entropy over labels != -100. idx, labels: [B, T].

    With chunk_len > 0 the sequence runs chunk by chunk carrying token-shift and WKV state; the
    state keeps its gradient (true BPTT through the kernels' state gradient) while each chunk's
    activations are recomputed in backward, so memory is O(chunk_len) instead of O(T)."""

    def chunk_loss(x, y, state):
        logits, new_state = model(x, state, return_state=True)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        return loss, new_state

    if not chunk_len or idx.shape[1] <= chunk_len:
        return chunk_loss(idx, labels, None)[0]
    total, state = idx.new_zeros((), dtype=torch.float32), None
    for lo in range(0, idx.shape[1], chunk_len):
        x, y = idx[:, lo : lo + chunk_len], labels[:, lo : lo + chunk_len]
        part, state = checkpoint(chunk_loss, x, y, state, use_reentrant=False)
        total = total + part
    return total


def sequence_loss(model, idx: torch.Tensor, labels: torch.Tensor, chunk_len: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 (see sequence_loss_sum)."""
    return sequence_loss_sum(model, idx, labels, chunk_len) / (labels != -100).sum().clamp(min=1)


# Weight decay by role: the big matrices that map between token and feature spaces (embedding, head,
# the r/k/v/output and FFN projections when trained in full) and every adapter factor (LoRA A/B,
# DiSHA Bone/Bat shards, whatever their rank as tensors) are decayed. The initial state, norms,
# token-shift mixes, decay/bonus vectors and the small time-mix low-rank maps (w1..v2) are not:
# they set the recurrence's dynamics, and RWKV-LM never decays them either.
_DECAYED_WEIGHT = re.compile(r"(^|\.)(emb|head|receptance|key|value|output)\.weight$")
_ADAPTER_FACTOR = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|disha)(\.|$)")


def decays(name: str) -> bool:
    """Whether the trained tensor called `name` (as trainable_parameters names it) gets weight decay."""
    return bool(_DECAYED_WEIGHT.search(name) or _ADAPTER_FACTOR.search(name))


def param_groups(named, weight_decay: float):
    """Two AdamW groups: tensors decayed by role (see `decays`) and the rest."""
    decay = [p for n, p in named if decays(n)]
    rest = [p for n, p in named if not decays(n)]
    groups = [{"params": rest, "weight_decay": 0.0}]
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    return groups


def train(recipe: Recipe, resume: bool = False, dist: Dist | None = None) -> dict:
    """Run the recipe; returns a summary dict (steps, first/last loss, out_dir)."""
    dist = dist or Dist()
    tc = recipe.train
    out_dir = Path(recipe.out_dir)
    device = pick_device(tc.device, "train.device")
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    torch.manual_seed(tc.seed)

    # --- setup: base model, adapter, data, optimizer --------------------------------------------
    # Under bf16 autocast the frozen weights are stored in bf16 too (half the memory); trained
    # tensors always live in fp32 so small updates are not rounded away.
    frozen_dtype = torch.bfloat16 if use_bf16 and recipe.method.kind != "full" else torch.float32
    base, base_path = build_base(recipe, device, frozen_dtype)
    base.grad_cp = tc.grad_cp
    model = attach(base, recipe.method)
    named = trainable_parameters(model)
    for _, p in named:
        p.data = p.data.float()
    if not named:
        raise UserError("method: nothing to train (check method.kind and method.train_parts)")
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    # Several processes: rank 0 tokenizes into the cache while the others wait, then they open it.
    data = main_first(dist, lambda build: make_dataset(
        recipe.data, tokenizer, seed=tc.seed, vocab_size=base.config.vocab_size,
        progress=recipe.log.progress and dist.is_main, build=build), what=f"tokenizing {recipe.data.path}")
    eval_docs = load_eval_docs(recipe.data.eval_path, tokenizer) if recipe.data.eval_path else None
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(named, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=fused or None
    )
    engine = None
    if tc.deepspeed.stage:
        from .distributed import deepspeed_engine

        engine, optimizer = deepspeed_engine(model, optimizer, recipe)

    start = 0
    if resume:
        start = ckpt.resume(out_dir, named, optimizer, engine, stage=tc.deepspeed.stage, rank=dist.rank,
                            world_size=dist.world_size)
    logger = RunLogger(out_dir, recipe, resume_step=start, enabled=dist.is_main)

    # --- train -----------------------------------------------------------------------------------
    tokens_per_step = tc.micro_bsz * tc.grad_accum * recipe.data.ctx_len * dist.world_size
    precision = _precision_context(device, use_bf16)
    completed, losses = start, []
    stop_at = min(tc.stop_after, tc.max_steps) if tc.stop_after else tc.max_steps
    try:
        for step in range(start, stop_at):
            lr = get_lr(
                step,
                lr=tc.lr,
                lr_final=tc.final_lr,
                max_steps=tc.max_steps,
                warmup_steps=tc.warmup_steps,
                schedule=tc.schedule,
                decay_frac=tc.decay_frac,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            batches = [data.batch(step, micro, tc.micro_bsz, tc.grad_accum, dist.rank, dist.world_size)
                       for micro in range(tc.grad_accum)]
            # One global batch, one loss: the sum of token losses over every micro-batch of every rank
            # divided by the loss tokens of the whole step, however the batch is split. Ranks average
            # their gradients, so each scales its sums by world_size / n_tokens.
            n_tokens = _sum_over_ranks(float(sum(int((y != -100).sum()) for _, y in batches)), dist, device)
            scale = dist.world_size / max(n_tokens, 1.0)
            loss_sum = 0.0
            for idx, labels in batches:
                with precision():
                    part = sequence_loss_sum(model, idx.to(device), labels.to(device), tc.chunk_len)
                if not torch.isfinite(part):
                    raise FloatingPointError(f"step {step + 1}: loss is {part.item()}")
                loss_sum += part.item()
                if engine is not None:
                    engine.backward(part * scale, scale_wrt_gas=False)
                    engine.step()
                else:
                    (part * scale).backward()
            step_loss = _sum_over_ranks(loss_sum, dist, device) / max(n_tokens, 1.0)
            if engine is None:
                gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in named], tc.grad_clip or float("inf"))
                if not torch.isfinite(gnorm):
                    raise FloatingPointError(f"step {step + 1}: gradient norm is {gnorm.item()}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            completed = step + 1  # from here on the step's update is in the weights
            dt = time.perf_counter() - t0
            losses.append(step_loss)
            logger.step(step + 1, step_loss, lr, tokens_per_step / dt)
            if eval_docs is not None and tc.eval_every and completed % tc.eval_every == 0 and completed < tc.max_steps:
                logger.eval(completed, _evaluate(model, eval_docs, precision))
            if completed % tc.save_every == 0 or completed in (tc.max_steps, stop_at):
                _save(out_dir, completed, named, optimizer, engine, model, base_path, recipe, dist)
    except KeyboardInterrupt:
        # A step cut short leaves only gradients behind: drop them and save the completed steps. Under
        # DeepSpeed the ranks are not interrupted at the same point (nor the engine at a step boundary),
        # so they cannot meet in a collective save: they resume from the last periodic checkpoint instead.
        optimizer.zero_grad(set_to_none=True)
        if completed > start and not ckpt.has_checkpoint(out_dir, completed) and engine is None:
            _save(out_dir, completed, named, optimizer, engine, model, base_path, recipe, dist)
        logger.close()
        saved = ckpt.list_checkpoints(out_dir)
        where = f"checkpoint at step {saved[-1][0]}" if saved else "no checkpoint yet"
        raise UserError(
            f"interrupted after step {completed} ({where}); continue with: rwkv-peft train ... --resume"
        ) from None
    except FloatingPointError as e:
        logger.close()
        last = ckpt.list_checkpoints(out_dir)
        kept = f"last good checkpoint: {last[-1][1]}" if last else "no checkpoint was written"
        raise UserError(f"{e}; stopping ({kept}); try a lower train.lr") from None

    # --- save ------------------------------------------------------------------------------------
    if stop_at < tc.max_steps:
        logger.close()
        return {
            "steps": completed,
            "stopped_early": True,
            "out_dir": str(out_dir),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
        }
    summary = {
        "steps": tc.max_steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "out_dir": str(out_dir),
    }
    if eval_docs is not None:
        summary["eval"] = _evaluate(model, eval_docs, precision)
        logger.eval(tc.max_steps, summary["eval"])
    if recipe.method.kind == "full":
        with gathered(named, tc.deepspeed.stage):
            if dist.is_main:
                save_model(base, out_dir / "model.pth")
    logger.close(plot=True)
    return summary


def _precision_context(device: torch.device, use_bf16: bool):
    """A factory of fresh contexts for every forward of the run, training and evaluation alike: bf16
    autocast on the run's device (CPU autocast included), or nothing for fp32."""
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _sum_over_ranks(value: float, dist: Dist, device: torch.device) -> float:
    if dist.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item()


def _evaluate(model, docs, precision=contextlib.nullcontext) -> dict:
    from ..infer.evaluate import evaluate

    was_training = model.training
    model.eval()
    with torch.no_grad(), precision():
        result = evaluate(model, docs)
    model.train(was_training)
    return result


def _save(out_dir, step, named, optimizer, engine, model, base_path, recipe, dist) -> None:
    """Checkpoint and adapter files. Under DeepSpeed every process takes part: each writes its own shard of
    the engine checkpoint; the adapter is one file as in a one-process run (ZeRO-3: gathered), rank 0 writes."""
    keep, stage = recipe.train.keep_checkpoints, recipe.train.deepspeed.stage
    with ckpt.ctrl_c_after_save():
        if engine is None:
            ckpt.save_checkpoint(out_dir, step, named, optimizer, keep=keep)
        else:
            ckpt.save_engine_checkpoint(engine, out_dir, step, named, keep=keep, rank=dist.rank,
                                        world_size=dist.world_size, stage=stage)
        with gathered(named, stage):
            if dist.is_main:
                save_adapter(model, out_dir, base_path=base_path)


def describe(recipe: Recipe) -> str:
    tc = recipe.train
    m = recipe.method
    what = m.kind + (" + state" if m.trains_state and m.kind != "state" else "")
    return (
        f"{what} on {recipe.model.path or 'a new model'}: {tc.max_steps} steps x {tc.micro_bsz * tc.grad_accum} "
        f"x {recipe.data.ctx_len} tokens, lr {tc.lr:g} ({tc.schedule}) -> {recipe.out_dir}"
    )


__all__ = ["train", "sequence_loss", "sequence_loss_sum", "param_groups", "get_lr", "describe", "Dist"]
