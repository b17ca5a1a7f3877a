"""Freed memory stays in the training process (glibc's malloc on Linux).

glibc serves an allocation over its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap and unmaps it
on free, and it gives the heap's free top back to the OS past a trim threshold. A training step frees and
re-allocates the same activations every step (at 0.1B ctx 4096: [4096, 3072] fp32 = 48 MiB each, ~12 GB in
all), so each step took them from the OS again, page by page: ~0.4-2.5M page faults and 2.5-15 s of system
time in a 12-19 s step on a 2-core VM. With mmap off and trimming off, freed blocks go back to malloc's heap
and the next step reuses them: no faults after the first steps (ctx 4096 state tuning: 12.2 -> 10.6 s a step).

The cost: the process keeps its peak memory until it exits (the peak is reached every step anyway). Other C
libraries (musl, macOS) keep their own behaviour. Nothing computed changes: this is where memory comes from.

Training on the CPU goes one step further (`CpuBlocks`, once the CPU extension is built): torch's
blocks of 8 MiB and more come from the extension's caching allocator (cuda/cpu_alloc.cpp), which keeps freed
blocks by size class and hands them to the next request of their class (or of a class up to half their
size). glibc's heap, reused in another order by the next step, was left with holes: at 0.1B ctx 4096 it held
~7 GB for at most ~4.4 GB in use; by size class the same steps take ~5 GB (docs/training_speed.md, round 10).
After each step the trainer returns free blocks that no request was given for 4 steps, and where shapes
change with every batch (the steps keep missing the cache) it gives the allocator up and glibc's heap, which
splits and joins blocks, serves them. At the run's end every free block goes back to the OS and the allocator
from before is torch's again (a later run in the same process installs it anew).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

import torch

from ..errors import UserError

__all__ = ["CpuBlocks", "available_memory", "check_batch_memory", "is_out_of_memory", "keep_freed_memory"]

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve every allocation from malloc's heap and never trim it (glibc). True where applied (calling it
    again changes nothing), False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # glibc only (musl's is a stub)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_MMAP_MAX 0: no mmap for large blocks (glibc still falls back to mmap if the heap cannot grow);
    # M_TRIM_THRESHOLD -1: trimming off (mallopt(3))
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


class CpuBlocks:
    """Training on the CPU (`enabled`): torch's CPU blocks of 8 MiB and more from the CPU extension's caching
    allocator (ops.cpu.cache_large_blocks) for this run. Around each training step (`step()`): afterwards the
    free blocks no step was given for 4 steps go back to the OS, and a step after the first whose large
    requests missed the cache more than MISS_SHARE of the time gives the allocator up for the rest of the run
    (shapes that change with every batch: glibc's heap serves those better). `close()` (the run's end, also as
    a context manager) gives it up and every free block back. `on`: whether it is in use; False without the
    extension (glibc's heap as above)."""

    MISS_SHARE = 0.05

    def __init__(self, enabled: bool, ops_cpu=None) -> None:
        if ops_cpu is None:
            from ..ops import cpu as ops_cpu
        self._cpu = ops_cpu
        self.on = bool(enabled and ops_cpu.is_available(torch.device("cpu")) and ops_cpu.cache_large_blocks())
        self.steps = 0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if not self.on:
            yield
            return
        before = self._cpu.block_cache_stats()
        yield
        after = self._cpu.block_cache_stats()
        self.steps += 1
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        if self.steps > 1 and misses > self.MISS_SHARE * (hits + misses):
            self.close()
        else:
            self._cpu.trim_block_cache()

    def close(self) -> None:
        if self.on:
            self._cpu.uncache_large_blocks()
            self.on = False

    def __enter__(self) -> CpuBlocks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` now: CUDA's free memory, Linux's MemAvailable; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocator's failure: torch's (CPU, CUDA), Python's, or the CPU block cache's (CpuBlocks)."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or any(
        s in str(e) for s in ("can't allocate memory", "CPU allocator: out of memory"))


def check_batch_memory(config, rows: int, ctx_len: int, run_len: int | None, device: torch.device) -> None:
    """A UserError before the first step where one micro-batch of `rows` samples cannot fit. Counted are only what
    it surely holds: its ids and labels (int64, [rows, ctx_len] each, on the CPU), and where every row runs
    `run_len` tokens (packed windows; None where a batch's padded tail is cut off first) its residual stream, one
    [rows, run_len, n_embd] tensor per layer in 2-byte elements, less than any backward keeps (gradient
    checkpointing included). A batch refused here would have failed, or been killed by the kernel, anyway."""
    batch = rows * ctx_len * 16
    acts = rows * run_len * config.n_embd * 2 * (config.n_layer + 1) if run_len else 0
    for where, need in (("cpu", batch + (acts if device.type == "cpu" else 0)), (device.type, acts)):
        free = available_memory(torch.device(where))
        if free is not None and need > free:
            raise UserError(f"train.micro_bsz: a micro-batch of {rows} samples of {ctx_len} tokens needs over "
                            f"{need / 2**30:.1f} GiB ({where}), {free / 2**30:.1f} GiB is free; lower train.micro_bsz "
                            "(raise train.grad_accum for the same batch)")
