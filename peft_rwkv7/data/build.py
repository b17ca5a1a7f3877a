"""`rwkv-peft data build`: a jsonl / json / parquet file -> binidx, streamed and on all cores.

The main process reads the input in ~4 MB chunks of raw lines and hands them to worker
processes, which parse the JSON, render and tokenize; results come back in order and are
appended to a temp `.bin`. At most 2 chunks per worker are in flight, so memory stays bounded
whatever the input size. Nothing is renamed into place until the whole input has succeeded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import UserError
from .binidx import BinIdxWriter, temp_name, token_dtype
from .formats import TextFormat, encode_records
from .records import CHUNK_BYTES, check_file, is_json_array, iter_json_array, iter_parquet, jsonl_chunks, parse_lines
from .tokenizer import Tokenizer, load_tokenizer

RECORDS_PER_JOB = 2048  # for parquet / JSON-array input, already parsed in the main process
_START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # what this platform offers


def default_workers() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_worker_tokenizers: dict[str, Tokenizer] = {}  # in worker processes only: loading World takes ~0.5 s


def _init_worker(tokenizer: Tokenizer | str) -> None:
    """Pool initializer: a forked worker inherits the parent's loaded tokenizer; a spawned one loads it."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    _worker_tokenizers[tok.spec] = tok


def _encode_job(tokenizer: Tokenizer, fmt, dtype, batched: bool, job: tuple
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """("lines", raw lines, first line number, path) or ("records", [(where, rec)]) -> documents."""
    if job[0] == "lines":
        _, lines, first, path = job
        records = list(parse_lines(lines, first, path))
    else:
        records = job[1]
    return encode_records(fmt, tokenizer, records, dtype, batched=batched)


def _worker_job(spec: str, fmt, dtype, job: tuple) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    # One text at a time (batched=False): pyrwkv-tokenizer's encode_batch runs on a Rust thread
    # pool, which deadlocks in a process forked from a parent that had already started it.
    return _encode_job(_worker_tokenizers[spec], fmt, dtype, False, job)


def _jobs(path: Path, chunk_bytes: int) -> Iterator[tuple[tuple, int]]:
    """(job, progress units): raw-line chunks of jsonl (units: bytes) or batches of parsed records."""
    suffix = path.suffix.lower()
    if suffix == ".parquet" or (suffix == ".json" and is_json_array(path)):
        records = iter_parquet(path) if suffix == ".parquet" else iter_json_array(path)
        batch: list = []
        for item in records:
            batch.append(item)
            if len(batch) == RECORDS_PER_JOB:
                yield ("records", batch), len(batch)
                batch = []
        if batch:
            yield ("records", batch), len(batch)
    else:
        for lines, first, nbytes in jsonl_chunks(path, chunk_bytes):
            yield ("lines", lines, first, str(path)), nbytes


def _start_worker(initializer: Callable | None, initargs: tuple, parent: int) -> None:
    """A worker leaves Ctrl-C to its parent: a terminal sends it to the whole process group, and the parent stops
    the pool (its workers finish the job at hand) and says "interrupted" once, without a traceback per worker.
    It ends with its parent: a parent killed outright (SIGKILL, the OOM killer) can stop no pool, and its
    workers waited forever for the next job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def _end_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when the thread that forked it ends (prctl PR_SET_PDEATHSIG); the pool forks
    its workers from the caller's thread, at the first submit. Elsewhere nothing (spawned workers see their
    call queue close)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def _submit(pool: ProcessPoolExecutor, fn: Callable, job: tuple):
    """pool.submit with Ctrl-C held back until it returns. The first submit forks the workers and starts the pool's
    manager thread; a KeyboardInterrupt landing between the thread's creation and its start left a pool whose
    shutdown fails ("cannot join thread before it is started"), which hid the interrupt and left the workers
    waiting. A signal that arrives meanwhile stays pending and is raised as soon as the submit is done."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return pool.submit(fn, job)  # only the main thread receives Ctrl-C
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(fn, job)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ordered_map(fn: Callable, jobs: Iterable[tuple[tuple, int]], workers: int, initializer: Callable | None = None,
                initargs: tuple = ()) -> Iterator[tuple[object, int]]:
    """(fn(job), units) in job order, on `workers` processes with at most 2 jobs each in flight.

    Workers are forked where possible: they start in milliseconds, inherit loaded objects and
    need no importable __main__ (spawn re-runs the caller's script); fn must then avoid thread
    pools the parent may have started.
    """
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(_START_METHOD),
                               initializer=_start_worker, initargs=(initializer, initargs, os.getpid()))
    pending: deque = deque()
    try:
        for job, units in jobs:
            pending.append((_submit(pool, fn, job), units))
            if len(pending) >= 2 * workers:
                fut, u = pending.popleft()
                yield fut.result(), u
        while pending:
            fut, u = pending.popleft()
            yield fut.result(), u
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tokenize_file(
    input_path: str | os.PathLike,
    out_prefix: str | os.PathLike,
    fmt,
    tokenizer: Tokenizer,
    workers: int | None = None,
    progress: bool = True,
    mask_path: str | os.PathLike | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Render + tokenize every record of `input_path` with `fmt` into the binidx pair `out_prefix`.

    With `mask_path` (formats with a loss mask), the per-token loss mask [num_tokens] uint8 is
    written there too (before the pair appears, so a present .idx implies a complete mask).
    Returns {"docs", "tokens", "bytes", "seconds", "prefix"}.
    """
    from tqdm.auto import tqdm

    path = check_file(input_path)
    workers = default_workers() if workers is None else max(1, int(workers))
    # Never start more workers than there are chunks to give them.
    workers = min(workers, -(-path.stat().st_size // chunk_bytes))
    dtype = token_dtype(tokenizer.vocab_size)
    is_lines = path.suffix.lower() != ".parquet" and not (path.suffix.lower() == ".json" and is_json_array(path))
    t0 = time.perf_counter()
    def new_bar():  # at the first chunk tokenized: a file refused at its first records prints only its error
        return tqdm(total=path.stat().st_size if is_lines else None, unit="B" if is_lines else " doc",
                    unit_scale=is_lines, desc=f"tokenizing {path.name}", disable=not progress, dynamic_ncols=True)

    bar = None
    # named as the pair's temp files (the mask is `{prefix}.mask`), so that a killed build's is removed with theirs
    mask_tmp = Path(temp_name(Path(mask_path).parent, Path(mask_path).stem, ".mask")) if mask_path else None
    docs = 0
    try:
        jobs = _jobs(path, chunk_bytes)
        if workers <= 1:  # in-process: small inputs, tests
            fn = partial(_encode_job, tokenizer, fmt, dtype, True)
            results = ((fn(job), units) for job, units in jobs)
        else:
            # a forked worker inherits the loaded tokenizer; a spawned one gets its spec to load
            init = tokenizer if _START_METHOD == "fork" else tokenizer.spec
            results = ordered_map(partial(_worker_job, tokenizer.spec, fmt, dtype), jobs, workers,
                                  _init_worker, (init,))
        with BinIdxWriter(out_prefix, dtype) as writer, closing(results):
            mask_file = open(mask_tmp, "wb") if mask_tmp else None
            try:
                for (tokens, mask, sizes), units in results:
                    writer.add(tokens, sizes)
                    if mask_file:
                        mask_file.write(mask.astype(np.uint8).tobytes())
                    docs += len(sizes)
                    bar = bar or new_bar()
                    bar.update(units)
            finally:
                if mask_file:
                    mask_file.close()
            if docs == 0:
                raise UserError(f"{path}: no records (empty dataset)")
            if writer.num_tokens <= docs:  # one end-of-text per document and nothing else
                raise UserError(f"{path}: every document is empty (no text to tokenize)")
            if mask_tmp:
                os.replace(mask_tmp, mask_path)
    finally:
        if bar is not None:
            bar.close()
        if mask_tmp:
            mask_tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {"docs": docs, "tokens": writer.num_tokens, "bytes": path.stat().st_size, "seconds": seconds,
            "prefix": writer.prefix}


def build_binidx(
    input_path: str | os.PathLike,
    out_prefix: str | os.PathLike,
    tokenizer_spec: str | Tokenizer = "world",
    field: str = "text",
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """`rwkv-peft data build`: each record's `field` -> one binidx entry `encode(text) + [0]`.

    Writes OUT_PREFIX.bin / OUT_PREFIX.idx (uint16 tokens when the vocabulary fits) atomically.
    `workers`: tokenizer processes (default: all cores). Returns
    {"docs", "tokens", "bytes", "seconds", "prefix"}. UserError on bad input, naming file and line.
    """
    tok = tokenizer_spec if isinstance(tokenizer_spec, Tokenizer) else load_tokenizer(tokenizer_spec)
    return tokenize_file(input_path, out_prefix, TextFormat(field), tok, workers, progress)
