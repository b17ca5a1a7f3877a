"""`rwkv-peft train`: recipe file -> checked run directory -> training loop -> summary line."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..extras import check_recipe
from .checkpoint import list_checkpoints
from .recipe import load_recipe


def train_from_cli(recipe_path: str, overrides: list[str], resume: bool = False) -> int:
    recipe = load_recipe(recipe_path, overrides)  # before the heavy imports: bad recipes fail fast
    check_recipe(recipe)  # optional extras the recipe needs (bitsandbytes, deepspeed, ...)
    from .distributed import launcher_dist
    from .loop import describe, train

    out_dir = Path(recipe.out_dir)
    if not resume and list_checkpoints(out_dir):
        raise UserError(
            f"{out_dir} already holds a run; add --resume to continue it, or set out_dir=... for a new one"
        )
    dist = launcher_dist(recipe)
    if dist.is_main:
        print(describe(recipe), flush=True)
    summary = train(recipe, resume=resume, dist=dist)
    if dist.is_main:
        first, last = summary.get("first_loss"), summary.get("last_loss")
        losses = f"loss {first:.4f} -> {last:.4f}" if first is not None else "no new steps"
        tail = "stopped early (train.stop_after); continue with --resume" if summary.get("stopped_early") else "done"
        ev = summary.get("eval")
        ev_text = f", eval loss {ev['loss']:.4f}" if ev else ""
        print(f"{tail}: {summary['steps']} steps, {losses}{ev_text}; run directory {out_dir}", flush=True)
    return 0
