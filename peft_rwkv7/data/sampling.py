"""Where each sample comes from: pure functions of (seed, sample index), numpy only.

`get` (RWKV-LM's scheme). An epoch is p windows of ctx_len+1 tokens, p a prime with p % 3 == 2.
For such p, x -> x^3 is a bijection of Z_p (gcd(3, p-1) = 1), so
`slot(j) = f * (j + c)^3 mod p` (f != 0) visits every slot 0..p-1 exactly once as j runs over
an epoch, in a scattered order, with O(1) memory whatever the data size. RWKV-LM takes the
largest such prime below the number of ctx_len-slots and a fixed golden-ratio f; here p is the
smallest such prime with p windows able to cover the stream, the p window starts are spread
evenly over [0, num_tokens - ctx_len - 1] (consecutive windows then overlap by a few tokens
instead of leaving a tail unseen), and f, c are drawn per (seed, epoch), so every epoch predicts
every token at least once, in a new order. The last window ends exactly at the last token.

`pad`. A document d with n_d tokens (its entry, ending with end-of-text) is the sequence
`s = [0] + entry`, predicted as inputs s[:-1] -> targets s[1:]. It yields pieces k = 0, 1, ..
whose targets are entry[k*L : (k+1)*L] (L = ctx_len; `truncate` keeps piece 0 only). Pieces
whose targets carry no loss are dropped. Their order is a fresh permutation per (seed, epoch);
`data.group_by_length` then gives each micro-batch pieces of similar length (grouped_order), so less
padding is run (a batch is cut after its last scored position, train/losses.py).
"""

from __future__ import annotations

import math

import numpy as np


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, epoch])


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def magic_prime(at_least: int) -> int:
    """The smallest prime p >= at_least with p % 3 == 2 (so cubing permutes Z_p)."""
    p = max(2, at_least)
    while not (p % 3 == 2 and is_prime(p)):
        p += 1
    return p


class WindowSampler:
    """`get` windows over a stream of `num_tokens` tokens: `offset(i)` -> first token of sample i."""

    def __init__(self, num_tokens: int, ctx_len: int, seed: int) -> None:
        if num_tokens < ctx_len + 1:
            raise ValueError(f"{num_tokens} tokens cannot fill one window of ctx_len+1 = {ctx_len + 1}")
        self.seed, self.ctx_len = seed, ctx_len
        self.span = num_tokens - (ctx_len + 1)  # largest valid window start
        # Window starts step span/(p-1) <= ctx_len apart, so consecutive windows leave no target unseen.
        self.p = 1 if self.span == 0 else magic_prime(-(-(num_tokens - 1) // ctx_len))
        self._epoch: tuple[int, int, int] | None = None

    @property
    def num_samples(self) -> int:
        return self.p

    def _params(self, epoch: int) -> tuple[int, int]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = _rng(self.seed, epoch)
            self._epoch = (epoch, int(rng.integers(1, self.p)) if self.p > 1 else 1, int(rng.integers(0, self.p)))
        return self._epoch[1], self._epoch[2]

    def slot(self, i: int) -> int:
        epoch, j = divmod(i, self.p)
        f, c = self._params(epoch)
        return f * pow((j + c) % self.p, 3, self.p) % self.p

    def offset(self, i: int) -> int:
        if self.p == 1:
            return 0
        return self.slot(i) * self.span // (self.p - 1)


class PieceSampler:
    """`pad` pieces of documents given by `starts` / `sizes` (token offsets into the stream).

    piece_start [P]: stream position of the piece's first target; piece_len [P]: its targets
    (<= ctx_len); piece_first [P]: whether it starts its document (input 0 comes first).
    """

    def __init__(self, starts: np.ndarray, sizes: np.ndarray, ctx_len: int, split: bool,
                 loss_mask: np.ndarray | None, seed: int) -> None:
        sizes = sizes.astype(np.int64)
        n = -(-sizes // ctx_len) if split else np.minimum(sizes, 1)
        doc = np.repeat(np.arange(len(sizes)), n)
        k = np.arange(len(doc)) - np.repeat(np.cumsum(n) - n, n)
        self.piece_start = starts.astype(np.int64)[doc] + k * ctx_len
        self.piece_len = np.minimum(sizes[doc] - k * ctx_len, ctx_len)
        self.piece_first = k == 0
        if loss_mask is not None:
            # Loss-carrying targets per piece, from a running count over the mask.
            cum = np.concatenate([[0], np.cumsum(loss_mask, dtype=np.int64)])
            keep = cum[self.piece_start + self.piece_len] > cum[self.piece_start]
            self.piece_start, self.piece_len = self.piece_start[keep], self.piece_len[keep]
            self.piece_first = self.piece_first[keep]
        self._order = EpochOrder(len(self.piece_start), self.piece_len, seed)

    @property
    def num_samples(self) -> int:
        return len(self.piece_start)

    def piece(self, i: int, block: int = 1) -> int:
        """The piece of sample i (EpochOrder)."""
        return self._order(i, block)


class EpochOrder:
    """Which of `n` samples global sample i is: a fresh permutation per (seed, epoch), and with block > 1
    (samples per micro-step) that permutation grouped by `lengths` (grouped_order). The pad pieces'
    order and the preference pairs' (data/preference.py); the last epoch's order is kept."""

    def __init__(self, n: int, lengths: np.ndarray, seed: int) -> None:
        self.n, self.lengths, self.seed = n, lengths, seed
        self._cached: tuple[int, int, np.ndarray] | None = None

    def __call__(self, i: int, block: int = 1) -> int:
        epoch, j = divmod(i, self.n)
        if self._cached is None or self._cached[:2] != (epoch, block):
            order = _rng(self.seed, epoch).permutation(self.n)
            if block > 1:
                order = grouped_order(order, self.lengths, block, epoch * self.n, self.seed, epoch)
            self._cached = (epoch, block, order)
        return int(self._cached[2][j])


MEGA_BLOCKS = 50  # blocks per length group at most (HF transformers' LengthGroupedSampler takes 50 batches)


def grouped_order(order: np.ndarray, lengths: np.ndarray, block: int, first: int, seed: int,
                  epoch: int) -> np.ndarray:
    """`order` (an epoch's permutation of sample ids) rearranged so that each micro-batch -- each run of
    `block` consecutive global sample indices, the first of the epoch's being global index `first` --
    holds samples of similar `lengths[id]`: runs of up to MEGA_BLOCKS blocks (fewer where an epoch has
    under 4 groups' worth) are sorted longest first and cut into blocks, and the blocks' order within a
    run is shuffled, so batches do not go from long to short within each run. Which samples an epoch sees
    is unchanged; a pure function of its arguments (exact resume). The epoch's leading samples that
    complete a micro-batch begun in the previous epoch, and a partial last block, stay where they are."""
    n = len(order)
    head = (-first) % block
    body_end = head + (n - head) // block * block
    per_run = block * min(MEGA_BLOCKS, max(1, (n - head) // (4 * block)))
    rng = np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, 1])
    out = order.copy()
    for lo in range(head, body_end, per_run):
        hi = min(lo + per_run, body_end)
        run = order[lo:hi]
        run = run[np.argsort(-lengths[run], kind="stable")].reshape(-1, block)
        out[lo:hi] = run[rng.permutation(len(run))].reshape(-1)
    return out
