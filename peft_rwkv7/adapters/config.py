"""The recipe's `method:` section: which PEFT method trains which parameters.

Parameter groups (`train_parts`) are named by what they are in RWKV-7, matched against official
checkpoint key names, so they select the same tensors in a model, an adapter file and a .pth.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from ..errors import UserError

KINDS = ("state", "lora", "pissa", "disha", "full")
QUANTS = ("none", "nf4", "fp4", "int8")
DISHA_MODES = ("bone", "bat")
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


@dataclass
class MethodConfig:
    """What trains. Everything not selected here stays frozen.

    kind:           state | lora | pissa | disha | full.
    r:              rank of LoRA/PiSSA; shard size of DiSHA (Bone: [r, out] per matrix; Bat: [in/r, r, r]).
    alpha:          LoRA/PiSSA scale numerator: the update is (alpha / r) * B @ A.
    dropout:        LoRA/PiSSA/Bone input dropout probability (Bat has none).
    target_modules: projection Linears that get an adapter (names within a block, e.g. "att.key").
                    Targets in a train_parts group (`ffn`) are trained in full instead.
    quant:          none | nf4 | fp4 | int8: frozen projection weights of every block are quantized with
                    bitsandbytes (QLoRA-style); embedding, head and the small time-mix tensors stay float.
    train_parts:    groups of base parameters trained in full: emb, head, ln, time, ffn.
    state:          also train the initial WKV state per layer ([H, N, N]); kind "state" means only that.
    svd_niter:      PiSSA: subspace iterations of the randomized SVD (0 = exact SVD, slow on big matrices).
    disha_mode:     DiSHA variant: "bone" (one shared [r, out] shard added to every in-block) or "bat"
                    (block affine: W_ij @ D_j + D_j, a nonlinear update that uses the frozen weight).
    """

    kind: str = "lora"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    quant: str = "none"
    train_parts: list[str] = field(default_factory=list)
    state: bool = False
    svd_niter: int = 4
    disha_mode: str = "bone"

    @classmethod
    def from_dict(cls, d: dict, where: str = "method") -> MethodConfig:
        """Build from a recipe/adapter.json mapping; unknown keys are a UserError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"{where}: unknown keys {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
        cfg = cls(**d)
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

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

    def validate(self, where: str = "method") -> MethodConfig:
        """Raise UserError("method.<field>: ...") on the first bad field; returns self."""

        def bad(name: str, msg: str) -> UserError:
            return UserError(f"{where}.{name}: {msg}")

        if self.kind not in KINDS:
            raise bad("kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise bad("r", f"expected a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise bad("alpha", f"expected a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"expected a probability in [0, 1), got {self.dropout!r}")
        if not isinstance(self.target_modules, list) or not self.target_modules:
            raise bad("target_modules", f"expected a non-empty list of {', '.join(PROJECTIONS)}")
        wrong = [t for t in self.target_modules if t not in PROJECTIONS]
        if wrong:
            shown = ", ".join(map(str, wrong))
            raise bad("target_modules", f"unknown {shown}; expected some of {', '.join(PROJECTIONS)}")
        if self.quant not in QUANTS:
            raise bad("quant", f"{self.quant!r} is not one of {', '.join(QUANTS)}")
        if self.quant != "none" and self.kind == "full":
            raise bad("quant", "a quantized base cannot be trained in full; use quant: none with kind: full")
        if not isinstance(self.train_parts, list) or any(p not in PART_PATTERNS for p in self.train_parts):
            raise bad("train_parts", f"{self.train_parts!r}: expected a list of {', '.join(PART_PATTERNS)}")
        if not isinstance(self.state, bool):
            raise bad("state", f"expected true or false, got {self.state!r}")
        if not isinstance(self.svd_niter, int) or self.svd_niter < 0:
            raise bad("svd_niter", f"expected an integer >= 0, got {self.svd_niter!r}")
        if self.disha_mode not in DISHA_MODES:
            raise bad("disha_mode", f"{self.disha_mode!r} is not one of {', '.join(DISHA_MODES)}")
        if self.adapter_kind is not None and not self.effective_targets():
            raise bad("target_modules", "every target is trained in full through train_parts: nothing left to adapt")
        return self
