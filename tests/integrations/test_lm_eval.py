"""The lm-evaluation-harness model `rwkv-peft`: registration, loglikelihood with and without the
shared context's state (equal, and the context read once), rolling log-likelihood and greedy
generation against direct computation, and the offline LAMBADA task = `rwkv-peft eval --lambada`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from peft_rwkv7.infer.longctx import exact_logprobs  # noqa: E402
from peft_rwkv7.integrations.lm_eval import NAME, RWKVPeftLM  # noqa: E402
from tests.conftest import make_model, shared_file  # noqa: E402
from tests.integrations.lmeval_tasks import LAMBADA_TASKS, write_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data/demo/rwkv7-demo.pth"


class ByteTokenizer:
    spec = "bytes"

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 1 for i in ids if i > 0).decode(errors="replace")


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _direct(model, ids: list[int], first: int) -> tuple[float, bool]:
    """log p(ids[first:] | ids[:first]) and greedy, from one whole forward."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        logits = model(seq[:, :-1])[:, first - 1 :]
    tgt = seq[:, first:]
    return float(exact_logprobs(logits, tgt).sum()), bool((logits.argmax(-1) == tgt).all())


@pytest.fixture(scope="module")
def tiny():
    return make_model(seed=11, vocab_size=257)


def test_registered_under_rwkv_peft_with_an_entry_point():
    from lm_eval.api.registry import get_model

    assert NAME == "rwkv-peft" and get_model("rwkv-peft") is RWKVPeftLM
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lm_eval.models"]
    assert eps == {"rwkv-peft": "peft_rwkv7.integrations.lm_eval:RWKVPeftLM"}
    assert "lm_eval" in " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                                 ["optional-dependencies"]["lmeval"])


def test_loglikelihood_shares_the_context_state_and_equals_a_whole_forward(tiny):
    tok = ByteTokenizer()
    reqs = [("The cat sat on the", " mat"), ("The cat sat on the", " hat and more"), ("", "Hello"),
            ("The cat sat on the", ""), ("Another context ", "word"), ("The cat sat on the", " m")]
    calls = []
    forward = tiny.forward

    def spy(idx, state=None, return_state=False):
        calls.append(idx[0].tolist())
        return forward(idx, state, return_state)

    start = [0, *tok.encode("The cat")]  # the first chunk (8 tokens) of the shared context
    tiny.forward = spy
    try:
        lm = RWKVPeftLM(tiny, tokenizer=tok, chunk_len=8)
        got = lm.loglikelihood([_req("loglikelihood", *r) for r in reqs], disable_tqdm=True)
        assert sum(c == start for c in calls) == 1  # read once for its four continuations
        calls.clear()
        plain = RWKVPeftLM(tiny, tokenizer=tok, reuse_state=False, chunk_len=8).loglikelihood(
            [_req("loglikelihood", *r) for r in reqs], disable_tqdm=True)
        assert sum(c == start for c in calls) == 3  # once per request with a non-empty continuation
    finally:
        tiny.forward = forward
    for (ctx, cont), (lp, greedy), (lp2, greedy2) in zip(reqs, got, plain):
        if not cont:
            assert (lp, greedy) == (0.0, True)
            continue
        ctx, cont = (ctx.rstrip(), ctx[len(ctx.rstrip()) :] + cont)
        ids = [0, *tok.encode(ctx)]
        want = _direct(tiny, ids + tok.encode(cont), len(ids))
        assert lp == pytest.approx(want[0], abs=1e-4) and greedy == want[1]
        assert lp2 == pytest.approx(want[0], abs=1e-4) and greedy2 == want[1]


def test_rolling_loglikelihood_reads_the_whole_text(tiny):
    tok = ByteTokenizer()
    text = "A longer document that spans several chunks of the state-carrying reader. " * 3
    (got,) = RWKVPeftLM(tiny, tokenizer=tok, chunk_len=16).loglikelihood_rolling(
        [_req("loglikelihood_rolling", text)], disable_tqdm=True)
    ids = [0, *tok.encode(text)]
    assert got == pytest.approx(_direct(tiny, ids, 1)[0], abs=1e-3)


def test_generate_until_is_greedy_and_stops(tiny):
    tok = ByteTokenizer()
    lm = RWKVPeftLM(tiny, tokenizer=tok, chunk_len=4)
    ids = [0, *tok.encode("Once upon")]
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(tiny(torch.tensor([ids]))[0, -1].argmax()))
    full = tok.decode(ids[1 + len("Once upon") :])
    (free,) = lm.generate_until([_req("generate_until", "Once upon", {"until": [], "max_gen_toks": 12})],
                                disable_tqdm=True)
    assert free == full
    stop = full[3:5]
    out = lm.generate_until([_req("generate_until", "Once upon", {"until": [stop], "max_gen_toks": 12})] * 2,
                            disable_tqdm=True)
    assert out == [full[: full.index(stop)]] * 2


def _tasks(tmp_path: Path, n: int) -> Path:
    lines = shared_file("lambada_test.jsonl").read_text().splitlines()[:n]
    data = tmp_path / "lambada_subset.jsonl"
    data.write_text("\n".join(lines) + "\n")
    write_tasks(tmp_path, data)
    return data


@pytest.mark.slow  # 13-17 s each on a 2-core AVX2 machine
def test_offline_lambada_equals_rwkv_peft_eval(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    # The demo model gets no LAMBADA word right (accuracy 0.0 both ways): this checks the perplexity on
    # real text; test_lm_eval_wind.py has an accuracy strictly between 0 and 1 without ../shared/data.
    data = _tasks(tmp_path, 12)
    # both in fp32 (auto may be bf16 on a CPU fast at it): the 1e-4 below is an fp32 agreement
    ours = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", "eval", "--model", str(DEMO), "--data", str(data),
                           "--lambada", "--json", "--dtype", "fp32"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert ours.returncode == 0, ours.stderr
    ours = json.loads(ours.stdout)
    lm = RWKVPeftLM(model=str(DEMO), device="cpu", dtype="fp32")
    res = lm_eval.simple_evaluate(model=lm, tasks=list(LAMBADA_TASKS), task_manager=TaskManager(
        include_path=str(tmp_path / "tasks")), num_fewshot=0, bootstrap_iters=0, log_samples=False)["results"]
    assert res["rwkv_lambada_acc"]["acc,none"] == ours["acc"]
    assert math.isclose(res["rwkv_lambada_ppl"]["token_perplexity,none"], ours["ppl"], rel_tol=1e-4)


class Induction(torch.nn.Module):
    """Predicts the token that followed the last earlier match of the current 1-4 token suffix:
    a World-vocabulary model that gets some LAMBADA last words right (they often occur earlier)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, state=None, return_state=False):
        hist = [[] for _ in range(idx.shape[0])] if state is None else [list(h) for h in state]
        logits = torch.zeros(idx.shape[0], idx.shape[1], 65536)
        for b, h in enumerate(hist):
            for t, tok in enumerate(idx[b].tolist()):
                h.append(tok)
                for k in range(min(4, len(h) - 1), 0, -1):
                    hit = next((i for i in range(len(h) - k - 1, -1, -1) if h[i : i + k] == h[-k:]), None)
                    if hit is not None:
                        logits[b, t, h[hit + k]] = 10.0
                        break
        return (logits, hist) if return_state else logits


@pytest.mark.slow  # 13-17 s each on a 2-core AVX2 machine
def test_offline_lambada_accuracy_is_the_same_where_a_model_gets_words_right(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from peft_rwkv7.data import load_eval_docs, load_tokenizer
    from peft_rwkv7.infer.evaluate import evaluate

    data = _tasks(tmp_path, 60)
    tok = load_tokenizer("world")
    ours = evaluate(Induction(), load_eval_docs(data, tok), lambada=True, tokenizer=tok)
    assert ours["acc"] > 0.05
    res = lm_eval.simple_evaluate(model=RWKVPeftLM(Induction(), tokenizer=tok), tasks=list(LAMBADA_TASKS),
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")), num_fewshot=0,
                                  bootstrap_iters=0, log_samples=False)["results"]
    assert res["rwkv_lambada_acc"]["acc,none"] == ours["acc"]
    # Perplexity against an fp64 computation: these peaked logits (10 vs 0 over 65536) are where an
    # fp32 cross-entropy would read ~2e-4 nats/token low (tests/infer/test_longctx.py).
    nll, n = 0.0, 0
    for d in load_eval_docs(data, tok):
        seq = torch.tensor([[0, *d]])
        nll -= float(exact_logprobs(Induction()(seq[:, :-1]), seq[:, 1:]).sum())
        n += len(d)
    assert math.isclose(res["rwkv_lambada_ppl"]["token_perplexity,none"], math.exp(nll / n), rel_tol=1e-9)


@pytest.mark.slow  # 13-17 s each on a 2-core AVX2 machine
def test_module_runs_lm_evals_command_line(tmp_path):
    _tasks(tmp_path, 3)
    out = subprocess.run([sys.executable, "-m", "peft_rwkv7.integrations.lm_eval", "--model", "rwkv-peft",
                          "--model_args", f"model={DEMO}", "--device", "cpu", "--tasks", "rwkv_lambada_acc",
                          "--include_path", str(tmp_path / "tasks"), "--limit", "3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rwkv_lambada_acc" in out.stdout and "rwkv-peft" in out.stdout


def test_model_args_load_adapter_and_state(tmp_path):
    from peft_rwkv7.adapters import MethodConfig, attach, save_adapter
    from peft_rwkv7.model import load_model, save_model

    save_model(make_model(seed=12, vocab_size=257), tmp_path / "base.pth")
    lora = attach(load_model(tmp_path / "base.pth"), MethodConfig(kind="lora", r=2, alpha=4))
    save_adapter(lora, tmp_path / "lora")
    H, N = lora.model.blocks[0].att.n_head, lora.model.blocks[0].att.head_size
    states = {f"blocks.{i}.att.time_state": torch.randn(H, N, N) * 0.1 for i in range(2)}
    torch.save(states, tmp_path / "state.pth")
    tok = ByteTokenizer()
    req = [_req("loglikelihood", "Some context", " here")]
    both = RWKVPeftLM(str(tmp_path / "base.pth"), adapter=str(tmp_path / "lora"), state=str(tmp_path / "state.pth"),
                      tokenizer=tok, device="cpu")
    only = RWKVPeftLM(str(tmp_path / "base.pth"), state=str(tmp_path / "state.pth"), tokenizer=tok, device="cpu")
    base = RWKVPeftLM(str(tmp_path / "base.pth"), tokenizer=tok, device="cpu")
    a, b, c = (x.loglikelihood(req, disable_tqdm=True)[0][0] for x in (both, only, base))
    assert a == pytest.approx(b, abs=1e-5)  # a fresh LoRA (B = 0) changes nothing; the state does
    assert abs(b - c) > 1e-3
    assert torch.equal(both.model.model.blocks[1].att.time_state, states["blocks.1.att.time_state"])
