"""Data- and weight-dependent LoRA starts beside PiSSA: OLoRA, LoftQ and EVA, as pure functions.

Each returns the start of one projection, fp32: A0 [r, in] and B0 [out, r] (EVA: A0 only, B0 = 0).
Like PiSSA's, the OLoRA and LoftQ starts are not zero: the frozen base becomes the residual
W - s B0 A0, s the LoRA scale (computed as `methods._apply_pissa_residual` does), quantized after that where
the base is quantized, so the adapter can be saved as a rank-2r delta against the original weight.
peft and bitsandbytes are imported inside the functions (the package imports lazily).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import UserError

LOFTQ_QUANTS = ("nf4", "fp4", "int8")


def _check_rank(r: int, shape: Sequence[int], what: str) -> None:
    if not 1 <= r <= min(shape):
        raise UserError(f"method.r: {r} must be between 1 and {min(shape)} for {what} of shape {list(shape)}")


@torch.no_grad()
def olora_start(weight: torch.Tensor, r: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz 2024, arXiv:2406.01775): the thin QR factorisation W = Q R of the weight
    [out, in] in fp32; A0 = R[:r] [r, in] (upper triangular in its first r columns), B0 = Q[:, :r]
    [out, r] (orthonormal columns).

    Computed by HF peft's own LoRA layer (`init_lora_weights="olora"`, tuners/lora/layer.py
    `olora_init`) on an fp32 copy of the weight, so the factors are bitwise peft's; the weight
    passed in is not touched. peft's layer leaves the residual fl(W - fl((alpha/r) B0) @ A0) in its
    base weight: the same operations in the same order as `methods._apply_pissa_residual`, which
    forms the frozen base from the returned factors. The factors do not depend on alpha (nor on
    rsLoRA): alpha only sets the residual peft leaves, which is not returned.
    """
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    _check_rank(r, weight.shape, "an OLoRA weight")
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
    lc = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="olora")
    with torch.random.fork_rng(devices=[]):  # peft first draws a random A (then overwritten)
        layer = PeftLoraLinear(linear, "default", config=lc, r=r, lora_alpha=alpha)
    return layer.lora_A["default"].weight.detach().float(), layer.lora_B["default"].weight.detach().float()


def _split_rank_r(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation of m [out, in] (Eckart-Young, fp32 SVD) split as PiSSA does:
    B = U_r sqrt(S_r) [out, r], A = sqrt(S_r) V_r^T [r, in], so B A = U_r S_r V_r^T."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root


@torch.no_grad()
def loftq_start(
    weight: torch.Tensor, r: int, scale: float, quant: str, iters: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al. 2023, arXiv:2310.08659, Algorithm 1): alternate, from A = B = 0, for t = 1..iters

        Q_t = roundtrip(fl_dtype(W - s B A))          (quantize what the adapter does not cover)
        (B, A) = best rank-r approximation of (W - Q_t) / s   (SVD, split B = U sqrt(S), A = sqrt(S) V^T)

    with s = `scale`, the LoRA multiplier of s B A (alpha / r; alpha / sqrt(r) with rsLoRA: the start
    depends on it, unlike OLoRA's), and W = weight as training holds it (cast to `dtype`, the base dtype), so
    iteration 1 is "quantize W, fit the rest". Returns (A0 [r, in], B0 [out, r]) fp32; the frozen base
    training multiplies by is then roundtrip(fl_dtype(W - s B0 A0)), the residual the PiSSA path
    quantizes (attach, and `pth_merge.merged_weight` for a quantized PiSSA-style start), i.e. Q_(iters+1).

    Quantizer: `quant.roundtrip`, the bitsandbytes layer training builds (nf4/fp4 blocksize 64 with
    double-quantized absmax, int8 row-wise without outliers), not the one peft's `loftq_init` uses
    (bitsandbytes without double quantization, CUDA/XPU only, nf4 or int8 only) nor the older
    NFQuantizer: the alternation minimises ||W - Q - s B A|| only for the Q training multiplies by,
    and a different quantizer's Q would leave a different error than the one the start was fit to.
    Deterministic: bitsandbytes quantization and the SVD have no randomness (same device, same
    result).
    """
    from .quant import roundtrip

    if quant not in LOFTQ_QUANTS:
        raise UserError(f"method.quant: LoftQ needs a quantized base ({', '.join(LOFTQ_QUANTS)}), got {quant!r}")
    if iters < 1:
        raise UserError(f"LoftQ iterations: {iters} must be at least 1")
    _check_rank(r, weight.shape, "a LoftQ weight")
    s = scale
    w = weight.detach().to(dtype).float()
    a = b = None
    for _ in range(iters):
        residual = w if a is None else (w - (s * b) @ a)
        q = roundtrip(residual.to(dtype), quant)
        a, b = _split_rank_r((w - q) / s, r)
    return a, b


@torch.no_grad()
def eva_components(inputs: torch.Tensor, r: int) -> torch.Tensor:
    """EVA (Paischer et al. 2024, arXiv:2410.07170): A0 [r, in] fp32 = the top-r principal directions
    of a layer's input activations inputs [n_tokens, in], B0 = 0 (the start adds nothing to the base).

    As peft computes them (tuners/lora/eva.py with utils/incremental_pca.py, defaults whiten=False):
    right singular vectors of the *centered* activations X - mean(X) (PCA), rows of unit norm, each
    row's sign chosen so its largest-magnitude entry is positive (peft's `_svd_flip`, v-based). peft
    reaches them incrementally (IncrementalPCA with randomized SVD, q = 2r, 4 power iterations, over
    batches until consecutive components have cosine >= tau = 0.99); here one exact SVD of all the
    collected rows (fp32, mean accumulated in fp64). Every layer gets rank r, as peft with
    EvaConfig(rho=1.0); peft's default rho=2 would move ranks between layers by explained variance.
    """
    n, d = inputs.shape
    if n < r:
        raise UserError(f"EVA: {n} calibration tokens reached a layer, method.r={r} needs at least r")
    _check_rank(r, (n, d), "EVA inputs")
    x = inputs.float()
    centered = x - x.sum(0, dtype=torch.float64).div(n).to(x.dtype)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    a = vh[:r].clone()
    pivot = a.abs().argmax(dim=1)
    sign = torch.sign(a[torch.arange(r, device=a.device), pivot])
    return a * sign[:, None]


@torch.no_grad()
def collect_inputs(
    model: nn.Module, module_names: Sequence[str], batches: Iterable[torch.Tensor], max_tokens: int
) -> dict[str, torch.Tensor]:
    """The inputs each named submodule of `model` receives on forwards over `batches` (token ids
    [B, T] each), as {name: fp32 [n, in]} with rows in batch-major, time-minor order, n <= max_tokens
    (the first max_tokens rows; batches stop once every module has that many).

    Runs without gradients and in eval mode (the model's mode is restored); batches are moved to the
    model's device and the rows stay there: max_tokens * in * 4 bytes per module.
    """
    if max_tokens < 1:
        raise UserError(f"EVA calibration tokens: {max_tokens} must be at least 1")
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}
    count = dict.fromkeys(module_names, 0)

    def hook_for(name: str):
        def hook(_module, args):
            take = max_tokens - count[name]
            if take > 0:
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1])[:take].float()
                rows[name].append(x)
                count[name] += x.shape[0]

        return hook

    modules = {}
    for name in module_names:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"collect_inputs: the model has no submodule {name!r}") from None
    device = next(model.parameters()).device
    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch.to(device))
            if all(c >= max_tokens for c in count.values()):
                break
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    out = {}
    for name, m in modules.items():
        if rows[name]:
            out[name] = torch.cat(rows[name])
        else:
            out[name] = torch.empty(0, getattr(m, "in_features", 0), device=device)
    return out
