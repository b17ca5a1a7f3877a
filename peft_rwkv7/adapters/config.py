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

Kind = Literal["state", "lora", "pissa", "disha", "full"]
Quant = Literal["none", "nf4", "fp4", "int8"]
DishaMode = Literal["bone", "bat"]
KINDS: tuple[str, ...] = get_args(Kind)
QUANTS: tuple[str, ...] = get_args(Quant)
DISHA_MODES: tuple[str, ...] = get_args(DishaMode)
PROJECTIONS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")

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


class MethodConfig(ConfigModel):
    """What trains. Everything not selected here stays frozen. Bad fields are UserErrors "method.<field>: ..."."""

    section: ClassVar[str] = "method"
    wording: ClassVar[Wording] = Wording(
        "{key}: expected {allowed}, got {value}", "{key}: expected {allowed}, got {value}",
        "{key}: {value} is not one of {choices}",
    )

    kind: Kind = Field("lora", description=(
        "state: only the initial WKV state per layer; lora, pissa, disha: adapters on target_modules; "
        "full: every weight"))
    r: int = Field(16, gt=0, description=(
        "rank of LoRA/PiSSA; shard size of DiSHA (Bone: [r, out] per matrix; Bat: [in/r, r, r])"))
    alpha: Number = Field(32.0, gt=0, description="LoRA/PiSSA scale numerator: the update is (alpha / r) * B @ A")
    dropout: Number = Field(0.0, ge=0, lt=1, description="LoRA/PiSSA/Bone input dropout probability (Bat has none)")
    target_modules: list[str] = Field(default_factory=lambda: list(PROJECTIONS), description=(
        f"projection Linears of every block that get an adapter, some of {', '.join(PROJECTIONS)}; "
        "those in a train_parts group (ffn) are trained in full instead"))
    quant: Quant = Field("none", description=(
        "quantize the frozen projection weights of every block with bitsandbytes (QLoRA-style); "
        "embedding, head and the small time-mix tensors stay float"))
    train_parts: list[str] = Field(default_factory=list, description=(
        f"groups of base parameters trained in full, some of {', '.join(PART_PATTERNS)}"))
    state: bool = Field(False, description='also train the initial WKV state per layer ([H, N, N]); kind "state" '
                                           "trains only that")
    svd_niter: int = Field(4, ge=0, description=(
        "PiSSA: subspace iterations of the randomized SVD (0 = exact SVD, slow on big matrices)"))
    disha_mode: DishaMode = Field("bone", description=(
        "DiSHA variant: bone (one shared [r, out] shard added to every in-block) or bat "
        "(block affine: W_ij @ D_j + D_j, a nonlinear update that uses the frozen weight)"))

    @field_validator("target_modules", mode="before")
    @classmethod
    def _known_targets(cls, v: Any) -> Any:
        if not isinstance(v, list) or not v:
            raise invalid(f"{{key}}: expected a non-empty list of {', '.join(PROJECTIONS)}")
        wrong = [t for t in v if t not in PROJECTIONS]
        if wrong:
            raise invalid(f"{{key}}: unknown {', '.join(map(str, wrong))}; expected some of {', '.join(PROJECTIONS)}")
        return v

    @field_validator("train_parts", mode="before")
    @classmethod
    def _known_parts(cls, v: Any) -> Any:
        if not isinstance(v, list) or any(p not in PART_PATTERNS for p in v):
            raise invalid(f"{{key}}: {v!r}: expected a list of {', '.join(PART_PATTERNS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.quant != "none" and self.kind == "full":
            raise invalid("{key}: a quantized base cannot be trained in full; use quant: none with kind: full", "quant")
        if self.adapter_kind is not None and not self.effective_targets():
            raise invalid("{key}: every target is trained in full through train_parts: nothing left to adapt",
                          "target_modules")
        return self

    @classmethod
    def from_dict(cls, d: dict, where: str = "method") -> MethodConfig:
        """Build from a recipe/adapter.json mapping; unknown keys are a UserError naming them."""
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
        """The per-matrix adapter: lora | pissa | bone | bat, or None (state, full)."""
        if self.kind in ("lora", "pissa"):
            return self.kind
        if self.kind == "disha":
            return self.disha_mode
        return None

    def effective_targets(self) -> list[str]:
        """Targets in PROJECTIONS order, minus those trained in full through train_parts."""
        if self.adapter_kind is None:
            return []
        full = {"ffn.key", "ffn.value"} if "ffn" in self.train_parts else set()
        return [t for t in PROJECTIONS if t in self.target_modules and t not in full]
