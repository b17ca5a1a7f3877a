"""A model ready for inference: the base (local path or hf://) on a device in a dtype, with an adapter run or a
tuned state applied. The CLI's generate/chat/eval and the web UI's chat load through this one function."""

from __future__ import annotations


def load_for_inference(model: str, adapter: str | None = None, device: str = "auto", dtype: str = "auto",
                       lora_alpha: float | None = None, say: bool = True):
    """`model`: a .pth/.safetensors/.st file or hf:// name; `adapter`: a run directory or adapter file;
    `dtype`: auto | fp32 | bf16 (auto picks bf16 only where the device runs it fast; `say` prints that choice)."""
    import torch

    from ..model import load_model, pick_device
    from ..model.hub import resolve_model_path
    from ..ops.precision import choose_bf16, cpu_bf16_check

    dev = pick_device(device, "--device")
    dt = torch.bfloat16 if choose_bf16(dtype, dev.type, "--dtype", say=say) else torch.float32
    saved = None
    if adapter:  # read first: an adapter over a quantized base loads the base on the CPU (staging_device)
        from ..adapters import load_adapter, read_adapter
        from ..adapters.quant import staging_device

        saved = read_adapter(adapter, lora_alpha)
    load_on = staging_device(saved.method.quant, dev) if saved is not None else dev
    loaded = load_model(resolve_model_path(model), dtype=dt, device=load_on)
    if dt == torch.bfloat16 and dev.type == "cpu":  # row chunks where the (cached) bf16 check found them faster
        loaded.set_bf16_row_chunks(cpu_bf16_check().row_chunks)
    if saved is not None:
        loaded = load_adapter(loaded, saved, device=dev)  # a staged base goes to dev (elsewhere it is there)
    return loaded.eval()
