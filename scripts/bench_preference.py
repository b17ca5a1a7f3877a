"""Preference tuning on the bundled demo: each recipe's held-out reward accuracy before and after, its wall
and CPU time, what it generates before and after, and Muon against AdamW on the LoRA DPO recipe.

    python scripts/bench_preference.py [--out runs/bench_pref] [--recipes dpo dpo_state orpo] [--muon]
        [--extra train.nll_weight=0 ...]

Before: the recipe's model at step 0 (method attached, nothing trained) on data.eval_path's pairs. Also
the "log-prob accuracy", the share of held-out pairs whose chosen answer has the higher mean token
log-prob under the policy, a measure that does not depend on the objective or a reference.
Prints one JSON object per recipe (and for Muon) and a summary table.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from peft_rwkv7.data import load_tokenizer
from peft_rwkv7.infer.generate import generate
from peft_rwkv7.train.loop import _run_eval, setup
from peft_rwkv7.train.losses import sequence_logps
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.runner import train_from_cli

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["User: Write the ship's log for day 12.\n\nAssistant:", "User: Log today's watch, day 77.\n\nAssistant:"]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@torch.no_grad()
def logp_accuracy(run) -> float:
    """Share of held-out pairs where mean-token log pi(chosen) > mean-token log pi(rejected)."""
    run.model.eval()
    hits, n = 0.0, 0
    for idx, labels in run.eval_pairs.in_order(8):
        with run.precision():
            lp, tok = sequence_logps(run.model, idx, labels)
        B = idx.shape[0] // 2
        mean = lp / tok
        hits += float((mean[:B] > mean[B:]).sum())
        n += B
    return hits / n


def state_of(recipe_path: str, over: list[str], resume: bool) -> dict:
    run = setup(load_recipe(recipe_path, over), resume=resume)
    tok = load_tokenizer("world")
    out = {"eval": _run_eval(run), "logp_acc": logp_accuracy(run)}
    out["generate"] = ["".join(generate(run.model, tok, p, max_tokens=40, temperature=0.0)) for p in PROMPTS]
    return out


def bench(name: str, out_dir: Path, extra: list[str]) -> dict:
    recipe_path = str(ROOT / f"recipes/{name}.yaml")
    over = [f"out_dir={out_dir}", "log.progress=false", *extra]
    before = state_of(recipe_path, over, resume=False)
    t0, c0 = time.perf_counter(), cpu_seconds()
    train_from_cli(recipe_path, over)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    after = state_of(recipe_path, over, resume=True)
    steps = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "lr" in r]
    recipe = load_recipe(recipe_path, over)
    tokens = recipe.train.micro_bsz * recipe.train.grad_accum * recipe.data.ctx_len * 2
    step_s = sorted(tokens / r["tokens_per_s"] for r in steps)
    return {"recipe": name, "extra": extra, "steps": len(steps), "train_wall_s": round(wall, 1),
            "train_cpu_s": round(cpu, 1), "median_step_s": round(step_s[len(step_s) // 2], 3),
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"], "before": before, "after": after}


def step_time_ratio(steps: int, out: Path) -> dict:
    """Muon / AdamW time per step on recipes/dpo.yaml, their steps interleaved so that a shared machine's
    load falls on both alike (median over `steps` steps after one warm-up step each)."""
    from peft_rwkv7.train.loop import train_step

    recipe = ROOT / "recipes/dpo.yaml"
    runs = {opt: setup(load_recipe(str(recipe), [f"out_dir={out}/{opt}_ratio", "log.progress=false",
                                                 f"train.optimizer={opt}"])) for opt in ("adamw", "muon")}
    times: dict[str, list[float]] = {opt: [] for opt in runs}
    opt_times: dict[str, list[float]] = {opt: [] for opt in runs}
    for step in range(steps + 1):
        for opt, run in runs.items():
            real_step = run.optimizer.step
            spent = []

            def timed(*a, _real=real_step, _spent=spent, **k):
                t = time.perf_counter()
                r = _real(*a, **k)
                _spent.append(time.perf_counter() - t)
                return r

            run.optimizer.step = timed
            t0 = time.perf_counter()
            train_step(run, step)
            if step:
                times[opt].append(time.perf_counter() - t0)
                opt_times[opt].append(spent[0])
            run.optimizer.step = real_step
    med = {opt: sorted(v)[len(v) // 2] for opt, v in times.items()}
    med_opt = {opt: sorted(v)[len(v) // 2] for opt, v in opt_times.items()}
    return {"steps": steps, "median_step_s": med, "median_optimizer_step_s": med_opt,
            "ratio_muon_over_adamw": med["muon"] / med["adamw"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_pref")
    ap.add_argument("--recipes", nargs="*", default=["dpo", "dpo_state", "orpo"])
    ap.add_argument("--muon", action="store_true", help="also run recipes/dpo.yaml with train.optimizer=muon")
    ap.add_argument("--extra", nargs="*", default=[], help="key=value overrides for every run")
    ap.add_argument("--tag", default="", help="suffix of the run directories")
    ap.add_argument("--ratio-steps", type=int, default=0, help="> 0: only time Muon against AdamW per step")
    args = ap.parse_args()
    if args.ratio_steps:
        print(json.dumps(step_time_ratio(args.ratio_steps, Path(args.out))))
        return
    results = []
    runs = [(name, [], name) for name in args.recipes]
    if args.muon:
        runs.append(("dpo", ["train.optimizer=muon"], "dpo_muon"))
    for name, extra, label in runs:
        res = bench(name, Path(args.out) / (label + args.tag), extra + args.extra)
        res["label"] = label
        print(json.dumps(res), flush=True)
        results.append(res)
    print(f"\n{'run':<12} {'acc before':>10} {'acc after':>9} {'logp acc':>13} {'loss':>17} {'wall s':>7} "
          f"{'cpu s':>7} {'step s':>7}")
    for r in results:
        b, a = r["before"], r["after"]
        print(f"{r['label']:<12} {b['eval']['reward_acc']:>10.3f} {a['eval']['reward_acc']:>9.3f} "
              f"{b['logp_acc']:>6.3f}->{a['logp_acc']:<6.3f} {r['first_loss']:>8.4f}->{r['last_loss']:<8.4f} "
              f"{r['train_wall_s']:>7.1f} {r['train_cpu_s']:>7.1f} {r['median_step_s']:>7.3f}")


if __name__ == "__main__":
    main()
