"""RWKV-7 model configuration, inferred from an official state dict's shapes."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from ..errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used as an RWKV-7 model; the message is one line for users."""


def _lowrank_width(n_embd: int, scale: float, power: float) -> int:
    # RWKV-LM x070 rounds every low-rank width to a multiple of 32, at least 32.
    return max(32, int(round(scale * (n_embd**power) / 32)) * 32)


@dataclass(frozen=True)
class RWKV7Config:
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    dim_ffn: int
    d_decay: int  # w1/w2 rank
    d_aaa: int  # a1/a2 rank
    d_mv: int  # v1/v2 rank (value residual)
    d_gate: int  # g1/g2 rank
    layer0_v: bool = True  # layer 0 stores v0/v1/v2 (unused there; some files omit them)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def new(cls, n_layer: int, n_embd: int, vocab_size: int, head_size: int = 64, dim_ffn: int | None = None):
        """Config for a fresh model with RWKV-LM's default widths (0.1B: w/a 64, v 32, g 128)."""
        if n_embd % head_size:
            raise ValueError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
        return cls(
            n_layer=n_layer,
            n_embd=n_embd,
            head_size=head_size,
            vocab_size=vocab_size,
            dim_ffn=dim_ffn or 4 * n_embd,
            d_decay=_lowrank_width(n_embd, 1.8, 0.5),
            d_aaa=_lowrank_width(n_embd, 1.8, 0.5),
            d_mv=_lowrank_width(n_embd, 1.3, 0.5),
            d_gate=_lowrank_width(n_embd, 0.6, 0.8),
        )


_BLOCK_KEYS = (
    "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    "att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g",
    "att.w0", "att.w1", "att.w2", "att.a0", "att.a1", "att.a2", "att.g1", "att.g2",
    "att.k_k", "att.k_a", "att.r_k",
    "att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
    "att.ln_x.weight", "att.ln_x.bias",
    "ffn.x_k", "ffn.key.weight", "ffn.value.weight",
)  # fmt: skip
_TOP_KEYS = ("emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias", "ln_out.weight", "ln_out.bias", "head.weight")


def expected_shapes(cfg: RWKV7Config) -> dict[str, tuple[int, ...]]:
    """Every key of an official checkpoint for `cfg` and its shape."""
    C, H, N, V, F = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size, cfg.dim_ffn
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (V, C),
    }
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for n in ("ln1", "ln2"):
            shapes[p + n + ".weight"] = (C,)
            shapes[p + n + ".bias"] = (C,)
        for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            shapes[p + "att." + n] = (1, 1, C)
        for n, d in (("w", cfg.d_decay), ("a", cfg.d_aaa), ("g", cfg.d_gate)):
            shapes[p + f"att.{n}1"] = (C, d)
            shapes[p + f"att.{n}2"] = (d, C)
        if i > 0 or cfg.layer0_v:
            shapes[p + "att.v0"] = (1, 1, C)
            shapes[p + "att.v1"] = (C, cfg.d_mv)
            shapes[p + "att.v2"] = (cfg.d_mv, C)
        shapes[p + "att.r_k"] = (H, N)
        for n in ("receptance", "key", "value", "output"):
            shapes[p + f"att.{n}.weight"] = (C, C)
        shapes[p + "att.ln_x.weight"] = (C,)
        shapes[p + "att.ln_x.bias"] = (C,)
        shapes[p + "ffn.x_k"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    return shapes


def older_generation(sd: dict) -> str | None:
    """"RWKV-4" / "RWKV-5" / "RWKV-6" where the keys are that generation's time-mix (None otherwise).

    RWKV-6: data-dependent token shift `att.time_maa_*`; RWKV-5: per-head `att.time_faaaa` bonus and
    `att.ln_x` without time_maa; RWKV-4: `att.time_first` and `att.time_mix_k`, no ln_x."""
    keys = {k.split(".", 2)[-1] for k in sd if k.startswith("blocks.0.")}
    if any(k.startswith("att.time_maa") for k in keys):
        return "RWKV-6"
    if "att.time_faaaa" in keys or ("att.time_first" in keys and "att.ln_x.weight" in keys):
        return "RWKV-5"
    if "att.time_first" in keys or "att.time_mix_k" in keys:
        return "RWKV-4"
    return None


def infer_config(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> RWKV7Config:
    """Read the model shape from an official state dict; raise CheckpointError naming what is wrong."""
    missing = [k for k in _TOP_KEYS + tuple("blocks.0." + k for k in _BLOCK_KEYS) if k not in sd]
    if missing:
        older = older_generation(sd)
        if older:
            raise CheckpointError(f"{source}: this is an {older} checkpoint; rwkv-peft works with RWKV-7 (x070) models "
                                  f"only")
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise CheckpointError(f"{source}: not an RWKV-7 checkpoint, missing keys: {shown}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)) and not k.endswith("time_state")}
    n_layer = max(layers) + 1
    V, C = sd["emb.weight"].shape
    v1 = next((sd[f"blocks.{i}.att.v1"] for i in range(n_layer) if f"blocks.{i}.att.v1" in sd), None)
    H, N = sd["blocks.0.att.r_k"].shape
    cfg = RWKV7Config(
        n_layer=n_layer,
        n_embd=C,
        head_size=N,
        vocab_size=V,
        dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
        d_decay=sd["blocks.0.att.w1"].shape[1],
        d_aaa=sd["blocks.0.att.a1"].shape[1],
        d_mv=v1.shape[1] if v1 is not None else 32,
        d_gate=sd["blocks.0.att.g1"].shape[1],
        layer0_v="blocks.0.att.v0" in sd,
    )
    if H * N != C:
        raise CheckpointError(f"{source}: att.r_k is {H}x{N} but the embedding width is {C}")
    want = expected_shapes(cfg)
    absent = [k for k in want if k not in sd]
    if absent:
        shown = ", ".join(absent[:4]) + (f" (+{len(absent) - 4} more)" if len(absent) > 4 else "")
        raise CheckpointError(f"{source}: incomplete RWKV-7 checkpoint, missing keys: {shown}")
    states = {f"blocks.{i}.att.time_state" for i in range(n_layer)}  # a state-tuned model's (H, N, N) per layer
    unknown = [k for k in sd if k not in want and k not in states]
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys for RWKV-7: {', '.join(unknown[:4])}")
    want.update({k: (H, N, N) for k in states if k in sd})
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(
                f"{source}: inconsistent shapes: {k} is {list(sd[k].shape)}, expected {list(shape)}"
            )
    for k, t in sd.items():
        if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise CheckpointError(f"{source}: {k} has dtype {t.dtype}, expected bf16, fp16 or fp32")
    return cfg
