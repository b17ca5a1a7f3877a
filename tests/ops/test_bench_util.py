"""scripts/bench_util.GemmPass: the FLOP it times are the step's big GEMMs, and it keeps no memory of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def bench_util(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_util

    yield bench_util
    sys.modules.pop("bench_util", None)


@pytest.mark.parametrize("method", ["state", "lora"])
def test_gemm_pass_counts_the_big_gemms_and_holds_only_the_models_weights(bench_util, method):
    from peft_rwkv7.adapters import attach
    from peft_rwkv7.model import RWKV7Config, new_model

    torch.manual_seed(0)
    C, V, L, rows = 256, 32768, 2, 1000  # 1000 rows: the head runs in chunks of 1024 (2^25 / V), one of 1000
    model = attach(new_model(RWKV7Config.new(L, C, V, head_size=64)), bench_util.method_config(method))
    p = bench_util.GemmPass(model, rows, torch.float32)
    # per layer: receptance, key, value, output (C x C), ffn key (4C x C), ffn value (C x 4C); the head V x C
    want = 4 * rows * (L * (4 * C * C + 2 * 4 * C * C) + V * C)
    assert p.flop == want
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    held = [t for item in p.work for t in item if isinstance(t, torch.Tensor)]
    assert held and all(t.untyped_storage().data_ptr() in params for t in held)  # the model's own weights
    # each of them, once: every layer's GEMMs multiply by its own weights, as a step's do (one weight per shape
    # stays in cache between calls, a rate no step gets)
    assert len({t.untyped_storage().data_ptr() for t in held}) == len(held) == 6 * L + 1
    assert all(n == 1 for _, _, n, _, head in p.work if not head)
    assert p.seconds() > 0


def test_the_head_runs_in_the_fused_losss_chunks(bench_util, monkeypatch):
    from peft_rwkv7.model import RWKV7Config, new_model
    from peft_rwkv7.ops.linear_ce import CHUNK_ELEMENTS, VOCAB_BLOCK

    assert bench_util.HEAD_CHUNK_ELEMENTS == CHUNK_ELEMENTS
    # the layout of the work, not its timing: no warm-up pass (bf16 GEMMs at V 65536 take a minute on a CPU
    # without native bf16)
    monkeypatch.setattr(bench_util.GemmPass, "seconds", lambda self: 0.0)
    model = new_model(RWKV7Config.new(1, 256, 65536, head_size=64))
    p = bench_util.GemmPass(model, 4096, torch.float32)
    head = [(r, n, cols) for w, r, n, cols, is_head in p.work if is_head]
    # 8 chunks of 512 rows, as linear_cross_entropy makes them at V 65536, in blocks of VOCAB_BLOCK columns
    # (its online path: fp32, a frozen head)
    assert head == [(512, 8, VOCAB_BLOCK)]
    assert bench_util.HEAD_VOCAB_BLOCK == VOCAB_BLOCK
    for dtype, full in ((torch.bfloat16, False), (torch.float32, True)):  # the chunk path: whole rows of logits
        p = bench_util.GemmPass(model, 1024, dtype, weight_grads=full)
        assert [(r, n, cols) for w, r, n, cols, is_head in p.work if is_head] == [(512, 2, 65536)]


def test_a_failed_child_is_reported_by_what_went_wrong(bench_util):
    """bench_train.py's row for a child that died: a C++ abort's `what():` line (an AMX Xeon's bf16 rows once
    said only `frame #44: _start + 0x21`), a Python exception's last line."""
    abort = ("terminate called after throwing an instance of 'c10::Error'\n"
             "  what():  d INTERNAL ASSERT FAILED at \"Allocator.h\":214, please report a bug to PyTorch.\n"
             "Exception raised from raw_deallocate at Allocator.h:214 (most recent call first):\n"
             "frame #0: c10::Error::Error() + 0x9d\nframe #44: _start + 0x21 (0x55d4727ed081 in python)\n")
    got = bench_util.child_error(abort)
    assert "terminate called" in got and "INTERNAL ASSERT FAILED" in got and "frame" not in got
    py = "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: out of memory\n"
    assert bench_util.child_error(py) == "RuntimeError: out of memory"
    assert bench_util.child_error("") == "no output"


def test_the_pass_makes_the_layers_products_in_row_chunks_where_the_model_does(bench_util):
    """row_chunks=True (bench_train passes the model's setting, ops/rowsplit.py): each layer's forward and input
    gradient products of 1000 rows in 2 calls of 500, as the model makes them; the head stays in its own
    chunks; the FLOP are the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from peft_rwkv7.model import RWKV7Config, new_model

    class Rows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.linear):
                self.rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    model = new_model(RWKV7Config.new(1, 512, 1024, head_size=64))
    plain = bench_util.GemmPass(model, 1000, torch.bfloat16)
    chunked = bench_util.GemmPass(model, 1000, torch.bfloat16, row_chunks=True)
    assert chunked.flop == plain.flop
    with Rows() as seen:
        chunked.seconds()
    # 6 weights of the layer, forward and backward, 2 chunks each; the head (1024 x 512): whole rows
    assert sorted(seen.rows) == sorted([500] * 24 + [1000] * 2)


def test_the_bound_counts_the_adapter_factors_as_trained_weights(bench_util):
    """Issue 23's rule: 4 FLOP per frozen matmul weight per token, 6 per trained one. LoRA r16's factors on the
    six projections of a block add 6 r (in + out) a token each; the frozen-only count is the same model's
    without them, as for state tuning; full fine-tuning counts every weight at 6."""
    from peft_rwkv7.adapters import attach
    from peft_rwkv7.model import RWKV7Config, new_model

    C, V, L, r, tokens = 256, 1024, 2, 16, 100
    counts = {}
    for method in ("state", "lora", "full"):
        torch.manual_seed(0)
        model = attach(new_model(RWKV7Config.new(L, C, V, head_size=64)), bench_util.method_config(method))
        counts[method] = bench_util.step_flop(model, tokens, full=method == "full")
    state, lora, full = counts["state"], counts["lora"], counts["full"]
    assert state[0] == state[1] and full[0] == full[1]  # no adapter factors
    assert lora[1] == state[1] and 2 * full[1] == 3 * state[1]  # the same frozen weights; 6 FLOP against 4
    # receptance, key, value, output (C -> C), the FFN's key (C -> 4C) and value (4C -> C)
    per_block = 4 * (C + C) + (C + 4 * C) + (4 * C + C)
    assert lora[0] - lora[1] == 6 * r * per_block * L * tokens
    # the frozen count holds at least the big weights (the projections and the head) at 4 FLOP a token
    assert state[1] >= 4 * tokens * (L * 12 * C * C + V * C)
