"""One global batch, one loss: masked SFT data gives the same step however the batch is split.

The step's loss is the sum of token losses over all micro-batches (and ranks) divided by the loss
tokens of the whole step. A mean of per-micro-batch means weighs a record with a short response as
much as one with a long response, and so differs (step-1 loss 19.48 vs 20.18 on the issue's data).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peft_rwkv7.adapters import trainable_parameters
from peft_rwkv7.train.loop import setup, train_step
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.runner import train_from_cli
from tests.fp_oracle import LOGGED, adam_bound, forward_rounding, fp64_forward, gamma, logits64, loss_rounding
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")
# Responses from 1 to ~40 words: the number of loss tokens per record differs by an order of magnitude.
LR = 1e-4
RESPONSES = ["Aye.", "Wind from the north-west, force five, seas moderate, visibility good, course held at 270.",
             "Nothing to report.", " ".join(["All hands mustered on deck at dawn for the inspection."] * 3),
             "Fog.", "Sighted a merchant brig to starboard, exchanged signals, she reports clear weather ahead.",
             "Pumps manned.", "Anchored in the bay at six bells; shore party sent for water and fresh fruit."]


def sft_file(tmp_path: Path) -> Path:
    path = tmp_path / "sft.jsonl"
    rows = [{"question": f"Entry {i}: what happened on watch?", "answer": r} for i, r in enumerate(RESPONSES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def split_overrides(tiny_world, tmp_path, out, micro_bsz, grad_accum, steps=3, **extra):
    common = {"data.path": sft_file(tmp_path), "data.kind": "sft", "data.ctx_len": 48, "data.eval_path": "null",
              "method.state": "true", "train.lr": LR, "train.warmup_steps": 0, "train.schedule": "constant",
              "train.micro_bsz": micro_bsz, "train.grad_accum": grad_accum, "train.device": "cpu",
              "train.grad_clip": 0.0}
    return tiny_overrides(tiny_world, out, steps=steps, **{**common, **extra})


def step_losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys() and x
    return max((x[k] - y[k]).abs().max().item() for k in x)


def step_one_expectation(tiny_world, tmp_path) -> tuple[float, float]:
    """(the base model's token-mean loss over the step's 4 records, computed here in fp64 in one batch
    with the masks the data pipeline made; its rounding bound in fp32)."""
    from peft_rwkv7.data import load_tokenizer, make_dataset
    from peft_rwkv7.model import load_model

    recipe = load_recipe(LORA, split_overrides(tiny_world, tmp_path, tmp_path / "unused", 4, 1))
    data = make_dataset(recipe.data, load_tokenizer("world"), seed=0, vocab_size=65536, progress=False)
    idx, labels = data.batch(0, 0, 4, 1)
    counts = (labels != -100).sum(dim=1)
    assert counts.max() >= 3 * counts.min(), counts  # the masks really are uneven
    model = load_model(tiny_world[0], dtype=torch.float32)
    logits = logits64(model, idx)
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()
    tol = loss_rounding(model.config, idx.shape[1], logits.abs().max().item(), want, int(counts.sum()))
    return want, tol


def test_micro_batches_and_accumulation_give_one_update(tiny_world, tmp_path):
    whole, accum = tmp_path / "4x1", tmp_path / "1x4"
    assert train_from_cli(LORA, split_overrides(tiny_world, tmp_path, whole, 4, 1)) == 0
    assert train_from_cli(LORA, split_overrides(tiny_world, tmp_path, accum, 1, 4)) == 0
    a, b = step_losses(whole), step_losses(accum)
    # Step 1, both splits: the base model's token-mean loss over the same 4 records (a mean of per-micro-
    # batch means differs by ~0.7 here). Later steps: see the gradient test below; Adam makes them equal
    # only up to adam_bound.
    want, tol = step_one_expectation(tiny_world, tmp_path)
    tol += LOGGED
    assert abs(a[0] - want) <= tol and abs(b[0] - want) <= tol, (a[0], b[0], want, tol)
    assert len(a) == len(b) == 3
    assert max_diff(whole, accum) <= adam_bound(3) * LR


KINDS = {"lora": {}, "bat": {"method.kind": "disha", "method.disha_mode": "bat", "method.r": 4},
         "bone": {"method.kind": "disha", "method.disha_mode": "bone", "method.r": 4},
         **{k: {"method.kind": k} for k in ("loha", "lokr", "boft", "ia3", "vera")}}


@pytest.mark.slow
@pytest.mark.parametrize("stage, kind", [(2, "lora"), *((3, k) for k in KINDS)])
def test_two_processes_split_the_same_global_batch(tiny_world, tmp_path, stage, kind):
    """ZeRO-3 too: it partitions every weight, whole only inside its own module's call. In fp32 on the CPU this
    recipe (LoRA without dropout, a trained state) once read four weights outside their modules and failed on
    each: the LoRA factors (adapters/fused_lora.py), ln_x's (ops.wkv_output), time_state and ln0 (RWKV7.hidden);
    DiSHA's Bat and peft's LoHa, LoKr, BOFT, IA3, VeRA and Bone read the base weight or their factors outside
    theirs (train/distributed.external_weights tells DeepSpeed)."""
    pytest.importorskip("deepspeed")
    from tests.train.test_deepspeed import run_two_processes

    whole, multi = tmp_path / "4x1", tmp_path / "2x1x2"
    assert train_from_cli(LORA, split_overrides(tiny_world, tmp_path, whole, 4, 1, **KINDS[kind])) == 0
    run_two_processes(split_overrides(tiny_world, tmp_path, multi, 2, 1, **{"train.deepspeed.stage": stage},
                                      **KINDS[kind]))
    a, b = step_losses(whole), step_losses(multi)
    want, tol = step_one_expectation(tiny_world, tmp_path)  # as in the test above
    tol += LOGGED
    assert abs(a[0] - want) <= tol and abs(b[0] - want) <= tol, (a[0], b[0], want, tol)
    assert len(a) == len(b) == 3
    assert max_diff(whole, multi) <= adam_bound(3) * LR


@pytest.mark.slow
def test_qlora_under_zero3_is_the_one_process_run(tiny_world, tmp_path):
    """An NF4 base under ZeRO-3 (bitsandbytes' packed weights among the parameters it partitions), never run
    before: two processes give the one-process run's losses and adapter."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("bitsandbytes")
    from tests.train.test_deepspeed import run_two_processes

    nf4 = {"method.quant": "nf4"}
    whole, multi = tmp_path / "4x1", tmp_path / "2x1x2"
    assert train_from_cli(LORA, split_overrides(tiny_world, tmp_path, whole, 4, 1, **nf4)) == 0
    run_two_processes(split_overrides(tiny_world, tmp_path, multi, 2, 1, **{"train.deepspeed.stage": 3}, **nf4),
                      timeout=300)
    a, b = step_losses(whole), step_losses(multi)
    _, tol = step_one_expectation(tiny_world, tmp_path)  # the fp32 rounding of one such step (the float base's)
    assert len(a) == len(b) == 3 and abs(a[0] - b[0]) <= 2 * tol + LOGGED, (a, b)
    assert max_diff(whole, multi) <= adam_bound(3) * LR


@pytest.mark.slow
def test_zero3_ranks_run_the_same_chunks(tiny_world, tmp_path):
    """train.chunk_len under ZeRO-3: each module call gathers its weights with a collective, so the ranks must run
    the same number of chunks. A micro-batch runs up to its last scored token, which differs from rank to rank on
    padded data: the rank with fewer chunks finished its step while the other waited on a gather (a hang). Now each
    micro-batch runs to the longest end over the ranks, and the run is the one-process run's."""
    pytest.importorskip("deepspeed")
    from tests.train.test_deepspeed import run_two_processes

    chunks = {"train.chunk_len": 8}  # ctx 48: the records end from ~12 to 48 tokens, 2 to 6 chunks
    whole, multi = tmp_path / "4x1", tmp_path / "2x1x2"
    assert train_from_cli(LORA, split_overrides(tiny_world, tmp_path, whole, 4, 1, **chunks)) == 0
    run_two_processes(split_overrides(tiny_world, tmp_path, multi, 2, 1, **{"train.deepspeed.stage": 3}, **chunks),
                      timeout=240)
    a, b = step_losses(whole), step_losses(multi)
    want, tol = step_one_expectation(tiny_world, tmp_path)  # the same step, unchunked, in fp64
    tol += LOGGED
    assert abs(a[0] - want) <= tol and abs(b[0] - want) <= tol, (a[0], b[0], want, tol)
    assert len(a) == len(b) == 3
    assert max_diff(whole, multi) <= adam_bound(3) * LR


def optimizer_gradient(recipe) -> tuple[dict[str, torch.Tensor], object]:
    """(the gradient the optimizer steps with at step 1, by trained-tensor name; the run before the step)."""
    run = setup(recipe)
    start = copy.deepcopy(run)
    seen = {}
    run.optimizer.register_step_pre_hook(lambda *_: seen.update({n: p.grad.clone() for n, p in run.named}))
    train_step(run, 0)
    return seen, start


def global_mean_gradient(run, n_samples: int) -> dict[str, torch.Tensor]:
    """DESIGN's step loss by plain autograd, in fp64: one batch of the step's n_samples samples, cross-entropy
    summed over every loss token and divided by their number; its gradient by trained-tensor name."""
    idx, labels = run.data.batch(0, 0, n_samples, 1)
    model = copy.deepcopy(run.model).double()
    with fp64_forward():
        logits = model(idx)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    (loss / (labels != -100).sum()).backward()
    return {n: p.grad for n, p in trainable_parameters(model)}


def test_the_step_gradient_is_the_global_batch_mean_with_clipping_on(tiny_world, tmp_path):
    """What the optimizer gets, for every split of 4 samples, against the fp64 gradient of the step's loss.

    Clipping on, at twice the reference norm (not clipped: a gradient k > 2 times too large is clipped to
    2x, one k times too small stays so) and, for one split, at half of it (clipped: exactly half the
    reference). Adam is scale-free, so without these checks a gradient off by grad_accum trains alike."""
    def recipe(micro_bsz, grad_accum, clip=0.0):
        over = split_overrides(tiny_world, tmp_path, tmp_path / f"{micro_bsz}x{grad_accum}", micro_bsz, grad_accum,
                               steps=1, **{"train.grad_clip": clip})
        return load_recipe(LORA, over)

    _, start = optimizer_gradient(recipe(4, 1))
    ref = global_mean_gradient(start, 4)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref.values()])).item()
    assert norm > 0
    # fp32 against fp64: the forward's bound, doubled for the backward (the same chain of ops in reverse),
    # plus the weight gradients' sums over the step's 4 x ctx_len tokens (gamma_(4 T)).
    T = start.recipe.data.ctx_len
    tol = 2 * forward_rounding(start.base.config, T) + gamma(4 * T)
    for micro_bsz, grad_accum, ratio in [(4, 1, 2.0), (2, 2, 2.0), (1, 4, 2.0), (1, 4, 0.5)]:
        got, _ = optimizer_gradient(recipe(micro_bsz, grad_accum, clip=ratio * norm))
        want = min(1.0, ratio)  # what clipping to ratio * |g| leaves of g
        assert got.keys() == ref.keys()
        err = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(got[n].double() - want * g)
                                                    for n, g in ref.items()])).item()
        assert err <= tol * want * norm, (micro_bsz, grad_accum, ratio, f"|g - want| / |want| {err / want / norm:.2e}")
