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
    m.add_argument("--base", required=True, help="base model: .pth, .st or HF directory")
    m.add_argument("--adapter", required=True, help="run directory, adapter file, or RWKV-PEFT .pth")
    m.add_argument("--out", required=True, help="output .pth")
    m.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="dtype of the merged weights (time_state stays fp32)")
    m.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha for RWKV-PEFT files (not stored there)")

    g = sub.add_parser("generate", help="sample text from a model (RNN mode), streamed")
    g.add_argument("--model", required=True, help="model: .pth, .st or HF directory")
    g.add_argument("--adapter", default=None, help="run directory, adapter file, or RWKV-PEFT .pth to apply")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha for RWKV-PEFT files (not stored there)")
    g.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    g.add_argument("--chat", action="store_true", help="render --prompt as one chat turn in the World format "
                   "(as data.kind chat trains it) and print only the reply, which ends at the first blank line")
    g.add_argument("--system", default=None, help="with --chat: a system message rendered first")
    g.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=200,
                   help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    g.add_argument("--top-p", type=float, default=0.85,
                   help="nucleus sampling: keep the smallest set of tokens with this much probability")
    g.add_argument("--seed", type=int, default=0, help="random seed of the sampler")
    g.add_argument("--tokenizer", default="world", help="world or a tokenizer.json path")
    _add_placement(g)

    e = sub.add_parser("eval", help="loss / perplexity (and LAMBADA accuracy) on a jsonl file")
    e.add_argument("--model", required=True, help="model: .pth, .st or HF directory")
    e.add_argument("--adapter", default=None, help="run directory, adapter file, or RWKV-PEFT .pth to apply")
    e.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha for RWKV-PEFT files (not stored there)")
    e.add_argument("--data", default=None, help='.jsonl/.json/.parquet: {"text"} documents (every token '
                   "scored), or sft pairs / chat or ShareGPT conversations (only the tokens training takes loss on: "
                   "responses, assistant replies)")
    e.add_argument("--kind", choices=["auto", "text", "sft", "chat"], default="auto",
                   help="how to read --data; auto guesses from the first record as data.kind auto does")
    e.add_argument("--system", default=None, help="sft/chat: system message rendered first, as data.system in training")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--tokenizer", default="world", help="world or a tokenizer.json path")
    e.add_argument("--lambada", action="store_true", help="also score last-word accuracy (LAMBADA)")
    e.add_argument("--limit", type=_positive_int("--limit"), default=None, help="score only the first N documents")
    lx = e.add_mutually_exclusive_group()
    lx.add_argument("--ctx-curve", action="store_true", help="mean loss per position bucket over --data's documents")
    lx.add_argument("--niah", action="store_true", help="needle in a haystack: context lengths x needle depths")
    lx.add_argument("--passkey", action="store_true", help="passkey retrieval: context lengths x passkey depths")
    e.add_argument("--max-ctx", type=_positive_int("--max-ctx"), default=16384,
                   help="longest context: the ctx-curve's last position, the grid's largest length")
    e.add_argument("--plot", default=None, metavar="PNG", help="write the curve / heatmap here")
    e.add_argument("--out", default=None, metavar="JSON", help="also write the JSON result to this file")
    e.add_argument("--compare", nargs="*", default=None, metavar="ADAPTER",
                   help="long-context modes: also score the base model (and these adapters/state files) in one run")
    e.add_argument("--lengths", default=None, help="--niah/--passkey context lengths, comma-separated "
                   "(default: 1024, 2048, ... up to --max-ctx)")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="--niah/--passkey needle depths in [0, 1]")
    e.add_argument("--trials", type=_positive_int("--trials"), default=3, help="--niah/--passkey trials per cell")
    e.add_argument("--haystack", default=None, help="--niah haystack: a .txt or jsonl file (default: generated text)")
    e.add_argument("--needle", default=None, help="--niah needle text; {answer} is replaced by the answer")
    e.add_argument("--question", default=None, help="--niah text after the haystack; the answer follows it")
    e.add_argument("--answer", default=None, help="--niah answer (default: a random 5-digit number per trial)")
    e.add_argument("--chunk-len", type=_positive_int("--chunk-len"), default=512,
                   help="long-context modes: tokens per forward pass (the state is carried between them)")
    _add_placement(e)

    c = sub.add_parser("chat", help="talk to a model (World chat format, multi-turn, state carried between turns)")
    c.add_argument("--model", required=True, help="model: .pth, .st or HF directory (or hf://OWNER/REPO/FILE.pth)")
    c.add_argument("--adapter", default=None, help="run directory, adapter file, or RWKV-PEFT .pth to apply "
                   "(a tuned state included)")
    c.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha for RWKV-PEFT files (not stored there)")
    c.add_argument("--system", default=None, help="system message rendered before the conversation")
    c.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=500,
                   help="tokens per reply at most (a reply ends earlier at a blank line or end-of-text)")
    c.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    c.add_argument("--top-p", type=float, default=0.85,
                   help="nucleus sampling: keep the smallest set of tokens with this much probability")
    c.add_argument("--seed", type=int, default=0, help="random seed of the sampler")
    c.add_argument("--tokenizer", default="world", help="world or a tokenizer.json path")
    c.add_argument("--stats", action="store_true", help="after each reply, print on stderr the tokens the turn "
                   "read and generated, and the speed")
    _add_placement(c)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION", required=True, parser_class=_Parser)
    b = dsub.add_parser("build", help="tokenize jsonl/json/parquet into binidx (.bin/.idx)")
    b.add_argument("input", help="jsonl / json / parquet file to tokenize")
    b.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    b.add_argument("--tokenizer", default="world", help="world or a tokenizer.json path")
    b.add_argument("--field", default="text", help="the text field of each record")

    i = sub.add_parser("inspect", help="show a model's config or a run directory's summary")
    i.add_argument("path", help="a model (.pth, .st, HF directory), a run directory, a training checkpoint, "
                   "or a binidx dataset")
    i.add_argument("--json", action="store_true", help="print one JSON object")

    x = sub.add_parser("export", help="write a model, adapter or state in another tool's layout")
    x.add_argument("--adapter", default=None, help="run directory (or adapter file) to export or to merge into --model")
    x.add_argument("--model", "--base", dest="model", default=None,
                   help="model to export (.pth, .st or HF directory); with --adapter: the base it is merged into")
    x.add_argument("--format", choices=["rwkv-peft", "st", "hf", "runner-state"], default="rwkv-peft",
                   help="rwkv-peft: RWKV-PEFT adapter .pth; st: web-rwkv/Ai00 safetensors (a model; an adapter alone: "
                   "LoRA blend and/or state file); hf: Hugging Face fla-hub directory; runner-state: RWKV-Runner "
                   "state .pth")
    x.add_argument("--out", required=True, help="output file (hf: a directory)")
    x.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="hf weights (default: the model file's); st is always fp16")
    x.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha for RWKV-PEFT files (not stored there)")

    cv = sub.add_parser("convert", help="convert a model between .pth, web-rwkv/Ai00 .st and HF (fla-hub) directories")
    cv.add_argument("input", help="model: .pth, .st or HF directory")
    cv.add_argument("output", help="where to write it")
    cv.add_argument("--format", choices=["pth", "st", "hf"], default=None,
                    help="output format (default: from OUTPUT's suffix: .pth, .st, anything else an HF directory)")
    cv.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="pth/hf weights (default: the input's); st is always fp16")

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
    if args.system is not None and not args.chat:
        raise UserError("--system is for chat turns: add --chat (or put the text into --prompt)")
    tokenizer = load_tokenizer(args.tokenizer)
    model = _load_for_inference(args)
    if args.chat:
        from .infer.chat import ChatSession

        session = ChatSession(model, tokenizer, args.system, max_tokens=args.max_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        for piece in session.ask(args.prompt):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(args.prompt)
    for piece in generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_chat(args) -> int:
    from .data import load_tokenizer
    from .infer.chat import ChatSession, run_chat
    from .infer.generate import check_sampling

    check_sampling(args.max_tokens, args.temperature, args.top_p)  # before the model loads
    tokenizer = load_tokenizer(args.tokenizer)
    model = _load_for_inference(args)
    session = ChatSession(model, tokenizer, args.system, max_tokens=args.max_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return run_chat(session, None if sys.stdin.isatty() else sys.stdin, show_stats=args.stats)


def _cmd_eval(args) -> int:
    from .data import load_tokenizer
    from .infer.evaluate import evaluate, load_eval_data

    if args.ctx_curve or args.niah or args.passkey:
        return _cmd_eval_longctx(args)
    if args.compare is not None:
        raise UserError("--compare works with --ctx-curve, --niah or --passkey")
    if args.data is None:
        raise UserError("eval needs --data (a jsonl file), or one of --ctx-curve, --niah, --passkey")
    tokenizer = load_tokenizer(args.tokenizer)
    data = load_eval_data(args.data, tokenizer, kind=args.kind, system=args.system, limit=args.limit)
    if args.lambada and data.masks is not None:
        raise UserError(f"{args.data}: --lambada scores the last word of plain text, and this is {data.kind} data "
                        "(scored on its replies without --lambada)")
    model = _load_for_inference(args)
    result = evaluate(model, data.docs, lambada=args.lambada, tokenizer=tokenizer, masks=data.masks)
    if args.json:
        print(json.dumps(result))
    else:
        acc = "n/a" if result["acc"] is None else f"{result['acc']:.4f}"
        print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.3f}  tokens {result['tokens']}  acc {acc}")
    return 0


def _cmd_eval_longctx(args) -> int:
    """--ctx-curve / --niah / --passkey for one model, or with --compare for the base and each adapter."""
    from .data import load_eval_docs, load_tokenizer
    from .infer import longctx, niah

    if args.lambada:
        raise UserError("--lambada does not combine with --ctx-curve, --niah or --passkey")
    tokenizer = load_tokenizer(args.tokenizer)
    adapters = [args.adapter] if args.compare is None else [None, *([args.adapter] if args.adapter else []),
                                                             *args.compare]
    if args.ctx_curve:
        if args.data is None:
            raise UserError("--ctx-curve needs --data: a jsonl file of (long) documents")
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
        model = _load_for_inference(argparse.Namespace(**{**vars(args), "adapter": adapter}))
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
    "convert": _cmd_convert,
    "generate": _cmd_generate,
    "eval": _cmd_eval,
    "chat": _cmd_chat,
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
