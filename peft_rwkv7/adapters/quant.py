"""Frozen projection weights quantized with bitsandbytes (QLoRA-style bases).

Training and merging build the quantized layer through the same function, so a merge reproduces
exactly the dequantized weight the adapter was trained against.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

# nf4/fp4 quantize blocks of 64 values with one absmax each; double quantization of the absmax
# ("compress_statistics") saves another ~0.4 bit per weight, as in QLoRA.
BLOCKSIZE_4BIT = 64
DOUBLE_QUANT = True


def _bnb():
    """bitsandbytes, imported on first need: it is the optional extra `quant`."""
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("method.quant needs bitsandbytes, which is not installed: "
                        "pip install 'rwkv-peft[quant]'") from None
    return bitsandbytes


@functools.lru_cache(maxsize=1)
def _int8_linear() -> type:
    bnb = _bnb()

    class Int8Linear(bnb.nn.Linear8bitLt):
        """LLM.int8 row-wise weights, multiplied as the dequantized weight in every mode.

        bitsandbytes' eval-mode path also quantizes the activations to int8 (~2e-2 off per layer on
        CPU), so evaluation would not compute what training computed, nor what a merge reproduces.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from peft.utils.integrations import dequantize_module_weight

            return F.linear(x, dequantize_module_weight(self).to(x.dtype))

    return Int8Linear


def quantize_linear(weight: torch.Tensor, quant: str, compute_dtype: torch.dtype,
                    device: torch.device | str | None = None) -> nn.Module:
    """A frozen bias-free bitsandbytes Linear holding `weight` [out, in] quantized as `quant`, on `device`
    (default: the weight's; the CPU for a meta weight). The float weight is read on the CPU, so a weight on
    the CPU is quantized onto a GPU without ever being there in full.

    nf4/fp4: 4-bit blockwise; int8: row-wise absmax int8 (LLM.int8 without outlier split).
    Matmuls run in `compute_dtype`.
    """
    bnb = _bnb()
    out_f, in_f = weight.shape
    w = weight.detach().to("cpu", torch.float32).clone()
    if quant in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(
            in_f,
            out_f,
            bias=False,
            compute_dtype=compute_dtype,
            quant_type=quant,
            compress_statistics=DOUBLE_QUANT,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            w, requires_grad=False, quant_type=quant, blocksize=BLOCKSIZE_4BIT, compress_statistics=DOUBLE_QUANT
        )
        # On AVX512-BF16 CPUs bitsandbytes repacks the weight, for good, on the first eval-mode
        # forward and then multiplies in bf16 (~1e-2 off per layer): evaluation would no longer
        # compute what training computed, nor what a merge reproduces. Keep the fp32 path.
        layer.support_avx512bf16_for_cpu = False
    elif quant == "int8":
        # threshold 0: no fp16 outlier columns, so the layer is exactly its dequantized weight.
        layer = _int8_linear()(in_f, out_f, bias=False, has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"unknown quantization {quant!r}")
    # Moving to a device is what quantizes (bitsandbytes' convention), on CPU too.
    if device is None:
        device = weight.device if weight.device.type != "meta" else "cpu"
    return layer.to(device)


def staging_device(quant: str, device: torch.device) -> torch.device:
    """Where to load a base that will be quantized as `quant` for `device`: the CPU for a quantized base on a
    GPU (attach(device=...) then quantizes each projection onto it, so its peak is the quantized model plus
    one layer, not the float model), else `device` itself."""
    return torch.device("cpu") if quant != "none" and device.type != "cpu" else device


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight [out, in] (fp32) a quantized layer multiplies by; the weight itself for nn.Linear."""
    bnb = sys.modules.get("bitsandbytes")  # a quantized layer exists only where it was imported
    if bnb is not None and isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(layer).float()
    return layer.weight.detach().float()


def roundtrip(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """dequantize(quantize(weight)) as fp32 [out, in]: what a quantized base computes with."""
    if quant == "none":
        return weight.float()
    return dequantized_weight(quantize_linear(weight, quant, torch.float32))


def quantized_bytes(layer: nn.Module) -> int:
    """Bytes a (quantized) Linear's weight occupies, quantization statistics included."""
    w = layer.weight
    n = w.numel() * w.element_size()
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        n += qs.absmax.numel() * qs.absmax.element_size()
        if qs.state2 is not None:
            n += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    scb = getattr(w, "SCB", None)
    if scb is not None:
        n += scb.numel() * scb.element_size()
    return n
