"""RWKV-7 logits against the `rwkv` pip package, an independent implementation."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.model import load_model, save_model
from tests.conftest import make_model, rwkv_pkg_logits

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
    for b in range(batch.shape[0]):
        expect = rwkv_pkg_logits(rwkv_pkg, path, batch[b].tolist())
        assert logits[b].abs().max() > 0.1  # a real signal, not an all-zero model
        err = (logits[b] - expect).abs().max().item()
        assert err <= 2e-4, f"sequence {b}: max |dlogit| {err}"


def test_bf16_weights_close_to_fp32(tmp_path):
    path = tmp_path / "m.pth"
    save_model(make_model(seed=2), path, dtype=torch.bfloat16)
    idx = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_model(path, dtype=torch.float32)(idx)
        low = load_model(path, dtype=torch.bfloat16)(idx).float()
    # bf16 activations keep ~3 significant digits; the WKV state itself stays fp32.
    assert (low - ref).abs().max() / ref.abs().max() < 0.05


def test_rnn_state_matches_rwkv_package(tmp_path, rwkv_pkg):
    path = tmp_path / "m.pth"
    save_model(make_model(seed=3), path, dtype=torch.float32)
    tokens = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    m = rwkv_pkg.RWKV(model=str(path)[:-4], strategy="cpu fp32")
    _, pkg_state = m.forward(tokens, None, full_output=True)
    ours = load_model(path)
    with torch.no_grad():
        _, state = ours(torch.tensor([tokens]), return_state=True)
    for i, st in enumerate(state):
        assert torch.allclose(st.att_shift[0], pkg_state[3 * i], atol=1e-5)
        assert torch.allclose(st.wkv[0], pkg_state[3 * i + 1], atol=1e-4)
        assert torch.allclose(st.ffn_shift[0], pkg_state[3 * i + 2], atol=1e-5)
