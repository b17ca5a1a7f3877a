"""How a run computes where this machine's measurements decide it: decided once per run and kept in its checkpoints.

Three choices are measured on the CPU at hand and cached per machine (issue 23): `train.precision: auto`'s bf16
check and, under bf16, whether products in oneDNN's slow row zone run in row chunks (ops/precision.py); in fp32,
which of LoRA's thin products run in the CPU extension's kernel (ops/thin_check.py). None changes what is computed;
each changes its rounding. So a run makes them once:

- Several processes: rank 0 measures while the others wait, and every rank takes its answer. Each rank measuring
  for itself timed on cores the others were loading, and a borderline product could be routed two ways (or, on a
  CPU where bf16 barely wins, two ranks could have trained in two precisions).
- A resume takes them from the run's newest checkpoint instead of measuring again, so a lost cache, another
  thread count or another machine cannot change the bits from the resumed step on (a resume in another precision
  than the checkpoint's chooses again: its bits differ anyway).

Where nothing is measured (a GPU, fp32 without a LoRA layer the kernel can take) nothing is decided here: the
layers keep their own lazy check (inference, the Python API).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from ..ops import cpu
from ..ops.precision import choose_bf16, cpu_bf16_check
from ..ops.thin_check import ThinCheck, cpu_thin_check
from .distributed import Dist, on_rank0


@dataclass(frozen=True)
class Routes:
    """bf16: autocast in bf16 (train.precision); row_chunks: bf16 CPU products in row chunks (ops/rowsplit.py);
    thin: None where not decided, else (nt ranks, tn ranks) whose LoRA thin products run in the CPU kernel."""

    bf16: bool = False
    row_chunks: bool = False
    thin: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def record(self) -> dict:
        """What a checkpoint keeps (JSON), read back by `saved`."""
        return {"row_chunks": self.row_chunks,
                "thin": None if self.thin is None else {"nt": list(self.thin[0]), "tn": list(self.thin[1])}}


def saved(record: object) -> dict:
    """The valid parts of a checkpoint's routes record (ckpt.saved_choices): {"row_chunks": bool} and/or
    {"thin": (nt, tn)}; a part that is missing or malformed (an older checkpoint) is chosen again."""
    out: dict = {}
    if not isinstance(record, dict):
        return out
    if isinstance(record.get("row_chunks"), bool):
        out["row_chunks"] = record["row_chunks"]
    thin = record.get("thin")
    if isinstance(thin, dict) and all(isinstance(thin.get(k), list) and all(
            isinstance(r, int) and not isinstance(r, bool) and r in cpu.THIN_RANKS for r in thin[k])
            for k in ("nt", "tn")):
        out["thin"] = (tuple(sorted(thin["nt"])), tuple(sorted(thin["tn"])))
    return out


def decide_precision(precision: str, device: torch.device, dist: Dist, saved_record: dict) -> Routes:
    """bf16 or not (choose_bf16 for `precision`, which a resume under auto has already replaced by the
    checkpoint's), and under bf16 on a CPU the row chunks: the checkpoint's where it has them (a resume in the
    checkpoint's precision). On several CPU processes rank 0 decides all of it, from its precision and its
    checkpoint read."""
    if device.type != "cpu":  # nothing measured: each rank asks its GPU (the same answer on the same GPUs)
        return Routes(bf16=choose_bf16(precision, device.type, "train.precision", say=dist.is_main))

    def decide() -> Routes:
        bf16 = choose_bf16(precision, "cpu", "train.precision")  # runs on rank 0 only: it may speak
        if not bf16:
            return Routes()
        chunks = saved_record.get("row_chunks")
        return Routes(bf16=True, row_chunks=cpu_bf16_check().row_chunks if chunks is None else chunks)

    return on_rank0(dist, decide)


def _lora_layers(model: torch.nn.Module) -> list:
    """`model`'s FusedLoraLinear layers. Only adapters/fused_lora.py makes them, so where it was never imported
    there are none, and it is not imported here (it imports peft, which state tuning does without)."""
    fused = sys.modules.get("peft_rwkv7.adapters.fused_lora")
    return [] if fused is None else [m for m in model.modules() if isinstance(m, fused.FusedLoraLinear)]


def decide_thin(model: torch.nn.Module, routes: Routes, device: torch.device, dist: Dist,
                saved_record: dict) -> Routes:
    """In fp32 on a CPU, where `model` has a LoRA layer the kernel can take: which thin products run in it (the
    checkpoint's, else the cached or measured check), set on every such layer. Otherwise `routes` as given. On
    several CPU processes every rank calls this and rank 0 decides all of it, the checkpoint read included, so no
    rank can be left alone in the broadcast."""
    if device.type != "cpu":
        return routes

    def decide() -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        if routes.bf16 or not any(r in cpu.THIN_RANKS for m in _lora_layers(model) for r in m.r.values()):
            return None
        kept = saved_record.get("thin")
        return _measured_thin() if kept is None else kept

    thin = on_rank0(dist, decide)
    if thin is None:
        return routes
    # the layers exist (rank 0 found them), so fused_lora is loaded
    sys.modules["peft_rwkv7.adapters.fused_lora"].route_thin(model, ThinCheck(nt=frozenset(thin[0]),
                                                                             tn=frozenset(thin[1])))
    return replace(routes, thin=thin)


def _measured_thin() -> tuple[tuple[int, ...], tuple[int, ...]]:
    check = cpu_thin_check()  # cached per machine, else measured now (~0.3 s)
    return tuple(sorted(check.nt)), tuple(sorted(check.tn))

