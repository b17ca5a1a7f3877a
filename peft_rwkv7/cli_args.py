"""The `rwkv-peft` argument parser: every subcommand's flags and help (the commands live in `cli.py`)."""

from __future__ import annotations

import argparse

from . import __version__

EXIT_USER_ERROR = 2
INT_LIMIT = 2**63 - 1  # counts and sizes past this are no real request (and overflow what reads them)
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes [0, 2**64)
# `eval` options with a default that only some modes read (cli_checks refuses them, changed, elsewhere)
EVAL_DEFAULTS = {"depths": "0,0.25,0.5,0.75,1", "trials": 3, "max_ctx": 16384, "chunk_len": 512}


def _int(name: str, least: int, below: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {value}")
        if value >= below:
            raise argparse.ArgumentTypeError(f"{name} must be below {below}, got {value}")
        return value

    return parse


def _positive_int(name: str):
    return _int(name, 1, INT_LIMIT + 1, "a positive integer")


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
                        help="weights in memory (auto: bf16 on a gpu with native bf16 and on a cpu measured fast at "
                        "bf16 matmuls, else fp32); the WKV state stays fp32")


def _add_model(parser: argparse.ArgumentParser, model_help: str = "model: .pth, .st or HF directory",
               adapter_help: str = "run directory, adapter file, or RWKV-PEFT .pth to apply") -> None:
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--adapter", default=None, help=adapter_help)
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="LoRA alpha for RWKV-PEFT files (not stored there)")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.85,
                        help="nucleus sampling: keep the smallest set of tokens with this much probability")
    parser.add_argument("--seed", type=_int("--seed", 0, SEED_LIMIT, "a non-negative integer"), default=0,
                        help="random seed of the sampler")
    parser.add_argument("--tokenizer", default="world", help="world or a tokenizer.json path")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rwkv-peft", description="Parameter-efficient fine-tuning for RWKV-7.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--version", action="version", version=f"rwkv-peft {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train what a recipe names (any of rwkv-peft methods)")
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
    _add_model(g)
    g.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    g.add_argument("--chat", action="store_true", help="render --prompt as one chat turn in the World format "
                   "(as data.kind chat trains it) and print only the reply, which ends at the first blank line")
    g.add_argument("--system", default=None, help="with --chat: a system message rendered first")
    g.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=200,
                   help="tokens to generate at most")
    _add_sampling(g)
    _add_placement(g)

    e = sub.add_parser("eval", help="loss / perplexity (and LAMBADA accuracy) on a jsonl file")
    _add_model(e)
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
    lx.add_argument("--rewards", default=None, metavar="SPEC", help="mean reward and pass@k of completions of "
                    "--data's prompts: SPEC is a GRPO recipe (train.grpo) or a rewards list '[{fn: numeric, column: "
                    "answer}]'")
    lx.add_argument("--pairs", default=None, metavar="RECIPE", help="reward accuracy and margin on --data's "
                    "preference pairs under RECIPE's objective (a DPO/ORPO/SimPO run's recipe.yaml), as training "
                    "evaluates them; the policy is --model with --adapter")
    e.add_argument("--samples", type=_positive_int("--samples"), default=None,
                   help="--rewards: completions per prompt (1 = greedy; k: pass@1 and pass@k)")
    e.add_argument("--max-ctx", type=_positive_int("--max-ctx"), default=EVAL_DEFAULTS["max_ctx"],
                   help="longest context: the ctx-curve's last position, the grid's largest length")
    e.add_argument("--plot", default=None, metavar="PNG", help="write the curve / heatmap here")
    e.add_argument("--out", default=None, metavar="JSON", help="also write the JSON result to this file")
    e.add_argument("--compare", nargs="*", default=None, metavar="ADAPTER",
                   help="long-context modes and --rewards: also score the base model (and these adapters/state files) "
                   "in one run")
    e.add_argument("--lengths", default=None, help="--niah/--passkey context lengths, comma-separated "
                   "(default: 1024, 2048, ... up to --max-ctx)")
    e.add_argument("--depths", default=EVAL_DEFAULTS["depths"], help="--niah/--passkey needle depths in [0, 1]")
    e.add_argument("--trials", type=_positive_int("--trials"), default=EVAL_DEFAULTS["trials"],
                   help="--niah/--passkey trials per cell")
    e.add_argument("--haystack", default=None, help="--niah haystack: a .txt or jsonl file (default: generated text)")
    e.add_argument("--needle", default=None, help="--niah needle text; {answer} is replaced by the answer")
    e.add_argument("--question", default=None, help="--niah text after the haystack; the answer follows it")
    e.add_argument("--answer", default=None, help="--niah answer (default: a random 5-digit number per trial)")
    e.add_argument("--chunk-len", type=_positive_int("--chunk-len"), default=EVAL_DEFAULTS["chunk_len"],
                   help="long-context modes: tokens per forward pass (the state is carried between them)")
    _add_placement(e)

    c = sub.add_parser("chat", help="talk to a model (World chat format, multi-turn, state carried between turns)")
    _add_model(c, "model: .pth, .st or HF directory (or hf://OWNER/REPO/FILE.pth)",
               "run directory, adapter file, or RWKV-PEFT .pth to apply (a tuned state included)")
    c.add_argument("--system", default=None, help="system message rendered before the conversation")
    c.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=500,
                   help="tokens per reply at most (a reply ends earlier at a blank line or end-of-text)")
    _add_sampling(c)
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

    mt = sub.add_parser("methods", help="what each method supports (merge, export, quantized base, + state) and how "
                        "a recipe picks it")
    mt.add_argument("--markdown", action="store_true", help="as the README's markdown table")

    it = sub.add_parser("init", help="write a starter recipe for your model and data")
    it.add_argument("kind", nargs="?", default=None, metavar="KIND",
                    help="method to train: a kind of rwkv-peft methods (lora, dora, loftq, vera, ...) or qlora "
                    "(default: state)")
    it.add_argument("--model", required=True, help="base model .pth (or hf://OWNER/REPO/FILE.pth)")
    it.add_argument("--data", required=True, help="training data: jsonl/json/parquet or a binidx prefix")
    it.add_argument("--kind", "--method", dest="kind_flag", default=None, metavar="KIND", help="the same as KIND")
    it.add_argument("--ctx-len", type=_positive_int("--ctx-len"), default=512, help="tokens per sample")
    it.add_argument("--out", default="recipe.yaml", help="recipe file to write, never overwritten")
    it.add_argument("--out-dir", default=None, help="the run directory the recipe trains into "
                    "(default: runs/<recipe name>)")

    ui = sub.add_parser("ui", help="the web UI: train, watch, chat, evaluate and export from a browser (extra [ui])")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (any but this machine's needs --auth)")
    ui.add_argument("--port", type=_positive_int("--port"), default=7860, help="port to serve on")
    ui.add_argument("--runs", default="runs", help="directory the page lists runs of and trains into")
    ui.add_argument("--lang", choices=["en", "zh"], default="en", help="interface language (switchable on the page)")
    ui.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="log-in for the page")

    dr = sub.add_parser("doctor", help="check this machine: torch, GPU, bf16, WKV kernels vs the reference, packages")
    dr.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; `train`'s key=value overrides may come before and after its flags
    (`train RECIPE --resume train.max_steps=500`): argparse takes one run of positionals, so the later
    ones come back unrecognized and join the overrides here. Anything else unrecognized is an error."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command == "train" and all("=" in a and not a.startswith("-") for a in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args
