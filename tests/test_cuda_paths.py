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
