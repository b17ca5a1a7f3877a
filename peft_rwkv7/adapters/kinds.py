"""What each method kind supports, in one place: the CLI (`rwkv-peft methods`, merge/export refusals), the
recipe checks and the README's table read `CAPABILITIES`, so a new HF peft tuner is one entry here (plus
its `peft_config` branch) and tests.

Columns: `merge` - folded exactly into an official .pth (and so into .st/HF through convert/export);
`rwkv_peft` - exported in RWKV-PEFT's checkpoint layout (that tool has the method); `st` - exported alone
as a web-rwkv run-time LoRA .st; `quant` - trains on a bitsandbytes 4/8-bit base (peft has the layer);
`state` - combinable with state tuning (`method.state: true`). This module imports nothing heavy: peft is
imported inside `peft_config` only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Capability:
    kind: str
    name: str  # what the README calls it
    paper: str
    merge: bool = True
    rwkv_peft: bool = False
    st: bool = False
    quant: bool = False
    state: bool = True


CAPABILITIES: dict[str, Capability] = {c.kind: c for c in (
    Capability("state", "state tuning", "the initial WKV state per layer (RWKV-specific)", rwkv_peft=True, st=True,
               quant=True),
    Capability("lora", "LoRA", "Hu et al. 2021, arXiv:2106.09685", rwkv_peft=True, st=True, quant=True),
    Capability("dora", "DoRA (lora, use_dora)", "Liu et al. 2024, arXiv:2402.09353", quant=True),
    Capability("rslora", "rsLoRA (lora, use_rslora)", "Kalajdzievski 2023, arXiv:2312.03732", rwkv_peft=True,
               st=True, quant=True),
    Capability("pissa", "PiSSA", "Meng et al. 2024, arXiv:2404.02948", rwkv_peft=True, st=True, quant=True),
    Capability("olora", "OLoRA (lora, init olora)", "Buyukakyuz 2024, arXiv:2406.01775", rwkv_peft=True, st=True,
               quant=True),
    Capability("loftq", "LoftQ (lora, init loftq)", "Li et al. 2023, arXiv:2310.08659", rwkv_peft=True, st=True,
               quant=True),
    Capability("eva", "EVA (lora, init eva)", "Paischer et al. 2024, arXiv:2410.07170", rwkv_peft=True, st=True,
               quant=True),
    Capability("disha", "DiSHA Bone/Bat", "Kang & Yin 2024, arXiv:2409.15371", rwkv_peft=True, quant=True),
    Capability("loha", "LoHa", "Hyeon-Woo et al. 2022, arXiv:2108.06098"),
    Capability("lokr", "LoKr", "Edalati et al. 2022, arXiv:2212.10650"),
    Capability("oft", "OFT", "Qiu et al. 2023, arXiv:2306.07280"),
    Capability("boft", "BOFT", "Liu et al. 2024, arXiv:2311.06243"),
    Capability("ia3", "IA3", "Liu et al. 2022, arXiv:2205.05638", quant=True),
    Capability("vera", "VeRA", "Kopiczko et al. 2024, arXiv:2310.11454"),
    Capability("adalora", "AdaLoRA", "Zhang et al. 2023, arXiv:2303.10512", quant=True),
    Capability("full", "full fine-tuning", "every weight"),
)}


def capability_key(method: Any) -> str:
    """The CAPABILITIES row of a MethodConfig (a LoRA option or init picks its own row)."""
    if method.kind == "lora":
        if method.use_dora:
            return "dora"
        if method.init in ("olora", "loftq", "eva"):
            return method.init
        if method.use_rslora:
            return "rslora"
    return method.kind


def capability(method: Any) -> Capability:
    return CAPABILITIES[capability_key(method)]


def boft_in_torch(module: Any) -> None:
    """Every peft BOFT layer under `module` forms its block-diagonal rotation with torch's ops, on any device.

    peft 0.21 switches a BOFT layer to its CUDA extension whenever it can compile it (a machine with nvcc and a
    CUDA build of torch), whatever device the layer's tensors are on; for CPU tensors (a merge into .pth, CPU
    inference on that machine) the extension returns zeros. With one butterfly factor (config.boft_factors) both
    ways compute the same rotation."""
    for m in module.modules():
        if hasattr(m, "fbd_cuda_available"):
            m.fbd_cuda_available = False


def peft_config(method: Any, targets: list[str], total_steps: int | None = None):
    """The HF peft config of a peft tuner kind (method.kind in config.PEFT_TUNERS) on `targets` (module
    names or suffixes). IA3 scales the input of ffn.value (the FFN's inner activation, as the paper scales
    T5's) and the output of every other target."""
    import peft

    m, kind = method, method.kind
    if kind == "loha":
        return peft.LoHaConfig(r=m.r, alpha=m.alpha, rank_dropout=0.0, module_dropout=0.0, target_modules=targets)
    if kind == "lokr":
        return peft.LoKrConfig(r=m.r, alpha=m.alpha, rank_dropout=0.0, module_dropout=0.0, target_modules=targets)
    if kind == "oft":
        return peft.OFTConfig(r=0, oft_block_size=m.r, module_dropout=m.dropout, target_modules=targets)
    if kind == "boft":
        return peft.BOFTConfig(boft_block_size=m.r, boft_n_butterfly_factor=m.boft_factors,
                               boft_dropout=m.dropout, target_modules=targets)
    if kind == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=[t for t in targets
                                                                           if t.endswith("ffn.value")])
    if kind == "vera":
        return peft.VeraConfig(r=m.r, vera_dropout=m.dropout, target_modules=targets, save_projection=True)
    if kind == "adalora":
        a = m.adalora
        total = total_steps if total_steps is not None else a.tinit + a.tfinal + 1
        return peft.AdaLoraConfig(init_r=m.r, target_r=a.target_r, tinit=a.tinit, tfinal=a.tfinal, deltaT=a.delta_t,
                                  beta1=a.beta1, beta2=a.beta2, orth_reg_weight=a.orth_reg_weight,
                                  total_step=total, lora_alpha=m.alpha, lora_dropout=m.dropout,
                                  target_modules=targets)
    raise ValueError(f"no peft config for method.kind {kind}")


# The CAPABILITIES rows picked by a LoRA option rather than a kind (capability_key's inverse); loftq also
# needs a quantized base (MethodConfig refuses it without one).
_LORA_OPTION = {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "olora": {"init": "olora"},
                "loftq": {"init": "loftq", "quant": "nf4"}, "eva": {"init": "eva"}}
COLUMNS = ("merge", "rwkv_peft", "st", "quant", "state")
_HEADERS = {"kind": "kind", "name": "what", "merge": "merge", "rwkv_peft": "RWKV-PEFT export",
            "st": "web-rwkv .st", "quant": "quantized base", "state": "+ state", "recipe": "in a recipe",
            "paper": "paper"}


def recipe_keys(key: str) -> dict[str, Any]:
    """The `method:` keys that select the CAPABILITIES row `key` ({"kind": "lora", "use_dora": True} for
    dora); `capability_key` of a MethodConfig built from them gives `key` back."""
    if key not in CAPABILITIES:
        raise KeyError(key)
    return {"kind": "lora", **_LORA_OPTION[key]} if key in _LORA_OPTION else {"kind": key}


def flow_yaml(keys: dict[str, Any]) -> str:
    """`{kind: lora, use_dora: true}`: recipe keys as one YAML flow mapping."""
    return "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()) + "}"


def table_rows() -> list[dict[str, str]]:
    """One row per CAPABILITIES entry, in table order: kind, name, paper, the COLUMNS as yes/no (`state`
    is "n/a" on state tuning's own row) and `recipe`, the method keys that select it."""
    rows = []
    for key, cap in CAPABILITIES.items():
        flags = {c: "yes" if getattr(cap, c) else "no" for c in COLUMNS}
        if key == "state":
            flags["state"] = "n/a"
        rows.append({"kind": key, "name": cap.name.split(" (")[0], **flags, "recipe": flow_yaml(recipe_keys(key)),
                     "paper": cap.paper})
    return rows


def _arxiv_link(paper: str) -> str:
    return re.sub(r"arXiv:(\d{4}\.\d{4,5})", r"[arXiv:\1](https://arxiv.org/abs/\1)", paper)


def markdown_table() -> str:
    """The README's methods table (one line per row, ending with a newline)."""
    cols = ("kind", "name", *COLUMNS, "recipe", "paper")
    lines = ["| " + " | ".join(_HEADERS[c] for c in cols) + " |", "|" + " --- |" * len(cols)]
    for row in table_rows():
        cells = {**row, "kind": f"`{row['kind']}`", "recipe": f"`{row['recipe']}`", "paper": _arxiv_link(row["paper"])}
        lines.append("| " + " | ".join(cells[c] for c in cols) + " |")
    return "\n".join(lines) + "\n"


def text_table() -> str:
    """`rwkv-peft methods`: what each row supports (with its paper), then the recipe keys that select it."""
    rows = table_rows()
    cols = ("kind", *COLUMNS, "name")
    heads = {**_HEADERS, "rwkv_peft": "rwkv-peft", "st": ".st", "quant": "quant", "state": "+state",
             "name": "what - paper"}
    cells = [{**r, "name": f"{r['name']} - {r['paper']}"} for r in rows]
    width = {c: max(len(heads[c]), *(len(r[c]) for r in cells)) for c in cols}
    lines = ["  ".join(heads[c].ljust(width[c]) for c in cols).rstrip()]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols).rstrip() for r in cells]
    lines += ["", "merge: folded into an official .pth (rwkv-peft merge); rwkv-peft: export --format rwkv-peft;",
              ".st: the adapter alone as web-rwkv's LoRA/state .st (export --format st);",
              "quant: on a method.quant base;",
              "+state: method.state: true also trains the initial WKV state.", "",
              "pick one in a recipe's method section (rwkv-peft init KIND writes a starter recipe):"]
    lines += [f"  {r['kind']:<{width['kind']}}  method: {r['recipe']}" for r in rows]
    lines.append("prompt/prefix tuning is refused: RWKV-7 has no attention to prepend tokens to; state tuning is "
                 "its counterpart.")
    return "\n".join(lines) + "\n"
