"""lm-evaluation-harness model `rwkv-peft`: a base model with an optional adapter and/or tuned state.

    lm_eval --model rwkv-peft --model_args model=M.pth,adapter=runs/lora,state=S.pth --tasks lambada_openai
    python -m peft_rwkv7.integrations.lm_eval --model rwkv-peft --model_args model=M.pth --tasks ...

The package declares the entry point `rwkv-peft` in the group `lm_eval.models`, which lm-eval
releases with plugin discovery read; `python -m peft_rwkv7.integrations.lm_eval ARGS` registers the
model and runs lm-eval's command line with any release. From Python, pass an instance:
`lm_eval.simple_evaluate(model=RWKVPeftLM(model="M.pth"), tasks=[...])`. The device is lm-eval's
`--device` (not a model_args key: lm-eval passes its own); its default, cuda:0, runs on the CPU with
one line saying so where CUDA is absent.

Scoring follows `rwkv-peft eval`: a context is read as [0] + encode(context) (end-of-text first, an
empty context is just [0]), the continuation as encode(continuation) right after it; log-probs are
an fp64 log-softmax of the logits. Requests that share a context reuse its RNN state: the context
is read once (chunk by chunk, state carried) and all its continuations run from that state in one
batch. `loglikelihood_rolling` reads [0] + encode(text) whole (an RNN needs no sliding windows).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import torch
from torch import nn

try:
    from lm_eval.api.model import LM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("peft_rwkv7.integrations.lm_eval needs lm-evaluation-harness: "
                      "pip install 'rwkv-peft[lmeval]'") from e

from ..errors import UserError
from ..infer.longctx import EOT, chunked_forward, exact_logprobs, expand_state, score_continuation

NAME = "rwkv-peft"
_CONT_TOKENS = 1024  # continuation tokens per batched forward pass (bounds the logits' memory)


def eval_device(device: str) -> torch.device:
    """The device to evaluate on: "auto" (CUDA when available), "cpu", or a CUDA device such as lm-eval's
    default "cuda:0", which falls back to the CPU (one line on stderr) where CUDA is absent, as
    lm-eval's HF model does; anything else is a one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"rwkv-peft: device {device}: no CUDA device is available; evaluating on the CPU", file=sys.stderr,
              flush=True)
        return torch.device("cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r}: rwkv-peft evaluates on cpu or cuda")
    return dev


def load_for_eval(model: str, adapter: str | None = None, state: str | None = None, lora_alpha: float | None = None,
                  device: str = "auto", dtype: str = "auto") -> nn.Module:
    """Base model (local path or hf://) with `adapter` (run directory or RWKV-PEFT .pth) and/or a
    tuned `state` file (keys blocks.N.att.time_state [H, N, N], e.g. a run's state.pth) applied."""
    from ..adapters import load_adapter, read_adapter
    from ..adapters.quant import staging_device
    from ..model import load_model
    from ..model.hub import resolve_model_path
    from ..model.io import read_state_dict
    from ..ops.precision import choose_bf16

    dev = eval_device(device)
    dtypes = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":  # as `rwkv-peft eval --dtype auto`: bf16 on a GPU with native bf16, on a CPU measured fast
        dtypes["auto"] = torch.bfloat16 if choose_bf16("auto", dev.type, "dtype") else torch.float32
    if dtype not in dtypes:
        raise UserError(f"dtype {dtype!r} is not one of auto, fp32, bf16")
    # the adapter read first: over a quantized base the base loads on the CPU and is quantized onto `dev` layer by
    # layer (staging_device), so a GPU never holds the float model
    saved = read_adapter(adapter or state, lora_alpha) if adapter or state else None
    load_on = staging_device(saved.method.quant, dev) if saved is not None else dev
    net = load_model(resolve_model_path(model), dtype=dtypes[dtype], device=load_on)
    if adapter and state:
        out = load_adapter(net, saved, device=dev)
        if out.method.trains_state:
            raise UserError(f"{adapter}: this adapter carries its own tuned state; drop state={state}")
        sd = read_state_dict(state)
        for i, blk in enumerate(out.model.blocks):
            ts = sd.get(f"blocks.{i}.att.time_state")
            if ts is None:
                raise UserError(f"{state}: no blocks.{i}.att.time_state (not a state file for this model)")
            shape = (blk.att.n_head, blk.att.head_size, blk.att.head_size)
            if tuple(ts.shape) != shape:
                raise UserError(f"{state}: blocks.{i}.att.time_state is {list(ts.shape)}, "
                                f"this model needs {list(shape)}")
            blk.att.register_buffer("time_state", ts.to(device=dev, dtype=torch.float32))
        net = out
    elif adapter or state:
        net = load_adapter(net, saved, device=dev)
    return net.eval()


class RWKVPeftLM(LM):
    """lm-eval's LM over an RWKV-7 (optionally adapted). `model` is a path (loaded with adapter,
    state, device, dtype) or an already built model object (then `tokenizer` may be an object too)."""

    def __init__(self, model: str | nn.Module, adapter: str | None = None, state: str | None = None,
                 lora_alpha: float | None = None, tokenizer="world", device: str | None = None, dtype: str = "auto",
                 chunk_len: int = 1024, max_gen_toks: int = 256, reuse_state: bool = True,
                 batch_size: int | str | None = 1, max_batch_size: int | None = None) -> None:
        super().__init__()
        from ..data import load_tokenizer

        if isinstance(model, nn.Module):
            self.model = model.eval()
        else:
            self.model = load_for_eval(str(model), adapter, state, None if lora_alpha is None else float(lora_alpha),
                                       device or "auto", dtype)
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self._device = next(self.model.parameters()).device
        self.chunk_len, self.max_gen_toks = int(chunk_len), int(max_gen_toks)
        self.reuse_state = reuse_state if isinstance(reuse_state, bool) else str(reuse_state).lower() == "true"

    @property
    def tokenizer_name(self) -> str:
        return "rwkv-world" if getattr(self.tokenizer, "spec", "world") == "world" else str(self.tokenizer.spec)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The World chat format: "User: ...\\n\\nAssistant: ...\\n\\n" (System: first if given)."""
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        text = "".join(f"{names.get(m['role'], m['role'].title())}: {m['content'].strip()}\n\n" for m in chat_history)
        return text + "Assistant:" if add_generation_prompt else text.rstrip("\n")

    # ---- reading -------------------------------------------------------------------------------

    def _read(self, ids: Sequence[int], state=None) -> tuple[torch.Tensor, list]:
        """Run ids [T >= 1] from `state`; returns (logits of the last token [V], state after it)."""
        idx = torch.tensor([list(ids)], dtype=torch.long, device=self._device)
        for _, logits, after in chunked_forward(self.model, idx, state, self.chunk_len):
            last, state = logits[0, -1], after
        return last, state

    def _encode_pair(self, context: str, continuation: str) -> tuple[tuple[int, ...], list[int]]:
        """([0] + encode(context), encode(continuation)); trailing whitespace moves to the continuation."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        return (EOT, *self.tokenizer.encode(context)), self.tokenizer.encode(continuation)

    @torch.no_grad()
    def _continuations(self, last: torch.Tensor, state, conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Score continuations that all follow one context (its last logits [V] and state)."""
        out: list[tuple[float, bool] | None] = [None] * len(conts)
        first = torch.log_softmax(last.double(), dim=-1)
        top = int(last.argmax())
        todo = []
        for i, c in enumerate(conts):
            if not c:
                out[i] = (0.0, True)
            elif len(c) == 1:
                out[i] = (float(first[c[0]]), top == c[0])
            elif len(c) - 1 > self.chunk_len:  # a long continuation: chunk by chunk from the context's state
                lp, greedy = self._chunked(c, state)
                out[i] = (float(first[c[0]]) + lp, top == c[0] and greedy)
            else:
                todo.append(i)
        todo.sort(key=lambda i: -len(conts[i]))
        while todo:
            L = len(conts[todo[0]]) - 1
            group, todo = todo[: max(1, _CONT_TOKENS // L)], todo[max(1, _CONT_TOKENS // L):]
            inp = torch.full((len(group), L), EOT, dtype=torch.long)
            tgt = torch.full((len(group), L), -1, dtype=torch.long)
            for row, i in enumerate(group):
                c = conts[i]
                inp[row, : len(c) - 1] = torch.tensor(c[:-1])
                tgt[row, : len(c) - 1] = torch.tensor(c[1:])
            inp, tgt = inp.to(self._device), tgt.to(self._device)
            logits = self.model(inp, expand_state(state, len(group)))
            lp = exact_logprobs(logits, tgt).sum(dim=1)
            greedy = ((logits.argmax(dim=-1) == tgt) | (tgt < 0)).all(dim=1)
            for row, i in enumerate(group):
                c = conts[i]
                out[i] = (float(first[c[0]]) + float(lp[row]), top == c[0] and bool(greedy[row]))
        return out  # type: ignore[return-value]

    # ---- lm-eval API ---------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy decoding reproduces it) per request, in order."""
        from tqdm.auto import tqdm

        pairs = [self._encode_pair(*r.args) for r in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(ctx if self.reuse_state else (i, *ctx), []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for members in tqdm(groups.values(), desc="loglikelihood", disable=disable_tqdm, leave=False):
            ctx = pairs[members[0]][0]
            if len(members) == 1:  # nothing to share (or reuse_state=False): one pass over context + continuation
                results[members[0]] = self._whole(ctx, pairs[members[0]][1])
                continue
            last, state = self._read(ctx)
            for i, res in zip(members, self._continuations(last, state, [pairs[i][1] for i in members])):
                results[i] = res
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return results  # type: ignore[return-value]

    def _whole(self, ctx: Sequence[int], cont: list[int]) -> tuple[float, bool]:
        """Without state reuse: read context + continuation as one sequence (batch 1)."""
        if not cont:
            return 0.0, True
        return self._chunked([*ctx, *cont], None, skip=len(ctx) - 1)

    def _chunked(self, seq: Sequence[int], state, skip: int = 0) -> tuple[float, bool]:
        """(summed log p, all greedy) of seq[1 + skip:], reading seq[:-1] from `state` chunk by chunk."""
        return score_continuation(self.model, seq, state, skip, self.chunk_len)

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) per request: [0] + encode(text) read whole (state carried), every token predicted."""
        from tqdm.auto import tqdm

        out = []
        for r in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm, leave=False):
            ids = [EOT, *self.tokenizer.encode(r.args[0])]
            total = self._chunked(ids, None)[0] if len(ids) > 1 else 0.0
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string (`until`), end-of-text or
        `max_gen_toks`; identical (context, settings) requests are generated once."""
        from tqdm.auto import tqdm

        done: dict[str, str] = {}
        out = []
        for r in tqdm(requests, desc="generate_until", disable=disable_tqdm, leave=False):
            context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 and r.args[1] else {})
            key = json.dumps([context, kwargs], sort_keys=True, default=str)
            if key not in done:
                done[key] = self._generate(context, kwargs)
            out.append(done[key])
            self.cache_hook.add_partial("generate_until", r.args, done[key])
        return out

    def _generate(self, context: str, kwargs: dict) -> str:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        limit = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
        from ..infer.generate import in_vocab, sample_next

        gen = torch.Generator().manual_seed(int(kwargs.pop("seed", 0) or 0))
        last, state = self._read((EOT, *self.tokenizer.encode(context)))
        ids: list[int] = []
        text = ""
        top_p = float(kwargs.get("top_p", 1.0) or 1.0)
        for _ in range(limit):
            tok = sample_next(in_vocab(last, self.tokenizer).float(), temperature, top_p, gen)
            if tok == EOT:
                break
            ids.append(tok)
            text = self.tokenizer.decode(ids)
            if any(u in text for u in until):
                break
            logits, state = self.model(torch.tensor([[tok]], device=self._device), state, return_state=True)
            last = logits[0, -1]
        cut = min((text.find(u) for u in until if u in text), default=len(text))
        return text[:cut]


def register() -> None:
    """Register RWKVPeftLM under `rwkv-peft` in lm-eval's model registry (once; a plugin entry
    already there resolves to this class)."""
    import lm_eval.models  # noqa: F401  (lm-eval fills its registry on this import only while it is empty)
    from lm_eval.api import registry

    known = getattr(registry, "model_registry", None) or registry.MODEL_REGISTRY  # 0.4.9+: a Registry, before: a dict
    if NAME not in known:
        registry.register_model(NAME)(RWKVPeftLM)


def main() -> None:
    """`python -m peft_rwkv7.integrations.lm_eval ARGS`: lm-eval's command line with `rwkv-peft` registered."""
    from lm_eval.__main__ import cli_evaluate

    from peft_rwkv7.integrations import lm_eval as this  # the importable module, not __main__

    this.register()
    cli_evaluate()


if __name__ == "__main__":
    main()
else:
    register()
