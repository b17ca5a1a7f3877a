"""adapters/inits.py: the OLoRA, LoftQ and EVA starts.

Expectations: HF peft's own LoRA layer (OLoRA) and EVA (`get_eva_state_dict` on a plain nn.Sequential),
torch.linalg.qr and fp64 SVDs (the formulas computed another way), and LoftQ's defining property (the
alternation lowers ||W - Q - s B A|| below plain quantization's error). Tolerances: Higham's gamma_n for
matmuls; for singular subspaces Wedin's theorem, angle <= ||E|| / gap, with an SVD's backward error ||E|| <=
gamma_(n+d) ||X||_F (Householder bidiagonalisation of an n x d matrix, a modest multiple of u ||X||).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peft_rwkv7.adapters.inits import collect_inputs, eva_components, loftq_start, olora_start
from peft_rwkv7.errors import UserError
from peft_rwkv7.model import RWKV7Config, new_model
from tests.adapters.conftest import TINY
from tests.fp_oracle import U32, gamma

R, ALPHA = 4, 8.0
S = ALPHA / R
D = 64


def weight(seed: int = 0, shape=(D, D)) -> torch.Tensor:
    return 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def peft_olora_layer(w: torch.Tensor):
    """peft's LoRA layer with init_lora_weights="olora" on a Linear holding w (a copy)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    lc = LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights="olora")
    return PeftLoraLinear(linear, "default", config=lc, r=R, lora_alpha=ALPHA)


# ---------------------------------------------------------------- OLoRA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(D, D), (48, D), (D, 40)])
def test_olora_factors_are_peft_and_the_thin_qr(dtype, shape):
    """A0 = R[:r], B0 = Q[:, :r] of W = QR in fp32, bitwise peft's factors; peft's base keeps
    fl(W - fl((alpha/r) B0) @ A0) in the weight's dtype, which is what _apply_pissa_residual forms.
    On a bf16 layer peft forms that residual with the fp32 factors and then stores the factors in bf16:
    olora_start keeps them fp32 (what the residual was formed with; adapters train in fp32)."""
    w = weight(1, shape).to(dtype)
    w_before = w.clone()
    a0, b0 = olora_start(w, R, ALPHA)
    assert torch.equal(w, w_before), "olora_start changed its input"
    assert a0.dtype == b0.dtype == torch.float32
    assert a0.shape == (R, shape[1]) and b0.shape == (shape[0], R)
    fp32_layer = peft_olora_layer(w.float())
    assert torch.equal(a0, fp32_layer.lora_A["default"].weight)
    assert torch.equal(b0, fp32_layer.lora_B["default"].weight)
    layer = peft_olora_layer(w)
    assert torch.equal(a0.to(dtype), layer.lora_A["default"].weight)
    assert torch.equal(b0.to(dtype), layer.lora_B["default"].weight)
    q, r = torch.linalg.qr(w.float())
    assert torch.equal(a0, r[:R]) and torch.equal(b0, q[:, :R])
    residual = (w.float() - (S * b0) @ a0).to(dtype)  # methods._apply_pissa_residual
    assert torch.equal(layer.base_layer.weight, residual)


def test_olora_layer_computes_the_original_linear():
    """peft's OLoRA layer (residual + (alpha/r) B0 A0) outputs what the original Linear does, within
    rounding: residual fl(W - fl(s B0) A0) <= gamma_(r+2), the base and LoRA matmuls gamma_(in) and
    gamma_(in+r+1), the final add u; the original's own matmul gamma_in."""
    w = weight(2)
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(3))
    a0, b0 = olora_start(w, R, ALPHA)
    layer = peft_olora_layer(w)
    layer.eval()
    with torch.no_grad():
        got, want = layer(x), nn.functional.linear(x, w)
    xa, wa, ra = x.abs().double(), w.abs().double(), layer.base_layer.weight.abs().double()
    lora = S * (xa @ a0.abs().double().T) @ b0.abs().double().T
    bound = (
        gamma(D + R + 3) * (xa @ ra.T + lora)
        + gamma(R + 2) * xa @ (wa + S * b0.abs().double() @ a0.abs().double()).T
        + gamma(D) * xa @ wa.T
    )
    assert ((got.double() - want.double()).abs() <= bound).all()
    assert not torch.equal(layer.base_layer.weight, w)  # the start really moved weight out of the base


def test_olora_rank_out_of_range():
    with pytest.raises(UserError, match="method.r"):
        olora_start(weight(0, (D, 3)), R, ALPHA)


# ---------------------------------------------------------------- LoftQ


def _quant_error(w: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, quant: str, dtype) -> float:
    """||W - (roundtrip(fl_dtype(W - s B0 A0)) + s B0 A0)||_F in fp64: what the start leaves to train."""
    from peft_rwkv7.adapters.quant import roundtrip

    wf = w.to(dtype).float()
    delta = (S * b0) @ a0
    base = roundtrip((wf - delta).to(dtype), quant)
    return (wf.double() - base.double() - delta.double()).norm().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_loftq_error_falls_with_iterations_below_plain_quantization(quant, dtype):
    """LoftQ's alternation minimises ||W - Q - s B A||: the error the start leaves does not grow from one
    iteration count to the next and is below quantizing W alone (a property of alternating projections;
    blockwise absmax quantization is not an exact projection, so this is measured, not guaranteed)."""
    pytest.importorskip("bitsandbytes")
    from peft_rwkv7.adapters.quant import roundtrip

    w = weight(4).to(dtype)
    plain = (w.double() - roundtrip(w, quant).double()).norm().item()
    errors = [_quant_error(w, *loftq_start(w, R, S, quant, it, dtype), quant, dtype) for it in range(1, 6)]
    assert errors[0] < plain
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]  # the alternation does something beyond the first fit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0, 1, 2])
def test_loftq_iteration_fits_the_best_rank_r_approximation(t, dtype):
    """Iteration t + 1 is Algorithm 1's step from the start of t iterations (A = B = 0 for t = 0):
    Q = roundtrip(fl_dtype(W - s B_t A_t)), then s B A is the best rank-r approximation of W - Q
    (Eckart-Young: error sqrt(sum of the trailing fp64 squared singular values), to within fp32 SVD and
    matmul rounding), split like PiSSA: A A^T = B^T B = diag(S_r / s)."""
    pytest.importorskip("bitsandbytes")
    from peft_rwkv7.adapters.quant import roundtrip

    w = weight(5).to(dtype).float()
    a_t, b_t = loftq_start(w, R, S, "nf4", t, dtype) if t else (torch.zeros(R, D), torch.zeros(D, R))
    m = (w - roundtrip((w - (S * b_t) @ a_t).to(dtype), "nf4")).double()
    a, b = (x.double() for x in loftq_start(w, R, S, "nf4", t + 1, dtype))
    sv = torch.linalg.svdvals(m)
    best = sv[R:].square().sum().sqrt().item()
    got = (m - S * b @ a).norm().item()
    tol = gamma(2 * D + R) * m.norm().item()
    assert best - tol <= got <= best + tol
    want = torch.diag(sv[:R] / S)
    assert torch.allclose(a @ a.T, want, rtol=0, atol=tol) and torch.allclose(b.T @ b, want, rtol=0, atol=tol)


def test_loftq_is_deterministic_and_reads_the_weight_as_training_holds_it():
    """Two calls give bitwise the same start; an fp32 weight for a bf16 base is the bf16 weight."""
    pytest.importorskip("bitsandbytes")
    w = weight(6)
    first, second = loftq_start(w, R, S, "nf4", 3, torch.float32), loftq_start(w, R, S, "nf4", 3, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    from_fp32 = loftq_start(w, R, S, "nf4", 2, torch.bfloat16)
    from_bf16 = loftq_start(w.bfloat16(), R, S, "nf4", 2, torch.bfloat16)
    assert all(torch.equal(x, y) for x, y in zip(from_fp32, from_bf16))


def test_loftq_bad_input():
    with pytest.raises(UserError, match="method.quant"):
        loftq_start(weight(0), R, S, "none", 1, torch.float32)
    with pytest.raises(UserError, match="at least 1"):
        loftq_start(weight(0), R, S, "nf4", 0, torch.float32)


# ---------------------------------------------------------------- EVA

SIGMAS = [8.0, 6.0, 4.0, 3.0]  # well separated top-r spread, then a floor of noise
NOISE = 0.05


def activations(seed: int, n: int = 256) -> torch.Tensor:
    """[n, D] rows with principal spreads SIGMAS along a random orthonormal basis, noise NOISE elsewhere,
    and a mean offset (which PCA must remove)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    spread = torch.tensor(SIGMAS + [NOISE] * (D - R))
    return (torch.randn(n, D, generator=g) * spread) @ basis.T + torch.randn(D, generator=g)


def pca64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 singular values and right singular vectors of the centered rows, peft's sign convention."""
    x = x.double()
    _, sv, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    sign = torch.sign(vh[torch.arange(len(vh)), vh.abs().argmax(1)])
    return sv, vh * sign[:, None]


def subspace_tol(x: torch.Tensor, sv: torch.Tensor) -> float:
    """Wedin: an fp32 SVD is exact for X + E, ||E|| <= gamma_(n+d) ||X||_F (plus the centering's 2u), so each
    singular vector moves by <= sqrt(2) ||E|| / gap, the gap the smallest between the top r + 1 values."""
    gap = (sv[:R] - sv[1 : R + 1]).min().item()
    return 2**0.5 * gamma(sum(x.shape) + 2) * x.double().norm().item() / gap


def test_eva_components_are_the_principal_directions():
    x = activations(8)
    a = eva_components(x, R)
    assert a.shape == (R, D) and a.dtype == torch.float32
    sv, vh = pca64(x)
    assert (a.double() - vh[:R]).abs().max().item() <= subspace_tol(x, sv)


def test_eva_matches_peft_get_eva_state_dict():
    """peft's EVA (rho=1: rank r everywhere) on nn.Sequential(Linear, Linear), the first an orthogonal map
    (so the second layer's inputs keep the spread gap), against collect_inputs + eva_components on the same
    batches. peft's randomized SVD (q = 2r, 4 power iterations) adds an angle ~ (s_(2r+1)/s_r)^9 times
    the start's conditioning (sqrt(n) here); its incremental PCA over the repeated batch is exact in the
    top r (the earlier components are eigenvectors of the stacked covariance)."""
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    x = activations(9)
    seq = nn.Sequential(nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False))
    with torch.no_grad():
        seq[0].weight.copy_(torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(10)))[0])
    batches = [x.reshape(4, -1, D)]
    lc = LoraConfig(r=R, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0), target_modules=["0", "1"])
    theirs = get_eva_state_dict(
        seq, batches, peft_config=lc, forward_fn=lambda m, b: m(b), prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None, show_progress_bar=False,
    )  # fmt: skip
    inputs = collect_inputs(seq, ["0", "1"], batches, max_tokens=10**6)
    assert torch.equal(inputs["0"], x)
    for name in ("0", "1"):
        xi = inputs[name]
        sv, _ = pca64(xi)
        randomized = len(xi) ** 0.5 * (sv[2 * R] / sv[R - 1]).item() ** 9
        tol = 2 * subspace_tol(xi, sv) + randomized
        ours = eva_components(xi, R)
        assert (ours - theirs[name]).abs().max().item() <= tol, name
        assert (ours.T @ ours - theirs[name].T @ theirs[name]).abs().max().item() <= 2 * tol


def test_eva_too_few_tokens():
    with pytest.raises(UserError, match="calibration tokens"):
        eva_components(activations(0, n=3), R)


# ---------------------------------------------------------------- collect_inputs on an RWKV7


@pytest.fixture(scope="module")
def tiny_model():
    model = new_model(RWKV7Config.new(**TINY), seed=3, wkv_backend="reference")
    model.train()
    return model


def token_batches(n: int, seed: int = 11) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (2, 9), generator=g) for _ in range(n)]


def test_collect_inputs_rwkv7(tiny_model):
    """The head's rows are model.hidden (batch-major, time-minor); ffn.value's rows are relu(ffn.key row
    @ W_key^T)^2 (gamma_D of the matmul, doubled by the square, plus its u); the model's mode is restored,
    its hooks removed, nothing requires grad."""
    model, batches = tiny_model, token_batches(3)
    names = ["head", "blocks.1.ffn.key", "blocks.1.ffn.value", "blocks.0.att.key"]
    got = collect_inputs(model, names, batches, max_tokens=10**6)
    with torch.no_grad():
        hidden = torch.cat([model.hidden(b)[0].reshape(-1, TINY["n_embd"]) for b in batches])
    assert torch.equal(got["head"], hidden)
    k, wk = got["blocks.1.ffn.key"].double(), model.blocks[1].ffn.key.weight.double()
    y, ybound = k @ wk.T, gamma(TINY["n_embd"]) * k.abs() @ wk.abs().T
    want = torch.relu(y).square()
    bound = (2 * y.abs() + ybound) * ybound + 2 * U32 * want
    assert ((got["blocks.1.ffn.value"].double() - want).abs() <= bound).all()
    assert got["blocks.0.att.key"].shape == (3 * 2 * 9, TINY["n_embd"])
    assert all(not t.requires_grad and t.dtype == torch.float32 for t in got.values())
    assert model.training
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_collect_inputs_caps_rows_and_stops_early(tiny_model):
    """max_tokens rows per module, the first ones; batches are no longer drawn once every module is full."""
    batches = token_batches(4)
    full = collect_inputs(tiny_model, ["blocks.0.att.value"], batches, max_tokens=10**6)["blocks.0.att.value"]
    drawn = []

    def counting():
        for b in batches:
            drawn.append(b)
            yield b

    capped = collect_inputs(copy.deepcopy(tiny_model), ["blocks.0.att.value"], counting(), max_tokens=20)
    assert torch.equal(capped["blocks.0.att.value"], full[:20])
    assert len(drawn) == 2  # 18 rows from the first batch, 2 from the second, then full
