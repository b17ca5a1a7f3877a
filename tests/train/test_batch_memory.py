"""A micro-batch that cannot fit in memory stops before the first step, naming train.micro_bsz (found by fuzzing:
`train.micro_bsz: 10**8` warned that samples repeat, then spent minutes building the batch before the allocator
failed or the kernel killed the process). Only what a batch surely holds is counted, so a batch that fits is never
refused: its ids and labels, and for packed windows (every row runs ctx_len tokens) one residual stream per layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peft_rwkv7.errors import UserError
from peft_rwkv7.model import RWKV7Config
from peft_rwkv7.train import memory
from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
CFG = RWKV7Config.new(n_layer=3, n_embd=64, vocab_size=100, head_size=16)


def test_a_micro_batch_larger_than_memory_is_refused_before_the_first_step(tiny_world, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train_from_cli(str(ROOT / "recipes/lora.yaml"), tiny_overrides(tiny_world, out, **{"train.micro_bsz": 10**8}))
    text = str(e.value)
    assert text.startswith("train.micro_bsz: a micro-batch of 100000000 samples of 32 tokens needs over") and \
        text.endswith("(raise train.grad_accum for the same batch)") and "\n" not in text, text
    assert not (out / "log.jsonl").exists() and not (out / "adapter.safetensors").exists()


@pytest.fixture
def free(monkeypatch):
    """available_memory per device type, as the test sets it."""
    mem = {}
    monkeypatch.setattr(memory, "available_memory", lambda device: mem.get(device.type))
    return mem


def test_the_count_is_the_batch_and_for_packed_windows_the_residual_stream(free):
    rows, ctx = 10, 50
    batch = rows * ctx * 16  # ids and labels, int64
    acts = rows * ctx * 64 * 2 * 4  # [rows, ctx, 64] in 2 bytes, for 3 layers and the embeddings
    free["cpu"] = batch + acts
    memory.check_batch_memory(CFG, rows, ctx, ctx, torch.device("cpu"))  # exactly fits
    free["cpu"] = batch + acts - 1
    with pytest.raises(UserError, match=r"10 samples of 50 tokens needs over 0\.0 GiB \(cpu\)"):
        memory.check_batch_memory(CFG, rows, ctx, ctx, torch.device("cpu"))
    memory.check_batch_memory(CFG, rows, ctx, None, torch.device("cpu"))  # pad: the tail is cut, only the batch
    free["cpu"] = batch - 1
    with pytest.raises(UserError):
        memory.check_batch_memory(CFG, rows, ctx, None, torch.device("cpu"))
    # infctx: the activations of one chunk, the batch of the whole context
    free["cpu"] = batch + acts // 5
    memory.check_batch_memory(CFG, rows, ctx, ctx // 5, torch.device("cpu"))


def test_on_a_gpu_the_activations_count_against_its_memory_and_the_batch_against_the_cpu_s(free):
    rows, ctx = 10, 50
    batch, acts = rows * ctx * 16, rows * ctx * 64 * 2 * 4
    free.update(cpu=batch, cuda=acts)
    memory.check_batch_memory(CFG, rows, ctx, ctx, torch.device("cuda"))
    free["cuda"] = acts - 1
    with pytest.raises(UserError, match=r"\(cuda\)"):
        memory.check_batch_memory(CFG, rows, ctx, ctx, torch.device("cuda"))
    free.update(cpu=batch - 1, cuda=acts)
    with pytest.raises(UserError, match=r"\(cpu\)"):
        memory.check_batch_memory(CFG, rows, ctx, ctx, torch.device("cuda"))


def test_unknown_free_memory_checks_nothing(free):
    memory.check_batch_memory(CFG, 10**12, 10**6, 10**6, torch.device("cpu"))


def test_the_free_memory_is_linux_s_available_memory():
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo")
    line = next(ln for ln in meminfo.read_text().splitlines() if ln.startswith("MemAvailable:"))
    kib = int(line.split()[1])
    got = memory.available_memory(torch.device("cpu"))
    assert abs(got - kib * 1024) < 2**30  # read a moment later: within what the machine did meanwhile
