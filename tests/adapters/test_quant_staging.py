"""A quantized base for a GPU: loaded on the CPU and quantized onto the device projection by projection
(adapters.quant.staging_device, attach(device=...)), so the device never holds the float projections. Before,
the whole float base went onto the GPU and was quantized there: QLoRA's peak was the float model.

No GPU here: the meta device stands in for one where the quantization is faked; the real bitsandbytes path is
checked on the CPU (device="cpu" against no device). tests/test_cuda_paths.py measures a GPU's peak."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7.adapters import MethodConfig, attach, load_adapter, save_adapter
from peft_rwkv7.adapters import methods as methods_mod
from peft_rwkv7.adapters.config import PROJECTIONS
from peft_rwkv7.adapters.quant import staging_device
from peft_rwkv7.model.rwkv7 import Linear

pytest.importorskip("bitsandbytes")


def test_staging_device_rule():
    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    assert staging_device("nf4", cuda) == cpu
    assert staging_device("int8", cuda) == cpu
    assert staging_device("none", cuda) == cuda  # a float base loads where it runs
    assert staging_device("nf4", cpu) == cpu


def _float_projection_bytes(model, device_type: str) -> int:
    n = 0
    for i in range(model.config.n_layer):
        for p in PROJECTIONS:
            layer = model.get_submodule(f"blocks.{i}.{p}")
            if getattr(layer, "fake_quantized", False):
                continue
            w = layer.weight
            if w.device.type == device_type and w.is_floating_point():
                n += w.numel() * w.element_size()
    return n


@pytest.mark.parametrize("kind", ["lora", "state"])
def test_quantized_onto_the_device_one_projection_at_a_time(load_base, monkeypatch, kind):
    model = load_base()
    calls = []

    def fake_quantize(weight, quant, compute_dtype, device=None):
        # what the device holds of the float projections when this one is quantized onto it
        calls.append((weight.device.type, torch.device(device).type, _float_projection_bytes(model, "meta")))
        q = Linear(weight.shape[1], weight.shape[0]).to(device)
        q.fake_quantized = True
        return q

    monkeypatch.setattr(methods_mod, "quantize_linear", fake_quantize)
    adapted = attach(model, MethodConfig(kind=kind, quant="nf4"), device="meta")
    n = model.config.n_layer * len(PROJECTIONS)
    assert calls == [("cpu", "meta", 0)] * n  # each read on the CPU, none of them float on the device first
    assert adapted.quant_bytes[0] > 0  # counted as the projections were quantized
    leftovers = [k for k, t in adapted.model.state_dict().items() if t.device.type != "meta"]
    assert leftovers == []  # then the rest of the model went to the device
    assert all(p.device.type == "meta" for p in adapted.parameters())


@pytest.mark.parametrize("cfg", [dict(kind="lora", quant="nf4", r=4), dict(kind="lora", quant="int8", r=4),
                                 dict(kind="lora", init="loftq", quant="nf4", r=4, loftq_iters=1),
                                 dict(kind="lora", init="pissa", quant="nf4", r=4)])
def test_staged_attach_computes_what_attach_computes(load_base, cfg):
    """The real bitsandbytes layers: attach(device="cpu") walks the staged path (a residual start where the
    layer lives, each projection quantized onto `device`, the rest moved after) and gives the same bits as
    attach without a device."""
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    plain = attach(load_base(), MethodConfig(**cfg)).eval()
    staged = attach(load_base(), MethodConfig(**cfg), device="cpu").eval()
    with torch.no_grad():
        assert torch.equal(plain(x), staged(x))
    assert plain.quant_bytes == staged.quant_bytes


def test_load_adapter_onto_a_device(load_base, tmp_path):
    """load_adapter(device=...) (generate/eval/chat with a QLoRA run) passes the device to attach."""
    cfg = MethodConfig(kind="lora", quant="nf4", r=4)
    adapted = attach(load_base(), cfg)
    with torch.no_grad():
        for _, p in adapted.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    save_adapter(adapted, tmp_path)
    x = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    again = load_adapter(load_base(), tmp_path, device="cpu").eval()
    with torch.no_grad():
        assert torch.equal(adapted.eval()(x), again(x))
