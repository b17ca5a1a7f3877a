"""RWKV-7 logits against the `rwkv` pip package, an independent implementation."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.model import load_model, save_model
from tests.conftest import make_model, rwkv_pkg_logits
from tests.fp_oracle import UBF16, LowPrecisionRoundings, forward_rounding, fp64_forward, logits64, rounding_bounds

SHAPES = [
    # head 16, layer-0 v0/v1/v2 present, low-rank and FFN widths unlike 0.1B, fp32 file
    dict(n_layer=2, n_embd=64, head_size=16, vocab_size=97, dim_ffn=160, d_decay=24, d_aaa=40, d_mv=16, d_gate=48,
         layer0_v=True, file_dtype=torch.float32),
    # head 32, layer-0 v0/v1/v2 absent, bf16 file
    dict(n_layer=3, n_embd=96, head_size=32, vocab_size=211, dim_ffn=256, d_decay=32, d_aaa=32, d_mv=32, d_gate=64,
         layer0_v=False, file_dtype=torch.bfloat16),
    # head 64, default widths, bf16 file
    dict(n_layer=2, n_embd=128, head_size=64, vocab_size=300, layer0_v=True, file_dtype=torch.bfloat16),
]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=["h16-fp32", "h32-nov0-bf16", "h64-bf16"])
def test_logits_match_rwkv_package(tmp_path, rwkv_pkg, shape):
    shape = dict(shape)
    file_dtype = shape.pop("file_dtype")
    path = tmp_path / "model.pth"
    save_model(make_model(seed=1, **shape), path, dtype=file_dtype)
    sd = torch.load(path, weights_only=True)
    assert ("blocks.0.att.v0" in sd) == shape["layer0_v"]

    ours = load_model(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, shape["vocab_size"], (3, 23), generator=g)  # B > 1, odd T
    with torch.no_grad():
        logits = ours(batch)
    # Both fp32 implementations against the fp64 forward of the same weights (the file's, exact in fp64),
    # each within the fp32 forward's rounding bound; the package's logits agree only if our math is its.
    oracle = logits64(ours, batch)
    tol = forward_rounding(ours.config, batch.shape[1]) * oracle.abs().max().item()
    assert (logits.double() - oracle).abs().max() <= tol
    for b in range(batch.shape[0]):
        expect = rwkv_pkg_logits(rwkv_pkg, path, batch[b].tolist())
        assert logits[b].abs().max() > 0.1  # a real signal, not an all-zero model
        err = (expect.double() - oracle[b]).abs().max().item()
        assert err <= tol, f"sequence {b}: rwkv package's max |dlogit| from fp64 {err:.2e} > {tol:.2e}"


def test_bf16_weights_close_to_fp32(tmp_path):
    path = tmp_path / "m.pth"
    save_model(make_model(seed=2), path, dtype=torch.bfloat16)
    idx = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_model(path, dtype=torch.float32)(idx)
    low_model = load_model(path, dtype=torch.bfloat16)
    for p in low_model.parameters():
        p.requires_grad_(True)  # for the roundings' gradients below
    # The same weights (the file is bf16): the difference is the bf16 forward's rounding. Compared on a
    # fixed random projection of the logits, whose bf16 roundings (each <= 2^-8 relative) are bounded to
    # first order with their gradients; plus the fp32 forward's own rounding.
    proj = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sites = LowPrecisionRoundings(torch.bfloat16)
    with sites:
        low = low_model(idx)
    (low.double() * proj).sum().backward()
    worst, likely = rounding_bounds(sites.terms(), UBF16)
    fp32 = forward_rounding(low_model.config, idx.shape[1]) * ref.abs().max().item() * proj.abs().sum().item()
    gap = ((low.detach().double() - ref.double()) * proj).sum().abs().item()
    assert 0 < gap <= likely + fp32, (gap, likely, worst)


def test_rnn_state_matches_rwkv_package(tmp_path, rwkv_pkg):
    path = tmp_path / "m.pth"
    save_model(make_model(seed=3), path, dtype=torch.float32)
    tokens = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    m = rwkv_pkg.RWKV(model=str(path)[:-4], strategy="cpu fp32")
    _, pkg_state = m.forward(tokens, None, full_output=True)
    ours = load_model(path)
    with torch.no_grad():
        _, state = ours(torch.tensor([tokens]), return_state=True)
        with fp64_forward():
            _, exact = ours.double()(torch.tensor([tokens]), return_state=True)
    # Each state tensor of both fp32 implementations within the forward's rounding bound (relative to
    # the tensor's largest entry) of the fp64 forward of the same weights.
    rel = forward_rounding(ours.config, len(tokens))
    for i, (st, ex) in enumerate(zip(state, exact)):
        for j, (mine, want) in enumerate(zip(st, ex)):
            tol = rel * want.abs().max().item()
            assert (mine[0].double() - want[0]).abs().max() <= tol, (i, j)
            assert (pkg_state[3 * i + j].double() - want[0]).abs().max() <= tol, (i, j)
