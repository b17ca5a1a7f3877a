"""bf16 CPU products in row chunks (ops/rowsplit.py): which calls are chunked, that each chunk is a separate
product written in place, that the results (forward, x's and the weight's gradients) are the exact products
within bf16 GEMM rounding, and that the model's Linear and the fused LoRA layer take them when switched on."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peft_rwkv7.ops.rowsplit import CHUNK_ROWS, ZONE, chunked_linear, mm_rows, row_chunks
from tests.conftest import make_model
from tests.fp_oracle import UBF16, gamma

BF = torch.bfloat16


class MmRows(TorchDispatchMode):
    """Records the row count of every product's first matrix: aten.mm's, and aten.addmm's (LoRA's layer adds its base
    product onto the thin one's, adapters/fused_lora.py)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.mm:
            self.rows.append(args[0].shape[0])
        elif func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.rows.append(args[1].shape[0])
        return func(*args, **(kwargs or {}))


def test_which_products_are_chunked():
    w, thin = torch.empty(3072, 768), torch.empty(768, 64)
    lo, hi = ZONE
    assert [row_chunks(n, w) for n in (1, 512, lo, lo + 1, 1024, 1025, 1536, 1537, hi - 1, hi, 4096)] == \
        [1, 1, 1, 2, 2, 3, 3, 4, 4, 1, 1]
    assert row_chunks(1024, thin) == row_chunks(1024, thin.t()) == 1  # low-rank products: one call
    assert all(-(-n // row_chunks(n, w)) <= CHUNK_ROWS for n in range(lo + 1, hi))


def bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |bf16(fl32(a @ b)) - a @ b|: the fp32 sum's rounding (gamma_K of the absolute
    products) and the final rounding to bf16 (u of the result, with the sum's error)."""
    a64, b64 = a.double(), b.double()
    exact, absolute = a64 @ b64, a64.abs() @ b64.abs()
    return UBF16 * (exact.abs() + gamma(a.shape[1]) * absolute) + gamma(a.shape[1]) * absolute


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_chunked_linear_is_the_product_and_its_gradients(autocast):
    g = torch.Generator().manual_seed(0)
    rows, k, o = 1000, 768, 1024  # 2 chunks of 500
    dt = torch.float32 if autocast else BF
    x = torch.randn(rows, k, generator=g).to(dt).requires_grad_()
    w = (torch.randn(o, k, generator=g) * 0.05).to(dt).requires_grad_()
    gy = torch.randn(rows, o, generator=g).to(BF)
    with MmRows() as seen, torch.autocast("cpu", dtype=BF, enabled=autocast):
        y = chunked_linear(x.view(2, 500, k), w)  # any leading shape
        assert y is not None and y.shape == (2, 500, o) and y.dtype == BF
        y.backward(gy.view(2, 500, o))
    assert seen.rows == [500, 500, 500, 500, o]  # forward, x's gradient in chunks; the weight's one call
    xb, wb = x.detach().to(BF), w.detach().to(BF)  # autocast's casts are exact for these (bf16 values)
    assert ((y.detach().reshape(rows, o).double() - xb.double() @ wb.double().t()).abs() <= bound(xb, wb.t())).all()
    assert ((x.grad.double() - gy.double() @ wb.double()).abs() <= bound(gy, wb)).all()
    assert x.grad.dtype == dt and w.grad.dtype == dt
    assert ((w.grad.double() - gy.double().t() @ xb.double()).abs() <= bound(gy.t(), xb)).all()


def test_mm_rows_writes_each_chunk_in_place():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1300, 64, generator=g).to(BF), torch.randn(64, 32, generator=g).to(BF)
    with MmRows() as seen:
        out = mm_rows(a, b, 3)
    assert seen.rows == [434, 433, 433]
    assert torch.equal(out, torch.cat([torch.mm(p, b) for p in a.tensor_split(3)]))  # each row: its own chunk's


def test_no_chunks_outside_the_zone_or_bf16():
    w = torch.randn(1024, 768).to(BF)
    assert chunked_linear(torch.randn(512, 768).to(BF), w) is None  # too few rows
    assert chunked_linear(torch.randn(2048, 768).to(BF), w) is None  # enough for one call
    assert chunked_linear(torch.randn(1000, 768), w.float()) is None  # fp32: MKL has no hole
    with torch.autocast("cpu", dtype=torch.float16):
        assert chunked_linear(torch.randn(1000, 768), w.float()) is None


def test_the_model_and_the_lora_layer_take_row_chunks():
    """RWKV7.set_bf16_row_chunks(True): under bf16 autocast, a 700-token sequence's products through the
    block's weights (512 and 2048 wide) are made in chunks of 350 rows, forward and backward, the LoRA layers'
    base products too; the loss and the LoRA factors' gradients stay those of whole calls within bf16
    rounding through the model (a few units of 2^-8 relative, far below what a wrong chunk would change)."""
    from peft_rwkv7.adapters import MethodConfig, attach

    model = attach(make_model(seed=2, n_layer=1, n_embd=512, head_size=64, vocab_size=97),
                   MethodConfig(kind="lora", r=4, alpha=8, target_modules=["att.receptance", "att.key", "att.value"]))
    idx = torch.randint(0, 97, (1, 700), generator=torch.Generator().manual_seed(0))

    def run(on: bool):
        for m in model.modules():
            if hasattr(m, "set_bf16_row_chunks"):
                m.set_bf16_row_chunks(on)
        model.zero_grad(set_to_none=True)
        with MmRows() as seen, torch.autocast("cpu", dtype=BF):
            loss = model(idx).float().logsumexp(-1).mean()
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return loss.item(), grads, seen.rows

    loss0, grads0, rows0 = run(False)
    loss1, grads1, rows1 = run(True)
    assert 350 not in rows0 and rows0.count(700) > 0
    # each in 2 chunks: the forward of r, k, v (LoRA layers), output, FFN key and value (Linear), and x's gradient
    # through output, FFN key and value (r, k and v read the frozen embedding's rows: no gradient wanted there);
    # the head (97 outputs) is one call
    assert rows1.count(350) == 2 * (6 + 3), rows1
    assert abs(loss1 - loss0) <= 8 * UBF16 * abs(loss0)
    for a, b in zip(grads1, grads0, strict=True):
        assert (a - b).abs().max() <= 8 * UBF16 * b.abs().max()


def test_a_weight_deepspeed_partitions_takes_one_call():
    """ZeRO-3's weights (ops.partitioned: a `ds_id` on the parameter) are whole only inside their module's own
    call, so ops.linear makes their product as F.linear does, one call, even with row chunks switched on."""
    from peft_rwkv7.ops import linear

    x, w = torch.randn(1000, 768).to(BF), torch.nn.Parameter(torch.randn(1024, 768).to(BF), requires_grad=False)
    with MmRows() as seen:
        linear(x, w, row_chunks=True)
    assert seen.rows == [500, 500]
    w.ds_id = 7
    with MmRows() as seen:
        y = linear(x, w, row_chunks=True)
    assert 500 not in seen.rows and y.shape == (1000, 1024)
