"""Put a PEFT method onto an RWKV7: inject adapters (HF peft), quantize the frozen base
(bitsandbytes), add trainable initial states, and freeze everything else.

Trainable tensors get *canonical names*, the RWKV-PEFT checkpoint layout: `blocks.N.att.key.lora_A`
[r, in], `...lora_B` [out, r], `...disha`, `blocks.N.att.time_state` [H, N, N], and official key
names for parameters trained in full. Adapter files, optimizer order and exports all use them.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

from ..errors import UserError
from ..model import RWKV7
from ..model.rwkv7 import Linear
from .config import PEFT_TUNERS, PROJECTIONS, MethodConfig, part_of
from .disha import BatLinear
from .quant import quantize_linear, quantized_bytes

# Randomized SVD (svd_niter > 0) draws a random test matrix: a fixed seed makes PiSSA's start
# reproducible, so a resumed run rebuilds exactly the residual it trained against.
PISSA_SVD_SEED = 0
# Layer 0 stores v0/v1/v2 but never uses them (v_first is its own value): never trained.
_UNUSED = re.compile(r"blocks\.0\.att\.v[012]")
# Values sampled per tensor for the base-model fingerprint (strided over the flattened tensor).
FINGERPRINT_SAMPLES = 256
# Set in an RWKV7's __dict__ (not its state dict) while a method is attached to it: a second attach would stack
# adapters on adapters (detach clears it).
ATTACHED = "_peft_rwkv7_attached"


def base_fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """16 hex digits identifying a base model: sha256 over every key, shape and a strided sample
    of each tensor's values. Values are rounded to bf16 first, so a model gives the same print in
    memory (any float dtype it was loaded as) and as the bf16/fp16/fp32 .pth it came from."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach()
        h.update(f"{k}:{list(t.shape)};".encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES].to("cpu", torch.float32).to(torch.bfloat16)
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def canonical_name(name: str) -> str:
    """peft's parameter path -> the RWKV-PEFT/official name (see module docstring). Other peft tuners keep
    peft's leaf without the adapter name: `...att.key.hada_w1_a.default` -> `...att.key.hada_w1_a`."""
    name = name.replace(".base_layer.", ".")
    if m := re.fullmatch(r"(.+)\.miss_block\.default", name):
        return f"{m[1]}.disha"
    if m := re.fullmatch(r"(.+)\.default(\.weight)?", name):
        return m[1]
    return name


def is_adapter_leaf(peft_name: str) -> bool:
    """Whether a parameter path (as the model names it) is an adapter's trained tensor (not AdaLoRA's
    constant rank count)."""
    return ".default" in peft_name and not re.search(r"(^|\.)ranknum\.", peft_name)


class AdaptedRWKV7(nn.Module):
    """An RWKV7 with a PEFT method attached (the model is modified in place and held as `.model`).

    forward(idx [B, T], state=None, return_state=False) -> logits [B, T, V] as RWKV7's (with labels=: token_nll);
    with state tuning the trained `time_state` [H, N, N] per layer is the default initial state.
    """

    def __init__(self, model: RWKV7, method: MethodConfig, fingerprint: str):
        super().__init__()
        self.model = model
        self.method = method
        self.base_fingerprint = fingerprint
        self.base_dtype = model.emb.weight.dtype
        # PiSSA: the SVD start (A0 [r, in], B0 [out, r]) per target, kept so the adapter can be
        # saved as a plain LoRA delta against the original weights.
        self.pissa_init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.quant_bytes = (0, 0)  # (float bytes, quantized bytes) of the quantized projections
        # State tuning: the base's own initial state per layer (a merged checkpoint's time_state, or
        # None for zeros), for disable_adapter and detach.
        self.base_time_states: list[torch.Tensor | None] = [None] * model.config.n_layer
        # The peft tuner object of a kind in PEFT_TUNERS (VeRA keeps its shared projections there, AdaLoRA
        # its rank allocator); held outside the module tree so its parameters are not registered twice.
        self.__dict__["tuner"] = None
        # detach took the method off (the model is the base again): merge, detach and disable_adapter refuse it
        self.detached = False

    @property
    def config(self):
        return self.model.config

    def forward(self, idx: torch.Tensor, state=None, return_state: bool = False, labels=None):
        """RWKV7's forward; with `labels` [B, T] instead (per-token NLL [B, T], final state), as token_nll."""
        if labels is not None:
            return self.model.token_nll(idx, labels, state)
        return self.model(idx, state, return_state)

    def token_nll(self, idx: torch.Tensor, labels: torch.Tensor, state=None):
        """Per-token NLL [B, T] of labels and the final state (RWKV7.token_nll: the fused chunked head).

        Made through this module's own call (forward with labels), so hooks on the root module run as for any
        forward: DeepSpeed ZeRO-3 starts a step's parameter trace there, and prefetches the next layer's weights
        only once a step's trace is complete (called past the root, it gathered each weight on demand)."""
        return self(idx, state, labels=labels)

    def initial_state(self):
        return self.model.initial_state()

    def hidden(self, idx: torch.Tensor, state=None):
        """RWKV7.hidden: the last block's output after ln_out and the final state."""
        return self.model.hidden(idx, state)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """RWKV7.head_logits: the (adapted) head on hidden states."""
        return self.model.head_logits(h)

    @torch.no_grad()
    def step(self, token: torch.Tensor, state=None):
        """One RNN step: token [B] -> logits [B, V] and the new state."""
        return self.model.step(token, state)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)


def _pissa_start(linear: nn.Linear, method: MethodConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's PiSSA init on one float Linear: returns (A0, B0) fp32; the Linear keeps the residual
    fl(W - s B0 A0). Runs before any quantization, so the SVD sees the float weight."""
    from peft import LoraConfig  # peft (and the transformers it imports, ~5 s) only where a method uses it
    from peft.tuners.lora import Linear as PeftLoraLinear

    init = "pissa" if method.svd_niter == 0 else f"pissa_niter_{method.svd_niter}"
    lc = LoraConfig(r=method.r, lora_alpha=method.alpha, init_lora_weights=init, use_rslora=method.use_rslora)
    # peft on an fp32 copy: its factors stay fp32 (on a bf16 Linear it rounds them to bf16 after forming the
    # residual, so the residual would not be fl(W - s B0 A0) of the factors saved), and the residual is ours.
    copy = nn.Linear(linear.in_features, linear.out_features, bias=False)
    copy.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=False)
    # torch.manual_seed seeds the GPU's generator too: fork_rng gives back the one the weight's device uses as well
    w = linear.weight
    with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
        torch.manual_seed(PISSA_SVD_SEED)
        layer = PeftLoraLinear(copy, "default", config=lc, r=method.r, lora_alpha=method.alpha,
                               use_rslora=method.use_rslora)
    a0, b0 = layer.lora_A["default"].weight.detach().float(), layer.lora_B["default"].weight.detach().float()
    _apply_pissa_residual(linear, a0, b0, method.lora_scale)
    return a0, b0


def _residual_start(linear: nn.Linear, method: MethodConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of a start moved into the base (PiSSA, OLoRA, LoftQ); the Linear keeps W - s B0 A0."""
    from . import inits

    if method.residual_init == "pissa":
        return _pissa_start(linear, method)
    w = linear.weight.detach()
    if method.residual_init == "olora":
        a0, b0 = inits.olora_start(w.float(), method.r, method.alpha)
    else:
        a0, b0 = inits.loftq_start(w, method.r, method.lora_scale, method.quant, method.loftq_iters, w.dtype)
    _apply_pissa_residual(linear, a0, b0, method.lora_scale)
    return a0, b0


def _eva_start(model: RWKV7, method: MethodConfig, names: list[str], batches) -> None:
    """EVA: lora_A of every target from the SVD of its inputs on the first training batches (B stays 0)."""
    from . import inits

    if isinstance(batches, tuple) and not batches:
        return  # loading a saved adapter: its A replaces the start, no data pass
    if batches is None:
        raise UserError("method.init: eva takes its start from the training data; attach it with batches "
                        "(the recipe's data does this) or choose another init")
    from ..ops.thin_check import ThinCheck
    from .fused_lora import FusedLoraLinear

    # B is 0, so how x A^T is computed cannot change what a layer passes on: this pass takes BLAS's thin products
    # rather than measure the thin check (which a run then decides once, for every process: train/routes.py)
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear) and m.thin_check is None]
    for m in layers:
        m.thin_check = ThinCheck()
    try:
        with torch.random.fork_rng(devices=[]):
            inputs = inits.collect_inputs(model, names, batches, method.eva_tokens)
    finally:
        for m in layers:
            m.thin_check = None
    with torch.no_grad():
        for name in names:
            a = model.get_submodule(name).lora_A["default"].weight
            a.copy_(inits.eva_components(inputs[name].float(), method.r).to(a.dtype))


def _peft_tuner(model: RWKV7, method: MethodConfig, targets: list[str], total_steps: int | None):
    """Inject a peft tuner kind (loha, lokr, oft, boft, ia3, vera, adalora) and return peft's tuner object."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from .kinds import boft_in_torch, peft_config

    if method.kind in ("oft", "boft"):  # peft would quietly pick another OFT block size
        for t in targets:
            n_in = model.get_submodule(t if t == "head" else f"blocks.0.{t}").in_features
            if n_in % method.r:
                raise UserError(f"method.r: {method.kind} block size {method.r} does not fit {t} ({n_in} inputs); "
                                f"use a divisor of {n_in}")
    pc = peft_config(method, targets, total_steps)
    try:
        tuner = PEFT_TYPE_TO_TUNER_MAPPING[pc.peft_type](model, pc, adapter_name="default")
        boft_in_torch(model)
        return tuner
    except ValueError as e:  # peft's shape checks (e.g. an OFT block size that does not divide a matrix)
        raise UserError(f"method: {method.kind} r={method.r} does not fit these matrices ({str(e).splitlines()[0]})"
                        ) from None


@torch.no_grad()
def _apply_pissa_residual(linear: nn.Linear, a0: torch.Tensor, b0: torch.Tensor, scale: float) -> None:
    """W <- W - (scale B0) A0, in fp32 and in the order peft computes it (bitwise the same start)."""
    w = linear.weight
    w.copy_((w.float() - (scale * b0.to(w.device)) @ a0.to(w.device)).to(w.dtype))


def quantized_names(model: RWKV7, cfg: MethodConfig) -> list[str]:
    """The projections a quantized base quantizes: every block's, less the FFN's where it trains in full."""
    if cfg.quant == "none":
        return []
    full_ffn = "ffn" in cfg.train_parts  # trained in full: stays a float Linear
    return [f"blocks.{i}.{p}" for i in range(model.config.n_layer) for p in PROJECTIONS
            if not (full_ffn and p.startswith("ffn."))]


def _in_layer_order(names: set[str], n_layer: int) -> list[str]:
    """`names` block by block (each block's projections in PROJECTIONS order), then the head."""
    order = [f"blocks.{i}.{p}" for i in range(n_layer) for p in PROJECTIONS]
    rest = sorted(names - set(order))  # other targets ("head") after the blocks
    return [n for n in order if n in names] + rest


def check_attachable(model, fn: str) -> None:
    """That `model` can take a method (attach, load_adapter): a plain RWKV7 with weights and none attached yet."""
    if isinstance(model, AdaptedRWKV7) or not isinstance(model, RWKV7):
        raise TypeError(f"{fn} expects a plain RWKV7 (load a fresh base model to attach another method), "
                        f"got {type(model).__name__}")
    if model.__dict__.get(ATTACHED):
        raise UserError(f"{fn}: this RWKV7 has a method attached already (it is an adapted model's .model); "
                        "detach it first, or load a fresh base model to attach another method")
    if model.emb.weight.device.type == "meta":
        raise UserError(f"{fn}: the model's weights are on the meta device (no values); load it with load_model")


def attach(
    model: RWKV7,
    cfg: MethodConfig,
    pissa_start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    total_steps: int | None = None,
    batches=None,
    device: torch.device | str | None = None,
) -> AdaptedRWKV7:
    """Attach the method `cfg` to `model` (modified in place) and freeze everything else.

    pissa_start: {module name: (A0, B0)} to rebuild a saved residual start (PiSSA, OLoRA, LoftQ) instead
    of computing it again. total_steps: the run's optimizer steps (AdaLoRA's schedule). batches: token-id
    tensors [B, T] of the training data (EVA's start), an iterable; () when a saved adapter will be loaded.
    device: move the model there as it is attached (default: it stays where it is). For a quantized base
    loaded on the CPU, each projection is quantized straight onto `device`, so the device never holds the
    unquantized projections (QLoRA on a GPU smaller than the float model).
    """
    check_attachable(model, "attach")
    if not isinstance(cfg, MethodConfig):
        raise TypeError(f"attach: cfg must be a MethodConfig (e.g. MethodConfig(kind='lora')), "
                        f"got {type(cfg).__name__}")
    cfg.validate()
    adapted = AdaptedRWKV7(model, cfg, base_fingerprint(model.state_dict()))
    n_layer, dtype = model.config.n_layer, adapted.base_dtype
    targets = cfg.effective_targets()
    target_names = [f"blocks.{i}.{t}" for i in range(n_layer) for t in targets if t != "head"]
    target_names += ["head"] if "head" in targets else []

    # A residual start (PiSSA, OLoRA, LoftQ) and the quantization, projection by projection in layer order
    residual = set(target_names) if cfg.residual_init else set()
    quantized = set(quantized_names(model, cfg))
    before = after = 0
    for name in _in_layer_order(residual | quantized, n_layer):
        linear = model.get_submodule(name)
        if name in residual:
            if device is not None:
                linear.to(device)  # the start is computed where the layer will live (a GPU's SVD)
            if pissa_start is None:
                adapted.pissa_init[name] = _residual_start(linear, cfg)
            elif name not in pissa_start:
                raise UserError(f"PiSSA adapter has no start for {name}")
            else:
                a0, b0 = pissa_start[name]
                _apply_pissa_residual(linear, a0, b0, cfg.lora_scale)
                adapted.pissa_init[name] = (a0.float(), b0.float())
        if name in quantized:
            q = quantize_linear(linear.weight, cfg.quant, dtype, device=device)
            before += linear.weight.numel() * linear.weight.element_size()
            after += quantized_bytes(q)
            _set_module(model, name, q)  # the float weight (on the CPU where `device` is given) goes
    if device is not None:
        model.to(device)  # the rest: embeddings, head, norms, the mixing vectors
    if cfg.quant != "none":
        adapted.quant_bytes = (before, after)
        # peft picks its bitsandbytes LoRA layers (which can merge) only when the model says so.
        model.is_loaded_in_4bit = cfg.quant in ("nf4", "fp4")
        model.is_loaded_in_8bit = cfg.quant == "int8"

    kind = cfg.adapter_kind
    if kind in ("lora", "pissa", "bone"):  # imported here: state tuning and DiSHA's Bat never load peft (~5 s)
        from peft import LoraConfig, MissConfig, inject_adapter_in_model

        from .fused_lora import FusedLoraLinear
    if kind in ("lora", "pissa"):
        lc = LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, use_dora=cfg.use_dora,
            use_rslora=cfg.use_rslora, init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
        )
        lc._register_custom_module({Linear: FusedLoraLinear})  # peft's LoRA Linear, its sum in one GEMM
        inject_adapter_in_model(lc, model)
        if cfg.init == "eva":
            _eva_start(model, cfg, target_names, batches)
    elif kind in PEFT_TUNERS:
        adapted.__dict__["tuner"] = _peft_tuner(model, cfg, targets, total_steps)
    elif kind == "bone":
        inject_adapter_in_model(
            MissConfig(r=cfg.r, miss_dropout=cfg.dropout, target_modules=targets, init_weights=True), model
        )
    elif kind == "bat":
        for name in target_names:
            try:
                _set_module(model, name, BatLinear(model.get_submodule(name), cfg.r))
            except ValueError as e:
                raise UserError(f"method.r: {e} ({name})") from e

    model.requires_grad_(False)
    for name, p in model.named_parameters():
        cname = canonical_name(name)
        adapter_param = is_adapter_leaf(name) or cname.endswith(".disha")
        if adapter_param:
            p.data = p.data.float()  # adapters train in fp32 whatever the base dtype
        in_full = cfg.kind == "full" or part_of(cname) in cfg.train_parts
        if adapter_param or (in_full and not _UNUSED.fullmatch(cname)):
            p.requires_grad_(True)
    for name, (a0, b0) in adapted.pissa_init.items():
        layer = model.get_submodule(name)
        layer.lora_A["default"].weight.data.copy_(a0)
        layer.lora_B["default"].weight.data.copy_(b0)

    if cfg.trains_state:
        H, N = model.config.n_head, model.config.head_size
        for i, blk in enumerate(model.blocks):
            start = getattr(blk.att, "time_state", None)
            if start is None:
                start = torch.zeros(H, N, N, device=blk.att.r_k.device)
            else:
                adapted.base_time_states[i] = start.detach().clone()
                del blk.att.time_state  # the base's state (a buffer) becomes the trainable start
            blk.att.time_state = nn.Parameter(start.detach().float().clone())
    model.__dict__[ATTACHED] = True
    return adapted


def trainable_parameters(adapted: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(canonical name, parameter) of everything that trains, in module order (stable across runs)."""
    if not isinstance(adapted, nn.Module):
        raise TypeError(f"trainable_parameters: expected a model (attach's result or an RWKV7), got "
                        f"{type(adapted).__name__}")
    model = adapted.model if isinstance(adapted, AdaptedRWKV7) else adapted
    return [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(adapted: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for _, p in trainable_parameters(adapted))
