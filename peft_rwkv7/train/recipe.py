"""The recipe: one YAML file (plus key=value overrides) that says what to train on what.

Sections: model, method (adapters.MethodConfig), data (data.DataConfig), train, log, out_dir.
Every field is validated at load with a message that names the dotted key; `rwkv-peft train
--print-schema` lists them all (train/schema.py). Reading a recipe imports neither torch nor peft.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import Field, create_model, field_validator, model_validator
from typing_extensions import Self

from ..adapters.config import MethodConfig
from ..config_base import ConfigModel, Number, Text, field_at, invalid, is_text
from ..data.config import DataConfig
from ..errors import UserError
from .grpo_config import GrpoConfig
from .schema import apply_overrides, from_dict, load_yaml, render_markdown, render_text

# The recipes ship inside the package (peft_rwkv7/recipes links to the repository's recipes/); the demo
# model and data they train on are a checkout's data/demo, not package data.
BUNDLED = Path(__file__).resolve().parents[1] / "recipes"
DEMO_DIR = "data/demo/"
# Models the demo makes (README's first commands) that bundled recipes start from, with the commands that make them
DEMO_RUNS = {"runs/state_tune/merged.pth": "rwkv-peft train recipes/state_tune.yaml, then rwkv-peft merge --base "
             "data/demo/rwkv7-demo.pth --adapter runs/state_tune --out runs/state_tune/merged.pth --dtype fp32"}

Objective = Literal["sft", "dpo", "orpo", "simpo", "grpo"]
WkvBackend = Literal["auto", "reference", "cpu", "cuda", "triton"]  # ops.BACKENDS (a test keeps them equal)
# The train keys each objective reads (train/objectives.py); another objective's key set to anything but its
# default is refused, so that `objective: orpo` with `beta: 0.5` cannot pass for a tuned ORPO run.
OBJECTIVE_KEYS: dict[str, tuple[str, ...]] = {
    "sft": (), "dpo": ("beta", "nll_weight"), "orpo": ("lambda",),
    "simpo": ("beta", "gamma", "length_norm", "nll_weight"), "grpo": (),
}
_SHOWN = {"dpo": "DPO", "orpo": "ORPO", "simpo": "SimPO"}
# train.seed's largest value: torch.manual_seed takes up to 2**64 - 1, numpy's generators any size >= 0; 2**63 - 1
# also fits a signed 64-bit integer (a torch.Generator's seed)
SEED_MAX = 2**63 - 1
# The method kinds that train LoRA B factors (tensors named *.lora_B), which train.lora_plus_ratio speeds up.
LORA_B_KINDS = ("lora", "pissa", "adalora")


def has_lora_b(kind: str) -> bool:
    """Whether method.kind `kind` trains LoRA B factors (LoRA+ applies)."""
    return kind in LORA_B_KINDS


class NewModel(ConfigModel):
    """Shape of a model trained from scratch (RWKV-LM initialisation)."""

    section: ClassVar[str] = "model.new"

    n_layer: int = Field(4, gt=0, description="blocks")
    n_embd: int = Field(128, gt=0, description="width C; a multiple of head_size")
    head_size: int = Field(32, gt=0, description="N; the model has n_embd / head_size heads")
    vocab_size: int = Field(65536, gt=0, description="V; 65536 for the World tokenizer")

    @model_validator(mode="after")
    def _whole_heads(self) -> Self:
        if self.n_embd % self.head_size:
            raise invalid(f"{{key}} {self.n_embd} must be a multiple of head_size {self.head_size}", "n_embd")
        return self


class ModelSection(ConfigModel):
    """The base model."""

    section: ClassVar[str] = "model"

    path: str = Field("", description="local .pth, .st (web-rwkv/Ai00) or HF RWKV-7 directory (fla-hub layout), "
                                      "or hf://OWNER/REPO/FILE.pth (downloaded once, cached)")
    new: NewModel | None = Field(None, description="train from scratch instead (pretraining); needs method.kind full")
    wkv_backend: WkvBackend = Field("auto", description="WKV7 kernel; auto picks the fastest for the device")

    @model_validator(mode="after")
    def _path_or_new(self) -> Self:
        if not self.path and self.new is None:
            raise invalid("{key} is required (a local .pth or hf://OWNER/REPO/FILE.pth)", "path")
        if self.path and self.new is not None:
            raise invalid("{key}: give either path or new, not both")
        return self


class DeepSpeedConfig(ConfigModel):
    """ZeRO through DeepSpeed (launch with `deepspeed` or `torchrun`)."""

    section: ClassVar[str] = "train.deepspeed"

    stage: Literal[0, 1, 2, 3] = Field(0, description="0 = off; 1, 2, 3 = ZeRO stage")
    offload: bool = Field(False, description="ZeRO-Offload: optimizer state and update on the CPU with "
                          "DeepSpeed's CPU Adam; needs stage 1-3 and adamw")


# What is optimised, and by which optimizer. Built with create_model because ORPO's weight is called
# `lambda` (a Python keyword); these keys come first in the train section. Read it as getattr(tc, "lambda").
_Objective = create_model(
    "_Objective", __base__=ConfigModel,
    objective=(Objective, Field("sft", description=(
        "sft: next-token loss on data's loss tokens; dpo, orpo, simpo: preference tuning on data.kind preference "
        "pairs (train/objectives.py has the formulas); grpo: rewards on sampled completions of data.kind prompts "
        "(train.grpo); the keys below that the objective does not read are refused unless at their defaults"))),
    beta=(Number | None, Field(None, gt=0, description=(
        "dpo: reward scale beta in beta * (log pi - log pi_ref), null: 0.1; simpo: beta / |y| * log pi, null: 2.0"))),
    **{"lambda": (Number, Field(0.1, ge=0, description="orpo: weight of the odds-ratio term next to the SFT loss"))},
    gamma=(Number, Field(1.0, description="simpo: target reward margin gamma in -log sigmoid(r_w - r_l - gamma)")),
    length_norm=(bool, Field(True, description="simpo: divide log pi(y|x) by the response's tokens |y|")),
    nll_weight=(Number, Field(0.0, ge=0, description=(
        "dpo, simpo: add this times the chosen response's mean token NLL (RPO); 0 = the pure objective, which "
        "can separate the pairs without making the chosen answers likely"))),
    optimizer=(Literal["adamw", "muon"], Field("adamw", description=(
        "muon: torch.optim.Muon (lr and weight decay matched to AdamW's scale) for the trained 2-D matrices "
        "(LoRA A/B, DiSHA Bone shards, projections and time-mix maps in full), AdamW for the rest (states, "
        "vectors, emb, head); not with train.deepspeed"))),
)


class TrainConfig(_Objective):
    """The optimisation."""

    section: ClassVar[str] = "train"

    max_steps: int = Field(200, gt=0, description="optimizer steps")
    micro_bsz: int = Field(4, gt=0, description=(
        "sequences per forward pass (per process); preference objectives: pairs, 2 sequences each"))
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: Number = Field(1e-4, gt=0, description="peak learning rate")
    lr_final: Number | None = Field(None, description="at the end of the schedule, between 0 and lr; null: lr / 10")
    lora_plus_ratio: Number | None = Field(None, gt=0, description=(
        "LoRA+ (arXiv:2402.12354): the LoRA B factors train at this many times the lr (same schedule), "
        "everything else at lr; typical 16; null = off; methods with LoRA B (kind lora, pissa, adalora), "
        "not with train.deepspeed.offload"))
    schedule: Literal["cosine", "wsd", "constant"] = Field("cosine", description="wsd: warmup-stable-decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup from lr / warmup_steps to lr")
    decay_frac: Number = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent decaying")
    weight_decay: Number = Field(0.0, ge=0, description="AdamW weight decay, by role: embedding, head, projection "
                                 "matrices, adapter factors (LoRA A/B, DiSHA shards); never states, norms, mixes, "
                                 "decay/bonus vectors or the time-mix low-rank maps")
    beta1: Number = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: Number = Field(0.99, ge=0, lt=1, description="AdamW beta2")
    eps: Number = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: Number = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    seed: int = Field(0, ge=0, le=SEED_MAX, description=(
        "seeds torch (initialisation, dropout), the data order and GRPO's sampling; 0 .. 2**63 - 1"))
    grad_cp: bool = Field(False, description="recompute each block in backward (less memory)")
    chunk_len: int = Field(0, ge=0, description=(
        "> 0: long-context (infctx) training in chunks of this many tokens carrying state; divides data.ctx_len"))
    save_every: int = Field(100, gt=0, description="checkpoint every N steps (and at the end)")
    eval_every: int = Field(0, ge=0, description=(
        "score the eval set (data.eval_path, else data.eval_split's held-out part) every N steps (and at the "
        "end); 0 = only at the end"))
    keep_checkpoints: int = Field(2, ge=0, description="newest checkpoints kept in out_dir/checkpoints; 0 keeps all")
    stop_after: int = Field(0, ge=0, description=(
        "> 0: end this invocation after that step (checkpointed); --resume goes on"))
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=(
        "auto: bf16 autocast on a GPU with native bf16 (compute capability 8.0 and later), and on a CPU whose "
        "bf16 matmuls a measured check finds fast (cached; rwkv-peft doctor shows it), else fp32; a resumed run "
        "keeps the precision it began in; bf16 where it is slow or emulated runs but warns"))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="multi-GPU training")
    grpo: GrpoConfig = Field(default_factory=GrpoConfig, description="objective grpo: sampling, rewards, loss")

    @model_validator(mode="after")
    def _final_below_peak(self) -> Self:
        if self.lr_final is not None and not 0 <= self.lr_final <= self.lr:
            raise invalid(f"{{key}} must be between 0 and train.lr ({self.lr}), got {self.lr_final}", "lr_final")
        return self

    @model_validator(mode="after")
    def _lora_plus_in_our_optimizers(self) -> Self:
        if self.lora_plus_ratio is not None and self.deepspeed.offload:
            raise invalid("{key} is not available with train.deepspeed.offload (DeepSpeed's CPU Adam); remove it or "
                          "set train.deepspeed.offload=false", "lora_plus_ratio")
        return self

    @model_validator(mode="after")
    def _objective_reads_the_keys(self) -> Self:
        reads = OBJECTIVE_KEYS[self.objective]
        for key in ("beta", "lambda", "gamma", "length_norm", "nll_weight"):
            default = type(self).model_fields[key].default
            # a key left out is at its default: a saved recipe.yaml (every key) loads again, and a recipe's
            # key is neutralised on the command line by setting it back (train.beta=null)
            if key in reads or key not in self.model_fields_set or getattr(self, key) == default:
                continue
            if not reads:  # sft, grpo
                hint = "only " + ", ".join(o for o, keys in OBJECTIVE_KEYS.items() if key in keys) + " read it"
                if self.objective == "grpo" and key == "beta":
                    hint += "; GRPO's KL weight is train.grpo.beta"
            else:
                hint = f"{_SHOWN[self.objective]} reads " + ", ".join(f"train.{k}" for k in reads)
                if self.objective == "orpo" and key == "nll_weight":
                    hint += "; its NLL term is built in, weight 1"
            raise invalid(f"{{key}} is not used by objective {self.objective} ({hint}); remove it or set it to "
                          f"{yaml.safe_dump(default).splitlines()[0]}", key)
        return self

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.lr_final is None else self.lr_final


class LogConfig(ConfigModel):
    """What a run reports besides log.jsonl."""

    section: ClassVar[str] = "log"

    wandb: Literal["off", "offline", "online"] = Field("off", description="Weights & Biases logging")
    project: Text = Field("rwkv-peft", description="wandb project")
    progress: bool = Field(True, description="progress bar on stderr")
    rollouts_every: int = Field(10, ge=0, description=(
        "grpo: write the step's sampled completions and their rewards to rollouts.jsonl every this many steps "
        "(0 = never)"))

    @field_validator("wandb", mode="before")
    @classmethod
    def _off_is_not_false(cls, v: object) -> object:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` (file or key=value) as false


class Recipe(ConfigModel):
    """A whole recipe file."""

    model: ModelSection = Field(description="the base model (or the shape of a new one)")
    method: MethodConfig = Field(default_factory=MethodConfig, description="what trains; everything else is frozen")
    data: DataConfig = Field(description="the training data and how it becomes samples")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the optimisation")
    log: LogConfig = Field(default_factory=LogConfig, description="reporting")
    out_dir: str = Field("runs/run", description="the run directory: recipe.yaml, adapter, checkpoints/, log.jsonl")

    @field_validator("out_dir")
    @classmethod
    def _out_dir_given(cls, v: str) -> str:
        if not v.strip():  # "" would be the working directory: a run's files among the user's own
            raise invalid(f"{{key}} is {v!r}; give the run directory, e.g. runs/my_run")
        return v

    @model_validator(mode="after")
    def _sections_agree(self) -> Self:
        if self.model.new is not None and self.method.kind != "full":
            raise invalid("{key} (training from scratch) needs method.kind: full", "model.new")
        if self.train.chunk_len and self.data.ctx_len % self.train.chunk_len:
            raise invalid(f"{{key}} {self.train.chunk_len} must divide data.ctx_len {self.data.ctx_len}",
                          "train.chunk_len")
        if self.train.objective == "grpo":
            if self.data.kind not in ("prompts", "auto"):
                raise invalid(f"{{key}} grpo samples completions for prompts; data.kind is {self.data.kind} (set "
                              "data.kind: prompts)", "train.objective")
            if not self.train.grpo.rewards:
                raise invalid("{key}: grpo needs at least one reward, e.g. [{fn: numeric, column: answer}]",
                              "train.grpo.rewards")
            if self.train.deepspeed.stage == 3:
                raise invalid("{key}: grpo samples with the whole model on every rank; ZeRO-3 partitions it (use "
                              "train.deepspeed.stage=2)", "train.deepspeed.stage")
            if self.train.chunk_len:
                raise invalid(f"{{key}} {self.train.chunk_len}: grpo scores each prompt + completion (at most "
                              "data.ctx_len tokens) in one pass, not in chunks; remove it", "train.chunk_len")
            if self.train.grpo.max_new_tokens >= self.data.ctx_len:
                raise invalid(f"{{key}} {self.train.grpo.max_new_tokens} leaves no room for a prompt in data.ctx_len "
                              f"{self.data.ctx_len}", "train.grpo.max_new_tokens")
        elif self.data.kind == "prompts":
            raise invalid("{key}: prompts are for train.objective grpo", "data.kind")
        elif "grpo" in self.train.model_fields_set and self.train.grpo != GrpoConfig():
            raise invalid(f"{{key}} is read by objective grpo only (this recipe trains {self.train.objective}); "
                          "remove it", "train.grpo")
        if self.train.objective not in ("sft", "grpo") and self.data.kind not in ("preference", "auto"):
            raise invalid(f"{{key}} {self.train.objective} trains on preference pairs; data.kind is "
                          f"{self.data.kind} (set data.kind: preference)", "train.objective")
        if self.train.objective == "sft" and self.data.kind == "preference":
            raise invalid("{key}: preference data need train.objective dpo, orpo or simpo", "data.kind")
        if self.train.objective == "dpo" and self.method.trains_state and self.train.deepspeed.stage == 3:
            raise invalid("{key}: dpo with a trained state runs under ZeRO-1/2, not 3 (ZeRO-3 partitions the state "
                          "that the reference switches off); use train.deepspeed.stage=2", "train.deepspeed.stage")
        if self.train.objective == "dpo" and self.method.residual_init and self.train.deepspeed.stage == 3:
            raise invalid(f"{{key}}: dpo with a start moved into the base ({self.method.residual_init}) runs under "
                          "ZeRO-1/2, not 3 (its reference swaps the start into the adapter's weights, which ZeRO-3 "
                          "gathers over); use train.deepspeed.stage=2", "train.deepspeed.stage")
        if self.train.lora_plus_ratio is not None and not has_lora_b(self.method.kind):
            raise invalid(f"{{key}}: method.kind {self.method.kind} has no LoRA B factor (LoRA+ raises the lr of B "
                          f"in B @ A); use method.kind {', '.join(LORA_B_KINDS[:-1])} or {LORA_B_KINDS[-1]}, or "
                          f"remove train.lora_plus_ratio", "train.lora_plus_ratio")
        if self.train.optimizer == "muon" and self.train.deepspeed.stage:
            raise invalid("{key}: muon is not available under train.deepspeed (ZeRO shards the matrices Muon "
                          "orthogonalizes); use adamw", "train.optimizer")
        return self


def recipe_data(path: str, overrides: list[str] | None = None) -> dict:
    """The recipe file's mapping with `dotted.key=value` overrides applied, not yet validated."""
    data = load_yaml(path)
    if not data:
        raise UserError(f"{path}: the recipe is empty; it needs at least model: and data: sections "
                        f"(rwkv-peft init --model M --data D writes a starter)")
    overrides = [_as_typed(o) for o in overrides or []]
    given = {o.partition("=")[0] for o in overrides}
    if "data.path" in given and "data.eval_path" not in given and isinstance(data.get("data"), dict):
        # the recipe's eval file belongs to the recipe's data, not to the data given here: hold out part of
        # the user's own data instead (data.eval_split), unless they name an eval file
        data["data"].pop("eval_path", None)
    return apply_overrides(data, overrides)


def _as_typed(item: str) -> str:
    """A `key=value` override of a string key (out_dir=5, data.path=2024, model.path=007) as the text typed,
    not the number YAML reads it as (a recipe file refuses a bare number there; a shell has no quotes to keep)."""
    key, sep, raw = item.partition("=")
    info = field_at(Recipe, key) if sep else None
    if info is None or not is_text(info):
        return item
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return item
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{key}={json.dumps(raw.strip())}"
    return item


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply `dotted.key=value` overrides, validate everything."""
    recipe = from_dict(Recipe, recipe_data(path, overrides), source=str(path))
    if recipe.train.grpo.rewards:  # a path.py:function reward is relative to the recipe's folder
        recipe.train.grpo = recipe.train.grpo.rewards_from(path)
    if Path(path).resolve().parent == BUNDLED.resolve():
        check_demo_files(recipe, str(path))
    return recipe


def check_demo_files(recipe: Recipe, path: str) -> None:
    """A bundled recipe's demo files (data/demo/..., relative to the working directory) are there, else
    one line saying where they live and how to train on one's own files instead."""
    keys = {"model.path": recipe.model.path, "data.path": recipe.data.path, "data.eval_path": recipe.data.eval_path}
    missing = {k: v for k, v in keys.items() if v and v.startswith(DEMO_DIR) and not os.path.exists(v)}
    made = recipe.model.path
    if not missing and made in DEMO_RUNS and not os.path.exists(made):
        raise UserError(f"{path}: this bundled recipe starts from {made}, which the demo makes: run "
                        f"{DEMO_RUNS[made]} (in a rwkv-peft checkout's root), or give your own model: rwkv-peft train "
                        f"{Path(path).stem} model.path=YOUR_MODEL.pth")
    if not missing:
        return
    own = " ".join(f"{k}=YOUR_{'MODEL.pth' if k == 'model.path' else 'DATA.jsonl'}" for k in missing
                   if k != "data.eval_path" or "data.path" not in missing)
    raise UserError(f"{path}: this bundled recipe reads {', '.join(missing.values())} from the working directory "
                    f"({os.getcwd()}); the demo files live in data/demo of a rwkv-peft checkout (not installed with "
                    f"the package): run it from the checkout's root, or give your own files: rwkv-peft train "
                    f"{Path(path).stem} {own}")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(), sort_keys=False)


def recipe_reference(markdown: bool = False) -> str:
    """Every recipe key with its type, default and meaning (`rwkv-peft train --print-schema [--markdown]`)."""
    return render_markdown(Recipe) if markdown else render_text(Recipe)
