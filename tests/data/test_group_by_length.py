"""data.group_by_length: each micro-batch takes pad pieces (or preference pairs) of similar length, so the
padding a batch runs (it is cut after its last scored position, train/losses.py) shrinks; an epoch still
sees every sample once, the order is a function of (seed, step) alone, and ranks split one grouped batch.

Expectations come from the samples themselves: the pieces each batch holds (their targets name their
stream positions), the lengths recomputed from the labels, never from the sampler's own bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_rwkv7.data import DataConfig, TrainData, make_dataset
from peft_rwkv7.data.preference import PreferenceData, Side
from peft_rwkv7.data.sampling import MEGA_BLOCKS
from peft_rwkv7.errors import UserError

IGNORE = -100


def pad_data(sizes, ctx_len: int, seed: int = 0, grouped: bool = True) -> TrainData:
    """Documents of `sizes` tokens over the stream arange(N): a target's value is its stream position."""
    sizes = np.asarray(sizes, np.int32)
    n = int(sizes.sum())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ds = TrainData(np.arange(n, dtype=np.int64), None, starts, sizes, ctx_len, "pad", True, seed)
    ds.group_by_length = grouped
    return ds


def scored_len(labels: torch.Tensor) -> list[int]:
    """Per row: positions up to and including its last scored one (what a trimmed batch runs for it)."""
    return [int(torch.nonzero(r != IGNORE).max()) + 1 for r in labels]


def epoch_batches(ds, mb: int, ga: int = 1, ws: int = 1):
    """Every micro-batch of epoch 0 (whole micro-steps only), as lists of per-rank (x, y)."""
    steps = ds.num_samples // (mb * ga * ws)
    return [[ds.batch(s, m, mb, ga, r, ws) for r in range(ws)] for s in range(steps) for m in range(ga)]


def lengths_seed(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, 61, n)  # documents of 2..60 tokens, one piece each at ctx 64


@pytest.mark.parametrize("mb,ga,ws", [(4, 1, 1), (2, 3, 1), (3, 1, 2)])
def test_an_epoch_sees_every_piece_once_and_batches_hold_similar_lengths(mb, ga, ws):
    n = 600 * mb * ws  # a whole number of micro-steps, many runs of MEGA_BLOCKS micro-batches
    sizes = lengths_seed(n)
    grouped, plain = pad_data(sizes, 64), pad_data(sizes, 64, grouped=False)
    seen, waste, waste_plain = [], 0, 0
    for mine, theirs in zip(epoch_batches(grouped, mb, ga, ws), epoch_batches(plain, mb, ga, ws), strict=True):
        rows = torch.cat([y for _, y in mine])  # the micro-step's rows over all ranks
        seen += [int(r[0]) for r in rows]  # a piece's first target is its document's start
        lens = scored_len(rows)
        waste += max(lens) * len(lens) - sum(lens)
        lens = scored_len(torch.cat([y for _, y in theirs]))
        waste_plain += max(lens) * len(lens) - sum(lens)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    assert sorted(seen) == starts.tolist()  # each document once
    # 59 distinct lengths over runs of 50 micro-steps: a sorted run leaves about one length step per block,
    # where random batches of 4-6 leave a third of the range; the plain order pads far more.
    assert waste_plain > 10 * waste


def test_blocks_of_a_run_do_not_interleave_and_runs_are_shuffled():
    mb = 4
    runs = 4  # an epoch of 4 runs' worth or more takes runs of MEGA_BLOCKS micro-batches (fewer: shorter runs)
    ds = pad_data(lengths_seed(runs * MEGA_BLOCKS * mb), 64)
    blocks = [scored_len(y) for [(_, y)] in epoch_batches(ds, mb)]
    assert len(blocks) == runs * MEGA_BLOCKS
    for b in blocks:
        assert b == sorted(b, reverse=True)  # longest first within a micro-batch
    firsts = []
    for run in range(runs):
        mine = blocks[run * MEGA_BLOCKS:(run + 1) * MEGA_BLOCKS]
        # sorted together, then cut: two blocks of one run never overlap in length
        for i, a in enumerate(mine):
            for b in mine[i + 1:]:
                assert min(a) >= max(b) or min(b) >= max(a), (a, b)
        maxima = [max(b) for b in mine]
        firsts.append(maxima)
        assert maxima != sorted(maxima, reverse=True)  # the blocks' order is shuffled, not long-to-short
    assert len({tuple(f) for f in firsts}) == runs


def test_the_order_depends_on_seed_and_step_only_across_epochs():
    sizes = lengths_seed(203)  # no whole number of micro-batches per epoch: batches straddle epochs
    a = pad_data(sizes, 64, seed=5)
    for step in range(160):  # three epochs and more, in order
        a.batch(step, 1, 3, 2)
    b = pad_data(sizes, 64, seed=5)  # "resumed"
    for step in (150, 67, 3, 68):
        assert torch.equal(a.batch(step, 1, 3, 2)[1], b.batch(step, 1, 3, 2)[1])
    c = pad_data(sizes, 64, seed=6)
    assert not torch.equal(c.batch(3, 1, 3, 2)[1], b.batch(3, 1, 3, 2)[1])
    # each epoch still holds every document once, straddling micro-batches included
    firsts = [int(a.sample(i, 3)[1][0]) for i in range(2 * 203)]
    starts = sorted(np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist())
    assert sorted(firsts[:203]) == starts and sorted(firsts[203:]) == starts
    assert firsts[:203] != firsts[203:]  # a new order each epoch


def test_later_epochs_stay_grouped_when_batches_straddle_epochs():
    n, mb, ws = 2003, 3, 2  # 2003 % 6 = 5: every epoch after the first starts inside a micro-step
    sizes = lengths_seed(n)
    grouped, plain = pad_data(sizes, 64, seed=8), pad_data(sizes, 64, seed=8, grouped=False)

    def waste(ds, first_step, steps):
        total = 0
        for s in range(first_step, first_step + steps):
            lens = scored_len(torch.cat([ds.batch(s, 0, mb, 1, r, ws)[1] for r in range(ws)]))
            total += max(lens) * len(lens) - sum(lens)
        return total

    for epoch in (1, 2):  # whole micro-steps inside the epoch, its straddling first and last ones left out
        first = -(-epoch * n // (mb * ws)) + 1
        steps = n // (mb * ws) - 3
        assert 10 * waste(grouped, first, steps) < waste(plain, first, steps), epoch


def test_micro_batches_of_one_are_not_reordered():
    sizes = lengths_seed(300)
    g, p = pad_data(sizes, 64, seed=2), pad_data(sizes, 64, seed=2, grouped=False)
    for step in range(0, 300, 7):
        assert torch.equal(g.batch(step, 0, 1, 1)[1], p.batch(step, 0, 1, 1)[1])


def test_ranks_split_the_grouped_batch_of_one_big_process():
    ds = pad_data(lengths_seed(2000), 64, seed=4)
    B, G, W = 3, 2, 4
    for step in (0, 9):
        for micro in range(G):
            parts = [ds.batch(step, micro, B, G, rank=r, world_size=W) for r in range(W)]
            whole = ds.batch(step, micro, B * W, G, rank=0, world_size=1)
            assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def side(sizes, rng, prompt: int = 2) -> Side:
    sizes = np.asarray(sizes, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    mask = np.ones(int(sizes.sum()), np.uint8)
    for s in starts:
        mask[s:s + prompt] = 0
    return Side(rng.integers(1, 1000, int(sizes.sum())), mask, starts, sizes)


def test_preference_pairs_are_grouped_by_their_longer_side():
    rng = np.random.default_rng(0)
    n, mb = 800, 4
    chosen, rejected = rng.integers(4, 120, n), rng.integers(4, 120, n)
    pairs = [PreferenceData(side(chosen, rng), side(rejected, rng), 100, seed=1) for _ in range(2)]
    pairs[0].group_by_length = True
    cost = []
    for data in pairs:
        total, seen = 0, []
        for step in range(n // mb):
            x, y = data.batch(step, 0, mb, 1)
            total += x.shape[1] * x.shape[0]  # the batch runs its longest row for every row
            seen += [tuple(r) for r in x[:mb].tolist()]
        assert len(set(seen)) == n  # every pair once
        cost.append(total)
    longer = np.minimum(np.maximum(chosen, rejected), 100)
    # sorted runs of 200 pairs over 97 lengths: a batch's longest row is a few tokens over each pair's longer side,
    # where random batches of 4 pairs run the longest of 8 rows
    bound = 2 * (longer.sum() + 8 * n)
    assert cost[0] <= bound < cost[1]


def write_jsonl(path, texts):
    import json

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_group_by_length_on_get_sampling_is_a_one_line_error(tmp_path):
    from peft_rwkv7.data.tokenizer import load_tokenizer

    path = write_jsonl(tmp_path / "t.jsonl", ["some text " * 40] * 8)
    cfg = DataConfig(path=str(path), ctx_len=16, group_by_length=True, eval_split=0)
    with pytest.raises(UserError, match=r"^data.group_by_length: applies to pad sampling.*get sampling"):
        make_dataset(cfg, load_tokenizer("world"), seed=0, cache_dir=tmp_path / "cache", progress=False)
    ok = make_dataset(cfg.model_copy(update={"sampling": "pad"}), load_tokenizer("world"), seed=0,
                      cache_dir=tmp_path / "cache", progress=False)
    assert ok.group_by_length and "grouped by length" in ok.describe()


@pytest.mark.parametrize("data, expect", [
    ("{path: d.jsonl, kind: text, group_by_length: true}", "data.group_by_length: applies to pad sampling and "
     "preference pairs; kind text is read with get sampling"),
    ("{path: d.jsonl, sampling: get, group_by_length: true}", "data.group_by_length: applies to pad sampling and "
     "preference pairs; data.sampling is get"),
    ("{path: p.jsonl, kind: prompts, group_by_length: true}", "data.group_by_length: applies to pad sampling and "
     "preference pairs, not to GRPO's prompts"),
])
def test_an_ungroupable_recipe_is_refused_at_load(tmp_path, data, expect):
    from peft_rwkv7.train.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: m.pth}}\ndata: {data}\n")
    with pytest.raises(UserError) as e:
        load_recipe(str(path))
    assert str(e.value).startswith(f"{path}: {expect}") and "\n" not in str(e.value), str(e.value)
    for ok in ("{path: d.jsonl, kind: text, sampling: pad, group_by_length: true}",
               "{path: d.jsonl, kind: sft, group_by_length: true}", "{path: d.jsonl, group_by_length: true}"):
        path.write_text(f"model: {{path: m.pth}}\ndata: {ok}\n")
        assert load_recipe(str(path)).data.group_by_length


def test_grpo_prompts_found_by_auto_refuse_grouping():
    from pathlib import Path

    from peft_rwkv7.data.prompts import make_prompt_data
    from peft_rwkv7.data.tokenizer import load_tokenizer

    prompts = Path(__file__).resolve().parents[2] / "data/demo/grpo_prompts.jsonl"
    cfg = DataConfig(path=str(prompts), group_by_length=True)  # kind auto: the loop reads it as prompts for grpo
    with pytest.raises(UserError, match=r"^data.group_by_length: applies to pad sampling and preference pairs, not"):
        make_prompt_data(cfg, load_tokenizer("world"), 0, 64)
    assert make_prompt_data(cfg.model_copy(update={"group_by_length": False}), load_tokenizer("world"), 0, 64).num_docs
