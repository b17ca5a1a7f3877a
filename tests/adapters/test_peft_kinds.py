"""Every HF peft tuner kind and LoRA option on RWKV-7 (adapters/kinds.py): merged .pth == adapter (our loader and
the independent `rwkv` package), in-memory merge == file merge, disable == base, token-by-token == sequence,
save/load identical; DoRA and rsLoRA against peft's own model on plain Linears of the same shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_rwkv7.adapters import MethodConfig, attach, disable_adapter, load_adapter, merge, merge_into_pth, save_adapter
from peft_rwkv7.adapters.methods import trainable_parameters
from peft_rwkv7.infer.evaluate import evaluate
from peft_rwkv7.model import load_model
from tests.adapters.test_merge import _time_states, fp32_logits_bound, fp32_loss_bound
from tests.fp_oracle import forward_rounding

IDX = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(5))
EVA_DATA = [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(9))]
# The acceptance bound for merged vs adapter logits (fp32), relative to max |logit|; the derived
# bound (2 x forward_rounding) is asserted as well, whichever is smaller decides.
MERGE_REL = 1e-5

KINDS = {
    "dora": dict(kind="lora", use_dora=True),
    "rslora": dict(kind="lora", use_rslora=True),
    "gaussian": dict(kind="lora", init="gaussian"),
    "olora": dict(kind="lora", init="olora"),
    "eva": dict(kind="lora", init="eva"),
    "loha": dict(kind="loha"),
    "lokr": dict(kind="lokr"),
    "oft": dict(kind="oft", r=16),
    "boft": dict(kind="boft", r=16),
    "ia3": dict(kind="ia3"),
    "vera": dict(kind="vera"),
    "adalora": dict(kind="adalora", adalora={"target_r": 4}),
    "loha+state+parts": dict(kind="loha", state=True, train_parts=["ln"]),
    "oft+ffn-full": dict(kind="oft", r=16, train_parts=["ffn"]),
    "dora-nf4": dict(kind="lora", use_dora=True, quant="nf4"),
    "loftq-nf4": dict(kind="lora", init="loftq", quant="nf4"),
    "ia3-int8": dict(kind="ia3", quant="int8"),
    "adalora-nf4+state": dict(kind="adalora", quant="nf4", state=True),
    "lora+head": dict(kind="lora", target_modules=["att.key", "head"]),
    "ia3+head-nf4": dict(kind="ia3", target_modules=["ffn.value", "head"], quant="nf4"),
    "bat+head": dict(kind="disha", disha_mode="bat", target_modules=["att.value", "head"]),
}
FLOAT = [k for k, m in KINDS.items() if "quant" not in m]


def _attach(model, name: str, **kw):
    cfg = MethodConfig(**{"r": 8, **KINDS[name]})
    if cfg.quant != "none":
        pytest.importorskip("bitsandbytes")
    return attach(model, cfg, batches=EVA_DATA if cfg.init == "eva" else None, **kw)


def logits(model, idx=IDX) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


@pytest.mark.parametrize("name", list(KINDS))
def test_merged_pth_equals_the_adapter_in_ours_and_the_rwkv_package(name, base_path, load_base, docs, train,
                                                                     rwkv_loss, tmp_path):
    adapted = _attach(load_base(), name)
    train(adapted)
    want, untrained = logits(adapted), logits(load_base())
    run = tmp_path / "run"
    save_adapter(adapted, run, base_path=str(base_path))
    line = merge_into_pth(base_path, run, tmp_path / "merged.pth", dtype="fp32")
    assert line.startswith("merged ")
    from_file = load_model(tmp_path / "merged.pth", wkv_backend="reference")
    in_memory = merge(adapted)
    scale = want.abs().max().item()
    tol = min(fp32_logits_bound(from_file), MERGE_REL * scale)
    assert (want - untrained).abs().max() > 10 * tol  # training moved the logits: the checks have teeth
    assert (logits(from_file) - want).abs().max() <= tol
    assert (logits(in_memory) - want).abs().max() <= tol
    # The independent implementation reads the merged file: its loss is the adapter's.
    ours = evaluate(adapted, docs, batch_size=3)["loss"]
    theirs = rwkv_loss(tmp_path / "merged.pth", docs, _time_states(tmp_path / "merged.pth"))
    assert abs(theirs - ours) <= fp32_loss_bound(from_file, docs, ours)


@pytest.mark.parametrize("name", list(KINDS))
def test_save_and_load_give_the_same_model(name, base_path, load_base, train, tmp_path):
    adapted = _attach(load_base(), name)
    train(adapted, steps=2)
    save_adapter(adapted, tmp_path / "run", base_path=str(base_path))
    again = load_adapter(load_base(), tmp_path / "run")
    assert torch.equal(logits(again), logits(adapted))
    names = [n for n, _ in trainable_parameters(again)]
    assert names == [n for n, _ in trainable_parameters(adapted)]
    assert not any(".default" in n or "base_layer" in n for n in names)


@pytest.mark.parametrize("name", [k for k in KINDS if "parts" not in k and "full" not in k])
def test_disable_adapter_is_the_base_and_comes_back(name, load_base, train):
    start = logits(_attach(load_base(), name))  # untrained: the base as this method holds it
    if "quant" not in KINDS[name] and KINDS[name].get("init") not in ("olora", "loftq"):
        assert torch.equal(start, logits(load_base()))  # a fresh adapter changes nothing, bit for bit
    adapted = _attach(load_base(), name)
    train(adapted)
    tuned = logits(adapted)
    with disable_adapter(adapted):
        off = logits(adapted)
    if KINDS[name].get("init") in ("olora", "loftq"):  # residual + start: the base within two forwards' rounding
        assert (off - start).abs().max() <= 2 * forward_rounding(adapted.config, IDX.shape[1]) * start.abs().max()
    else:
        assert torch.equal(off, start)
    assert not torch.equal(tuned, start)
    assert torch.equal(logits(adapted), tuned)


@pytest.mark.parametrize("name", ["dora", "loha", "oft", "ia3", "vera", "adalora", "dora-nf4", "lora+head"])
def test_token_by_token_equals_the_sequence(name, load_base, train):
    adapted = _attach(load_base(), name)
    train(adapted, steps=2)
    idx = IDX[:1, :9]
    whole = logits(adapted, idx)[0]
    state, steps = None, []
    with torch.no_grad():
        for t in range(idx.shape[1]):
            out, state = adapted(idx[:, t : t + 1], state, return_state=True)
            steps.append(out[0, -1])
    tol = 2 * forward_rounding(adapted.config, idx.shape[1]) * whole.abs().max().item()
    assert (torch.stack(steps) - whole).abs().max() <= tol


@pytest.mark.parametrize("option", [dict(use_dora=True), dict(use_rslora=True), dict(use_dora=True, use_rslora=True)])
def test_dora_and_rslora_equal_peft_on_plain_linears(option, load_base, train):
    """Each adapted projection against peft's own model on an nn.Sequential of one Linear of the same shape,
    holding the same weights: the same inputs give the same outputs and the same gradients, so only the
    RWKV wiring is new."""
    import peft

    adapted = attach(load_base(), MethodConfig(kind="lora", r=4, alpha=8, **option))
    train(adapted, steps=2)  # B and the magnitude away from their start
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0], out)))
             for n, m in adapted.model.named_modules() if hasattr(m, "lora_A") and n.startswith("blocks.")]
    adapted.zero_grad()
    x = IDX[:, :-1]
    out = adapted(x)
    for h in hooks:
        h.remove()
    for _, y in seen.values():
        y.retain_grad()
    F.cross_entropy(out.flatten(0, 1), IDX[:, 1:].flatten()).backward()
    assert len(seen) == 2 * 6
    for name, (inp, y) in seen.items():
        layer = adapted.model.get_submodule(name)
        w = layer.get_base_layer().weight
        plain = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
        plain[0].weight.data.copy_(w)
        ref = peft.get_peft_model(plain, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], **option))
        ours = {n.split(".default")[0].rsplit(".", 1)[-1]: p for n, p in layer.named_parameters() if ".default" in n}
        theirs = {n.split(".default")[0].rsplit(".", 1)[-1]: p for n, p in ref.named_parameters() if ".default" in n}
        assert ours.keys() == theirs.keys() and ("lora_magnitude_vector" in ours) == option.get("use_dora", False)
        with torch.no_grad():
            for k in ours:
                theirs[k].copy_(ours[k])
        x_in = inp.detach().clone()
        y_ref = ref(x_in)
        if option.get("use_dora"):  # peft's own forward runs in the layer: the same bits
            assert torch.equal(y_ref, y.detach()), name
        else:  # the fused layer sums the two products inside the base GEMM (adapters/fused_lora.py): a few ulps
            s = layer.scaling["default"]
            xa = x_in.abs() @ ours["lora_A"].detach().abs().t()
            mag = x_in.abs() @ w.abs().t() + s * xa @ ours["lora_B"].detach().abs().t()
            assert ((y_ref - y.detach()).abs() <= 8 * 2.0**-24 * mag).all(), name
        y_ref.backward(y.grad)
        for k in ours:
            assert torch.equal(theirs[k].grad, ours[k].grad), f"{name} {k}"


@pytest.mark.parametrize("fields, needle", [
    (dict(kind="prefix"), "state tuning"),
    (dict(kind="prompt_tuning"), "state tuning"),
    (dict(kind="loha", quant="nf4"), "quantized"),
    (dict(kind="oft", use_dora=True), "LoRA option"),
    (dict(kind="lora", init="loftq"), "quant"),
    (dict(kind="ia3", init="olora"), "kind: lora"),
    (dict(kind="lora", use_dora=True, init="olora"), "DoRA"),
])
def test_bad_combinations_are_one_line_errors(fields, needle):
    from peft_rwkv7.errors import UserError

    with pytest.raises(UserError, match=needle) as e:
        MethodConfig(**fields)
    assert "\n" not in str(e.value) and str(e.value).startswith("method.")


def test_a_block_size_that_does_not_divide_is_a_user_error(load_base):
    from peft_rwkv7.errors import UserError

    with pytest.raises(UserError, match="does not fit"):
        attach(load_base(), MethodConfig(kind="oft", r=24))


def test_init_pissa_is_kind_pissa():
    assert MethodConfig(kind="lora", init="pissa") == MethodConfig(kind="pissa")


@pytest.mark.parametrize("name", ["loha", "dora", "vera"])
def test_exports_the_other_tools_lack_point_to_merge(name, base_path, load_base, train, tmp_path):
    from peft_rwkv7.adapters import export_rwkv_peft
    from peft_rwkv7.adapters.export import export_adapter_st
    from peft_rwkv7.errors import UserError

    adapted = _attach(load_base(), name)
    save_adapter(adapted, tmp_path / "run", base_path=str(base_path))
    with pytest.raises(UserError, match="rwkv-peft merge"):
        export_rwkv_peft(tmp_path / "run", tmp_path / "x.pth")
    with pytest.raises(UserError, match="merge"):
        export_adapter_st(tmp_path / "x.st", tmp_path / "run")


def test_rslora_exports_with_the_alpha_that_gives_its_scale(base_path, load_base, train, tmp_path):
    """RWKV-PEFT and web-rwkv scale B A by alpha / rank: the exported alpha must make that alpha / sqrt(r)."""
    from peft_rwkv7.adapters import export_rwkv_peft
    from peft_rwkv7.adapters.export import lora_st_tensors
    from peft_rwkv7.adapters.files import read_adapter

    adapted = attach(load_base(), MethodConfig(kind="lora", r=16, alpha=8, use_rslora=True))
    train(adapted, steps=1)
    save_adapter(adapted, tmp_path / "run", base_path=str(base_path))
    line = export_rwkv_peft(tmp_path / "run", tmp_path / "x.pth")
    assert line.endswith("merge it with --lora-alpha 32")  # 32 / 16 = 8 / sqrt(16)
    _, alpha = lora_st_tensors(read_adapter(tmp_path / "run"), None)
    assert alpha == 32
    merge_into_pth(base_path, tmp_path / "x.pth", tmp_path / "a.pth", dtype="fp32", lora_alpha=32)
    merge_into_pth(base_path, tmp_path / "run", tmp_path / "b.pth", dtype="fp32")
    a, b = torch.load(tmp_path / "a.pth"), torch.load(tmp_path / "b.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_adapted_head_scores_tokens_as_its_logits_do(load_base, train):
    adapted = _attach(load_base(), "lora+head")
    train(adapted, steps=2)
    labels = IDX[:, 1:].clone()
    labels[0, :3] = -100
    nll, _ = adapted.token_nll(IDX[:, :-1], labels)
    want = F.cross_entropy(logits(adapted, IDX[:, :-1]).flatten(0, 1), labels.flatten(), reduction="none",
                           ignore_index=-100).view(labels.shape)
    assert torch.equal(nll.detach(), want)
    assert adapted.model.head.lora_A["default"].weight.requires_grad


class _FakeFbdCuda:
    """peft's CUDA block-diagonal extension as it behaves for CPU tensors on a machine that can compile it: the
    output it allocated comes back unwritten (zeros)."""

    calls = 0

    @classmethod
    def forward(cls, x):
        cls.calls += 1
        n, d, h, _ = x.shape
        return [x.new_zeros(n, d * h, d * h)]


def test_boft_uses_torchs_block_diagonal_where_peft_could_build_its_cuda_extension(monkeypatch, base_path,
                                                                                    load_base, train, tmp_path):
    """On a machine with nvcc and a CUDA build of torch peft compiles its BOFT extension and runs it for every
    BOFT layer, CPU tensors included, where it gives zeros. Faked here: attach, training, the in-memory merge and
    the merge into .pth must all compute with torch's block_diag, as on a machine without the extension."""
    import peft.tuners.boft.layer as boft_layer

    adapted = _attach(load_base(), "boft")
    train(adapted)
    want = logits(adapted)
    save_adapter(adapted, tmp_path / "run", base_path=str(base_path))
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _FakeFbdCuda)
    _FakeFbdCuda.calls = 0
    again = load_adapter(load_base(), tmp_path / "run")  # the layers made where the extension "exists"
    assert torch.equal(logits(again), want)
    merge_into_pth(base_path, tmp_path / "run", tmp_path / "merged.pth", dtype="fp32")
    from_file = load_model(tmp_path / "merged.pth", wkv_backend="reference")
    tol = min(fp32_logits_bound(from_file), MERGE_REL * want.abs().max().item())
    assert (logits(from_file) - want).abs().max() <= tol
    fresh = _attach(load_base(), "boft")
    train(fresh, steps=1)
    assert _FakeFbdCuda.calls == 0


def test_more_than_one_boft_butterfly_factor_is_a_one_line_error():
    from peft_rwkv7.errors import UserError

    with pytest.raises(UserError, match="boft_factors: 2 is not supported; use 1") as e:
        MethodConfig(kind="boft", r=16, boft_factors=2)
    assert "\n" not in str(e.value)
    assert MethodConfig(kind="boft", r=16, boft_factors=1).boft_factors == 1


def test_bat_makes_its_parameter_on_the_base_layers_device():
    """DiSHA's Bat shards start on the frozen weight's device (a model already on a GPU gets them there); the meta
    device stands in for one here."""
    from peft_rwkv7.adapters.disha import BatLinear

    with torch.device("meta"):
        base = nn.Linear(32, 16, bias=False)
    assert BatLinear(base, 8).disha.device == base.weight.device
