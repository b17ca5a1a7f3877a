"""The recipe: one YAML file (plus key=value overrides) that says what to train on what.

Sections: model, method (adapters.MethodConfig), data (data.DataConfig), train, log, out_dir.
Every field is validated at load with a message that names the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from ..adapters.config import MethodConfig
from ..data.config import DataConfig
from ..errors import UserError
from ..ops import BACKENDS as WKV_BACKENDS
from .schema import apply_overrides, from_dict, load_yaml, to_dict

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("off", "offline", "online")


@dataclass
class NewModel:
    """Shape of a model trained from scratch (RWKV-LM initialisation)."""

    n_layer: int = 4
    n_embd: int = 128
    head_size: int = 32
    vocab_size: int = 65536

    def validate(self) -> None:
        for name in ("n_layer", "n_embd", "head_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.new.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.head_size:
            raise UserError(f"model.new.n_embd {self.n_embd} must be a multiple of head_size {self.head_size}")


@dataclass
class ModelSection:
    path: str = ""  # local .pth or hf://OWNER/REPO/FILE.pth
    new: NewModel | None = None  # train from scratch instead (pretraining); needs method.kind full
    wkv_backend: str = "auto"

    def validate(self) -> None:
        if not self.path and self.new is None:
            raise UserError("model.path is required (a local .pth or hf://OWNER/REPO/FILE.pth)")
        if self.path and self.new is not None:
            raise UserError("model: give either path or new, not both")
        if self.wkv_backend not in WKV_BACKENDS:
            raise UserError(f"model.wkv_backend must be one of {', '.join(WKV_BACKENDS)}, got {self.wkv_backend!r}")


@dataclass
class DeepSpeedConfig:
    stage: int = 0  # 0 = off; 1, 2, 3 = ZeRO stage (launch with `deepspeed` or `torchrun`)
    offload: bool = False  # offload optimizer state to CPU

    def validate(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise UserError(f"train.deepspeed.stage must be 0 (off), 1, 2 or 3, got {self.stage}")


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps
    micro_bsz: int = 4  # sequences per forward pass (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate
    lr_final: float | None = None  # at the end of the schedule; default lr / 10
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 10
    decay_frac: float = 0.2  # wsd: share of the steps spent decaying
    weight_decay: float = 0.0  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    seed: int = 0
    grad_cp: bool = False  # recompute each block in backward (less memory)
    chunk_len: int = 0  # > 0: long-context (infctx) training in chunks carrying state
    save_every: int = 100  # checkpoint every N steps (and at the end)
    eval_every: int = 0  # score data.eval_path every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2
    stop_after: int = 0  # > 0: end this invocation after that step (checkpointed); --resume goes on
    precision: str = "auto"  # auto: fp32 on CPU, bf16 autocast on GPU
    device: str = "auto"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self) -> None:
        for name in ("max_steps", "micro_bsz", "grad_accum", "save_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "chunk_len", "keep_checkpoints", "stop_after"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"train.lr must be a positive number, got {self.lr}")
        if self.lr_final is not None and not 0 <= self.lr_final <= self.lr:
            raise UserError(f"train.lr_final must be between 0 and train.lr ({self.lr}), got {self.lr_final}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.decay_frac <= 1:
            raise UserError(f"train.decay_frac must be in (0, 1], got {self.decay_frac}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("train.weight_decay and train.grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError(f"train.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise UserError(f"train.device must be one of {', '.join(DEVICES)}, got {self.device!r}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.lr_final is None else self.lr_final


@dataclass
class LogConfig:
    wandb: str = "off"  # off | offline | online
    project: str = "rwkv-peft"
    progress: bool = True  # progress bar on stderr

    def validate(self) -> None:
        if self.wandb not in WANDB_MODES:
            raise UserError(f"log.wandb must be one of {', '.join(WANDB_MODES)}, got {self.wandb!r}")


@dataclass
class Recipe:
    model: ModelSection
    data: DataConfig
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    out_dir: str = "runs/run"

    def validate(self) -> None:
        if self.model.new is not None and self.method.kind != "full":
            raise UserError("model.new (training from scratch) needs method.kind: full")
        if self.train.chunk_len and self.data.ctx_len % self.train.chunk_len:
            raise UserError(
                f"train.chunk_len {self.train.chunk_len} must divide data.ctx_len {self.data.ctx_len}"
            )


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply `dotted.key=value` overrides, validate everything."""
    data = apply_overrides(load_yaml(path), overrides or [])
    return from_dict(Recipe, data, source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
