"""`rwkv-peft` command line: each subcommand calls into the package (the parser: `cli_args.py`).

Every bad input ends as one line on stderr and a non-zero exit; `--debug` shows the traceback.
Paths and flags are checked before any work (`cli_checks.py`); heavy modules are imported inside the
subcommands, so `rwkv-peft --help` and a refused command end at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .cli_args import EXIT_USER_ERROR, parse_args
from .cli_checks import check_inputs
from .errors import Interrupted, TokenIdError, UserError
from .interrupts import import_torch

EXIT_INTERRUPTED = 130


def _cmd_inspect(args) -> int:
    from .infer.inspect import inspect_path

    print(inspect_path(args.path, as_json=args.json))
    return 0


def _cmd_train(args) -> int:
    if args.print_schema:
        from .train.recipe import recipe_reference

        print(recipe_reference(markdown=args.markdown), end="")
        return 0
    if args.recipe is None:
        raise UserError("train needs a recipe: a YAML file or a bundled name (rwkv-peft recipes); "
                        "--print-schema lists its keys")
    from .train.runner import train_from_cli
    from .train.starter import resolve_recipe

    return train_from_cli(resolve_recipe(args.recipe), args.overrides, resume=args.resume)


def _cmd_merge(args) -> int:
    from .adapters import merge_into_pth

    print(merge_into_pth(args.base, args.adapter, args.out, dtype=args.dtype, lora_alpha=args.lora_alpha))
    return 0


def _cmd_export(args) -> int:
    from .model.hub import resolve_model_path

    model = None if args.model is None else resolve_model_path(args.model)
    if args.format != "rwkv-peft":
        from .adapters.export import export

        print(export(args.format, args.out, args.adapter, model, args.dtype, args.lora_alpha))
        return 0
    from .adapters import export_rwkv_peft

    if args.adapter is None or model is not None or args.dtype or args.lora_alpha is not None:
        raise UserError("export --format rwkv-peft takes --adapter RUN_DIR and --out only")
    print(export_rwkv_peft(args.adapter, args.out))
    return 0


def _cmd_convert(args) -> int:
    from .model import DTYPES
    from .model.formats import convert
    from .model.hub import resolve_model_path

    dtype = DTYPES[args.dtype] if args.dtype else None
    print(convert(resolve_model_path(args.input), args.output, args.format, dtype))
    return 0


def _load_for_inference(args, say: bool = True):
    """Base model on --device in --dtype with --adapter applied (infer/load.py); `say`: print what --dtype auto
    chose (once per command)."""
    from .infer.load import load_for_inference

    return load_for_inference(args.model, args.adapter, device=args.device, dtype=args.dtype,
                              lora_alpha=args.lora_alpha, say=say)


def _damaged(args, e: Exception) -> UserError:
    """NonFiniteLogits from sampling, naming the model (and adapter) that produced them."""
    adapter = f" with --adapter {args.adapter}" if args.adapter else ""
    return UserError(f"--model {args.model}{adapter}: {e}")


def _cmd_generate(args) -> int:
    from .data import load_tokenizer
    from .infer.generate import NonFiniteLogits, check_sampling, generate

    check_sampling(args.max_tokens, args.temperature, args.top_p)  # before the model loads
    if args.system is not None and not args.chat:
        raise UserError("--system is for chat turns: add --chat (or put the text into --prompt)")
    tokenizer = load_tokenizer(args.tokenizer)
    model = _load_for_inference(args)
    if args.chat:
        from .infer.chat import ChatSession

        session = ChatSession(model, tokenizer, args.system, max_tokens=args.max_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        pieces = session.ask(args.prompt)
    else:
        sys.stdout.write(args.prompt)
        pieces = generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except NonFiniteLogits as e:
        sys.stdout.write("\n")
        raise _damaged(args, e) from e
    except BaseException:  # the error line (stderr) starts a line of its own, not after the prompt on a terminal
        sys.stdout.write("\n")
        sys.stdout.flush()
        raise
    sys.stdout.write("\n")
    return 0


def _cmd_chat(args) -> int:
    from .data import load_tokenizer
    from .infer.chat import ChatSession, run_chat
    from .infer.generate import NonFiniteLogits, check_sampling

    check_sampling(args.max_tokens, args.temperature, args.top_p)  # before the model loads
    tokenizer = load_tokenizer(args.tokenizer)
    model = _load_for_inference(args)
    session = ChatSession(model, tokenizer, args.system, max_tokens=args.max_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        return run_chat(session, None if sys.stdin.isatty() else sys.stdin, show_stats=args.stats)
    except NonFiniteLogits as e:
        sys.stdout.write("\n")
        raise _damaged(args, e) from e


def _cmd_eval(args) -> int:
    from .data import load_tokenizer
    from .infer.evaluate import evaluate, load_eval_data

    if args.ctx_curve or args.niah or args.passkey:
        return _cmd_eval_longctx(args)
    if args.rewards:
        return _cmd_eval_rewards(args)
    if args.pairs:
        return _cmd_eval_pairs(args)
    tokenizer = load_tokenizer(args.tokenizer)
    data = load_eval_data(args.data, tokenizer, kind=args.kind, system=args.system, limit=args.limit)
    if args.lambada and data.masks is not None:
        raise UserError(f"{args.data}: --lambada scores the last word of plain text, and this is {data.kind} data "
                        "(scored on its replies without --lambada)")
    if args.system is not None and data.masks is None:
        raise UserError(f"--system is rendered before sft/chat records, and {args.data} is {data.kind} data "
                        "(every token scored as it is)")
    if data.masks is not None and not any(any(m) for m in data.masks):
        raise UserError(f"{args.data}: no tokens to score (no document has a response or assistant reply)")
    model = _load_for_inference(args)
    result = evaluate(model, data.docs, lambada=args.lambada, tokenizer=tokenizer, masks=data.masks)
    if args.out:
        from .infer.longctx import write_json

        write_json(args.out, result)
    if args.json:
        print(json.dumps(result))
    else:
        acc = "n/a" if result["acc"] is None else f"{result['acc']:.4f}"
        print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.3f}  tokens {result['tokens']}  acc {acc}")
    return 0


def _cmd_eval_rewards(args) -> int:
    """--rewards: mean reward and pass@k of --data's prompts for the model (with --compare: base and each adapter)."""
    from .data import load_tokenizer
    from .train.reward_eval import eval_rewards, plot_rewards, reward_spec

    reward_spec(args.rewards)  # a bad SPEC stops before any model loads
    tokenizer = load_tokenizer(args.tokenizer)
    adapters = [args.adapter] if args.compare is None else [None, *([args.adapter] if args.adapter else []),
                                                             *args.compare]
    def loader(adapter, first: bool):
        def load():
            args.adapter = adapter
            return _load_for_inference(args, say=first)
        return load

    # loaded, scored and let go one at a time: a GPU holds one model of the comparison, not all of them
    models = [(adapter or "base", loader(adapter, i == 0)) for i, adapter in enumerate(adapters)]
    result = eval_rewards(args.rewards, args.data, models, tokenizer, args.samples)
    if args.out:
        from .infer.longctx import write_json

        write_json(args.out, result)
    if args.plot:
        plot_rewards(result, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        for label, r in result.items():
            passes = "  ".join(f"{k} {v:.3f}" for k, v in r.items() if k.startswith("pass@"))
            print(f"{label}: reward {r['reward']:.4f}  {passes}  ({r['prompts']} prompts)")
    return 0


def _cmd_eval_pairs(args) -> int:
    """--pairs RECIPE: reward accuracy / margin of --data's preference pairs for --model + --adapter."""
    from .data import load_tokenizer
    from .train.preference import eval_pairs, needs_frozen_copy, pairs_recipe

    recipe = pairs_recipe(args.pairs)  # before the model loads
    if args.dtype == "auto":  # as the trainer's held-out evaluation ran: in the recipe's train.precision
        args = argparse.Namespace(**{**vars(args), "dtype": recipe.train.precision})
    tokenizer = load_tokenizer(args.tokenizer)
    model = _load_for_inference(args)
    reference = None if args.adapter else model  # no adapter: the base model is its own reference
    if args.adapter and needs_frozen_copy(recipe.method):  # trained in full: the base is the ref
        reference = _load_for_inference(argparse.Namespace(**{**vars(args), "adapter": None}), say=False)
    result = eval_pairs(recipe, args.data, model, tokenizer, reference)
    if args.out:
        from .infer.longctx import write_json

        write_json(args.out, result)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['objective']} (beta {result['beta']:g}): reward accuracy {result['reward_acc']:.4f}  margin "
              f"{result['reward_margin']:.4f}  loss {result['loss']:.4f}  ({result['pairs']} pairs)")
    return 0


def _cmd_eval_longctx(args) -> int:
    """--ctx-curve / --niah / --passkey for one model, or with --compare for the base and each adapter
    (cli_checks has refused the flags these modes do not read)."""
    from .data import load_eval_docs, load_tokenizer
    from .infer import longctx, niah

    tokenizer = load_tokenizer(args.tokenizer)
    adapters = [args.adapter] if args.compare is None else [None, *([args.adapter] if args.adapter else []),
                                                             *args.compare]
    if args.ctx_curve:
        docs = load_eval_docs(args.data, tokenizer)[: args.limit]

        def score(model, label):
            return longctx.ctx_curve(model, docs, max_ctx=args.max_ctx, chunk_len=args.chunk_len, desc=label)
    else:
        spec = niah.make_spec(args.passkey, args.needle, args.question, args.answer)
        lengths = (niah.parse_list(args.lengths, "--lengths", int) if args.lengths
                   else niah.default_lengths(args.max_ctx))
        depths = niah.parse_list(args.depths, "--depths", float)
        hay = niah.read_haystack(args.haystack, passkey=args.passkey)
        niah.check_grid(tokenizer, spec, lengths, depths, args.trials, hay)

        def score(model, label):
            return niah.needle_grid(model, tokenizer, spec, lengths, depths, hay, trials=args.trials,
                                    chunk_len=args.chunk_len, desc=label)
    runs = []
    for adapter in adapters:
        label = "base" if adapter is None else str(adapter)
        model = _load_for_inference(argparse.Namespace(**{**vars(args), "adapter": adapter}), say=not runs)
        runs.append({"label": label, **score(model, label)})
        del model
    result = runs[0] if len(runs) == 1 else {"runs": runs}
    if args.out:
        longctx.write_json(args.out, result)
    if args.plot:
        if args.ctx_curve:
            longctx.plot_ctx_curve(runs, args.plot)
        else:
            niah.plot_grid(runs, args.plot, title="passkey retrieval" if args.passkey else "needle in a haystack")
    if args.json:
        print(json.dumps(result))
    else:
        print(longctx.format_ctx_curve(runs) if args.ctx_curve else niah.format_grid(runs))
    return 0


def _cmd_data(args) -> int:
    from .data import build_binidx

    stats = build_binidx(args.input, args.out, tokenizer_spec=args.tokenizer, field=args.field)
    print(f"wrote {args.out}.bin/.idx: {stats['docs']} documents, {stats['tokens']} tokens")
    return 0


def _cmd_recipes(args) -> int:
    from .train.starter import list_recipes

    rows = list_recipes()
    width = max(len(name) for name, _ in rows)
    for name, what in rows:
        print(f"{name:<{width}}  {what}")
    print("run one: rwkv-peft train NAME (or its path) [key=value ...]; "
          "your own: rwkv-peft init [KIND] --model M --data D")
    return 0


def _cmd_methods(args) -> int:
    from .adapters.kinds import markdown_table, text_table

    print(markdown_table() if args.markdown else text_table(), end="")
    return 0


def _cmd_init(args) -> int:
    from .train.starter import write_starter

    if args.kind and args.kind_flag and args.kind != args.kind_flag:
        raise UserError(f"init: KIND {args.kind} and --kind {args.kind_flag} disagree; give one")
    kind = args.kind or args.kind_flag or "state"
    print(write_starter(args.out, args.model, args.data, kind, args.out_dir, args.ctx_len))
    return 0


def _cmd_ui(args) -> int:
    from .extras import require

    require("ui", "rwkv-peft ui")
    from .ui.app import serve

    serve(args.host, args.port, args.runs, args.lang, args.auth)
    return 0


def _cmd_doctor(args) -> int:
    from .doctor import main as doctor

    return doctor(as_json=args.json)


_COMMANDS = {
    "inspect": _cmd_inspect,
    "train": _cmd_train,
    "merge": _cmd_merge,
    "export": _cmd_export,
    "convert": _cmd_convert,
    "generate": _cmd_generate,
    "eval": _cmd_eval,
    "chat": _cmd_chat,
    "data": _cmd_data,
    "doctor": _cmd_doctor,
    "ui": _cmd_ui,
    "recipes": _cmd_recipes,
    "methods": _cmd_methods,
    "init": _cmd_init,
}
# Commands that need torch from the start import it with Ctrl-C held (interrupts.py); train holds it in train.runner
_STARTS_WITH_TORCH = {"inspect", "merge", "export", "convert", "generate", "eval", "chat", "doctor"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    # bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional hub kernel is missing;
    # the fallback it then uses is fine, so keep the terminal for our own messages.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        check_inputs(args)  # every path and flag before any work (train: its recipe's, in train.runner)
        if args.command in _STARTS_WITH_TORCH:
            import_torch()
        return _COMMANDS[args.command](args)
    except Interrupted as e:  # a Ctrl-C the command stopped for in good order (train: its steps saved)
        if args.debug:
            raise
        print(str(e), file=sys.stderr)
        return EXIT_INTERRUPTED
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TokenIdError as e:  # a text's tokens past the model's vocabulary: another model's tokenizer
        if args.debug:
            raise
        print(f"error: {e}; is --tokenizer {getattr(args, 'tokenizer', None)} the tokenizer of --model "
              f"{getattr(args, 'model', None)}?", file=sys.stderr)
        return EXIT_USER_ERROR
    except (OSError, RuntimeError, ValueError) as e:
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {first} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
