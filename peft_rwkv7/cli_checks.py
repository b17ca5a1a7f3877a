"""What each subcommand checks before any work (`cli.main` calls `check_inputs` first): every path it
reads or writes (path_checks), and for eval, the flags its mode reads, so none is silently ignored.

Imports nothing heavy, so a bad input is refused in a fraction of a second whatever the command."""

from __future__ import annotations

from .errors import UserError
from .path_checks import need_data, need_model, need_output, need_path, need_tokenizer

GRID_FLAGS = ("haystack", "needle", "question", "answer", "lengths")  # read only by --niah / --passkey


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _model_and_adapter(args) -> None:
    need_model("--model", args.model)
    if args.adapter:
        need_path("--adapter", args.adapter)


def _merge(args) -> None:
    need_model("--base", args.base)
    need_path("--adapter", args.adapter)
    need_output("--out", args.out, file=True)


def _export(args) -> None:
    if args.adapter:
        need_path("--adapter", args.adapter)
    if args.model:
        need_model("--model", args.model)
    need_output("--out", args.out)


def _convert(args) -> None:
    need_model("INPUT", args.input)
    need_output("OUTPUT", args.output)


def _generate(args) -> None:
    _model_and_adapter(args)
    need_tokenizer("--tokenizer", args.tokenizer)


def _data(args) -> None:
    need_path("INPUT", args.input)
    need_output("--out", args.out)
    need_tokenizer("--tokenizer", args.tokenizer)


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


_CHECKS = {"merge": _merge, "export": _export, "convert": _convert, "generate": _generate, "chat": _generate,
           "eval": _eval, "data": _data, "inspect": _inspect}


def check_inputs(args) -> None:
    """UserError (one line naming the flag and the path) for the first bad input of the command. `train`
    checks its recipe's paths once the recipe is read (train.runner)."""
    check = _CHECKS.get(args.command)
    if check is not None:
        check(args)
