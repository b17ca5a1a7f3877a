"""The progress line's tokens/s and log.jsonl's `tokens`: the positions the model ran in the step.

A right-padded batch (pad sampling: sft, chat, preference pairs) stops at its last scored position
(losses.scored_end), so a step runs rows x that many positions, not micro_bsz x ctx_len slots. The
expectations here are counted from the data pipeline's batches with plain Python, not with scored_end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_rwkv7.data import load_tokenizer, make_dataset
from peft_rwkv7.train.grpo import GrpoTask
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.runner import train_from_cli
from peft_rwkv7.train.tasks import PreferenceTask, SftTask
from tests.train.conftest import tiny_overrides
from tests.train.test_batch_split import LORA, sft_file

CTX = 48


def padded_sft(tmp_path: Path) -> dict:
    return {"data.path": sft_file(tmp_path), "data.kind": "sft", "data.sampling": "pad", "data.ctx_len": CTX,
            "data.eval_path": "null"}


def records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def positions_run(labels: torch.Tensor) -> int:
    """rows x (one past the last column in which any row has a label), counted cell by cell."""
    last = -1
    for row in labels.tolist():
        for t, v in enumerate(row):
            if v != -100:
                last = max(last, t)
    return len(labels) * (last + 1)


def expected(recipe_overrides, steps: int, micro_bsz: int, world_size: int = 1) -> list[int]:
    recipe = load_recipe(LORA, recipe_overrides)
    data = make_dataset(recipe.data, load_tokenizer("world"), seed=recipe.train.seed, vocab_size=65536,
                        progress=False)
    return [sum(positions_run(data.batch(s, 0, micro_bsz, 1, rank, world_size)[1]) for rank in range(world_size))
            for s in range(steps)]


def test_a_padded_batch_counts_the_positions_it_runs(tiny_world, tmp_path):
    out = tmp_path / "sft"
    over = tiny_overrides(tiny_world, out, steps=4, **padded_sft(tmp_path))
    assert train_from_cli(LORA, over) == 0
    got = [r["tokens"] for r in records(out)]
    want = expected(over, 4, micro_bsz=2)
    assert got == want
    assert sum(want) < 4 * 2 * CTX, want  # the old count (micro_bsz x ctx_len slots a step) would be wrong
    assert all(r["tokens_per_s"] > 0 for r in records(out))


def test_packed_text_runs_every_position(tiny_world, tmp_path):
    out = tmp_path / "text"
    assert train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=2, **{"train.micro_bsz": 3})) == 0
    assert [r["tokens"] for r in records(out)] == [3 * 32, 3 * 32]  # ctx_len 32 (tiny_overrides), all scored


def test_the_count_by_hand():
    labels = torch.tensor([[-100, 5, -100, -100, -100], [1, -100, 7, -100, -100], [-100] * 5])
    batches = [(torch.zeros(3, 5, dtype=torch.long), labels), (torch.zeros(1, 4, dtype=torch.long),
                                                              torch.tensor([[-100, -100, -100, 2]]))]
    assert SftTask().tokens_run(None, batches) == 3 * 3 + 1 * 4
    assert PreferenceTask().tokens_run(None, batches) == 13  # a pair's two rows are rows of the batch


def test_grpo_counts_the_completion_slots():
    class Cfg:
        num_generations, max_new_tokens = 4, 16

    task = GrpoTask.__new__(GrpoTask)
    task.cfg = Cfg
    assert task.tokens_run(None, [[0, 1], [2, 3]]) == 4 * 4 * 16


@pytest.mark.slow
def test_two_processes_add_their_positions(tiny_world, tmp_path):
    pytest.importorskip("deepspeed")
    from tests.train.test_deepspeed import run_two_processes

    out = tmp_path / "2x2"
    over = tiny_overrides(tiny_world, out, steps=3, **padded_sft(tmp_path), **{"train.deepspeed.stage": 2})
    run_two_processes(over)
    got = [r["tokens"] for r in records(out)]
    assert got == expected(over, 3, micro_bsz=2, world_size=2)
    assert got != expected(over, 3, micro_bsz=2, world_size=1)  # rank 1's rows are counted too
