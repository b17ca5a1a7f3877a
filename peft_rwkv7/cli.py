"""`rwkv-peft` command line: argument parsing only; the work happens in the package.

Every bad input ends as one line on stderr and a non-zero exit; `--debug` shows the traceback.
Heavy modules are imported inside the subcommands so `rwkv-peft --help` starts at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value}")
        return value

    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default (where it has a meaningful one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and default not in (None, False, argparse.SUPPRESS)
                and not isinstance(action, argparse._HelpAction) and action.option_strings):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the whole usage block by default)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see: {self.prog} --help)\n")


def _add_placement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (auto: cuda when available)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="weights in memory (auto: bf16 on cuda, fp32 on cpu); the WKV state stays fp32")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rwkv-peft", description="Parameter-efficient fine-tuning for RWKV-7.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--version", action="version", version=f"rwkv-peft {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train what a recipe names (state, LoRA, PiSSA, DiSHA, full)")
    t.add_argument("recipe", nargs="?", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    t.add_argument("--print-schema", action="store_true", help="list every recipe key: type, default, meaning")
    t.add_argument("--markdown", action="store_true", help="with --print-schema: as the README's markdown table")

    m = sub.add_parser("merge", help="fold an adapter into a base .pth (official layout)")
    m.add_argument("--base", required=True, help="base model .pth")
    m.add_argument("--adapter", required=True, help="run directory, adapter file, or RWKV-PEFT .pth")
    m.add_argument("--out", required=True, help="output .pth")
    m.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="dtype of the merged weights (time_state stays fp32)")
    m.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha for RWKV-PEFT files (not stored there)")

    g = sub.add_parser("generate", help="sample text from a model (RNN mode), streamed")
    g.add_argument("--model", required=True, help="model .pth")
    g.add_argument("--adapter", default=None, help="run directory, adapter file, or RWKV-PEFT .pth to apply")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha for RWKV-PEFT files (not stored there)")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=200,
                   help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    g.add_argument("--top-p", type=float, default=0.85,
                   help="nucleus sampling: keep the smallest set of tokens with this much probability")
    g.add_argument("--seed", type=int, default=0, help="random seed of the sampler")
    g.add_argument("--tokenizer", default="world", help="world or a tokenizer.json path")
    _add_placement(g)

    e = sub.add_parser("eval", help="loss / perplexity (and LAMBADA accuracy) on a jsonl file")
    e.add_argument("--model", required=True, help="model .pth")
    e.add_argument("--adapter", default=None, help="run directory, adapter file, or RWKV-PEFT .pth to apply")
    e.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha for RWKV-PEFT files (not stored there)")
    e.add_argument("--data", required=True, help='jsonl with one {"text": ...} per line')
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--tokenizer", default="world", help="world or a tokenizer.json path")
    e.add_argument("--lambada", action="store_true", help="also score last-word accuracy (LAMBADA)")
    e.add_argument("--limit", type=_positive_int("--limit"), default=None, help="score only the first N documents")
    _add_placement(e)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION", required=True, parser_class=_Parser)
    b = dsub.add_parser("build", help="tokenize jsonl/json/parquet into binidx (.bin/.idx)")
    b.add_argument("input", help="jsonl / json / parquet file to tokenize")
    b.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    b.add_argument("--tokenizer", default="world", help="world or a tokenizer.json path")
    b.add_argument("--field", default="text", help="the text field of each record")

    i = sub.add_parser("inspect", help="show a model's config or a run directory's summary")
    i.add_argument("path", help="a model .pth or a run directory")

    x = sub.add_parser("export", help="write an adapter in another tool's layout")
    x.add_argument("--adapter", required=True, help="run directory to export")
    x.add_argument("--format", choices=["rwkv-peft"], default="rwkv-peft", help="target layout")
    x.add_argument("--out", required=True, help="output file")

    sub.add_parser("recipes", help="list the bundled recipes with their purpose")

    it = sub.add_parser("init", help="write a starter recipe for your model and data")
    it.add_argument("--model", required=True, help="base model .pth (or hf://OWNER/REPO/FILE.pth)")
    it.add_argument("--data", required=True, help="training data: jsonl/json/parquet or a binidx prefix")
    it.add_argument("--method", default="state", choices=["state", "lora", "pissa", "disha", "qlora", "full"],
                    help="what to train")
    it.add_argument("--ctx-len", type=_positive_int("--ctx-len"), default=512, help="tokens per sample")
    it.add_argument("--out", default="recipe.yaml", help="recipe file to write, never overwritten")
    it.add_argument("--out-dir", default=None, help="the run directory the recipe trains into "
                    "(default: runs/<recipe name>)")

    dr = sub.add_parser("doctor", help="check this machine: torch, GPU, bf16, WKV kernels vs the reference, packages")
    dr.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _cmd_inspect(args) -> int:
    from .infer.inspect import inspect_path

    print(inspect_path(args.path))
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
    from .adapters import export_rwkv_peft

    print(export_rwkv_peft(args.adapter, args.out))
    return 0


def _load_for_inference(args):
    """Base model (local or hf://) on --device in --dtype, with --adapter (or tuned state) applied."""
    import torch

    from .model import load_model, pick_device
    from .model.hub import resolve_model_path

    device = pick_device(args.device, "--device")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": None}[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(resolve_model_path(args.model), dtype=dtype, device=device)
    if args.adapter:
        from .adapters import load_adapter

        model = load_adapter(model, args.adapter, lora_alpha=args.lora_alpha)
    return model.eval()


def _cmd_generate(args) -> int:
    from .data import load_tokenizer
    from .infer.generate import check_sampling, generate

    check_sampling(args.max_tokens, args.temperature, args.top_p)  # before the model loads
    tokenizer = load_tokenizer(args.tokenizer)
    model = _load_for_inference(args)
    sys.stdout.write(args.prompt)
    for piece in generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_eval(args) -> int:
    from .data import load_eval_docs, load_tokenizer
    from .infer.evaluate import evaluate

    tokenizer = load_tokenizer(args.tokenizer)
    docs = load_eval_docs(args.data, tokenizer)[: args.limit]
    model = _load_for_inference(args)
    result = evaluate(model, docs, lambada=args.lambada, tokenizer=tokenizer)
    if args.json:
        print(json.dumps(result))
    else:
        acc = "n/a" if result["acc"] is None else f"{result['acc']:.4f}"
        print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.3f}  tokens {result['tokens']}  acc {acc}")
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
    print("run one: rwkv-peft train NAME (or its path) [key=value ...]; your own: rwkv-peft init --model M --data D")
    return 0


def _cmd_init(args) -> int:
    from .train.starter import write_starter

    print(write_starter(args.out, args.model, args.data, args.method, args.out_dir, args.ctx_len))
    return 0


def _cmd_doctor(args) -> int:
    from .doctor import main as doctor

    return doctor(as_json=args.json)


_COMMANDS = {
    "inspect": _cmd_inspect,
    "train": _cmd_train,
    "merge": _cmd_merge,
    "export": _cmd_export,
    "generate": _cmd_generate,
    "eval": _cmd_eval,
    "data": _cmd_data,
    "doctor": _cmd_doctor,
    "recipes": _cmd_recipes,
    "init": _cmd_init,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = _build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    # bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional hub kernel is missing;
    # the fallback it then uses is fine, so keep the terminal for our own messages.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return _COMMANDS[args.command](args)
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
    except (OSError, RuntimeError, ValueError) as e:
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {first} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
