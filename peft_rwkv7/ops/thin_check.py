"""Which of LoRA's thin products run faster in the CPU extension's kernel (cuda/thin_cpu.cpp, ops.cpu.thin_nt /
thin_tn) than in torch's BLAS on this CPU: the measured check behind their routing (issue 23, round 22).

The products of an activation [tokens, K] with a rank-R factor are shapes BLAS blocks badly for (55-90 GFLOP/s in a
step on a 2-core AVX-512 EPYC, whose big products run at ~190). There the kernel beats BLAS on the factors' gradients
at ranks 8-32 (1.7-3x) and on x A^T at rank 16 (1.2-1.3x), and loses on x A^T at ranks 8, 32 and 64; its AVX2 clone,
timed on the same CPU, wins and loses at other ranks again. Which wins depends on the CPU, so it is measured, as
`train.precision: auto`'s bf16 check is (ops/precision.py), once per machine:

- for each rank the kernel takes (8, 16, 32, 64), both kinds of product at a 0.1B block's two widths (K 768 and
  3072) and a training step's 512 rows: "nt" x [512, K] A^T (also g B: LoRA's forward and x's gradient) and "tn"
  (g B)^T x (the factors' gradients), kernel and BLAS in alternate rounds, each product's best call;
- a (kind, rank) runs in the kernel where BLAS's summed time over both widths is MARGIN times the kernel's;
- about 0.3 s on a 2-core AVX-512 EPYC, at the process's thread count; cached as JSON beside the kernel cache,
  keyed like the bf16 check (the CPU's name and flags, torch, the thread count) and by the kernel's source, so a
  changed kernel is measured again.

A layer decides per call by its rank, so the same rank gives the same products in training and in a no-grad
forward (DPO's reference pass, evaluation).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cpu, precision

_PROBE = 1  # bump when the probe (shapes, rule, record) changes: part of the cache key
KINDS = ("nt", "tn")
ROWS, WIDTHS = 512, (768, 3072)  # a training step's rows at ctx 512; a 0.1B block's attention and FFN widths
# The kernel must be this much faster to be taken: a near tie is not worth bits that differ from BLAS's, and it
# keeps repeat-to-repeat noise (a few % on a shared machine) from flipping the routing between machines' runs.
MARGIN = 1.1
ROUNDS, CALLS = 5, 3  # alternate rounds of kernel and BLAS; per round CALLS calls, each on another activation
_SOURCE = cpu._KERNELS / "thin_cpu.cpp"


@dataclass(frozen=True)
class ThinCheck:
    """nt / tn: the ranks whose products of that kind run in the kernel here; speedup: kind -> rank -> BLAS's time
    over the kernel's (empty where nothing was measured: no extension); cpu: the CPU's name; seconds: how long the
    measurement took; cached: read from the cache."""

    nt: frozenset[int] = frozenset()
    tn: frozenset[int] = frozenset()
    speedup: dict[str, dict[int, float]] = field(default_factory=dict)
    cpu: str = ""
    seconds: float = 0.0
    cached: bool = False

    def summary(self) -> str:
        """Per kind, the kernel's speed over BLAS's at each rank and where it runs, in words."""
        if not self.speedup:
            return "not measured (the CPU extension is not built): BLAS"
        parts = []
        for kind in KINDS:
            taken = getattr(self, kind)
            rates = ", ".join(f"r{r} {x:.2f}x{'' if r in taken else ' (BLAS)'}" for r, x in self.speedup[kind].items())
            parts.append(f"{kind}: {rates}")
        source = "cached measurement" if self.cached else f"measured now in {self.seconds:.2f} s"
        return f"kernel's speed over BLAS's: {'; '.join(parts)} (needs {MARGIN}x; {source})"


def _fields() -> dict[str, object]:
    """What changes the answer: the bf16 check's machine fields, this probe and the kernel's source."""
    try:
        kernel = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]
    except OSError:
        kernel = "absent"
    return {**precision.machine_fields(), "probe": f"thin-{_PROBE}", "kernel": kernel}


def _best(fns: tuple[Callable[[int], object], Callable[[int], object]]) -> tuple[float, float]:
    """(kernel, BLAS) best seconds per call of fns[i](j) over ROUNDS alternate rounds of CALLS calls (j = the
    call's activation), after one untimed call of each."""
    for f in fns:
        f(0)
    best = [math.inf, math.inf]
    for _ in range(ROUNDS):
        for i, f in enumerate(fns):
            for j in range(CALLS):
                t0 = time.perf_counter()
                f(j)
                best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def measure_thin() -> dict:
    """Time the probe now (see the module docstring): {"speedup": {kind: {str(rank): BLAS/kernel}}, "seconds"}.
    Needs the CPU extension."""
    ext = cpu._extension()
    if ext is None:
        raise RuntimeError("the CPU extension is not built: nothing to measure")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)  # never the global RNG: training seeds it after this may run
    spent = {kind: {r: [0.0, 0.0] for r in cpu.THIN_RANKS} for kind in KINDS}
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for k in WIDTHS:
            xs = [torch.empty(ROWS, k).uniform_(-1, 1, generator=gen) for _ in range(CALLS)]
            for r in cpu.THIN_RANKS:
                a = torch.empty(r, k).uniform_(-1, 1, generator=gen)
                gs = [torch.empty(ROWS, r).uniform_(-1, 1, generator=gen) for _ in range(CALLS)]
                probes = {"nt": (lambda j: ext.thin_nt(xs[j], a, 1.0, True), lambda j: torch.mm(xs[j], a.t())),  # noqa: B023
                          "tn": (lambda j: ext.thin_tn(gs[j], xs[j], 1.0, False),  # noqa: B023
                                 lambda j: torch.mm(gs[j].t(), xs[j]))}  # noqa: B023
                for kind, fns in probes.items():
                    kern, blas = _best(fns)
                    spent[kind][r][0] += kern
                    spent[kind][r][1] += blas
    speedup = {kind: {str(r): round(b / kn, 3) for r, (kn, b) in spent[kind].items()} for kind in KINDS}
    return {"speedup": speedup, "seconds": round(time.perf_counter() - t0, 3)}


def _valid(record: object) -> bool:
    """A measurement record of the shape measure_thin returns."""
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if not (isinstance(record, dict) and number(record.get("seconds")) and isinstance(record.get("speedup"), dict)):
        return False
    sp = record["speedup"]
    return set(sp) == set(KINDS) and all(
        isinstance(sp[kind], dict) and set(sp[kind]) == {str(r) for r in cpu.THIN_RANKS}
        and all(map(number, sp[kind].values())) for kind in KINDS)


def _check(record: dict, cpu_name: str, cached: bool) -> ThinCheck:
    speedup = {kind: {int(r): float(x) for r, x in record["speedup"][kind].items()} for kind in KINDS}
    taken = {kind: frozenset(r for r, x in speedup[kind].items() if x >= MARGIN) for kind in KINDS}
    return ThinCheck(nt=taken["nt"], tn=taken["tn"], speedup=speedup, cpu=cpu_name,
                     seconds=float(record["seconds"]), cached=cached)


def cpu_thin_check(cache_dir: Path | None = None, measure: Callable[[], dict] | None = None) -> ThinCheck:
    """This CPU's routing of the thin products: from the cache in `cache_dir` (default: beside the kernel cache)
    when a readable one exists for this machine and kernel, else measured by `measure` (default: measure_thin) and
    cached. Without the CPU extension (and no `measure`): nothing is measured and every product stays BLAS's. A
    cache that cannot be written only costs a measurement next time."""
    fields = _fields()
    path = precision.cache_file(precision.default_cache_dir() if cache_dir is None else cache_dir, fields,
                                prefix="thin-check")
    try:
        record = json.loads(path.read_text())
        if _valid(record) and record.get("fields") == fields:
            return _check(record, str(fields["cpu"]), cached=True)
    except (OSError, ValueError):
        pass  # absent or unreadable: measured again below
    if measure is None:
        if cpu._extension() is None:
            return ThinCheck(cpu=str(fields["cpu"]))
        measure = measure_thin
    record = dict(measure())
    if not _valid(record):
        raise TypeError(f"thin-product measurement returned {record!r}")
    try:
        precision.write_atomic(path, {**record, "fields": fields})
    except OSError as e:
        print(f"peft_rwkv7: could not cache the thin-product check in {path} ({e})", file=sys.stderr, flush=True)
    return _check(record, str(fields["cpu"]), cached=False)


__all__ = ["ThinCheck", "cpu_thin_check", "measure_thin"]
