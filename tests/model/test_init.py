"""A fresh model's start (model/init.py) against RWKV-LM's x070 trainer, transcribed here from its source
(BlinkDL/RWKV-LM, RWKV-v7/train_temp/src/model.py at d07df1c, 2025-04-07: RWKV_Tmix_x070/RWKV_CMix_x070's
__init__, then RWKV.generate_init_weight, which the trainer runs on a model built without --load_model and which
writes over the modules' starts of ln_x, the embedding, the head and every other `.weight` matrix).

The formulas are written out per element, in RWKV-LM's own loops, not vectorised as init.py has them. Random
matrices are checked by what their init promises: orthogonal rows or columns times the gain, a uniform range."""

from __future__ import annotations

import math

import pytest
import torch

from peft_rwkv7.model import RWKV7Config, new_model


def rwkv_lm_time_mix(C: int, H: int, N: int, layer_id: int, n_layer: int) -> dict[str, torch.Tensor]:
    """RWKV_Tmix_x070.__init__'s deterministic parameters (those generate_init_weight keeps), and ln_x.weight as
    generate_init_weight sets it."""
    ratio_0_to_1 = layer_id / (n_layer - 1)
    ratio_1_to_almost0 = 1.0 - (layer_id / n_layer)
    ddd = torch.ones(1, 1, C)
    for i in range(C):
        ddd[0, 0, i] = i / C
    out = {
        "x_r": 1.0 - torch.pow(ddd, 0.2 * ratio_1_to_almost0),
        "x_w": 1.0 - torch.pow(ddd, 0.9 * ratio_1_to_almost0),
        "x_k": 1.0 - (torch.pow(ddd, 0.9 * ratio_1_to_almost0) + 0.4 * ratio_0_to_1),
        "x_v": 1.0 - (torch.pow(ddd, 0.4 * ratio_1_to_almost0) + 0.6 * ratio_0_to_1),
        "x_a": 1.0 - torch.pow(ddd, 0.9 * ratio_1_to_almost0),
        "x_g": 1.0 - torch.pow(ddd, 0.2 * ratio_1_to_almost0),
    }
    decay_speed = torch.ones(C)
    for n in range(C):
        decay_speed[n] = -7 + 5 * (n / (C - 1)) ** (0.85 + 1.0 * ratio_0_to_1 ** 0.5)
    out["w0"] = decay_speed.reshape(1, 1, C) + 0.5
    out["a0"] = torch.zeros(1, 1, C)
    out["v0"] = torch.zeros(1, 1, C) + 1.0
    out["k_k"] = torch.ones(1, 1, C) * 0.85
    out["k_a"] = torch.ones(1, 1, C)
    out["r_k"] = torch.zeros(H, N)
    out["ln_x.weight"] = torch.zeros(C) + ((1 + layer_id) / n_layer) ** 0.7
    out["ln_x.bias"] = torch.zeros(C)
    return out


def rwkv_lm_channel_mix_x_k(C: int, layer_id: int, n_layer: int) -> torch.Tensor:
    ratio_1_to_almost0 = 1.0 - (layer_id / n_layer)
    ddd = torch.ones(1, 1, C)
    for i in range(C):
        ddd[0, 0, i] = i / C
    return 1.0 - torch.pow(ddd, ratio_1_to_almost0**4)


# generate_init_weight's else-branch: every `.weight` matrix not named ln/emb/head is drawn again, orthogonal with
# gain 1.0, except .att.key. (0.1) and .att.output. / .ffn.value. (zero); the low-rank factors w1/w2... keep the
# modules' starts (zeros, and ortho_init(., 0.1) for the second factors).
GAINS = {"att.receptance.weight": 1.0, "att.key.weight": 0.1, "att.value.weight": 1.0, "ffn.key.weight": 1.0,
         "att.w2": 0.1, "att.a2": 0.1, "att.v2": 0.1, "att.g2": 0.1}
ZEROS = ("att.output.weight", "ffn.value.weight", "att.w1", "att.a1", "att.v1", "att.g1")


def assert_orthogonal(w: torch.Tensor, gain: float, name: str) -> None:
    """torch.nn.init.orthogonal_'s promise: orthonormal rows (rows <= cols) or columns, times the gain."""
    w = w.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    eye = torch.eye(gram.shape[0], dtype=torch.float64) * gain**2
    # fp32 entries rounded once (2**-24 relative), summed over at most a few thousand: far below 1e-4
    assert torch.allclose(gram, eye, atol=1e-4 * gain**2), (name, (gram - eye).abs().max().item())


# built per test, not per module: mutation testing (scripts/mutation.sh model_init) runs for each mutant only the
# tests that called init_weights themselves, and a module-scoped model had been built by the first test alone.
# Two layers as well as three: a layer's ratio i / (L - 1) differs from i / 2 only there.
@pytest.fixture(params=[(3, 128, 300, 32), (2, 64, 50, 16)], ids=["L3-wide-head", "L2-narrow-head"])
def fresh(request):
    n_layer, n_embd, vocab_size, head_size = request.param
    cfg = RWKV7Config.new(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, head_size=head_size)
    return cfg, new_model(cfg, seed=5)


def test_the_deterministic_starts_are_rwkv_lm_s(fresh):
    cfg, model = fresh
    C, H, N, L = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_layer
    sd = model.state_dict()
    for i in range(L):
        for name, want in rwkv_lm_time_mix(C, H, N, i, L).items():
            got = sd[f"blocks.{i}.att.{name}"]
            # init.py computes the powers vectorised: equal to the per-element loop up to a rounding of the pow
            assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-6, atol=1e-6), (i, name)
        assert torch.allclose(sd[f"blocks.{i}.ffn.x_k"], rwkv_lm_channel_mix_x_k(C, i, L), rtol=1e-6, atol=1e-6)
        for name in ZEROS:
            assert torch.count_nonzero(sd[f"blocks.{i}.{name}"]) == 0, (i, name)
        lns = ("ln1", "ln2", "ln0") if i == 0 else ("ln1", "ln2")
        for ln in lns:
            assert torch.equal(sd[f"blocks.{i}.{ln}.weight"], torch.ones(C)) and torch.count_nonzero(
                sd[f"blocks.{i}.{ln}.bias"]) == 0
    assert torch.equal(sd["ln_out.weight"], torch.ones(C)) and torch.count_nonzero(sd["ln_out.bias"]) == 0


def test_the_random_matrices_are_orthogonal_with_rwkv_lm_s_gains(fresh):
    cfg, model = fresh
    sd = model.state_dict()
    for i in range(cfg.n_layer):
        for name, gain in GAINS.items():
            if name == "att.v2" and f"blocks.{i}.att.v2" not in sd:
                continue
            assert_orthogonal(sd[f"blocks.{i}.{name}"], gain, f"blocks.{i}.{name}")
    V, C = cfg.vocab_size, cfg.n_embd
    assert_orthogonal(sd["head.weight"], 0.5 * math.sqrt(V / C) if V > C else 0.5, "head.weight")
    emb = sd["emb.weight"]  # uniform on [-1e-4, 1e-4]: its range, spread and centre
    assert emb.abs().max() <= 1e-4 and emb.std() == pytest.approx(1e-4 / math.sqrt(3), rel=0.05)
    assert emb.min() < -0.9e-4 and emb.max() > 0.9e-4 and abs(emb.mean()) < 1e-5


def test_the_start_writes_over_every_parameter(fresh):
    """init_weights on a model whose every parameter holds garbage gives the fresh model's start: nothing is left
    to the modules' own defaults (layer 0's ln0 included)."""
    from peft_rwkv7.model.init import init_weights

    cfg, model = fresh
    used = new_model(cfg, seed=9)
    with torch.no_grad():
        for p in used.parameters():
            p.fill_(7.0)
    init_weights(used, seed=5)
    want, got = model.state_dict(), used.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    default = new_model(cfg, seed=9)
    init_weights(default)  # the seed's default is 0
    again = init_weights(new_model(cfg, seed=9), seed=0).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in default.state_dict().items())


def test_a_head_no_wider_than_the_model_has_gain_one_half():
    cfg = RWKV7Config.new(n_layer=2, n_embd=64, vocab_size=50, head_size=16)
    assert_orthogonal(new_model(cfg, seed=0).head.weight.detach(), 0.5, "head.weight")


def test_the_start_is_a_function_of_the_seed_and_leaves_torch_s_generator_alone():
    cfg = RWKV7Config.new(n_layer=2, n_embd=64, vocab_size=50, head_size=16)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = new_model(cfg, seed=1), new_model(cfg, seed=1), new_model(cfg, seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.att.receptance.weight"], sc["blocks.0.att.receptance.weight"])
