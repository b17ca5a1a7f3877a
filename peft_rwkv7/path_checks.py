"""Input and output paths checked before any work, each failure one line naming the flag (or recipe key)
and the path: a missing adapter is found before the base model is scored, not after.

Only what the file system says is checked here (exists, is a directory, can be written); whether a file
holds what it should is for its reader. Imports nothing heavy: the CLI calls these before torch loads."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

HF_PREFIX = "hf://"  # model.hub's: resolved (cache or download) by the loader, not a local path


def need_path(flag: str, path: str | os.PathLike) -> None:
    """`path` exists (a file or a directory)."""
    if not Path(path).exists():
        raise UserError(f"{flag} {path}: no such file or directory")


def need_model(flag: str, ref: str | os.PathLike) -> None:
    """A local model (.pth, .st, HF directory) exists; hf:// references are left to the hub lookup."""
    if not str(ref).startswith(HF_PREFIX):
        need_path(flag, ref)


def need_data(flag: str, path: str | os.PathLike) -> None:
    """A data file exists, or `path` is a binidx prefix (PREFIX.bin / PREFIX.idx next to it)."""
    s = str(path)
    prefix = s[:-4] if s.endswith((".bin", ".idx")) else s
    if not (Path(s).exists() or Path(prefix + ".bin").is_file() or Path(prefix + ".idx").is_file()):
        raise UserError(f"{flag} {path}: no such file (nor a binidx PREFIX.bin/.idx)")


def need_tokenizer(flag: str, spec: str | os.PathLike) -> None:
    """`world`, a tokenizer.json file, or a directory holding one (as data.load_tokenizer reads them)."""
    s = str(spec)
    if s.strip().lower() == "world":
        return
    p = Path(s).expanduser()
    if not (p.is_file() or (p / "tokenizer.json").is_file()):
        raise UserError(f"{flag} {s}: neither 'world' nor an existing tokenizer.json file")


def need_output(flag: str, path: str | os.PathLike, file: bool = False) -> None:
    """`path` can be written: its nearest existing ancestor is a writable directory (the writers create the
    folders below it). file=True: `path` itself must not be an existing directory."""
    p = Path(path).absolute()
    if file and p.is_dir():
        raise UserError(f"{flag} {path}: is a directory (expected a file name)")
    folder = p.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {folder} is not writable")


def check_recipe_paths(recipe) -> None:
    """The recipe's model, data, eval and tokenizer files exist and its out_dir can be written."""
    if recipe.model.path:
        need_model("model.path", recipe.model.path)
    need_data("data.path", recipe.data.path)
    if recipe.data.eval_path:
        need_data("data.eval_path", recipe.data.eval_path)
    need_tokenizer("data.tokenizer", recipe.data.tokenizer)
    need_output("out_dir", recipe.out_dir)
