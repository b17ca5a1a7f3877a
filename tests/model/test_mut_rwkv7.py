"""model/rwkv7.py where the parity tests could not look (found by `scripts/mutation.sh rwkv7`): token shift by
hand, keys whose norm is below 1 against the `rwkv` package, what reaches the WKV op (one dtype, the chosen
backend), and the one-token paths (the RNN step without autograd, the sequence op with it)."""

from __future__ import annotations

import pytest
import torch

import peft_rwkv7.model.rwkv7 as rwkv7
from peft_rwkv7.model import load_model, save_model
from peft_rwkv7.ops.timemix import token_mix, token_mix_reference
from tests.conftest import make_model, rwkv_pkg_logits, spy_wkv7

V = 97


@pytest.mark.parametrize("fn", [token_mix, token_mix_reference], ids=["model", "reference"])
def test_token_shift_mixes_previous_and_current(fn):
    """out[m][t] = x[t] + (x[t-1] - x[t]) mix[m] with x[-1] = prev (or 0), written out for T = 1, 2, 3 in fp64
    (the model's op is the fused one where the CPU kernels are built)."""
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(2, 4, generator=g)
    mix = torch.rand(3, 4, generator=g)
    for T in (1, 2, 3):
        x = torch.randn(2, T, 4, generator=g)
        for p in (prev, None):
            before = torch.zeros(2, 4) if p is None else p
            xp = torch.stack([before if t == 0 else x[:, t - 1] for t in range(T)], dim=1).double()
            want = [x.double() + (xp - x.double()) * m.double() for m in mix]
            got = fn(x, p, mix)
            assert len(got) == 3
            for o, w in zip(got, want):
                torch.testing.assert_close(o.double(), w, rtol=1e-6, atol=1e-6)
    # the state is fp32, the activations bf16 under autocast: the mix stays in the activations' dtype
    for T in (1, 3):
        assert fn(torch.randn(2, T, 4).bfloat16(), prev, mix)[0].dtype == torch.bfloat16


def test_keys_shorter_than_one_are_normalised(tmp_path, rwkv_pkg):
    """k_k scaled down so that |k * k_k| per head is well below 1: kk = that / its norm all the same (an eps
    near 1 instead of 1e-12 would leave such keys unnormalised). Against the `rwkv` package's RWKV-7."""
    model = make_model(seed=4, n_layer=2, n_embd=64, head_size=16, vocab_size=V)
    with torch.no_grad():
        for blk in model.blocks:
            blk.att.k_k.mul_(1e-3)
    path = tmp_path / "m.pth"
    save_model(model, path, dtype=torch.float32)
    ours = load_model(path, dtype=torch.float32, wkv_backend="reference")
    tokens = torch.randint(0, V, (13,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(tokens[None])[0]
        k = ours.blocks[0].att.key(ours.blocks[0].ln1(ours.blocks[0].ln0(ours.emb(tokens[None]))))
        assert (k * ours.blocks[0].att.k_k).view(13, 4, 16).norm(dim=-1).max() < 0.1  # really short keys
    theirs = rwkv_pkg_logits(rwkv_pkg, path, tokens.tolist())
    # two fp32 forwards of a 2-layer, 64-wide model over 13 tokens: each within (n_layer + 1) chains of
    # ~(256 + 13) roundings of 2^-24 of max |logit|, ~5e-5 relative; 1e-4 for both
    assert (logits - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_the_wkv_op_gets_one_dtype_and_the_chosen_backend(monkeypatch):
    seen = spy_wkv7(monkeypatch, lambda args, kwargs: ({t.dtype for t in args[:6]}, kwargs.get("backend")))
    model = make_model(seed=0, n_layer=2, n_embd=64, head_size=16, vocab_size=V)
    model.set_wkv_backend("reference")
    # as in bf16 training with train_parts [emb, time, ln]: frozen matrices bf16, trained tensors fp32, so w, a and
    # kk come out fp32 beside r, k, v in bf16, and the residual stream (from the fp32 embedding) is fp32
    for n, p in model.named_parameters():
        p.data = p.data.float() if p.dim() != 2 or n == "emb.weight" else p.data.to(torch.bfloat16)
    # the WKV output goes back to the activations' dtype before ln_x (GroupNorm keeps a bf16 input in bf16): the
    # y that wkv_output (ln_x, bonus, gate; fused on the CPU) gets
    dtypes = []
    for blk in model.blocks:
        blk.att.register_forward_pre_hook(lambda m, args: dtypes.append(("x", args[0].dtype)))
    real_out = rwkv7.wkv_output

    def out_spy(y, *rest):
        dtypes.append(("ln_x", y.dtype))
        return real_out(y, *rest)

    monkeypatch.setattr(rwkv7, "wkv_output", out_spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, V, (2, 5)))
    assert seen == [({torch.bfloat16}, "reference")] * 2
    assert dtypes == [("x", torch.float32), ("ln_x", torch.float32)] * 2


@pytest.fixture
def model():
    m = make_model(seed=6, n_layer=2, n_embd=64, head_size=16, vocab_size=V)
    return m


def test_short_inputs_without_autograd_equal_the_prefix(model):
    """Inference on 1 and 2 tokens (T = 1 takes the RNN step) gives the first logits of a longer input."""
    idx = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(idx)
        for T in (1, 2):
            part = model(idx[:, :T])
            # the same math in another order (step kernel vs sequence op): a few fp32 roundings of the logits
            assert (part - whole[:, :T]).abs().max() <= 1e-5 * whole.abs().max(), T


def test_one_token_with_autograd_has_the_sequence_gradients(model):
    """With autograd on, one token goes through the differentiable sequence op (the RNN step kernel has no
    backward): its gradients are those of the first position of a longer input (causal)."""
    idx = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters()]

    def grads(x):
        model.zero_grad(set_to_none=True)
        (model(x)[:, 0] * weights).sum().backward()
        return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])

    one, three = grads(idx[:, :1]), grads(idx)
    # fp32 gradients of the same first-position loss through the same ops: relative 1e-4 covers their
    # summation-order differences (~1e2 roundings of 2^-24 per entry, and the norm over ~1e5 entries)
    assert (one - three).norm() <= 1e-4 * three.norm()


def test_a_checkpoints_time_state_is_the_default_initial_state(tmp_path):
    model = make_model(seed=7, n_layer=2, n_embd=64, head_size=16, vocab_size=V)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    states = [0.5 * torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    for i, s in enumerate(states):
        sd[f"blocks.{i}.att.time_state"] = s
    torch.save(sd, tmp_path / "tuned.pth")
    tuned = load_model(tmp_path / "tuned.pth", wkv_backend="reference")
    idx = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = tuned(idx)
        explicit = model.set_wkv_backend("reference") or model(idx, [rwkv7.LayerState(None, s, None) for s in states])
        zero = model(idx)
    assert torch.equal(got, explicit)  # the same weights, the same ops
    assert (got - zero).abs().max() > 1e-2  # the state matters


def test_grad_cp_recomputes_each_block_and_keeps_the_gradients_of_a_frozen_input():
    """As in adapter training, the embedding and ln0 are frozen, so a block's input needs no gradient:
    checkpointing must still give the blocks' parameters their gradients (a reentrant checkpoint gives none)."""
    model = make_model(seed=6, n_layer=2, n_embd=64, head_size=16, vocab_size=V)
    model.emb.weight.requires_grad_(False)
    for p in model.blocks[0].ln0.parameters():
        p.requires_grad_(False)
    calls = []
    for blk in model.blocks:  # the recomputation calls forward itself (no module hooks)
        def counted(*args, _forward=blk.forward, _i=blk.layer_id, **kwargs):
            calls.append(_i)
            return _forward(*args, **kwargs)

        blk.forward = counted
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(5))

    def grads():
        model.zero_grad(set_to_none=True)
        calls.clear()
        model(idx).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    assert calls == [0, 1] and "blocks.1.att.key.weight" in plain
    model.grad_cp = True
    cp = grads()
    assert calls == [0, 1, 1, 0]  # each block again in backward, last block first
    assert cp.keys() == plain.keys()
    # the same ops recomputed: equal up to the fp32 summation order of the backward (~1e-6 relative)
    assert all(torch.allclose(cp[n], plain[n], atol=1e-6, rtol=1e-5) for n in plain)
    model.grad_cp = False
    with torch.no_grad():
        calls.clear()
        model(idx)
    assert calls == [0, 1]


def test_a_model_needs_a_config_and_says_what_it_got():
    with pytest.raises(TypeError) as e:
        rwkv7.RWKV7({"n_layer": 2})
    assert str(e.value) == ("RWKV7: expected an RWKV7Config (RWKV7Config.new(n_layer, n_embd, vocab_size, "
                            "head_size)), got dict")


def test_a_time_mix_built_alone_runs_on_the_automatic_backend(model, monkeypatch):
    """TimeMix is public (peft_rwkv7.model): built outside an RWKV7, which sets every layer's backend, it picks the
    WKV backend as the model's default does ("auto") and gives the layer's output inside the model."""
    seen = spy_wkv7(monkeypatch, lambda args, kwargs: kwargs.get("backend"))
    inside = model.blocks[1].att
    alone = rwkv7.TimeMix(model.config, 1)
    alone.load_state_dict(inside.state_dict())
    assert inside.wkv_backend == "auto"  # make_model's default, which RWKV7 passes down
    x, v_first = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)), torch.randn(2, 5, 64)
    with torch.no_grad():
        want, got = inside(x, v_first, None, None), alone(x, v_first, None, None)
    assert seen == ["auto", "auto"]
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)
