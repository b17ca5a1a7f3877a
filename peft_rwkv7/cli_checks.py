"""What each subcommand checks before any work (`cli.main` calls `check_inputs` first): every path it
reads or writes (path_checks), and for eval, the flags its mode reads, so none is silently ignored.

Imports nothing heavy, so a bad input is refused in a fraction of a second whatever the command."""

from __future__ import annotations

import math
from pathlib import Path

from .cli_args import EVAL_DEFAULTS
from .errors import UserError
from .path_checks import need_data, need_model, need_output, need_path, need_tokenizer

GRID_FLAGS = ("haystack", "needle", "question", "answer", "lengths")  # read only by --niah / --passkey
MAX_GRID_LENGTH = 2**22  # --niah/--passkey: the longest context built (infer/niah.MAX_LENGTH, equal by a test)

# Values argparse takes that would otherwise read as "not given" or as the working directory: an empty
# string is refused for each of these (attribute -> what is expected there).
_EXPECTED = {
    "model": "a model path", "base": "a model path", "adapter": "a run directory or adapter file",
    "tokenizer": "'world' or a tokenizer.json path", "data": "a data file", "out": "an output path",
    "plot": "a .png path", "haystack": "a .txt or .jsonl file", "rewards": "a GRPO recipe or a rewards list",
    "pairs": "a DPO/ORPO/SimPO run's recipe.yaml", "lengths": "comma-separated context lengths",
    "input": "an input path", "output": "an output path", "field": "a field name", "path": "a path",
    "kind": "a method (rwkv-peft methods)", "kind_flag": "a method (rwkv-peft methods)",
    "out_dir": "a run directory", "system": "the system message's text (leave the flag out for none)",
}
_NAMES = {"input": "INPUT", "output": "OUTPUT", "path": "PATH", "kind": "KIND", "kind_flag": "--kind"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _not_empty(args) -> None:
    for name, what in _EXPECTED.items():
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            raise UserError(f"{_NAMES.get(name, _flag(name))} is empty: expected {what}")
    if any(not a.strip() for a in getattr(args, "compare", None) or []):
        raise UserError("--compare: an empty name; expected run directories or adapter files")


def _lora_alpha(args, adapters: bool) -> None:
    """--lora-alpha: a positive number, and only where an adapter is given (it scales RWKV-PEFT files)."""
    alpha = getattr(args, "lora_alpha", None)
    if alpha is None:
        return
    if not (math.isfinite(alpha) and alpha > 0):
        raise UserError(f"--lora-alpha must be a positive number, got {alpha}")
    if not adapters:
        raise UserError("--lora-alpha scales an RWKV-PEFT adapter file: give --adapter (it does nothing without one)")


def _same(a, b) -> bool:
    return a is not None and b is not None and Path(a).absolute().resolve() == Path(b).absolute().resolve()


def _not_an_input(flag: str, out, args, inputs: tuple[str, ...]) -> None:
    """`out` is none of the files the command reads (writing it would destroy its own input)."""
    for name in inputs:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if _same(out, value):
                raise UserError(f"{flag} {out}: is the {_NAMES.get(name, _flag(name))} input; write elsewhere")


def _model_and_adapter(args) -> None:
    need_model("--model", args.model)
    if args.adapter is not None:
        need_path("--adapter", args.adapter)


def _merge(args) -> None:
    need_model("--base", args.base)
    need_path("--adapter", args.adapter)
    _lora_alpha(args, True)
    need_output("--out", args.out, file=True)


def _export(args) -> None:
    if args.adapter is not None:
        need_path("--adapter", args.adapter)
    _lora_alpha(args, args.adapter is not None)
    if args.model is not None:
        need_model("--model", args.model)
    need_output("--out", args.out)  # not one of its inputs: adapters.files.check_output


def _convert(args) -> None:
    need_model("INPUT", args.input)
    need_output("OUTPUT", args.output)


def _generate(args) -> None:
    _model_and_adapter(args)
    _lora_alpha(args, args.adapter is not None)
    need_tokenizer("--tokenizer", args.tokenizer)


def _data(args) -> None:
    need_path("INPUT", args.input)
    if args.out.endswith(("/", "\\")) or Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: is a directory; expected a file prefix (writes PREFIX.bin and PREFIX.idx)")
    need_output("--out", args.out)
    for suffix in (".bin", ".idx"):
        if _same(args.out + suffix, args.input):
            raise UserError(f"--out {args.out}: would write over INPUT {args.input}; choose another prefix")
    need_tokenizer("--tokenizer", args.tokenizer)


def _init(args) -> None:
    need_model("--model", args.model)
    need_data("--data", args.data)
    need_output("--out", args.out, file=True)
    if args.out_dir is not None:
        if Path(args.out_dir).is_file():
            raise UserError(f"--out-dir {args.out_dir}: is a file; expected a run directory")
        need_output("--out-dir", args.out_dir)


def _inspect(args) -> None:
    need_data("PATH", args.path)


def eval_mode(args) -> str | None:
    return next((_flag(m) for m in ("ctx_curve", "niah", "passkey", "rewards", "pairs") if getattr(args, m)), None)


def _first_given(args, names: tuple[str, ...]) -> str | None:
    """The first of these flags on the command line (--kind: other than its default, auto)."""
    return next((_flag(n) for n in names if (getattr(args, n) != "auto" if n == "kind" else
                                             getattr(args, n) is not None)), None)


def check_eval_flags(args) -> None:
    """Refuse the flags `eval`'s mode does not read (one line naming the flag and the mode)."""
    mode = eval_mode(args)
    grid, contexts = mode in ("--niah", "--passkey"), mode in ("--ctx-curve", "--niah", "--passkey")
    for name, default in EVAL_DEFAULTS.items():  # given (not the default) to a mode that does not read it
        if getattr(args, name, default) != default and not (grid or (contexts and name in ("max_ctx", "chunk_len"))):
            modes = "--niah or --passkey" if name in ("depths", "trials") else "--ctx-curve, --niah or --passkey"
            raise UserError(f"{_flag(name)} is for {modes}" + (f", not {mode}" if mode else ""))
    if mode != "--rewards" and args.samples is not None:
        raise UserError("--samples is for --rewards")
    if mode == "--rewards":
        if flag := _first_given(args, ("limit", "kind", "system", *GRID_FLAGS)) or (args.lambada and "--lambada"):
            raise UserError(f"{flag} does not apply to --rewards: it samples completions of --data's prompts")
        if args.data is None:
            raise UserError('--rewards needs --data: a jsonl file of prompts ({"prompt": ..., "answer": ...})')
        return
    if mode == "--pairs":
        if flag := _first_given(args, ("limit", "kind", "system", "compare", "plot", *GRID_FLAGS)) or (
                args.lambada and "--lambada"):
            raise UserError(f"{flag} does not apply to --pairs: it scores every pair of --data under the recipe")
        if args.data is None:
            raise UserError('--pairs needs --data: a jsonl file of pairs ({"prompt", "chosen", "rejected"})')
        need_data("--pairs", args.pairs)
        return
    if mode is not None and args.lambada:
        raise UserError("--lambada does not combine with --ctx-curve, --niah, --passkey, --rewards or --pairs")
    if mode in ("--niah", "--passkey"):
        if flag := _first_given(args, ("data", "limit", "kind", "system")):
            raise UserError(f"{flag} does not apply to {mode}: its contexts come from --haystack (or built-in "
                            "text), sized by --lengths, --depths and --trials")
        if args.lengths is not None and args.max_ctx != EVAL_DEFAULTS["max_ctx"]:
            raise UserError(f"--max-ctx does nothing beside --lengths: for {mode} it only makes the default lengths "
                            "(1024, 2048, ... up to it); give one of the two")
        if args.lengths is None and args.max_ctx > MAX_GRID_LENGTH:
            raise UserError(f"--max-ctx must be at most {MAX_GRID_LENGTH} for {mode}, got {args.max_ctx}")
        return
    if flag := _first_given(args, GRID_FLAGS):
        raise UserError(f"{flag} is for --niah or --passkey" + (f", not {mode}" if mode else ""))
    if mode == "--ctx-curve":
        if flag := _first_given(args, ("kind", "system")):
            raise UserError(f"{flag} does not apply to --ctx-curve: it scores every token of --data's "
                            '{"text"} documents')
        if args.data is None:
            raise UserError("--ctx-curve needs --data: a jsonl file of (long) documents")
        return
    if args.compare is not None:
        raise UserError("--compare works with --ctx-curve, --niah or --passkey")
    if args.plot is not None:
        raise UserError("--plot is for --ctx-curve, --niah or --passkey")
    if args.data is None:
        raise UserError("eval needs --data (a jsonl file), or one of --ctx-curve, --niah, --passkey")


def _eval(args) -> None:
    check_eval_flags(args)
    _model_and_adapter(args)
    _lora_alpha(args, args.adapter is not None or bool(args.compare))
    for adapter in args.compare or []:
        need_path("--compare", adapter)
    if args.data is not None:
        need_path("--data", args.data)
    if args.haystack is not None:
        need_path("--haystack", args.haystack)
    need_tokenizer("--tokenizer", args.tokenizer)
    for flag in ("out", "plot"):
        if getattr(args, flag) is not None:
            need_output(_flag(flag), getattr(args, flag), file=True)
            _not_an_input(_flag(flag), getattr(args, flag), args,
                          ("data", "model", "adapter", "compare", "haystack", "pairs", "rewards", "tokenizer"))
    if _same(args.out, args.plot):
        raise UserError(f"--out and --plot are the same file {args.out}; give each its own")
    if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
        raise UserError(f"--plot {args.plot}: the plot is a PNG image; give a path ending in .png")


_CHECKS = {"merge": _merge, "export": _export, "convert": _convert, "generate": _generate, "chat": _generate,
           "eval": _eval, "data": _data, "inspect": _inspect, "init": _init}


def check_inputs(args) -> None:
    """UserError (one line naming the flag and the path) for the first bad input of the command. `train`
    checks its recipe's paths once the recipe is read (train.runner)."""
    _not_empty(args)
    check = _CHECKS.get(args.command)
    if check is not None:
        check(args)
