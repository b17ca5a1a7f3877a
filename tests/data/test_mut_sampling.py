"""What mutation testing of data/sampling.py found untested (scripts/mutation.sh sampling; docs/mutation.md).

Expectations come from the documented rules themselves (a brute-force search for the smallest window count,
the set of ids a run of blocks may hold, the truncate rule) or from comparing two inputs that the rule says
must give the same order, never from the sampler's own bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from peft_rwkv7.data import sampling
from peft_rwkv7.data.sampling import EpochOrder, PieceSampler, WindowSampler, grouped_order, is_prime


def slots(w: WindowSampler, epoch: int) -> list[int]:
    return [w.slot(epoch * w.p + j) for j in range(w.p)]


def test_the_window_count_is_the_smallest_prime_that_covers_the_stream():
    # the rule (module docstring): p windows of ctx_len+1 tokens whose starts, spread evenly over [0, span], leave
    # no target unseen (start steps of span / (p-1) <= ctx_len), p prime with p % 3 == 2, the smallest such p
    for n in range(10, 400, 7):
        for ctx in (3, 4, 7, 16, 33):
            if n < ctx + 2:
                continue
            span = n - ctx - 1
            want = next(p for p in range(2, 10 * n) if is_prime(p) and p % 3 == 2 and (p - 1) * ctx >= span)
            assert WindowSampler(n, ctx, seed=0).p == want, (n, ctx)


def test_a_stream_of_one_window_has_one_slot_and_a_too_short_one_is_refused():
    w = WindowSampler(65, 64, seed=3)
    assert (w.p, w.offset(0), w.offset(5), w.slot(0), w.slot(1)) == (1, 0, 0, 0, 0)
    for n in (64, 63, 10):
        with pytest.raises(ValueError, match=rf"^{n} tokens cannot fill one window of ctx_len\+1 = 65$"):
            WindowSampler(n, 64, seed=0)


def test_every_seed_and_epoch_of_a_two_window_stream_is_a_permutation_and_epochs_reshuffle():
    # 9 tokens at ctx 4: two windows (p = 2)
    orders = []
    for seed in range(20):
        w = WindowSampler(9, 4, seed)
        assert w.p == 2
        first, second = slots(w, 0), slots(w, 1)
        assert sorted(first) == sorted(second) == [0, 1]
        orders.append(first != second)
    assert any(orders)  # each epoch draws its own order: some seeds flip between epochs


def test_epochs_scatter_windows_with_new_neighbours():
    w = WindowSampler(200_000, 32, seed=1)
    a, b = slots(w, 0), slots(w, 1)
    assert sorted(a) == sorted(b) == list(range(w.p))
    # a scattered order: consecutive samples' distances take many values (a linear map would give one)
    assert len({(y - x) % w.p for x, y in zip(a, a[1:])}) > w.p // 4
    # and a new one: few pairs of consecutive samples are consecutive again in the next epoch
    pairs = set(zip(a, a[1:]))
    assert sum(p in pairs for p in zip(b, b[1:])) < w.p // 20


def test_truncated_documents_give_their_first_piece_only():
    sizes = np.array([5, 1, 12, 0, 3, 9])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    s = PieceSampler(starts, sizes, ctx_len=4, split=False, loss_mask=None, seed=0)
    keep = sizes > 0  # an empty document has no piece
    assert s.piece_start.tolist() == starts[keep].tolist()
    assert s.piece_len.tolist() == np.minimum(sizes[keep], 4).tolist()
    assert s.piece_first.tolist() == [True] * int(keep.sum())


def test_a_piece_at_the_stream_start_with_one_scored_target_is_kept():
    mask = np.zeros(8, np.uint8)
    mask[2] = 1  # the first piece (targets 0..3) scores one token, the second (4..7) none
    s = PieceSampler(np.array([0]), np.array([8]), ctx_len=4, split=True, loss_mask=mask, seed=0)
    assert s.piece_start.tolist() == [0] and s.piece_len.tolist() == [4]


def test_one_sample_per_batch_takes_the_plain_permutation_whatever_the_lengths():
    n = 300
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 60, n), np.full(n, 7)
    for args in ((), (1,)):  # the default is one sample per micro-step
        oa, ob = EpochOrder(n, a, seed=4), EpochOrder(n, b, seed=4)
        assert [oa(i, *args) for i in range(2 * n)] == [ob(i, *args) for i in range(2 * n)]
    sizes = rng.integers(1, 60, n)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pa = PieceSampler(starts, sizes, 64, True, None, seed=4)
    pb = PieceSampler(starts, np.full(n, 7), 64, True, None, seed=4)
    assert [pa.piece(i) for i in range(n)] == [pb.piece(i) for i in range(n)]


def test_an_epochs_order_is_made_once(monkeypatch):
    made = []
    real = sampling.grouped_order
    monkeypatch.setattr(sampling, "grouped_order", lambda *a: made.append(1) or real(*a))
    o = EpochOrder(100, np.arange(100), seed=1)
    for i in range(250):
        o(i, 4)
    assert len(made) == 3  # one per epoch, not per sample


def _runs_ok(order, out, lengths, block, head, per_run):
    """The documented result: each run of per_run ids (from `head` on, whole blocks) is the permutation's run
    sorted longest first -- stably (Python's sort here), so that ties keep the permutation's order and the result
    never depends on how a numpy version breaks them (exact resume) -- and cut into blocks, in any block order."""
    n = len(order)
    body_end = head + (n - head) // block * block
    if list(out[:head]) != list(order[:head]) or list(out[body_end:]) != list(order[body_end:]):
        return False
    for lo in range(head, body_end, per_run):
        hi = min(lo + per_run, body_end)
        run = sorted(order[lo:hi].tolist(), key=lambda i: -lengths[i])
        want = sorted(tuple(run[k:k + block]) for k in range(0, hi - lo, block))
        if sorted(tuple(out[k:k + block].tolist()) for k in range(lo, hi, block)) != want:
            return False
    return True


@pytest.mark.parametrize("n,block,first", [(12, 2, 0), (7, 3, 0), (33, 4, 1), (45, 4, 3), (100, 2, 0),
                                           (1000, 2, 0), (500, 3, 7)])
@pytest.mark.parametrize("top", [1000, 3], ids=["few-ties", "many-ties"])
def test_runs_hold_up_to_fifty_blocks_and_fewer_in_a_short_epoch(n, block, first, top):
    head = (-first) % block
    runs_blocks = min(sampling.MEGA_BLOCKS, max(1, (n - head) // (4 * block)))
    for seed in range(6):
        rng = np.random.default_rng(seed)
        order, lengths = rng.permutation(n), rng.integers(1, top, n)
        out = grouped_order(order, lengths, block, first, seed, epoch=0)
        assert _runs_ok(order, out, lengths, block, head, block * runs_blocks), (n, block, first, seed)
        if runs_blocks > 1:  # one more or one fewer block a run would not give this (checked on the same draw)
            assert not all(_runs_ok(order, out, lengths, block, head, block * r) for r in (runs_blocks - 1,
                                                                                         runs_blocks + 1))


def test_the_blocks_order_depends_on_the_seed_and_equal_lengths_keep_the_permutations_batches():
    n, block = 400, 4
    order = np.random.default_rng(0).permutation(n)
    lengths = np.random.default_rng(1).integers(1, 100, n)
    outs = {tuple(grouped_order(order, lengths, block, 0, seed, 0)) for seed in range(4)}
    assert len(outs) == 4  # the same permutation, four seeds: four arrangements of its blocks
    # all lengths equal: grouping moves whole micro-batches of the permutation and never mixes them
    out = grouped_order(order, np.full(n, 5), block, 0, 3, 0)
    batches = {tuple(order[k:k + block]) for k in range(0, n, block)}
    assert {tuple(out[k:k + block]) for k in range(0, n, block)} == batches
    assert not np.array_equal(out, order)
