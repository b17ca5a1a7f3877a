"""Optional dependencies: what each extra of the package brings, and a one-line error naming the extra
when a recipe needs one that is not installed (checked before any heavy work)."""

from __future__ import annotations

import importlib.util

from .errors import UserError

# extra -> the import it provides
EXTRAS = {"quant": "bitsandbytes", "deepspeed": "deepspeed", "triton": "triton", "wandb": "wandb", "ui": "gradio"}


def installed(extra: str) -> bool:
    return importlib.util.find_spec(EXTRAS[extra]) is not None


def require(extra: str, why: str) -> None:
    """UserError "{why} needs {module}, which is not installed: pip install 'rwkv-peft[extra]'"."""
    if not installed(extra):
        raise UserError(f"{why} needs {EXTRAS[extra]}, which is not installed: pip install 'rwkv-peft[{extra}]'")


def check_recipe(recipe) -> None:
    """Every extra the recipe's settings need is importable (else the one-line error above)."""
    if recipe.method.quant != "none":
        require("quant", f"method.quant: {recipe.method.quant}")
    if recipe.train.deepspeed.stage:
        require("deepspeed", f"train.deepspeed.stage: {recipe.train.deepspeed.stage}")
    if recipe.model.wkv_backend == "triton":
        require("triton", "model.wkv_backend: triton")
    if recipe.log.wandb != "off":
        require("wandb", f"log.wandb: {recipe.log.wandb}")
