"""Sampling: `get` windows are deterministic per seed, cover the stream each epoch without
repeats and never read past the end; `pad` pieces; batches sharded by rank; resume by step.

The token stream is np.arange(N), so every token names its own position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_rwkv7.data import TrainData
from peft_rwkv7.data.sampling import WindowSampler, is_prime, magic_prime


def stream_data(n: int, ctx_len: int, seed: int = 0, sampling: str = "get", sizes=None, mask=None) -> TrainData:
    tokens = np.arange(n, dtype=np.int64)
    sizes = np.array([n] if sizes is None else sizes, np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return TrainData(tokens, mask, starts, sizes, ctx_len, sampling, True, seed)


def windows(ds: TrainData, first: int, count: int) -> list[int]:
    """Start position of each sample, after checking it is a contiguous window of the stream."""
    out = []
    for i in range(first, first + count):
        x, y = ds.sample(i)
        o = int(x[0])
        assert torch.equal(x, torch.arange(o, o + ds.ctx_len))  # contiguous, in order
        assert torch.equal(y, x + 1)                            # next-token targets
        out.append(o)
    return out


def test_magic_prime():
    primes = [p for p in range(2, 2000) if all(p % d for d in range(2, p))]
    assert [p for p in range(2000) if is_prime(p)] == primes
    for need in (1, 2, 3, 6, 100, 1000, 12345):
        p = magic_prime(need)
        assert p >= need and p % 3 == 2 and p in primes + [p] and is_prime(p)
        assert not any(q % 3 == 2 for q in primes if need <= q < p)  # the smallest such prime


@pytest.mark.parametrize(
    "n, ctx_len", [(10_000, 64), (5000, 7), (1000, 999), (1100, 1000), (2500, 1000), (3001, 100), (65, 64)]
)
def test_get_epoch_covers_stream_without_repeats_or_overrun(n, ctx_len):
    ds = stream_data(n, ctx_len, seed=3)
    p = ds.num_samples
    assert p * ctx_len >= n - 1  # enough windows to cover every target
    for epoch in range(2):
        starts = windows(ds, epoch * p, p)
        assert len(set(starts)) == p or n - ctx_len - 1 < p  # distinct windows
        assert min(starts) == 0 and max(starts) + ctx_len + 1 == n  # first token .. exactly the last
        covered = np.zeros(n, bool)
        for o in starts:
            covered[o + 1 : o + ctx_len + 1] = True
        assert covered[1:].all()  # every token (bar the first, which nothing precedes) is a target


def test_get_is_deterministic_per_seed_and_reshuffles_each_epoch():
    a, b, c = stream_data(50_000, 32, seed=1), stream_data(50_000, 32, seed=1), stream_data(50_000, 32, seed=2)
    p = a.num_samples
    order_a = windows(a, 0, 200)
    assert order_a == windows(b, 0, 200)
    assert order_a != windows(c, 0, 200)
    assert windows(a, p, 200) != order_a  # epoch 2: same windows, new order
    assert sorted(windows(a, p, p)) == sorted(windows(a, 0, p))
    # scattered, not sequential: consecutive samples rarely neighbours
    steps = np.abs(np.diff(order_a))
    assert np.median(steps) > 50 * 32


def test_window_sampler_is_a_permutation_per_epoch():
    for n in (200, 1000, 7777):
        w = WindowSampler(n, 3, seed=5)
        assert sorted(w.slot(i) for i in range(w.p)) == list(range(w.p))


def test_get_too_short_stream_is_user_error():
    from peft_rwkv7.errors import UserError

    with pytest.raises(UserError, match="cannot fill one sample of ctx_len\\+1 = 65; lower data.ctx_len"):
        stream_data(64, 64)
    assert stream_data(65, 64).num_samples == 1


def test_pad_pieces_and_order():
    sizes = [5, 12, 1, 8]  # ctx_len 4 -> pieces 2 + 3 + 1 + 2
    ds = stream_data(26, 4, sampling="pad", sizes=sizes)
    assert ds.num_samples == 8
    got = sorted((tuple(ds.sample(i)[0].tolist()), tuple(ds.sample(i)[1].tolist())) for i in range(8))
    pad = -100
    want = sorted([
        ((0, 0, 1, 2), (0, 1, 2, 3)), ((3, 0, 0, 0), (4, pad, pad, pad)),             # doc 0: tokens 0..4
        ((0, 5, 6, 7), (5, 6, 7, 8)), ((8, 9, 10, 11), (9, 10, 11, 12)), ((12, 13, 14, 15), (13, 14, 15, 16)),
        ((0, 0, 0, 0), (17, pad, pad, pad)),                                          # doc 2: token 17
        ((0, 18, 19, 20), (18, 19, 20, 21)), ((21, 22, 23, 24), (22, 23, 24, 25)),
    ])
    assert got == want
    other = stream_data(26, 4, seed=9, sampling="pad", sizes=sizes)
    assert [other.sample(i)[1].tolist() for i in range(8)] != [ds.sample(i)[1].tolist() for i in range(8)]


def test_pad_drops_pieces_without_loss_and_masks_labels():
    mask = np.zeros(12, np.uint8)
    mask[9:] = 1  # only the last 3 tokens carry loss
    ds = stream_data(12, 4, sampling="pad", sizes=[12], mask=mask)
    assert ds.num_samples == 1  # pieces over targets 0..3 and 4..7 carry no loss
    x, y = ds.sample(0)
    assert x.tolist() == [7, 8, 9, 10] and y.tolist() == [-100, 9, 10, 11]


@pytest.mark.parametrize("sampling", ["get", "pad"])
def test_rank_sharding_equals_one_big_process(sampling):
    ds = stream_data(20_000, 16, seed=4, sampling=sampling, sizes=None if sampling == "get" else [37] * 540 + [20])
    B, G, W = 3, 2, 4
    for step in (0, 7):
        for micro in range(G):
            parts = [ds.batch(step, micro, B, G, rank=r, world_size=W) for r in range(W)]
            xs = torch.cat([p[0] for p in parts])
            whole = ds.batch(step, micro, B * W, G, rank=0, world_size=1)
            assert torch.equal(xs, whole[0]) and torch.equal(torch.cat([p[1] for p in parts]), whole[1])
            assert xs.shape == (B * W, 16)
            assert len({tuple(r) for r in xs.tolist()}) == B * W  # ranks read distinct samples


def test_batch_depends_on_step_only():
    a = stream_data(30_000, 16, seed=6)
    for step in range(40):  # walk through more than one epoch
        a.batch(step, 0, 8, 1)
    b = stream_data(30_000, 16, seed=6)  # "resumed" at step 37
    assert torch.equal(a.batch(37, 0, 8, 1)[0], b.batch(37, 0, 8, 1)[0])
    assert torch.equal(a.batch(3, 0, 8, 1)[0], b.batch(3, 0, 8, 1)[0])
