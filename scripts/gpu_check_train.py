"""Training figures for the GPU check: the real trainer (`peft_rwkv7.train.loop.train`) on the 0.1B shape.

    python scripts/gpu_check_train.py [--out PART.json] [--budget-s 110] [--wkv-backend auto] [--dry-run]

(alone, or from scripts/gpu_check.py in its own process). A random 0.1B-shape RWKV-7 (L12 C768 H12 N64
V65536, RWKV-LM init) is saved to a temporary .pth, a generated text jsonl (~36k World tokens) is the
data, and a Recipe built from a dict runs state tuning and LoRA (r 16) at ctx 1024 batch 1 and at ctx
512 batch 16, bf16 autocast, train.device cuda: exactly what `rwkv-peft train` runs. Per run: peak VRAM
(torch.cuda.max_memory_allocated over the whole run: model load, steps, save; and max_memory_reserved,
nearer to what nvidia-smi shows), tokens/s (median of the trainer's own log.jsonl after the warm-up
steps), and which WKV backend and dtype `auto` verified. A run starts only while the budget lasts; rows
are written to --out after every run. --dry-run: a tiny stand-in shape on the CPU in fp32 (the same code
path, for tests/ops/test_gpu_check_script.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_check_report import one_line, write_json  # noqa: E402

from peft_rwkv7.model import RWKV7Config, new_model, save_model  # noqa: E402
from peft_rwkv7.ops import dispatch  # noqa: E402

SHAPES = {
    "0.1B": {"n_layer": 12, "n_embd": 768, "vocab_size": 65536, "head_size": 64},  # RWKV-7 World 0.1B
    # The dry run's stand-in; the full vocabulary because the World tokenizer's ids reach ~52k on our text.
    "tiny": {"n_layer": 2, "n_embd": 64, "vocab_size": 65536, "head_size": 64},
}
METHODS = {"state": {"kind": "state"}, "lora": {"kind": "lora", "r": 16, "alpha": 32}}
LR = {"state": 1.0, "lora": 1e-4}
# configs: (ctx_len, batch, role); the role is the shape the anchors (gpu_check_report.ANCHORS) are keyed by.
# steps: 12 = WARMUP_STEPS untimed + 10 timed. On an H200 a ctx-512 batch-16 step of the 0.1B shape is
# ~8k tokens, ~0.1-0.3 s; a run is dominated by its model load, kernel checks and save (a few seconds).
PLANS = {
    "gpu": {"device": "cuda", "precision": "bf16", "shape": "0.1B", "steps": 12,
            "configs": ((1024, 1, "ctx1024_bs1"), (512, 16, "ctx512_bs16"))},
    "dry": {"device": "cpu", "precision": "fp32", "shape": "tiny", "steps": 4,
            "configs": ((64, 1, "ctx1024_bs1"), (32, 4, "ctx512_bs16"))},
}  # fmt: skip
PENDING = "not run: the part stopped before it"
WARMUP_STEPS = 2  # first steps compile / autotune kernels and grow the allocator: not timed
GOAL_STATE_MIB = 1536  # 0.1B state tuning at ctx 1024 batch 1 (RWKV-PEFT reports 2.6 GB on an RTX 4090)
_WORDS = ("ship", "log", "wind", "north", "east", "harbour", "crew", "sail", "storm", "calm", "day", "night",
          "fog", "anchor", "deck", "cargo", "rope", "watch", "bell", "tide", "course", "knots", "captain")


@torch.no_grad()
def make_base(folder: Path, shape: dict | None = None) -> Path:
    """A random model of `shape` (default 0.1B) in the official layout (bf16 .pth). RWKV-LM's init zeroes
    the attention output and more, so no gradient would reach a tuned state: every all-zero matrix gets
    small random values, as a trained model has."""
    shape = shape or SHAPES["0.1B"]
    cfg = RWKV7Config.new(shape["n_layer"], shape["n_embd"], shape["vocab_size"], head_size=shape["head_size"])
    model = new_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.dim() == 2 and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    path = folder / "base.pth"
    save_model(model, path)
    return path


def make_data(folder: Path, docs: int = 300, words: int = 120) -> Path:
    """Generated English-like text, ~36k World tokens: ~35 ctx-1024 windows, ~70 of ctx 512."""
    rng = random.Random(0)
    path = folder / "train.jsonl"
    with path.open("w") as f:
        for _ in range(docs):
            text = " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."
            f.write(json.dumps({"text": text}) + "\n")
    return path


def recipe_for(method: str, base: Path, data: Path, out_dir: Path, ctx: int, steps: int, batch: int = 1,
               device: str = "cuda", precision: str = "bf16", wkv_backend: str = "auto"):  # fmt: skip
    """The Recipe `rwkv-peft train` would build from the same YAML (validated the same way). No held-out
    eval (data.eval_split 0): it is not timed and would only lengthen the run."""
    from peft_rwkv7.train.recipe import Recipe
    from peft_rwkv7.train.schema import from_dict

    return from_dict(Recipe, {
        "model": {"path": str(base), "wkv_backend": wkv_backend},
        "method": METHODS[method],
        "data": {"path": str(data), "kind": "text", "ctx_len": ctx, "eval_split": 0},
        "train": {"max_steps": steps, "micro_bsz": batch, "grad_accum": 1, "lr": LR[method], "warmup_steps": 1,
                  "save_every": steps, "precision": precision, "device": device, "seed": 0},
        "log": {"progress": False, "wandb": "off"},
        "out_dir": str(out_dir),
    }, source="gpu_check")  # fmt: skip


def plan_runs(plan: dict) -> list[tuple[str, int, int, str]]:
    """(method, ctx_len, batch, role) in the order they run: both methods at each config."""
    return [(method, ctx, batch, role) for ctx, batch, role in plan["configs"] for method in METHODS]


def measure(method: str, base: Path, data: Path, folder: Path, ctx: int = 1024, steps: int = 12, batch: int = 1,
            device: str = "cuda", precision: str = "bf16", wkv_backend: str = "auto") -> dict:  # fmt: skip
    """One training run through the trainer; peak VRAM over the whole run (CUDA) and tokens/s after warm-up."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional-kernel notice at import, as the CLI
    from peft_rwkv7.train.loop import train

    out_dir = folder / f"run-{method}-ctx{ctx}-bs{batch}"
    recipe = recipe_for(method, base, data, out_dir, ctx, steps, batch, device, precision, wkv_backend)
    cuda = device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    known = set(dispatch._VERDICTS)
    t0 = time.perf_counter()
    summary = train(recipe)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][WARMUP_STEPS:]
    # What wkv7(backend="auto") verified during this run: (backend, head size, dtype) on this device.
    wkv = sorted(f"{k[0]} N{k[1]} {str(k[2]).removeprefix('torch.')}: {'ok' if v.ok else 'FAILED'}"
                 for k, v in dispatch._VERDICTS.items() if k not in known and k[3] == device)
    result = {
        "steps": steps, "warmup_steps": WARMUP_STEPS,
        "peak_mib": round((torch.cuda.max_memory_allocated() - before) / 2**20, 1) if cuda else None,
        "reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1) if cuda else None,
        "tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
        "first_loss": summary["first_loss"], "last_loss": summary["last_loss"], "wall_s": round(wall, 1),
        "wkv_checks": wkv or ["(verified earlier in this process)"],
    }  # fmt: skip
    return result


def run_all(plan: dict, budget_s: float = 600.0, emit=None, wkv_backend: str = "auto") -> dict:
    """Every run of `plan` on one base model and dataset (built once, removed afterwards). A run starts only
    when the budget left holds 1.5x the longest run so far; `emit(result)` after setup and every run."""
    deadline = time.monotonic() + budget_s
    out: dict = {"setup_s": None, "runs": []}
    emit = emit or (lambda result: None)
    shape_name = plan["shape"]
    runs = plan_runs(plan)
    out["runs"] = [{"method": method, "ctx_len": ctx, "batch": batch, "role": role, "shape": shape_name,
                    "precision": plan["precision"], "skipped": PENDING} for method, ctx, batch, role in runs]
    emit(out)
    with tempfile.TemporaryDirectory(prefix="gpu_check_train-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        base, data = make_base(folder, SHAPES[shape_name]), make_data(folder)
        out["setup_s"] = round(time.perf_counter() - t0, 1)
        emit(out)
        longest = 0.0
        for i, (method, ctx, batch, role) in enumerate(runs):
            row = {k: v for k, v in out["runs"][i].items() if k != "skipped"}
            if deadline - time.monotonic() < 1.5 * longest:
                row["skipped"] = "not run: the part's time budget was spent"
            else:
                t1 = time.perf_counter()
                try:
                    row.update(measure(method, base, data, folder, ctx, plan["steps"], batch, plan["device"],
                                       plan["precision"], wkv_backend))  # fmt: skip
                    if method == "state" and role == "ctx1024_bs1" and shape_name == "0.1B":
                        row.update(goal_mib=GOAL_STATE_MIB, pass_goal=row["peak_mib"] <= GOAL_STATE_MIB)
                except Exception as e:
                    row["error"] = one_line(f"{type(e).__name__}: {e}", 300)
                longest = max(longest, time.perf_counter() - t1)
            out["runs"][i] = row
            emit(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows here (JSON) after every run")
    parser.add_argument("--budget-s", type=float, default=600.0, help="start no run after this many seconds")
    parser.add_argument("--wkv-backend", default="auto", choices=("auto", "cuda", "triton", "cpu", "reference"))
    parser.add_argument("--dry-run", action="store_true", help="a tiny stand-in shape on the CPU, fp32")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check_train: no CUDA device (torch sees none); run this on a GPU machine", file=sys.stderr)
        return 2
    emit = (lambda result: write_json(args.out, {**result, "done": False})) if args.out else None
    result = run_all(PLANS["dry" if args.dry_run else "gpu"], args.budget_s, emit, args.wkv_backend)
    if args.out:
        write_json(args.out, {**result, "done": True})
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
