"""One global batch, one loss: masked SFT data gives the same step however the batch is split.

The step's loss is the sum of token losses over all micro-batches (and ranks) divided by the loss
tokens of the whole step. A mean of per-micro-batch means weighs a record with a short response as
much as one with a long response, and so differs (step-1 loss 19.48 vs 20.18 on the issue's data).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")
# Responses from 1 to ~40 words: the number of loss tokens per record differs by an order of magnitude.
LR = 1e-4  # Adam divides by |g| + eps: fp32 summation order shows in near-zero gradients, scaled by lr
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


def test_micro_batches_and_accumulation_give_one_update(tiny_world, tmp_path):
    whole, accum = tmp_path / "4x1", tmp_path / "1x4"
    assert train_from_cli(LORA, split_overrides(tiny_world, tmp_path, whole, 4, 1)) == 0
    assert train_from_cli(LORA, split_overrides(tiny_world, tmp_path, accum, 1, 4)) == 0
    a, b = step_losses(whole), step_losses(accum)
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    assert max_diff(whole, accum) <= 1e-6

    # The independent expectation of step 1: the base model's token-mean loss over the same 4 records,
    # computed here in one batch with the masks the data pipeline made.
    from peft_rwkv7.data import load_tokenizer, make_dataset
    from peft_rwkv7.model import load_model
    from peft_rwkv7.train.recipe import load_recipe

    recipe = load_recipe(LORA, split_overrides(tiny_world, tmp_path, tmp_path / "unused", 4, 1))
    data = make_dataset(recipe.data, load_tokenizer("world"), seed=0, vocab_size=65536, progress=False)
    idx, labels = data.batch(0, 0, 4, 1)
    counts = (labels != -100).sum(dim=1)
    assert counts.max() >= 3 * counts.min(), counts  # the masks really are uneven
    model = load_model(tiny_world[0], dtype=torch.float32)
    with torch.no_grad():
        logits = model(idx)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()
    assert abs(a[0] - want) <= 1e-5, (a[0], want)


@pytest.mark.slow
def test_two_processes_split_the_same_global_batch(tiny_world, tmp_path):
    pytest.importorskip("deepspeed")
    from tests.train.test_deepspeed import run_two_processes

    whole, multi = tmp_path / "4x1", tmp_path / "2x1x2"
    assert train_from_cli(LORA, split_overrides(tiny_world, tmp_path, whole, 4, 1)) == 0
    run_two_processes(split_overrides(tiny_world, tmp_path, multi, 2, 1, **{"train.deepspeed.stage": 2}))
    a, b = step_losses(whole), step_losses(multi)
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    assert max_diff(whole, multi) <= 1e-6
