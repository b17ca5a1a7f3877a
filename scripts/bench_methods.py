"""Every PEFT method side by side on CPU: trainable parameters, step time, peak RSS; on the demo model also
the eval loss after the same training and the merge error.

    python scripts/bench_methods.py --shape demo [--steps 100] [--markdown]
    python scripts/bench_methods.py --shape 0.1b [--steps 3] [--markdown]
    python scripts/bench_methods.py --shape demo --only lora,ia3 --steps 5

Each row is a bundled recipe plus overrides (the ROWS table below; shown in the output), so a row is
reproduced by `rwkv-peft train recipes/<recipe> <overrides>`. The recipe gives the method and the train
section (lr, lr_final, schedule, warmup, weight decay, seed): state tuning takes state_tune.yaml's lr (2.0),
LoRA lora.yaml's (1e-4), PiSSA pissa.yaml's (5e-5), DiSHA disha.yaml's (1e-4), full full.yaml's (3e-5),
the quantized rows qlora.yaml's (1e-4). The methods without a bundled recipe (LoHa, LoKr, OFT, BOFT, IA3,
VeRA, AdaLoRA) and the LoRA variants (DoRA, rsLoRA, OLoRA, EVA, state+LoRA) take lora.yaml's train section:
one default, not tuned per method (IA3 and VeRA train few scalars and usually want a larger lr).

--shape demo: the bundled demo model (data/demo/rwkv7-demo.pth, 6 layers, 64 wide) trains --steps steps
(default 100, each recipe's max_steps is set to it) on data/demo/ship_log.jsonl with lora.yaml's data
section (ctx 128, 4 sequences a step), fp32, as train/loop.py steps (token-mean loss, grad clip, the
recipe's schedule). Then: eval loss on data/demo/ship_log_eval.jsonl (held out), and the merge error:
max |logit difference| between `adapters.merge(adapted)` (a plain RWKV7, fp32) and the adapted model on
the eval documents, and that over max |logit| (the relative error; fp32 rounding is ~1e-7 of it).
The "base" row is the untrained demo model's eval loss.

--shape 0.1b: random weights (PyTorch's default init: nothing zero, so SVD starts see full-rank matrices)
in the RWKV-7 World 0.1B shape (scripts/bench_util.SHAPE), one random sequence of --ctx tokens (512) a
step, fp32; one warm-up step then --steps timed steps (default 3). No eval.

Step time: the median over the timed steps (forward + backward + optimizer; AdaLoRA also its rank
allocation). Peak RSS: the process's ru_maxrss after training (each method runs in its own process, so
it is that method's alone; model, data and optimizer included; a quantized base is built in fp32 first).
Block sizes that must divide the matrices: OFT/BOFT block r = 16 (demo) / 32 (0.1b), BOFT with 2 butterfly
factors; VeRA r = 64 (demo, as wide as the model) / 256 (0.1b); AdaLoRA r 16 -> target 8 with
total_steps = 100 (demo: --steps). AdaLoRA's orthogonality penalty and rank allocation
(`update_and_allocate` after each optimizer step) are applied here as peft prescribes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BLOCK = {"demo": 16, "0.1b": 32}  # OFT/BOFT block size: divides 64/256 (demo) and 768/3072 (0.1B)
VERA_R = {"demo": 64, "0.1b": 256}
ADALORA_STEPS = 100

# name -> (bundled recipe, method overrides); "{block}" and "{vera}" are filled per shape.
ROWS: dict[str, tuple[str, list[str]]] = {
    "state": ("state_tune", []),
    "lora": ("lora", []),
    "dora": ("lora", ["use_dora=true"]),
    "rslora": ("lora", ["use_rslora=true"]),
    "pissa": ("pissa", []),
    "olora": ("lora", ["init=olora"]),
    "loftq (nf4)": ("qlora", ["init=loftq"]),
    "eva": ("lora", ["init=eva"]),
    "disha bone": ("disha", []),
    "disha bat": ("disha", ["disha_mode=bat"]),
    "loha": ("lora", ["kind=loha"]),
    "lokr": ("lora", ["kind=lokr"]),
    "oft": ("lora", ["kind=oft", "r={block}"]),
    "boft": ("lora", ["kind=boft", "r={block}"]),
    "ia3": ("lora", ["kind=ia3"]),
    "vera": ("lora", ["kind=vera", "r={vera}"]),
    "adalora": ("lora", ["kind=adalora", "adalora.target_r=8"]),
    "full": ("full", []),
    "lora-nf4": ("qlora", []),
    "state+lora": ("lora", ["state=true"]),
}
EXTRA = {"lora-int8": ("qlora", ["quant=int8"]), "pissa-nf4": ("pissa", ["quant=nf4"])}  # with --only
BASE = "base"  # demo: the untrained model's eval loss


def row_overrides(name: str, shape: str) -> tuple[str, list[str]]:
    recipe, over = {**ROWS, **EXTRA}[name] if name != BASE else ("lora", [])
    return recipe, [o.format(block=BLOCK[shape], vera=VERA_R[shape]) for o in over]


def load_row(name: str, shape: str, steps: int):
    """The row's Recipe: bundled recipe + method overrides, max_steps = steps, fp32; data from lora.yaml."""
    from peft_rwkv7.train.recipe import BUNDLED, load_recipe

    recipe_name, over = row_overrides(name, shape)
    recipe = load_recipe(str(BUNDLED / f"{recipe_name}.yaml"),
                         [f"method.{o}" for o in over] + [f"train.max_steps={steps}", "train.precision=fp32"])
    data = load_recipe(str(BUNDLED / "lora.yaml")).data  # one data section for every row
    return recipe.model_copy(update={"data": data})


def train(adapted, tc, batch, steps: int) -> list[float]:
    """`steps` optimizer steps as train/loop.py runs them (one process, sft); returns each step's seconds."""
    import torch

    from peft_rwkv7.adapters import trainable_parameters
    from peft_rwkv7.train.adalora import orth_penalty, update_and_allocate
    from peft_rwkv7.train.losses import sequence_loss_sum
    from peft_rwkv7.train.optim import build_optimizer
    from peft_rwkv7.train.schedule import get_lr

    named = trainable_parameters(adapted)
    for _, p in named:
        p.data = p.data.float()
    opt = build_optimizer(named, tc, torch.device("cpu"))
    adalora = adapted.method.kind == "adalora"
    adapted.train()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        lr = get_lr(step, lr=tc.lr, lr_final=tc.final_lr, max_steps=tc.max_steps, warmup_steps=tc.warmup_steps,
                    schedule=tc.schedule, decay_frac=tc.decay_frac)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        batches = [batch(step, micro) for micro in range(tc.grad_accum)]
        n_tokens = sum(int((y != -100).sum()) for _, y in batches)
        for idx, labels in batches:
            loss = sequence_loss_sum(adapted, idx, labels, tc.chunk_len) / n_tokens
            if adalora:
                loss = loss + orth_penalty(adapted) / tc.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], tc.grad_clip or float("inf"))
        opt.step()
        update_and_allocate(adapted, step)
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def merge_error(adapted, docs) -> tuple[float, float]:
    """(max |logits of merge(adapted) - logits of adapted|, max |logits of adapted|) over `docs`, fp32."""
    import torch

    from peft_rwkv7.adapters import merge

    merged = merge(adapted, torch.float32)
    adapted.eval()
    merged.eval()
    err = top = 0.0
    with torch.no_grad():
        for d in docs:
            idx = torch.tensor([[0] + list(d)])
            a, b = adapted(idx).float(), merged(idx).float()
            err, top = max(err, (a - b).abs().max().item()), max(top, a.abs().max().item())
    return err, top


def run_one(args, name: str) -> dict:
    """Build, attach, train, (demo) evaluate and merge one row; returns its measurements."""
    import torch
    from bench_util import SHAPE

    from peft_rwkv7.adapters import attach, count_trainable
    from peft_rwkv7.model import RWKV7Config, load_model, new_model

    demo = args.shape == "demo"
    recipe = load_row(name, args.shape, args.steps if demo else ADALORA_STEPS)
    tc = recipe.train
    torch.manual_seed(tc.seed)
    if demo:
        from peft_rwkv7.data import load_tokenizer, make_dataset
        from peft_rwkv7.infer.evaluate import evaluate, load_eval_data

        base = load_model(recipe.model.path, dtype=torch.float32, wkv_backend=args.backend)
        tokenizer = load_tokenizer(recipe.data.tokenizer)
        data = make_dataset(recipe.data, tokenizer, seed=tc.seed, vocab_size=base.config.vocab_size, progress=False)
        held = load_eval_data(recipe.data.eval_path, tokenizer, data_config=recipe.data)

        def batch(step, micro):
            return data.batch(step, micro, tc.micro_bsz, tc.grad_accum)

        if name == BASE:
            return {"trainable": 0, "eval_loss": evaluate(base, held.docs, masks=held.masks)["loss"]}
    else:
        cfg = RWKV7Config.new(SHAPE["n_layer"], SHAPE["n_embd"], SHAPE["vocab_size"], head_size=SHAPE["head_size"])
        base = new_model(cfg, wkv_backend=args.backend)

        def batch(step, micro):
            g = torch.Generator().manual_seed(step * tc.grad_accum + micro)
            x = torch.randint(0, SHAPE["vocab_size"], (1, args.ctx + 1), generator=g)
            return x[:, :-1], x[:, 1:]

    eva = (batch(s, 0)[0] for s in range(10**6))  # EVA's start reads the first training batches
    t0 = time.perf_counter()
    adapted = attach(base, recipe.method, total_steps=tc.max_steps, batches=eva)
    attach_s = time.perf_counter() - t0
    times = train(adapted, tc, batch, args.steps if demo else 1 + args.steps)
    out = {
        "trainable": count_trainable(adapted),
        "step_s": statistics.median(times if demo else times[1:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "attach_s": attach_s,
    }
    if demo:
        out["eval_loss"] = evaluate(adapted, held.docs, masks=held.masks)["loss"]
        out["merge_err"], out["max_logit"] = merge_error(adapted, held.docs)
    return out


def describe(name: str, shape: str) -> str:
    if name == BASE:
        return "untrained demo model"
    recipe, over = row_overrides(name, shape)
    return f"{recipe}.yaml" + (" " + " ".join(over) if over else "")


def table(results: dict[str, dict], shape: str, markdown: bool) -> list[str]:
    demo = shape == "demo"
    cols = ["method", "recipe + method overrides", "trainable", "step s", "peak RSS MB"]
    if demo:
        cols += ["eval loss", "merge max abs err", "relative"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, describe(name, shape), "failed: " + r["error"]] + [""] * (len(cols) - 3))
            continue
        row = [name, describe(name, shape), f"{r['trainable']:,}"]
        row += ["", ""] if name == BASE else [f"{r['step_s']:.3f}" if demo else f"{r['step_s']:.2f}",
                                              f"{r['peak_rss_mb']:.0f}"]
        if demo:
            row.append(f"{r['eval_loss']:.4f}")
            row += ["", ""] if name == BASE else [f"{r['merge_err']:.2e}", f"{r['merge_err'] / r['max_logit']:.1e}"]
        rows.append(row)
    if markdown:
        right = [False, False] + [True] * (len(cols) - 2)
        lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
        return lines + ["| " + " | ".join(c if i != 1 else f"`{c}`" for i, c in enumerate(row)) + " |"
                        for row in rows]
    width = [max(len(str(x)) for x in [c] + [row[i] for row in rows]) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(width))
    return [fmt.format(*cols), "-" * (sum(width) + 2 * len(width))] + [fmt.format(*row) for row in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["demo", "0.1b"], default="demo")
    ap.add_argument("--steps", type=int, default=None, help="training steps (demo: 100) / timed steps (0.1b: 3)")
    ap.add_argument("--ctx", type=int, default=512, help="0.1b: tokens per step")
    ap.add_argument("--backend", default="auto", help="wkv7 backend")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join([*ROWS, *EXTRA, BASE]))
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown (for README)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one row's JSON
    args = ap.parse_args()
    if args.steps is None:
        args.steps = 100 if args.shape == "demo" else 3
    if args.one is not None:
        sys.path.insert(0, str(HERE))
        print("RESULT " + json.dumps(run_one(args, args.one)), flush=True)
        return

    import torch
    from bench_util import SHAPE, isa_flags

    names = [n for n in args.only.split(",") if n] or ([BASE] if args.shape == "demo" else []) + list(ROWS)
    unknown = [n for n in names if n not in {**ROWS, **EXTRA, BASE: 0}]
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(unknown)}; expected some of {', '.join([*ROWS, *EXTRA, BASE])}")
    what = (f"demo model (data/demo/rwkv7-demo.pth), {args.steps} steps of 4 x 128 tokens on data/demo/ship_log.jsonl, "
            "eval on data/demo/ship_log_eval.jsonl" if args.shape == "demo" else
            f"0.1B shape L{SHAPE['n_layer']} C{SHAPE['n_embd']} V{SHAPE['vocab_size']}, random weights, "
            f"1 x {args.ctx} tokens, median of {args.steps} steps after a warm-up step")
    print(f"{what}; fp32, wkv backend {args.backend}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"CPU: {isa_flags()}; {datetime.date.today().isoformat()}", flush=True)
    common = ["--shape", args.shape, "--steps", str(args.steps), "--ctx", str(args.ctx), "--backend", args.backend]
    results: dict[str, dict] = {}
    for name in names:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *common, "--one", name], capture_output=True, text=True,
                              cwd=ROOT)
        line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            results[name] = json.loads(line[len("RESULT "):])
        print(f"  {name}: {results[name]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print("\n".join(table(results, args.shape, markdown=False)))
    if args.markdown:
        print()
        print("\n".join(table(results, args.shape, markdown=True)))
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
