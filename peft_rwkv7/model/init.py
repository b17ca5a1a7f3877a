"""RWKV-LM-style initialisation for new RWKV-7 models (used to pretrain the bundled demo model).

The formulas are RWKV-LM's x070 trainer's (RWKV-v7/train_temp, as of 2025-04, the release of the World models whose
low-rank widths model.config reproduces): the modules' own starts, then what its generate_init_weight writes over
them (ln_x's per-layer scale, the embedding, the head, and every other weight matrix orthogonal or zero).
tests/model/test_init.py checks each against a transcription of that code."""

from __future__ import annotations

import math

import torch
from torch import nn

from .rwkv7 import RWKV7

# Decay speeds span exp(-exp(-7 + ...)) .. : slow channels remember ~1000 steps, fast ones a few.
DECAY_SPEED_MIN, DECAY_SPEED_RANGE = -7.0, 5.0
LOWRANK_GAIN = 0.1
KEY_GAIN = 0.1


def _ortho(t: torch.Tensor, gain: float) -> None:
    nn.init.orthogonal_(t, gain=gain)


@torch.no_grad()
def init_weights(model: RWKV7, seed: int = 0) -> RWKV7:
    """Initialise every parameter the way RWKV-LM's x070 trainer does; deterministic by seed."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    ddd = torch.arange(C, dtype=torch.float32) / C
    for i, blk in enumerate(model.blocks):
        att, ffn = blk.att, blk.ffn
        r01 = i / max(L - 1, 1)  # 0 at the first layer, 1 at the last
        r1a0 = 1.0 - i / L  # 1 at the first layer, towards 0 at the last
        att.x_r.copy_((1 - ddd ** (0.2 * r1a0)).view(1, 1, C))
        att.x_w.copy_((1 - ddd ** (0.9 * r1a0)).view(1, 1, C))
        att.x_k.copy_((1 - (ddd ** (0.9 * r1a0) + 0.4 * r01)).view(1, 1, C))
        att.x_v.copy_((1 - (ddd ** (0.4 * r1a0) + 0.6 * r01)).view(1, 1, C))
        att.x_a.copy_((1 - ddd ** (0.9 * r1a0)).view(1, 1, C))
        att.x_g.copy_((1 - ddd ** (0.2 * r1a0)).view(1, 1, C))
        n = torch.arange(C, dtype=torch.float32)
        decay_speed = DECAY_SPEED_MIN + DECAY_SPEED_RANGE * (n / (C - 1)) ** (0.85 + 1.0 * r01**0.5)
        att.w0.copy_((decay_speed + 0.5).view(1, 1, C))
        att.w1.zero_()
        _ortho(att.w2, LOWRANK_GAIN)
        att.a0.zero_()
        att.a1.zero_()
        _ortho(att.a2, LOWRANK_GAIN)
        if att.has_v:
            att.v0.fill_(1.0)
            att.v1.zero_()
            _ortho(att.v2, LOWRANK_GAIN)
        att.g1.zero_()
        _ortho(att.g2, LOWRANK_GAIN)
        att.k_k.fill_(0.85)
        att.k_a.fill_(1.0)
        att.r_k.zero_()
        # RWKV-LM's generate_init_weight replaces the modules' uniform starts of these matrices: orthogonal, gain 1
        # (the attention key's 0.1); the output projections start at zero
        _ortho(att.receptance.weight, 1.0)
        _ortho(att.key.weight, KEY_GAIN)
        _ortho(att.value.weight, 1.0)
        att.output.weight.zero_()
        att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
        att.ln_x.bias.zero_()
        ffn.x_k.copy_((1 - ddd ** (r1a0**4)).view(1, 1, C))
        _ortho(ffn.key.weight, 1.0)
        ffn.value.weight.zero_()
        for ln in (blk.ln1, blk.ln2) + ((blk.ln0,) if i == 0 else ()):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
    model.emb.weight.uniform_(-1e-4, 1e-4)
    model.ln_out.weight.fill_(1.0)
    model.ln_out.bias.zero_()
    V = cfg.vocab_size
    gain = 0.5 * math.sqrt(V / C) if V > C else 0.5
    _ortho(model.head.weight, gain)
    torch.random.set_rng_state(gen_state)
    return model
