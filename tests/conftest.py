"""Shared test helpers: random official-layout RWKV-7 checkpoints of any shape."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from peft_rwkv7.model import RWKV7Config, new_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """A file from ../shared/data, or skip the test where it is absent."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


def log_records(run: Path) -> list[dict]:
    """A run's log.jsonl records (run_dir.read_log) without what depends on the clock: two runs' logs compare equal."""
    from peft_rwkv7.run_dir import read_log

    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in read_log(run)]


@pytest.fixture(scope="session")
def world():
    """The World tokenizer (loaded once per test session)."""
    from peft_rwkv7.data import load_tokenizer

    return load_tokenizer("world")


@torch.no_grad()
def randomize(model, seed: int = 0):
    """Give every parameter a non-trivial random value in its realistic range (nothing zero)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(p, scale, center=0.0):
        p.copy_(center + scale * torch.randn(p.shape, generator=g))

    for name, p in model.named_parameters():
        leaf = name.split(".")[-1] if not name.endswith("weight") and not name.endswith("bias") else name
        if name.startswith("emb"):
            rnd(p, 1.0)
        elif name.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
            rnd(p, 0.2, 1.0)
        elif name.endswith("bias"):
            rnd(p, 0.1)
        elif leaf in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g") or name.endswith("ffn.x_k"):
            p.copy_(torch.rand(p.shape, generator=g))
        elif leaf == "w0":
            rnd(p, 1.0, -1.0)
        elif leaf in ("a0", "v0"):
            rnd(p, 0.5)
        elif leaf == "k_k":
            rnd(p, 0.1, 0.85)
        elif leaf == "k_a":
            rnd(p, 0.1, 1.0)
        elif leaf == "r_k":
            rnd(p, 0.3)
        elif leaf in ("w1", "a1", "v1", "g1"):
            rnd(p, 1 / math.sqrt(p.shape[0]))
        elif leaf in ("w2", "a2", "v2", "g2"):
            rnd(p, 0.5 / math.sqrt(p.shape[0]))
        elif p.dim() == 2:  # Linear weights [out, in]
            rnd(p, 1 / math.sqrt(p.shape[1]))
        else:
            raise AssertionError(f"randomize: unhandled parameter {name}")
    return model


def make_model(seed: int = 0, **shape):
    """A randomised RWKV7 with config from `shape` (RWKV7Config fields; defaults are tiny)."""
    base = dict(n_layer=2, n_embd=64, head_size=16, vocab_size=97)
    base.update({k: shape.pop(k) for k in list(shape) if k in base})
    cfg = RWKV7Config.new(base["n_layer"], base["n_embd"], base["vocab_size"], base["head_size"])
    cfg = RWKV7Config(**{**cfg.to_dict(), **shape})
    return randomize(new_model(cfg, seed=seed), seed=seed)


def inject_measurement(monkeypatch, cache_dir: Path, module, name: str, record: dict) -> list[dict]:
    """Make `module.name`, a CPU check's measurement (precision.measure_bf16, thin_check.measure_thin), return
    `record`, with the checks' cache in `cache_dir` (never the user's); returns the measurements taken from now."""
    from peft_rwkv7.ops import precision

    taken: list[dict] = []

    def measure() -> dict:
        taken.append(record)
        return dict(record)

    monkeypatch.setattr(precision, "default_cache_dir", lambda: cache_dir)
    monkeypatch.setattr(module, name, measure)
    return taken


def spy_extension(monkeypatch, *names: str) -> list[str]:
    """Record the calls of these ops of the CPU extension itself (the module ops.cpu loads): their names, in order.
    ops' Python wrappers, which may take torch's path instead, run either way."""
    from peft_rwkv7.ops import cpu

    calls: list[str] = []
    ext = cpu._extension()
    for name in names:
        real = getattr(ext, name)
        monkeypatch.setattr(ext, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


def spy_wkv7(monkeypatch, record) -> list:
    """Record record(args, kwargs) for each call of the model's WKV op (model/rwkv7.py's `wkv7`), which still runs."""
    import peft_rwkv7.model.rwkv7 as rwkv7

    seen = []
    real = rwkv7.wkv7

    def spy(*args, **kwargs):
        seen.append(record(args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(rwkv7, "wkv7", spy)
    return seen


def graph_nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes t's graph holds (which ops a forward took)."""
    names, todo, done = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in done:
            continue
        done.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.fixture(scope="session")
def rwkv_pkg():
    """The `rwkv` pip package's independent RWKV-7 (RWKV_V7_ON must be set before import)."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    model_mod = pytest.importorskip("rwkv.model")
    return model_mod


def rwkv_pkg_logits(rwkv_model_mod, pth: Path, tokens: list[int]) -> torch.Tensor:
    """Logits [T, V] from the rwkv package for one sequence (cpu fp32)."""
    m = rwkv_model_mod.RWKV(model=str(pth)[: -len(".pth")], strategy="cpu fp32")
    out, _ = m.forward(list(tokens), None, full_output=True)
    return out.float()


def pytest_addoption(parser):
    parser.addoption("--ui-screenshots", default=None, metavar="DIR",
                     help="the browser tests save their page screenshots here (docs/ui for the README)")
