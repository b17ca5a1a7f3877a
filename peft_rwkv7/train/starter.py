"""`rwkv-peft recipes` (the bundled recipes, one line each) and `rwkv-peft init [KIND]` (a starter recipe for a
user's own model and data, training any method of `rwkv-peft methods`)."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import yaml

from ..adapters.config import PROMPT_KINDS, MethodConfig
from ..adapters.kinds import recipe_keys
from ..errors import UserError
from .recipe import BUNDLED, load_recipe

# What `init KIND` writes beside the keys that select KIND (adapters.kinds.recipe_keys): the sizes, learning rate
# and schedule that suit it, and what it trains. One entry per CAPABILITIES row, plus `qlora` (LoRA over NF4).
_LORA = {"r": 16, "alpha": 32}
STARTERS: dict[str, tuple[dict, float, str]] = {
    "state": ({}, 1.0, "the initial WKV state of every layer; the model stays frozen"),
    "lora": (_LORA, 1e-4, "LoRA on the projection matrices"),
    "dora": (_LORA, 1e-4, "DoRA: LoRA's direction plus a trained magnitude per output row"),
    "rslora": ({"r": 64, "alpha": 16}, 1e-4, "rsLoRA at rank 64 (scale alpha / sqrt(r) = 2, as LoRA r 16 alpha 32)"),
    "pissa": (_LORA, 1e-4, "LoRA started from the top singular vectors"),
    "olora": (_LORA, 1e-4, "LoRA started from a QR decomposition of each weight"),
    "loftq": (_LORA, 1e-4, "LoRA over an NF4 base, started to cancel the quantization error"),
    "eva": (_LORA, 1e-4, "LoRA whose A starts from the SVD of each layer's inputs on the first batches"),
    "disha": ({"r": 64}, 1e-4, "DiSHA (Bone) shards on the projection matrices"),
    "loha": ({"r": 8, "alpha": 16}, 1e-4, "LoHa: a Hadamard product of two rank-8 pairs per matrix"),
    "lokr": ({"r": 8, "alpha": 16}, 1e-4, "LoKr: a Kronecker product of a small and a rank-8 factor per matrix"),
    "oft": ({"r": 32}, 1e-4, "OFT: an orthogonal rotation of each weight's inputs in 32 x 32 blocks"),
    "boft": ({"r": 32, "boft_factors": 1}, 1e-4, "BOFT: orthogonal rotations in 32 x 32 blocks (one butterfly "
             "factor: more need peft's CUDA extension, which miscomputes CPU tensors)"),
    "ia3": ({}, 3e-3, "IA3: one learned scale per channel of each projection"),
    "vera": ({"r": 256}, 1e-3, "VeRA: two scale vectors per matrix over frozen random rank-256 projections"),
    "adalora": ({"r": 12, "alpha": 32, "adalora": {"target_r": 4, "tinit": 20, "tfinal": 40, "delta_t": 10}}, 1e-4,
                "AdaLoRA: LoRA in SVD form, ranks 12 pruned to 4 on average where they matter least"),
    "full": ({}, 1e-5, "every parameter"),
    "qlora": (_LORA, 1e-4, "LoRA over an NF4-quantized base"),
    "grpo": (_LORA, 5e-5, "LoRA by GRPO: rewards on sampled completions of your prompts (train.grpo)"),
}
# `init grpo`: the objective, its prompts data and a starter reward (the answer column's number).
_GRPO = {"objective": "grpo", "grpo": {"num_generations": 8, "max_new_tokens": 64, "temperature": 1.0,
                                       "rewards": [{"fn": "numeric", "column": "answer"}]}}
_QLORA = {"kind": "lora", "quant": "nf4"}  # `init qlora`: the recipe spelling of QLoRA


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


def method_keys(kind: str) -> tuple[dict, float, str]:
    """(the recipe's method section, learning rate, what it trains) of `init KIND`; KIND is a CAPABILITIES row
    (dora, loftq, ... pick kind lora and that option) or qlora."""
    if kind in PROMPT_KINDS:
        MethodConfig.from_dict({"kind": kind})  # the recipe's own refusal: state tuning is the counterpart
    if kind not in STARTERS:
        raise UserError(f"KIND: {kind!r} is not a method; expected one of {', '.join(STARTERS)} "
                        "(rwkv-peft methods says what each supports)")
    sizes, lr, what = STARTERS[kind]
    if kind == "grpo":
        return {**recipe_keys("lora"), **sizes}, lr, what
    return {**(_QLORA if kind == "qlora" else recipe_keys(kind)), **sizes}, lr, what


def starter_recipe(model: str, data: str, method: str, out_dir: str, ctx_len: int) -> tuple[str, str]:
    """(YAML body of a starter recipe, what the method trains)."""
    keys, lr, what = method_keys(method)
    body = {
        "model": {"path": model},
        "method": keys,
        "data": {"path": data, "kind": "auto", "ctx_len": ctx_len},
        "train": {"max_steps": 200, "micro_bsz": 4, "grad_accum": 1, "lr": lr, "lr_final": lr / 100 if method ==
                  "state" else lr / 10, "warmup_steps": 10, "save_every": 50},
        "out_dir": out_dir,
    }
    if method == "grpo":  # prompts {"prompt": ..., "answer": ...}; fewer, larger steps of sampled completions
        body["data"]["kind"] = "prompts"
        body["train"].update(_GRPO, micro_bsz=2, max_steps=100, save_every=20)
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
              "# Every key: rwkv-peft train --print-schema; every method: rwkv-peft methods.\n"
              "# Override any key on the command line, e.g. train.lr=...\n")
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
