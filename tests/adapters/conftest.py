"""Shared fixtures: a tiny random RWKV-7 saved as .pth, random documents, a few AdamW steps, and
the `rwkv` pip package as the independent oracle for merged checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peft_rwkv7.adapters import trainable_parameters
from peft_rwkv7.adapters.files import read_adapter
from peft_rwkv7.model import RWKV7Config, load_model, new_model, save_model
from tests.fp_oracle import gamma

TINY = dict(n_layer=2, n_embd=64, vocab_size=128, head_size=16)


def make_base(path: Path, seed: int) -> Path:
    """RWKV-LM init plus noise, so no weight is zero (the init zeroes several) and outputs vary."""
    model = new_model(RWKV7Config.new(**TINY), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_model(model, path, dtype=torch.float32)
    return path


@pytest.fixture
def tiny_config() -> RWKV7Config:
    return RWKV7Config.new(**TINY)


@pytest.fixture(scope="session")
def base_path(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "base.pth", seed=1)


@pytest.fixture(scope="session")
def other_base_path(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("other") / "other.pth", seed=2)


@pytest.fixture(scope="session")
def docs() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, TINY["vocab_size"], (n,), generator=g).tolist() for n in (7, 12, 16, 9)]


@pytest.fixture
def load_base(base_path):
    """A fresh fp32 copy of the base model on the reference wkv op (independent of kernel builds)."""
    return lambda path=base_path: load_model(path, wkv_backend="reference")


def train_steps(adapted, steps: int = 3, lr: float = 1e-2, seed: int = 0) -> None:
    """A few AdamW steps on random tokens; asserts that every trainable tensor moved."""
    g = torch.Generator().manual_seed(seed)
    params = trainable_parameters(adapted)
    before = [p.detach().clone() for _, p in params]
    opt = torch.optim.AdamW([p for _, p in params], lr=lr)
    adapted.train()
    for _ in range(steps):
        x = torch.randint(0, TINY["vocab_size"], (2, 17), generator=g)
        logits = adapted(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, p), b in zip(params, before):
        assert not torch.equal(p.detach(), b), f"{name} did not train"
    adapted.eval()


def merge_rounding(run_dir, base_path, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per element, a bound on |one merge - another| from the roundings the two formulas make (written
    for the in-memory merge against the file merge; any two orders of the same sums are within it).

    Both add the same exact terms, base W + s B A (PiSSA: the file's rank-2r [B, -B0] [A; A0], memory
    the residual fl(W - s B0 A0) held since attach, plus s B A), in different orders. Each r-term dot
    product rounds r times (Higham gamma_r on s |B| |A|), each add once: memory gamma_(r+1) + gamma_r + u,
    the file gamma_(2r+1), together <= gamma_(4r+3) times S = |W| + |merged| + s |B_2r| |A_2r|, which
    bounds every summand and partial sum. Tensors copied as they are (full parts, states) get 0."""
    af, base = read_adapter(run_dir), torch.load(base_path)
    out = {}
    for key, w in merged.items():
        module = key[: -len(".weight")]
        if f"{module}.lora_A" not in af.tensors and f"{module}.disha" not in af.tensors and af.method.quant == "none":
            out[key] = torch.zeros_like(w)
            continue
        scale = w.abs() + base[key].float().abs()
        if f"{module}.lora_A" in af.tensors:
            a, b = af.tensors[f"{module}.lora_A"], af.tensors[f"{module}.lora_B"]
            scale = scale + af.lora_scale * (b.abs() @ a.abs())
        out[key] = gamma(4 * af.method.r + 3) * scale
    return out


@pytest.fixture
def train():
    return train_steps


def rwkv_package(path: Path):
    os.environ["RWKV_V7_ON"] = "1"  # the rwkv package reads this at import
    from rwkv.model import RWKV

    return RWKV(model=str(path)[: -len(".pth")], strategy="cpu fp32")


def rwkv_package_loss(path: Path, docs: list[list[int]], time_states: list[torch.Tensor] | None = None) -> float:
    """Mean NLL over every token of every doc scored as [0] + doc, by the `rwkv` package, starting
    from `time_states` ([H, N, N] per layer) as RNN state when given."""
    model = rwkv_package(path)
    total, n = 0.0, 0
    for d in docs:
        state = None
        if time_states is not None:
            state = []
            for ts in time_states:
                state += [torch.zeros(TINY["n_embd"]), ts.clone().float(), torch.zeros(TINY["n_embd"])]
        logits, _ = model.forward([0] + d[:-1], state, full_output=True)
        total += F.cross_entropy(logits.float(), torch.tensor(d), reduction="sum").item()
        n += len(d)
    return total / n


@pytest.fixture
def rwkv_loss():
    return rwkv_package_loss


@pytest.fixture
def rwkv_model():
    return rwkv_package
