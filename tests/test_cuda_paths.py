"""Paths only a GPU takes (skipped without one): each is a bug a static review found before any GPU ran this code,
fixed, and checked here the first time the suite runs on a CUDA machine (the CPU tests check what they can: the meta
device, injected verdicts)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _tiny():
    from peft_rwkv7.model import RWKV7Config, new_model

    torch.manual_seed(0)
    return new_model(RWKV7Config.new(2, 64, 128, head_size=16)).cuda()


def test_sampling_gpu_logits_with_a_cpu_generator():
    """generate, lm-eval's generate_until and GRPO sample with a CPU generator (the same tokens on any device)."""
    from peft_rwkv7.infer.generate import sample_next

    logits = torch.randn(1000, device="cuda")
    for top_p in (1.0, 0.9):
        on_gpu = sample_next(logits, 0.8, top_p, torch.Generator().manual_seed(3))
        on_cpu = sample_next(logits.cpu(), 0.8, top_p, torch.Generator().manual_seed(3))
        assert on_gpu == on_cpu


def test_bat_trains_on_a_model_already_on_the_gpu():
    from peft_rwkv7.adapters import MethodConfig, attach

    adapted = attach(_tiny(), MethodConfig(kind="disha", disha_mode="bat", r=8))
    loss = adapted(torch.randint(0, 128, (1, 9), device="cuda")).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.device.type == "cuda" for p in adapted.parameters())


def test_pissa_leaves_the_gpus_random_state_alone():
    from peft_rwkv7.adapters import MethodConfig, attach

    model = _tiny()
    torch.cuda.manual_seed(123)
    before = torch.cuda.get_rng_state()
    attach(model, MethodConfig(kind="pissa", r=4))
    assert torch.equal(torch.cuda.get_rng_state(), before)


def _float_projection_bytes(model) -> int:
    from peft_rwkv7.adapters.config import PROJECTIONS

    return sum(model.get_submodule(f"blocks.{i}.{p}").weight.numel() * 4
               for i in range(model.config.n_layer) for p in PROJECTIONS)


def test_qlora_never_holds_the_float_base_on_the_gpu(tmp_path):
    """A QLoRA run's adapter for generate/eval/chat (the training run: the next test): the base loads on the CPU and
    each projection is quantized onto the GPU (adapters.quant.staging_device). Before, the float base went onto the
    GPU whole, so QLoRA's peak was the float model's."""
    pytest.importorskip("bitsandbytes")
    from peft_rwkv7.adapters import MethodConfig, attach, save_adapter
    from peft_rwkv7.infer.load import load_for_inference
    from peft_rwkv7.model import RWKV7Config, load_model, new_model, save_model

    base = new_model(RWKV7Config.new(2, 1024, 128, head_size=64))  # projections: 25M weights, 100 MB in fp32
    save_model(base, tmp_path / "base.pth", dtype=torch.float32)
    float_bytes = _float_projection_bytes(base)
    save_adapter(attach(load_model(tmp_path / "base.pth"), MethodConfig(kind="lora", quant="nf4", r=4)),
                 tmp_path / "run")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    loaded = load_for_inference(str(tmp_path / "base.pth"), adapter=str(tmp_path / "run"), device="cuda",
                                dtype="fp32", say=False)
    peak = torch.cuda.max_memory_allocated()
    assert all(t.device.type == "cuda" for t in loaded.state_dict().values())
    assert peak < float_bytes / 3, (peak, float_bytes)  # nf4 is ~1/7 of fp32, plus one layer's float copy


def test_qlora_training_setup_on_the_gpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from pathlib import Path

    from peft_rwkv7.model import RWKV7Config, new_model, save_model
    from peft_rwkv7.train.loop import setup
    from peft_rwkv7.train.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    base = new_model(RWKV7Config.new(8, 1024, 65536, head_size=64))  # projections 100M weights, the rest 136M
    save_model(base, tmp_path / "base.pth", dtype=torch.bfloat16)
    n_proj = _float_projection_bytes(base) // 4
    n_rest = sum(t.numel() for t in base.state_dict().values()) - n_proj
    del base
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run = setup(load_recipe(root / "recipes/qlora.yaml", [
        f"model.path={tmp_path / 'base.pth'}", f"data.path={root / 'data/demo/ship_log.jsonl'}",
        "train.device=cuda", "train.max_steps=1", "train.eval_every=0", f"out_dir={tmp_path / 'out'}",
        "log.progress=false"]))
    peak = torch.cuda.max_memory_allocated()
    assert all(p.device.type == "cuda" for p in run.model.parameters())
    size = 2 if run.computes_in == "bf16" else 4  # the frozen weights' dtype
    # the float base on the GPU would be (n_rest + n_proj) * size; staged: the rest, nf4 projections, one layer
    assert peak < (n_rest + n_proj / 2) * size, (peak, n_rest, n_proj, size)


def test_the_kernel_check_runs_its_problem_on_the_gpu():
    """ops/verify.py makes the first-use check's problem on the kernel's device: made on the CPU (a generator or a
    draw without the device), a CUDA kernel would crash on CPU tensors, fail its check, and auto would hand every
    run the next backend (mutation testing, round 27: the CPU cannot tell those apart)."""
    from peft_rwkv7.ops import verify, wkv7_reference

    seen = set()

    def kernel(*args):
        seen.update(x.device.type for x in args)
        return wkv7_reference(*args)

    (inputs, state, dy, ds) = verify._problem(16, torch.float32, torch.device("cuda"), 0)
    assert {x.device.type for x in (*inputs, state, dy, ds)} == {"cuda"}
    assert verify.check(kernel, 16, torch.float32, "cuda").ok and seen == {"cuda"}
