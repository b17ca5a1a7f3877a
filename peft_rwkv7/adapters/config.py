"""The recipe's `method:` section: which PEFT method trains which parameters.

Parameter groups (`train_parts`) are named by what they are in RWKV-7, matched against official
checkpoint key names, so they select the same tensors in a model, an adapter file and a .pth.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal, get_args

from pydantic import Field, ValidationError, field_validator, model_validator
from typing_extensions import Self

from ..config_base import ConfigModel, Number, Wording, invalid, user_error
from ..errors import UserError
from .kinds import CAPABILITIES, capability

Kind = Literal["state", "lora", "pissa", "disha", "full", "loha", "lokr", "oft", "boft", "ia3", "vera", "adalora"]
Init = Literal["default", "gaussian", "pissa", "olora", "loftq", "eva"]
Quant = Literal["none", "nf4", "fp4", "int8"]
DishaMode = Literal["bone", "bat"]
KINDS: tuple[str, ...] = get_args(Kind)
INITS: tuple[str, ...] = get_args(Init)
# HF peft tuners attached as they are (peft's layers, peft's merge): method.kind -> peft's name for it.
PEFT_TUNERS = ("loha", "lokr", "oft", "boft", "ia3", "vera", "adalora")
# peft's prompt/prefix tuners prepend learned vectors to a transformer's attention; an RNN has none to extend.
PROMPT_KINDS = ("prefix", "prefix_tuning", "prompt", "prompt_tuning", "p_tuning", "ptuning", "adaption_prompt",
                "prompt_encoder", "multitask_prompt_tuning", "cpt")
# LoRA inits that move the start into the base weight (residual = W - scale B0 A0), saved as a rank-2r delta.
RESIDUAL_INITS = ("pissa", "olora", "loftq")
QUANTS: tuple[str, ...] = get_args(Quant)
DISHA_MODES: tuple[str, ...] = get_args(DishaMode)
PROJECTIONS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
TARGETS = (*PROJECTIONS, "head")  # what an adapter may wrap: every block's projections and the head

# Official key names (without the `blocks.N.` prefix where there is one) of each train_parts group.
_TIME_NAMES = r"x_[rwkvag]|[wav][012]|g[12]|k_k|k_a|r_k"
PART_PATTERNS = {
    "emb": r"emb\.weight",
    "head": r"head\.weight",
    "ln": r"(blocks\.\d+\.(ln[012]|att\.ln_x)|ln_out)\.(weight|bias)",
    "time": rf"blocks\.\d+\.att\.({_TIME_NAMES})",
    "ffn": r"blocks\.\d+\.ffn\.(x_k|key\.weight|value\.weight)",
}


def part_of(key: str) -> str | None:
    """The train_parts group an official key belongs to (None for projections of att)."""
    for part, pattern in PART_PATTERNS.items():
        if re.fullmatch(pattern, key):
            return part
    return None


class AdaLoraOptions(ConfigModel):
    """AdaLoRA's rank allocation (Zhang et al. 2023, arXiv:2303.10512): every adapted matrix starts at rank
    method.r and the budget shrinks to target_r per matrix on average between tinit and total - tfinal."""

    section: ClassVar[str] = "method.adalora"
    target_r: int = Field(4, gt=0, description="average rank per matrix after allocation (the budget)")
    tinit: int = Field(0, ge=0, description="steps at full rank before pruning starts")
    tfinal: int = Field(0, ge=0, description="final steps at the budget, ranks frozen")
    delta_t: int = Field(1, gt=0, description="steps between two rank allocations")
    beta1: Number = Field(0.85, gt=0, lt=1, description="EMA of the sensitivity")
    beta2: Number = Field(0.85, gt=0, lt=1, description="EMA of the uncertainty")
    orth_reg_weight: Number = Field(0.5, ge=0, description="weight of the orthogonality penalty on P and Q")


class MethodConfig(ConfigModel):
    """What trains. Everything not selected here stays frozen. Bad fields are UserErrors "method.<field>: ..."."""

    section: ClassVar[str] = "method"
    wording: ClassVar[Wording] = Wording(
        "{key}: expected {allowed}, got {value}", "{key}: expected {allowed}, got {value}",
        "{key}: {value} is not one of {choices}",
    )

    kind: Kind = Field("lora", description=(
        "state: only the initial WKV state per layer; lora, pissa, disha, loha, lokr, oft, boft, ia3, vera, "
        "adalora: adapters on target_modules (`rwkv-peft methods` lists what each supports); full: every weight"))
    r: int = Field(16, gt=0, description=(
        "rank of LoRA/PiSSA/LoHa/LoKr/VeRA, AdaLoRA's initial rank; shard size of DiSHA (Bone: [r, out] per "
        "matrix; Bat: [in/r, r, r]); block size of OFT/BOFT (must divide the matrix sizes)"))
    alpha: Number = Field(32.0, gt=0, description=(
        "LoRA/PiSSA/LoHa/LoKr/AdaLoRA scale numerator: the update is (alpha / r) * B @ A (alpha / sqrt(r) "
        "with use_rslora)"))
    use_dora: bool = Field(False, description=(
        "LoRA: DoRA (Liu et al. 2024): W' = m * (W + s B A) / ||W + s B A|| per output row, the "
        "magnitude m trained too"))
    use_rslora: bool = Field(False, description=(
        "LoRA/PiSSA: rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023)"))
    init: Init = Field("default", description=(
        "LoRA start: default (A Kaiming, B zero), gaussian (A normal 1/r), pissa (= kind pissa), olora (QR of "
        "W, residual kept in the base), loftq (quantized base: alternating quantize/SVD, needs quant), eva "
        "(A from the SVD of each layer's inputs on the first training batches)"))
    loftq_iters: int = Field(2, gt=0, description="LoftQ: alternating quantize/SVD rounds")
    eva_tokens: int = Field(4096, gt=0, description="EVA: input rows per layer taken from the training data")
    adalora: AdaLoraOptions = Field(default_factory=AdaLoraOptions, description="AdaLoRA's rank budget")
    boft_factors: int = Field(1, gt=0, description=(
        "BOFT: butterfly factors; only 1 (block-diagonal OFT): peft makes more with its CUDA extension alone, "
        "which gives wrong results for CPU tensors (merges, CPU inference)"))
    dropout: Number = Field(0.0, ge=0, lt=1, description="LoRA/PiSSA/Bone input dropout probability (Bat has none)")
    target_modules: list[str] = Field(default_factory=lambda: list(PROJECTIONS), description=(
        f"Linears that get an adapter: projections of every block and the head, some of {', '.join(TARGETS)}; "
        "those in a train_parts group (ffn, head) are trained in full instead"))
    quant: Quant = Field("none", description=(
        "quantize the frozen projection weights of every block with bitsandbytes (QLoRA-style); "
        "embedding, head and the small time-mix tensors stay float; on a GPU the base is read on the CPU and "
        "each projection quantized onto the GPU, which never holds the float projections"))
    train_parts: list[str] = Field(default_factory=list, description=(
        f"groups of base parameters trained in full, some of {', '.join(PART_PATTERNS)}"))
    state: bool = Field(False, description='also train the initial WKV state per layer ([H, N, N]); kind "state" '
                                           "trains only that")
    svd_niter: int = Field(4, ge=0, description=(
        "PiSSA: subspace iterations of the randomized SVD (0 = exact SVD, slow on big matrices)"))
    disha_mode: DishaMode = Field("bone", description=(
        "DiSHA variant: bone (one shared [r, out] shard added to every in-block) or bat "
        "(block affine: W_ij @ D_j + D_j, a nonlinear update that uses the frozen weight)"))

    @model_validator(mode="before")
    @classmethod
    def _no_prompt_tuners(cls, d: Any) -> Any:
        if isinstance(d, dict) and d.get("kind") in PROMPT_KINDS:
            raise invalid(f"{{key}}: {d['kind']} prepends learned tokens to a transformer's attention; RWKV-7 "
                          "has none to extend - its counterpart is state tuning (kind: state, or state: true "
                          "beside an adapter)", "kind")
        if isinstance(d, dict) and d.get("init") == "pissa" and d.get("kind", "lora") in ("lora", "pissa"):
            d = {**d, "kind": "pissa", "init": "default"}  # one method, two spellings
        return d

    @field_validator("target_modules", mode="before")
    @classmethod
    def _known_targets(cls, v: Any) -> Any:
        if not isinstance(v, list) or not v:
            raise invalid(f"{{key}}: expected a non-empty list of {', '.join(TARGETS)}")
        wrong = [t for t in v if t not in TARGETS]
        if wrong:
            raise invalid(f"{{key}}: unknown {', '.join(map(str, wrong))}; expected some of {', '.join(TARGETS)}")
        return v

    @field_validator("boft_factors")
    @classmethod
    def _one_butterfly_factor(cls, v: int) -> int:
        # peft 0.21 builds factors > 1 only where it can compile its CUDA block-diagonal extension, and then runs
        # that extension for CPU tensors too (zeros come back: a merge into .pth or CPU inference would be wrong);
        # without it peft quietly trains 1 instead. So 1 everywhere, said, instead of a silent difference.
        if v != 1:
            raise invalid(f"{{key}}: {v} is not supported; use 1 (peft makes more butterfly factors only with its "
                          "CUDA extension, which computes wrong results for the CPU tensors of a merge or of CPU "
                          "inference, and on a CPU-only machine it quietly trains 1)")
        return v

    @field_validator("train_parts", mode="before")
    @classmethod
    def _known_parts(cls, v: Any) -> Any:
        if not isinstance(v, list) or any(not isinstance(p, str) or p not in PART_PATTERNS for p in v):
            raise invalid(f"{{key}}: {v!r}: expected a list of {', '.join(PART_PATTERNS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.quant != "none" and self.kind == "full":
            raise invalid("{key}: a quantized base cannot be trained in full; use quant: none with kind: full", "quant")
        lora_like = self.kind in ("lora", "pissa")
        for flag in ("use_dora", "use_rslora"):
            if getattr(self, flag) and not lora_like:
                raise invalid(f"{{key}}: is a LoRA option; kind {self.kind} has no LoRA factors", flag)
        if self.init != "default" and self.kind != "lora":
            raise invalid(f"{{key}}: {self.init} is a LoRA start; use it with kind: lora", "init")
        if self.init == "loftq" and self.quant == "none":
            raise invalid("{key}: loftq fits the adapter to a quantized base; set quant: nf4, fp4 or int8", "init")
        if self.use_dora and self.residual_init:
            raise invalid("{key}: DoRA's magnitude is taken from the weight; use it with init default, gaussian "
                          "or eva, not a start moved into the base (pissa, olora, loftq)", "use_dora")
        cap = capability(self)
        if self.quant != "none" and not cap.quant:
            able = ", ".join(c.kind for c in CAPABILITIES.values() if c.quant)
            raise invalid(f"{{key}}: peft has no {self.quant}-quantized layer for {cap.name}; quantized bases "
                          f"train with {able}", "quant")
        if self.adapter_kind is not None and not self.effective_targets():
            raise invalid("{key}: every target is trained in full through train_parts: nothing left to adapt",
                          "target_modules")
        return self

    @classmethod
    def from_dict(cls, d: dict, where: str = "method") -> MethodConfig:
        """Build from a recipe/adapter.json mapping; unknown keys are a UserError naming them."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a mapping of method fields (kind, r, ...), got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.model_fields))
        if unknown:
            known = ", ".join(sorted(cls.model_fields))
            raise UserError(f"{where}: unknown keys {', '.join(unknown)}; expected some of {known}")
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise user_error(e, cls, where) from None

    def to_dict(self) -> dict:
        return self.model_dump()

    @property
    def trains_state(self) -> bool:
        return self.kind == "state" or self.state

    @property
    def adapter_kind(self) -> str | None:
        """The per-matrix adapter: lora | pissa | bone | bat | a peft tuner (loha, ...), or None (state, full)."""
        if self.kind in ("lora", "pissa") or self.kind in PEFT_TUNERS:
            return self.kind
        if self.kind == "disha":
            return self.disha_mode
        return None

    @property
    def residual_init(self) -> str | None:
        """pissa | olora | loftq when the LoRA start is moved into the base weight (see RESIDUAL_INITS)."""
        if self.kind == "pissa":
            return "pissa"
        return self.init if self.kind == "lora" and self.init in RESIDUAL_INITS else None

    @property
    def lora_scale(self) -> float:
        """s of the LoRA update s * B @ A: alpha / r, or alpha / sqrt(r) with use_rslora."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    def unread_keys(self) -> list[str]:
        """The keys set away from their defaults that this kind never reads (method.r with kind state, dropout with
        ia3, ...): a recipe's silent no-ops, which the trainer names in a warning. Kept out of the checks above so
        that a run's own recipe.yaml and adapter.json written before still read back."""
        k, reads = self.kind, {"kind", "quant", "train_parts", "state"}
        if self.adapter_kind is not None:
            reads.add("target_modules")
        if k in ("lora", "pissa", "disha", "loha", "lokr", "oft", "boft", "vera", "adalora"):
            reads.add("r")
        if k in ("lora", "pissa", "loha", "lokr", "adalora"):
            reads.add("alpha")
        if k in ("lora", "pissa", "oft", "boft", "vera", "adalora") or self.adapter_kind == "bone":
            reads.add("dropout")
        reads |= {"use_dora", "use_rslora", "init"} if k in ("lora", "pissa") else set()
        reads |= {name for name, on in (("svd_niter", k == "pissa"), ("loftq_iters", self.init == "loftq"),
                                        ("eva_tokens", self.init == "eva"), ("adalora", k == "adalora"),
                                        ("boft_factors", k == "boft"), ("disha_mode", k == "disha")) if on}
        return [name if isinstance(getattr(self, name), ConfigModel) else f"{name} {getattr(self, name)!r}"
                for name, f in type(self).model_fields.items()
                if name not in reads and getattr(self, name) != f.get_default(call_default_factory=True)]

    def effective_targets(self) -> list[str]:
        """Targets in TARGETS order, minus those trained in full through train_parts."""
        if self.adapter_kind is None:
            return []
        full = ({"ffn.key", "ffn.value"} if "ffn" in self.train_parts else set()) | (
            {"head"} if "head" in self.train_parts else set())
        return [t for t in TARGETS if t in self.target_modules and t not in full]
