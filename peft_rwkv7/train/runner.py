"""`rwkv-peft train`: recipe file -> checked run directory -> training loop -> summary line.

Everything before the training loop is light: the recipe, its paths, the run lock and the state of the
run directory are checked before torch, the model code or DeepSpeed are imported, so a refused run (a
busy or finished out_dir, a missing file) says so at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from ..errors import UserError
from ..extras import check_recipe
from ..interrupts import ctrl_c_held
from ..path_checks import check_recipe_paths
from ..run_dir import RECIPE_FILE, end_cut_short, end_parts, list_checkpoints, remove_stale_temps
from .recipe import Recipe, dump_recipe, load_recipe
from .runlock import held, holder_pid, run_lock
from .schedule import get_lr
from .schema import from_dict

# Keys a resumed run may change: they move no number of the steps already taken nor of those to come
# (where checkpoints go, what is logged and shown) or only the kernel that computes the same math.
RESUME_FREE = {"train.stop_after", "train.save_every", "train.eval_every", "train.keep_checkpoints",
               "log.progress", "log.wandb", "log.project", "train.device", "model.wkv_backend"}


def _load_checked(recipe_path: str, overrides: list[str]) -> Recipe:
    recipe = load_recipe(recipe_path, overrides)  # before the heavy imports: bad recipes fail fast
    check_recipe(recipe)  # optional extras the recipe needs (bitsandbytes, deepspeed, ...)
    check_recipe_paths(recipe)
    return recipe


def preflight(recipe_path: str, overrides: list[str], resume: bool = False) -> Recipe:
    """Every check `rwkv-peft train` makes before it trains, as the same one-line UserErrors, without training
    or holding the lock: the web UI's Start calls it before it starts the CLI in a process of its own."""
    recipe = _load_checked(recipe_path, overrides)
    out_dir = Path(recipe.out_dir)
    if held(out_dir):
        raise UserError(f"{out_dir} is in use by another rwkv-peft train (pid {holder_pid(out_dir)}); wait for it "
                        "to finish or train into another out_dir=...")
    if resume:
        check_resume(recipe, out_dir)
    elif (done := check_fresh(recipe, out_dir)) is not None:
        raise UserError(f"{out_dir} already holds this finished run ({done} steps); to train again pick another "
                        "out_dir=...")
    return recipe


def train_from_cli(recipe_path: str, overrides: list[str], resume: bool = False) -> int:
    recipe = _load_checked(recipe_path, overrides)
    out_dir = Path(recipe.out_dir)
    with run_lock(out_dir, enabled=_global_rank0()):  # one run per directory, for the run's lifetime
        if resume:
            check_resume(recipe, out_dir)
        elif (done := check_fresh(recipe, out_dir)) is not None:
            # offered only where a longer schedule keeps the lr of the steps taken (constant; not a finished
            # wsd or cosine run): the rule check_resume applies to a raised max_steps
            longer = (", or raise train.max_steps with --resume"
                      if _lr_unchanged(recipe.train, done, done + 1, done) else "")
            print(f"{out_dir} already holds this finished run ({done} steps); nothing to do — to train again "
                  f"pick another out_dir=...{longer}", flush=True)
            return 0
        if _global_rank0():
            remove_stale_temps(out_dir)  # a killed run's, now that this one holds the directory
        with ctrl_c_held():  # torch's import, cut by a Ctrl-C, breaks it (a traceback) or aborts: taken once done
            from .distributed import close_dist, launcher_dist
            from .loop import describe, train

        dist = launcher_dist(recipe)
        if dist.is_main:
            print(describe(recipe), flush=True)
            if unread := recipe.method.unread_keys():  # a recipe's silent no-ops (kept readable: old runs resume)
                print(f"warning: method.kind {recipe.method.kind} does not read "
                      f"{', '.join('method.' + k for k in unread)}; they change nothing (remove them)",
                      file=sys.stderr, flush=True)
        summary = train(recipe, resume=resume, dist=dist)
        close_dist()
    if dist.is_main:
        print(summary_line(summary, out_dir), flush=True)
        if not summary.get("stopped_early"):
            print(next_steps(recipe), flush=True)
    return 0


def _global_rank0() -> bool:
    """Whether this process is the one that holds the run lock: global rank 0 as the launcher numbers it (RANK,
    the launcher protocol that train.distributed follows; read here because initialising torch.distributed
    would import torch before the lock). Several processes without DeepSpeed are refused later, in one line,
    by launcher_dist; the lock must not refuse them first with a misleading "in use"."""
    return os.environ.get("RANK", "0") == "0"




def summary_line(summary: dict, out_dir: Path) -> str:
    first, last = summary.get("first_loss"), summary.get("last_loss")
    losses = f"loss {first:.4f} -> {last:.4f}" if first is not None else "no new steps"
    if summary.get("first_reward") is not None:  # grpo: its loss is ~0 by construction, the reward tells
        losses = f"reward {summary['first_reward']:.4f} -> {summary['last_reward']:.4f}"
    tail = "stopped early (train.stop_after); continue with --resume" if summary.get("stopped_early") else "done"
    ev = summary.get("eval")
    ev_text = f", eval loss {ev['loss']:.4f}" if ev and "loss" in ev else ""
    if ev and "reward" in ev:
        ev_text = f", eval reward {ev['reward']:.4f} pass@1 {ev['pass@1']:.3f}"
    return f"{tail}: {summary['steps']} steps, {losses}{ev_text}; run directory {out_dir}"


def next_steps(recipe: Recipe) -> str:
    """The commands a user runs next on this run (generate, eval, merge), with its own paths."""
    out = recipe.out_dir
    if recipe.method.kind == "full" or recipe.model.new is not None:
        model = f"{out}/model.pth"
        lines = [f"  rwkv-peft generate --model {model} --prompt \"...\""]
        if recipe.data.eval_path:
            lines.append(f"  rwkv-peft eval --model {model} --data {recipe.data.eval_path}")
    else:
        base = recipe.model.path
        lines = [f"  rwkv-peft generate --model {base} --adapter {out} --prompt \"...\""]
        if recipe.train.objective == "grpo":  # rewards of held-out prompts, the base beside the run
            prompts = recipe.data.eval_path or recipe.data.path
            lines.append(f"  rwkv-peft eval --model {base} --rewards {out}/recipe.yaml --data {prompts} "
                         f"--compare {out}")
        elif recipe.data.eval_path:
            lines.append(f"  rwkv-peft eval --model {base} --adapter {out} --data {recipe.data.eval_path}")
        lines.append(f"  rwkv-peft merge --base {base} --adapter {out} --out {out}/merged.pth")
    return "next:\n" + "\n".join(lines)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changes(recipe: Recipe, out_dir: Path) -> tuple[dict, dict, list[str]]:
    """(the run's recipe and this one, flattened; the keys whose change moves a number). The run's recipe is
    read through today's schema, so a key added since it was written counts as its default (a new key's
    default keeps the old behaviour): the same command after an upgrade is the same run."""
    path = out_dir / RECIPE_FILE
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the run's recipe ({e})") from None
    new = _flat(yaml.safe_load(dump_recipe(recipe)))
    old = old if isinstance(old, dict) else {}
    try:
        old = yaml.safe_load(dump_recipe(from_dict(Recipe, old, source=str(path))))
    except UserError:  # a key since removed or renamed: compared as written (and shown as a change)
        pass
    old = _flat(old)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_FREE)
    return old, new, changed


def _show(old: dict, new: dict, changed: list[str]) -> str:
    shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
    return shown + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "")


def check_fresh(recipe: Recipe, out_dir: Path) -> int | None:
    """A run without --resume: None for an out_dir that holds no run; the steps of the finished run it
    holds when the recipe is the same (up to RESUME_FREE keys), so running the same command again does
    nothing; else (an unfinished run, another recipe) a one-line refusal pointing at --resume / out_dir."""
    saved = list_checkpoints(out_dir)
    if not saved:
        return None
    done = saved[-1][0]
    old, new, changed = _changes(recipe, out_dir)
    if changed:
        raise UserError(f"{out_dir} already holds a run of another recipe ({_show(old, new, changed)}); set "
                        f"out_dir=... for a new one, or continue it with its own recipe and --resume")
    if done < recipe.train.max_steps:
        raise UserError(f"{out_dir} already holds a run ({done} of {recipe.train.max_steps} steps); add --resume "
                        f"to continue it, or set out_dir=... for a new one")
    if end_cut_short(out_dir, recipe.method.kind, saved):
        raise UserError(f"{out_dir} holds this run's {done} steps, stopped before its end was written "
                        f"({end_parts(recipe.method.kind)}); add --resume to finish it")
    return done


def check_resume(recipe: Recipe, out_dir: Path) -> None:
    """Refuse (one line, nothing written) a resume whose recipe differs from the run's in a way that
    changes the result, and a resume of a finished run. Extending train.max_steps is allowed when the
    learning rate of every step taken so far stays the same (constant schedule; wsd before its decay)."""
    saved = list_checkpoints(out_dir)
    if not saved:
        raise UserError(f"{out_dir}: nothing to resume (no checkpoints/); run without --resume")
    from .checkpoint import resumable_step  # torch: imported where a resume needs it

    readable = resumable_step(out_dir)  # a damaged newest checkpoint is passed over (None: resume says why)
    done = saved[-1][0] if readable is None else readable
    old, new, changed = _changes(recipe, out_dir)
    if "train.max_steps" in changed and _same_lr_so_far(recipe, old, done):
        changed.remove("train.max_steps")
    if changed == ["train.max_steps"]:
        raise UserError(f"{out_dir}: {_show(old, new, changed)} would change the learning rate of the {done} steps "
                        f"already taken (train.schedule {recipe.train.schedule}; constant, and wsd before its decay, "
                        f"can be extended); train a longer run into a new out_dir=...")
    if changed:
        raise UserError(f"{out_dir}: --resume with a recipe that differs from the run's: {_show(old, new, changed)}; "
                        f"resume with the run's own recipe ({out_dir / 'recipe.yaml'}), or train into a new "
                        "out_dir=...")
    finished = readable is not None and done >= recipe.train.max_steps
    if finished and not end_cut_short(out_dir, recipe.method.kind, saved):
        raise UserError(f"{out_dir}: the run is finished ({done} of {recipe.train.max_steps} steps); nothing to "
                        f"resume (to train on, raise train.max_steps where the schedule allows: constant or wsd)")


def _same_lr_so_far(recipe: Recipe, old: dict, done: int) -> bool:
    old_max = old.get("train.max_steps")
    return isinstance(old_max, int) and _lr_unchanged(recipe.train, old_max, recipe.train.max_steps, done)


def _lr_unchanged(tc, old_max: int, new_max: int, done: int) -> bool:
    """Whether the first `done` steps get the same learning rate with max_steps new_max as with old_max."""

    def lr(step: int, max_steps: int) -> float:
        return get_lr(step, lr=tc.lr, lr_final=tc.final_lr, max_steps=max_steps, warmup_steps=tc.warmup_steps,
                      schedule=tc.schedule, decay_frac=tc.decay_frac)

    return all(lr(s, old_max) == lr(s, new_max) for s in range(done))
