"""Training figures for the GPU check: the real trainer (`peft_rwkv7.train.loop.train`) on the 0.1B shape.

    python scripts/gpu_check_train.py [--steps 12] [--ctx 1024]     (alone; scripts/gpu_check.py calls it too)

A random 0.1B-shape RWKV-7 (L12 C768 H12 N64 V65536, RWKV-LM init) is saved to a temporary .pth, a
generated text jsonl is the data, and a Recipe built from a dict runs state tuning and LoRA (r 16) at
ctx 1024, batch 1, bf16 autocast, train.device cuda: exactly what `rwkv-peft train` runs. Reported per
method: peak VRAM (torch.cuda.max_memory_allocated over the whole run: model load, steps, save;
and max_memory_reserved, nearer to what nvidia-smi shows), tokens/s (median of the trainer's own
log.jsonl after the warm-up steps), and which WKV backend and dtype `auto` chose.
"""

from __future__ import annotations

import argparse
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

from peft_rwkv7.model import RWKV7Config, new_model, save_model  # noqa: E402
from peft_rwkv7.ops import dispatch  # noqa: E402

SHAPE = dict(n_layer=12, n_embd=768, vocab_size=65536, head_size=64)  # RWKV-7 World 0.1B
METHODS = {"state": {"kind": "state"}, "lora": {"kind": "lora", "r": 16, "alpha": 32}}
LR = {"state": 1.0, "lora": 1e-4}
WARMUP_STEPS = 2  # first steps compile / autotune kernels and grow the allocator: not timed
GOAL_STATE_MIB = 1536  # 0.1B state tuning at ctx 1024 (RWKV-PEFT reports 2.6 GB)
_WORDS = ("ship", "log", "wind", "north", "east", "harbour", "crew", "sail", "storm", "calm", "day", "night",
          "fog", "anchor", "deck", "cargo", "rope", "watch", "bell", "tide", "course", "knots", "captain")


@torch.no_grad()
def make_base(folder: Path) -> Path:
    """A random 0.1B-shape model in the official layout (bf16 .pth). RWKV-LM's init zeroes the attention
    output and more, so no gradient would reach a tuned state: every all-zero matrix gets small random
    values, as a trained model has."""
    cfg = RWKV7Config.new(SHAPE["n_layer"], SHAPE["n_embd"], SHAPE["vocab_size"], head_size=SHAPE["head_size"])
    model = new_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.dim() == 2 and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    path = folder / "base-0.1b.pth"
    save_model(model, path)
    return path


def make_data(folder: Path, docs: int = 300, words: int = 120) -> Path:
    """Generated English-like text, ~50k World tokens: plenty of ctx-1024 windows."""
    rng = random.Random(0)
    path = folder / "train.jsonl"
    with path.open("w") as f:
        for _ in range(docs):
            text = " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."
            f.write(json.dumps({"text": text}) + "\n")
    return path


def recipe_for(method: str, base: Path, data: Path, out_dir: Path, ctx: int, steps: int):
    """The Recipe `rwkv-peft train` would build from the same YAML (validated the same way)."""
    from peft_rwkv7.train.recipe import Recipe
    from peft_rwkv7.train.schema import from_dict

    return from_dict(Recipe, {
        "model": {"path": str(base), "wkv_backend": "auto"},
        "method": METHODS[method],
        "data": {"path": str(data), "kind": "text", "ctx_len": ctx},
        "train": {"max_steps": steps, "micro_bsz": 1, "grad_accum": 1, "lr": LR[method], "warmup_steps": 1,
                  "save_every": steps, "precision": "bf16", "device": "cuda", "seed": 0},
        "log": {"progress": False, "wandb": "off"},
        "out_dir": str(out_dir),
    }, source="gpu_check")  # fmt: skip


def measure(method: str, base: Path, data: Path, folder: Path, ctx: int = 1024, steps: int = 12) -> dict:
    """One training run through the trainer; peak VRAM over the whole run and tokens/s after warm-up."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # an optional-kernel notice at import, as the CLI
    from peft_rwkv7.train.loop import train

    recipe = recipe_for(method, base, data, folder / f"run-{method}", ctx, steps)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    known = set(dispatch._VERDICTS)
    t0 = time.perf_counter()
    summary = train(recipe)
    wall = time.perf_counter() - t0
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    records = [json.loads(line) for line in (Path(recipe.out_dir) / "log.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][WARMUP_STEPS:]
    # What wkv7(backend="auto") verified during this run: (backend, head size, dtype) on the GPU.
    wkv = sorted(f"{k[0]} N{k[1]} {str(k[2]).removeprefix('torch.')}: {'ok' if v.ok else 'FAILED'}"
                 for k, v in dispatch._VERDICTS.items() if k not in known and k[3] == "cuda")
    result = {
        "method": method, "ctx_len": ctx, "batch": 1, "steps": steps,
        "peak_mib": round((peak - before) / 2**20, 1), "reserved_mib": round(reserved / 2**20, 1),
        "tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
        "first_loss": summary["first_loss"], "last_loss": summary["last_loss"], "wall_s": round(wall, 1),
        "wkv_checks": wkv or ["(verified earlier in this process)"],
    }  # fmt: skip
    if method == "state":
        result.update(goal_mib=GOAL_STATE_MIB, pass_goal=result["peak_mib"] <= GOAL_STATE_MIB)
    return result


def run_all(ctx: int = 1024, steps: int = 12) -> dict:
    """Both methods on one base model and dataset (built once, removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_train-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        base, data = make_base(folder), make_data(folder)
        out = {"setup_s": round(time.perf_counter() - t0, 1)}
        for method in METHODS:
            out[method] = measure(method, base, data, folder, ctx, steps)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check_train: no CUDA device (torch sees none); run this on a GPU machine", file=sys.stderr)
        return 2
    print(json.dumps(run_all(args.ctx, args.steps), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
