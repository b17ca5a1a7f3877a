"""Whether this CPU's bf16 matrix products are natively fast: the measured check behind
`train.precision: auto` and `generate/eval --dtype auto` on CPU.

On a CPU with native bf16 (AVX512-BF16, AMX) torch's bf16 GEMMs run 2-4x faster than fp32; on one without
(AVX2 only) they fall to a scalar path (one run: `F.linear` 5.5 GFLOP/s and `grad @ W` 0.3 GFLOP/s against
fp32's 27), which turns a 2 s training step into minutes. The ISA flags do not say which path torch's BLAS
takes for which op, so the check measures the three products a training step runs through a frozen
weight (forward `F.linear(x, W)`, input gradient `g @ W`, weight gradient `g.T @ x`) at a block's FFN
shape and a vocabulary-head slice, fp32 against bf16, on torch's thread count as training uses it.

Each op is first timed on a 16-row slice in both dtypes (cheap even at 0.3 GFLOP/s); bf16 below half of
fp32's speed there is clearly slow and ends the check (one slow op decides "slow"). Otherwise both dtypes
are timed at the full shape (the best of a few calls). bf16 counts as fast only if every op runs at least
FAST_MARGIN times fp32's speed; the whole check takes about 0.5-1.5 s on a 2-core CPU, once per machine.

Where bf16 is fast, the check also times the products of the zone of row counts where oneDNN may run a whole
call on one thread (ops/rowsplit.py) whole against in row chunks, at three row counts in it and a block's three
weight shapes, forward and input gradient; chunks count as faster at ROW_CHUNKS_MARGIN times the speed
(~0.3 s).

The result is cached as JSON beside the kernel cache (`<torch extensions root>/peft_rwkv7/`), keyed by
what changes it: the CPU's model name and flags, torch's version and CPU capability, the thread count, the
libraries' ISA caps (LIBRARY_ISA_CAPS, e.g. ONEDNN_MAX_CPU_ISA) and the probe itself. An unreadable cache is
measured again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

_VERSION = 2  # bump when the probe (shapes, rule, record) changes: part of the cache key
# (rows, in features, out features): a 0.1B block's FFN key at ctx 512 ([512, 768] against [3072, 768]) and
# a 4096-word slice of the 65536-word head at 128 tokens (far more outputs than inputs; the whole head would
# take seconds in fp32).
SHAPES = ((512, 768, 3072), (128, 768, 4096))
SCREEN_ROWS = 16  # rows of the first, cheap probe: 75-100 MFLOP per op, about 0.3 s even at 0.3 GFLOP/s
# bf16 must beat fp32 by 20% on every op to be chosen: autocast adds cast passes over activations and
# trained fp32 tensors that these timings leave out, and the step's non-GEMM work does not speed up, so a
# GEMM that is barely faster does not make the step faster; 20% also keeps repeat-to-repeat noise (a few %
# on a shared machine) from flipping the choice. Measured CPUs are far from it on either side (native:
# 2.7-4x, scalar path: 0.01-0.2x).
FAST_MARGIN = 1.2
# Below half of fp32's speed on the screen's slice is far under the margin: the check stops there.
# Passing it also bounds the full-shape bf16 calls at about twice fp32's time.
CLEARLY_SLOW = 0.5
# Calls are timed in rounds of one fp32 call and then bf16 calls for about as long (at most MAX_REPEAT), so
# that a burst of other work on the machine hits both alike and bf16's shorter calls get as many chances to
# run undisturbed (one lost time slice is a large share of a short call); each dtype's best call counts
# (other work only ever adds time). SCREEN_ROUNDS on the slice after a warm-up, FULL_ROUNDS at the full shape
# (the slice warmed the code paths, and the best call drops a slow first one); no further round once the
# op's budget is spent (a 0.3 GFLOP/s call spends it alone).
# The row-chunk probe (ops/rowsplit.py): row counts inside its zone and a block's weights [out, in] (attention,
# FFN key, FFN value); chunks are taken where they are this much faster in all (a 2-core Xeon with AMX: 1.25-1.29x;
# the ops without a hole there run at 0.95-1x in chunks, those with one at ~2x).
ROW_CHUNKS_ROWS = (768, 1024, 1280)
ROW_CHUNKS_SHAPES = ((768, 768), (3072, 768), (768, 3072))
ROW_CHUNKS_MARGIN, ROW_CHUNKS_ROUNDS = 1.1, 3
SCREEN_ROUNDS, SCREEN_BUDGET_S = 3, 0.1
FULL_ROUNDS, FULL_BUDGET_S = 2, 0.5
MAX_REPEAT = 8
# The libraries' own settings that cap the instructions they use on the same CPU (oneDNN's, MKL's, torch's own
# kernels'). They are not this project's settings, but they change the answer: oneDNN capped at AVX2 runs bf16
# products at 0.01-0.2x fp32's speed on a CPU with AVX512-BF16 (issue 23, round 28), so a verdict cached
# without the cap must not be read under it, nor the other way round. Part of the cache key.
LIBRARY_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_CPU_ISA_HINTS", "DNNL_CPU_ISA_HINTS",
                    "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "ATEN_CPU_CAPABILITY")


@dataclass(frozen=True)
class Bf16Check:
    """fast: bf16 beats fp32 by FAST_MARGIN on every probed op; ratio: the worst bf16/fp32 speed ratio;
    gflops: op -> {"fp32": GFLOP/s, "bf16": GFLOP/s} for the ops measured (fewer when one was clearly
    slow); cpu: the CPU's name; seconds: how long the measurement took; cached: read from the cache."""

    fast: bool
    ratio: float
    gflops: dict[str, dict[str, float]]
    cpu: str
    seconds: float
    cached: bool = False
    row_chunks: bool = False  # bf16 products of ops.rowsplit's zone are faster in row chunks here
    row_chunks_speedup: float | None = None  # whole calls' time over chunked calls' (None: not measured)
    isa_caps: dict[str, str] = field(default_factory=dict)  # the libraries' ISA caps it was measured under

    def summary(self) -> str:
        """The worst ratio and whether it was measured now, in words."""
        source = "cached measurement" if self.cached else f"measured now in {self.seconds:.2f} s"
        return f"bf16 matmuls run at {self.ratio:.2g}x fp32's speed on this CPU at worst ({source})"


def _cpuinfo() -> tuple[str, str]:
    """(model name, ISA flags) from /proc/cpuinfo (Linux), else the platform's processor name."""
    name, flags = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if not name and key in ("model name", "Model", "cpu model"):
                name = value.strip()
            elif not flags and key in ("flags", "Features"):
                flags = " ".join(sorted(value.split()))
    return name or platform.processor() or platform.machine(), flags


def machine_fields() -> dict[str, object]:
    """What changes the check's answer; all of it goes into the cache key."""
    name, flags = _cpuinfo()
    return {
        "probe": _VERSION, "cpu": name, "flags": flags, "machine": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "torch": f"{torch.__version__} {torch.version.git_version}",
        "isa_caps": {var: os.environ[var] for var in LIBRARY_ISA_CAPS if os.environ.get(var)},
    }


def default_cache_dir() -> Path:
    """`<torch extensions root>/peft_rwkv7`, where ops.build keeps the compiled kernels."""
    from .build import extensions_root

    return extensions_root() / "peft_rwkv7"


def cache_file(cache_dir: Path, fields: dict[str, object], prefix: str = "bf16-check") -> Path:
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{prefix}-{key}.json"


def _timed(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _best_seconds(f32: Callable[[], object], f16: Callable[[], object], rounds: int, budget_s: float,
                  warm_up: bool) -> tuple[float, float]:
    """(fp32, bf16) best seconds per call over up to `rounds` rounds (see SCREEN_ROUNDS), after one untimed
    call of each when `warm_up`; at least one round, no further ones once `budget_s` is spent."""
    start = time.perf_counter()
    if warm_up:
        f32(), f16()
    best32 = best16 = math.inf
    for i in range(rounds):
        if i and time.perf_counter() - start > budget_s:
            break
        best32 = min(best32, _timed(f32))
        repeat = 1 if best16 == math.inf else max(1, min(MAX_REPEAT, round(best32 / best16)))
        for _ in range(repeat):
            best16 = min(best16, _timed(f16))
    return best32, best16


def _ops(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The products through a weight w [o, k]: forward on x [rows, k], input and weight gradients from g [rows, o]."""
    (rows, k), o = x.shape, w.shape[0]
    return {f"F.linear x[{rows},{k}] W[{o},{k}]": lambda: F.linear(x, w),
            f"g[{rows},{o}] @ W[{o},{k}]": lambda: g @ w,
            f"g.T @ x -> [{o},{k}] over {rows} rows": lambda: g.t() @ x}


def _rates(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, screen: bool) -> list[tuple[str, float, float]]:
    """(op, fp32 GFLOP/s, bf16 GFLOP/s) of each product (each is 2*rows*k*o FLOP), stopping after a clearly
    slow one."""
    flop = 2.0 * x.shape[0] * x.shape[1] * w.shape[0]
    ops32, ops16 = _ops(x, w, g), _ops(*(t.to(torch.bfloat16) for t in (x, w, g)))
    rounds, budget = (SCREEN_ROUNDS, SCREEN_BUDGET_S) if screen else (FULL_ROUNDS, FULL_BUDGET_S)
    out = []
    for (name, f32), f16 in zip(ops32.items(), ops16.values()):
        s32, s16 = _best_seconds(f32, f16, rounds, budget, warm_up=screen)
        out.append((name, flop / s32 / 1e9, flop / s16 / 1e9))
        if s32 < CLEARLY_SLOW * s16:
            break  # the rest would only cost time (and at 0.3 GFLOP/s, a lot of it)
    return out


def _row_chunks_speedup(gen: torch.Generator) -> float:
    """Time of whole bf16 calls over that of the same calls in ops.rowsplit's chunks (each op's best of
    ROW_CHUNKS_ROUNDS alternated rounds), summed over ROW_CHUNKS_ROWS x ROW_CHUNKS_SHAPES, forward and x's
    gradient."""
    from .rowsplit import mm_rows, row_chunks

    whole = chunked = 0.0
    for rows in ROW_CHUNKS_ROWS:
        for o, k in ROW_CHUNKS_SHAPES:
            x, w, g = (torch.empty(shape).uniform_(-1, 1, generator=gen).to(torch.bfloat16)
                       for shape in ((rows, k), (o, k), (rows, o)))
            n = row_chunks(rows, w)
            for a, b in ((x, w.t()), (g, w)):
                mm_rows(a, b, 1), mm_rows(a, b, n)  # warm-up
                best = [math.inf, math.inf]
                for _ in range(ROW_CHUNKS_ROUNDS):
                    best[0] = min(best[0], _timed(lambda: mm_rows(a, b, 1)))  # noqa: B023 (called at once)
                    best[1] = min(best[1], _timed(lambda: mm_rows(a, b, n)))  # noqa: B023
                whole, chunked = whole + best[0], chunked + best[1]
    return whole / chunked


def _measure_once() -> dict:
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)  # never the global RNG: training seeds it after this runs
    gflops: dict[str, dict[str, float]] = {}
    ratios: list[float] = []
    with torch.no_grad():
        for rows, k, o in SHAPES:
            x, w, g = (torch.empty(shape).uniform_(-1, 1, generator=gen) for shape in ((rows, k), (o, k), (rows, o)))
            screen = _rates(x[:SCREEN_ROWS], w, g[:SCREEN_ROWS], screen=True)
            slow = any(b < CLEARLY_SLOW * a for _, a, b in screen)
            for name, rate32, rate16 in screen if slow else _rates(x, w, g, screen=False):
                gflops[name] = {"fp32": round(rate32, 2), "bf16": round(rate16, 2)}
                ratios.append(rate16 / rate32)
            if slow:  # one clearly slow op decides
                break
    ratio = min(ratios)
    record = {"fast": ratio >= FAST_MARGIN, "ratio": round(ratio, 3), "gflops": gflops}
    if record["fast"]:
        with torch.no_grad():
            speedup = _row_chunks_speedup(gen)
        record.update(row_chunks=speedup >= ROW_CHUNKS_MARGIN, row_chunks_speedup=round(speedup, 3))
    return {**record, "seconds": round(time.perf_counter() - t0, 3)}


def measure_bf16() -> dict:
    """Time the probe now: {fast, ratio, gflops, seconds} (see the module docstring). A "slow" answer is
    measured a second time and the better of the two kept, since it is cached and a burst of other work
    on the machine can only make bf16 look slower than it is, never faster than fp32 by the margin
    (a slow CPU's second look costs little: its first clearly slow op ends it)."""
    first = _measure_once()
    if first["fast"]:
        return first
    second = _measure_once()
    best = max(first, second, key=lambda r: r["ratio"])
    return {**best, "seconds": round(first["seconds"] + second["seconds"], 3)}


def _valid(record: object) -> bool:
    """A measurement record of the shape measure_bf16 returns."""
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(record, dict) and isinstance(record.get("fast"), bool) and number(record.get("ratio"))
            and number(record.get("seconds")) and isinstance(record.get("gflops"), dict)):
        return False
    if not isinstance(record.get("row_chunks", False), bool) or not (
            record.get("row_chunks_speedup") is None or number(record["row_chunks_speedup"])):
        return False
    return all(isinstance(k, str) and isinstance(v, dict) and set(v) == {"fp32", "bf16"}
               and all(map(number, v.values())) for k, v in record["gflops"].items())


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cpu_bf16_check(cache_dir: Path | None = None, measure: Callable[[], dict] | None = None) -> Bf16Check:
    """This CPU's bf16 verdict: from the cache in `cache_dir` (default: beside the kernel cache) when a
    readable one exists for this machine, else measured by `measure` (default: measure_bf16) and cached.
    A cache that cannot be written only costs a measurement next time."""
    fields = machine_fields()
    path = cache_file(default_cache_dir() if cache_dir is None else cache_dir, fields)
    try:
        record = json.loads(path.read_text())
        if _valid(record) and record.get("fields") == fields:
            return _record(record, fields, cached=True)
    except (OSError, ValueError):
        pass  # absent or unreadable: measured again below
    record = dict((measure or measure_bf16)())
    if not _valid(record):
        raise TypeError(f"bf16 measurement returned {record!r}")
    try:
        write_atomic(path, {**record, "fields": fields})
    except OSError as e:
        print(f"peft_rwkv7: could not cache the bf16 check in {path} ({e})", file=sys.stderr, flush=True)
    return _record(record, fields, cached=False)


def _record(record: dict, fields: dict, cached: bool) -> Bf16Check:
    speedup = record.get("row_chunks_speedup")
    return Bf16Check(fast=record["fast"], ratio=float(record["ratio"]), gflops=record["gflops"],
                     cpu=str(fields["cpu"]), seconds=float(record["seconds"]), cached=cached,
                     row_chunks=record.get("row_chunks", False),
                     row_chunks_speedup=None if speedup is None else float(speedup),
                     isa_caps=dict(fields["isa_caps"]))


def cuda_bf16_native() -> bool:
    """Whether the current CUDA device computes bf16 natively (torch.cuda.is_bf16_supported also says yes where it
    only emulates it)."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def choose_bf16(precision: str, device_type: str, setting: str, say: bool = True,
                check: Callable[[], Bf16Check] | None = None) -> bool:
    """Whether `precision` ("auto", "fp32" or "bf16", read from `setting`) computes in bf16 on `device_type`.

    auto: bf16 on a GPU with native bf16 (compute capability 8.0 and later: torch emulates it on older ones, slowly);
    on CPU only where the check finds bf16 fast, with one stderr line saying what it chose and why (on a GPU only
    where it chooses fp32). bf16 forced on a CPU the check finds slow, or on a GPU without native bf16: bf16 all the
    same, with one warning line. `say` False (every process but the main one) keeps stderr quiet. `check` defaults
    to cpu_bf16_check."""
    if precision == "fp32":
        return False
    sep = " " if setting.startswith("-") else ": "

    def tell(line: str) -> None:
        if say:
            print(line, file=sys.stderr, flush=True)

    def warn_slow(why: str) -> None:  # bf16 asked for where it is slow
        tell(f"warning: {setting}{sep}bf16: {why}: expect a much slower run; {setting}{sep}fp32 or auto avoids it")

    if device_type == "cuda":
        native = cuda_bf16_native()
        if not native:
            gpu = torch.cuda.get_device_name() if say else ""
            if precision == "auto":
                tell(f"{setting}{sep}auto chose fp32: {gpu} has no native bf16 (torch would emulate it)")
            else:
                warn_slow(f"{gpu} has no native bf16 (torch emulates it)")
        return precision == "bf16" or native
    if device_type != "cpu":
        return precision == "bf16"
    result = (check or cpu_bf16_check)()
    if precision == "auto":
        tell(f"{setting}{sep}auto chose {'bf16' if result.fast else 'fp32'}: {result.summary()}; bf16 needs "
             f"{FAST_MARGIN}x")
    elif not result.fast:
        warn_slow(result.summary())
    return precision == "bf16" or result.fast
