"""`rwkv-peft recipes` (the bundled recipes, one line each) and `rwkv-peft init` (a starter recipe for a
user's own model and data)."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import yaml

from ..errors import UserError
from .recipe import BUNDLED, load_recipe

# What `init` writes per method: the learning rate and schedule that suit it, and what it trains.
STARTERS = {
    "state": ({"kind": "state"}, 1.0, "the initial WKV state of every layer; the model stays frozen"),
    "lora": ({"kind": "lora", "r": 16, "alpha": 32}, 1e-4, "LoRA on the projection matrices"),
    "pissa": ({"kind": "pissa", "r": 16, "alpha": 32}, 1e-4, "LoRA started from the top singular vectors"),
    "disha": ({"kind": "disha", "r": 64}, 1e-4, "DiSHA (Bone) shards on the projection matrices"),
    "qlora": ({"kind": "lora", "r": 16, "alpha": 32, "quant": "nf4"}, 1e-4, "LoRA over an NF4-quantized base"),
    "full": ({"kind": "full"}, 1e-5, "every parameter"),
}


def purpose(text: str, width: int = 90) -> str:
    """The first sentence of a recipe's header paragraph (after the command line), without asides in
    parentheses, cut to `width` characters."""
    lines = [ln.lstrip("#").strip() for ln in text.splitlines() if ln.startswith("#")]
    paragraph = " ".join(itertools.takewhile(bool, itertools.dropwhile(lambda ln: not ln, lines[1:])))
    sentence = re.split(r"(?<=[.])\s", paragraph, maxsplit=1)[0].rstrip(".")
    sentence = re.sub(r"\s*\([^()]*\)", "", sentence)
    return sentence if len(sentence) <= width else sentence[: width - 1].rstrip() + "…"


def list_recipes(folder: Path = BUNDLED) -> list[tuple[str, str]]:
    """(name, purpose) of every bundled recipe, by name."""
    return [(p.stem, purpose(p.read_text(encoding="utf-8"))) for p in sorted(folder.glob("*.yaml"))]


def resolve_recipe(path: str) -> str:
    """A recipe path as given, or the bundled recipe of that name (`state_tune`, `lora.yaml`, ...)."""
    if os.path.exists(path):
        return path
    bundled = BUNDLED / (path if path.endswith(".yaml") else f"{path}.yaml")
    if "/" not in path and bundled.is_file():
        return str(bundled)
    return path  # load_recipe names the missing file


def starter_recipe(model: str, data: str, method: str, out_dir: str, ctx_len: int) -> tuple[str, str]:
    """(YAML body of a starter recipe, what the method trains)."""
    if method not in STARTERS:
        raise UserError(f"--method: {method!r} is not one of {', '.join(STARTERS)}")
    keys, lr, what = STARTERS[method]
    body = {
        "model": {"path": model},
        "method": keys,
        "data": {"path": data, "kind": "auto", "ctx_len": ctx_len},
        "train": {"max_steps": 200, "micro_bsz": 4, "grad_accum": 1, "lr": lr, "lr_final": lr / 100 if method ==
                  "state" else lr / 10, "warmup_steps": 10, "save_every": 50},
        "out_dir": out_dir,
    }
    return yaml.safe_dump(body, sort_keys=False), what


def write_starter(out: str, model: str, data: str, method: str = "state", out_dir: str | None = None,
                  ctx_len: int = 512) -> str:
    """Write a starter recipe to `out` (never over an existing file); returns a one-line summary."""
    target = Path(out)
    if target.exists():
        raise UserError(f"{target}: already exists; choose another --out (nothing was overwritten)")
    run_dir = out_dir or f"runs/{target.stem}"
    body, what = starter_recipe(model, data, method, run_dir, ctx_len)
    header = (f"# rwkv-peft train {target}\n#\n# {method} on {model}: trains {what}.\n"
              f"# Every key: rwkv-peft train --print-schema. Override any on the command line, e.g. train.lr=...\n")
    text = header + body
    tmp = target.with_name(f".{target.name}.tmp")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text, encoding="utf-8")
    try:
        load_recipe(str(tmp))  # what we write must load
    except UserError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return f"wrote {target} ({method}); check data.ctx_len and train.max_steps, then: rwkv-peft train {target}"
