"""What mutation testing of ops/rowsplit.py found untested (scripts/mutation.sh rowsplit, docs/mutation.md): a
weight the chunks cannot take is left to the caller, and the chunked node keeps and computes only what a
gradient asked for needs (x is kept for the weight's gradient only, x's gradient made only where wanted)."""

from __future__ import annotations

import torch

from peft_rwkv7.ops.rowsplit import chunked_linear
from tests.ops.test_rowsplit import BF, MmRows


def test_a_weight_that_is_not_a_matrix_or_does_not_fit_is_left_to_the_caller():
    """chunked_linear answers None (the caller's F.linear then computes, or raises its own error) for a 1-D weight
    (F.linear takes one) and for a weight whose inputs are not x's features, even at a row count in the zone."""
    x = torch.randn(700, 768).to(BF)
    assert chunked_linear(x, torch.randn(768).to(BF)) is None
    assert chunked_linear(x, torch.randn(1024, 512).to(BF)) is None
    assert chunked_linear(x, torch.randn(1024, 768).to(BF)) is not None  # the same rows and a fitting weight: chunks


def _saved(y: torch.Tensor) -> tuple:
    (node, _), = y.grad_fn.next_functions  # y is a view of the node's [rows, out] result
    assert type(node).__name__ == "_RowChunkedLinearBackward"
    return node.saved_tensors


def test_the_node_keeps_x_only_for_the_weights_gradient():
    x = torch.randn(700, 768).to(BF).requires_grad_()
    frozen = torch.randn(1024, 768).to(BF)
    kept = _saved(chunked_linear(x, frozen))
    assert kept[0] is None and len(kept) == 2  # x is not kept: nothing asks for the weight's gradient
    trained = torch.randn(1024, 768).to(BF).requires_grad_()
    kept = _saved(chunked_linear(x.detach(), trained))
    assert kept[0] is not None and torch.equal(kept[0], x.detach())


def test_the_backward_makes_only_the_gradients_asked_for():
    """x frozen and the weight trained (full fine-tuning of a first layer): one product, the weight's gradient
    over all 700 rows at once; no product for x's gradient."""
    x = torch.randn(700, 768).to(BF)
    w = torch.randn(1024, 768).to(BF).requires_grad_()
    y = chunked_linear(x, w)
    with MmRows() as seen:
        y.backward(torch.ones_like(y))
    assert seen.rows == [1024] and w.grad is not None  # g^T x: [1024, 700] x [700, 768]
