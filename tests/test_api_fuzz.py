"""The public Python API called with plausible mistakes: each names the argument it got wrong (a ValueError,
TypeError or UserError of one line), and nothing that is wrong gives a silently wrong result."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7 import (
    RWKV7,
    LayerState,
    MethodConfig,
    attach,
    detach,
    disable_adapter,
    merge,
    param_groups,
    sequence_loss,
    sequence_loss_sum,
    trainable_parameters,
)
from peft_rwkv7.errors import UserError
from tests.conftest import make_model

V = 97  # make_model's vocabulary
IDX = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model():
    return make_model().eval()


# ---- RWKV7: forward / step / token_nll ----


@pytest.mark.parametrize("bad", [V, -1, 10 * V])
def test_forward_refuses_token_ids_outside_the_vocabulary(model, bad):
    idx = IDX.clone()
    idx[1, 3] = bad
    least, most = min(bad, int(IDX.min())), max(bad, int(IDX.max()))
    with pytest.raises(ValueError, match=rf"^idx: token ids must be in \[0, {V}\) .*got {least}\.\.{most}$"):
        model(idx)
    with pytest.raises(ValueError, match=r"^idx: token ids must be in"):
        sequence_loss(model, idx, IDX)


@pytest.mark.parametrize("idx, error, words", [
    (IDX[0], ValueError, r"^idx: expected token ids \[B, T\].*got shape \(8,\); add a batch dimension"),
    (IDX[None], ValueError, r"^idx: expected token ids \[B, T\].*got shape \(1, 2, 8\)$"),
    (IDX.float(), TypeError, r"^idx: expected integer token ids \(int64\), got torch.float32$"),
    (IDX.tolist(), TypeError, r"^idx: expected a LongTensor of token ids \[B, T\].*got list$"),
    (IDX[:, :0], ValueError, r"^idx: no tokens \(shape \(2, 0\)\)"),
], ids=["1-D", "3-D", "float", "list", "empty"])
def test_forward_names_a_wrong_idx(model, idx, error, words):
    with pytest.raises(error, match=words):
        model(idx)


def test_narrow_integer_ids_are_widened(model):
    with torch.no_grad():
        want = model(IDX)
        assert torch.equal(model(IDX.to(torch.int16)), want)
        assert torch.equal(model(IDX.to(torch.uint8)), want)


def test_state_must_have_one_layer_state_per_layer(model):
    """zip over the blocks ran only as many blocks as states were given: the output of a shorter model."""
    with pytest.raises(ValueError, match=r"^state: expected a list of 2 LayerState .*got 1 \(LayerState\)$"):
        model(IDX, [LayerState(None, None, None)])
    with pytest.raises(ValueError, match=r"^state: expected a list of 2 LayerState .*got 3 \(LayerState\)$"):
        model(IDX, [LayerState(None, None, None)] * 3)
    with pytest.raises(ValueError, match=r"^state: .*got 2 \(Tensor\)$"):
        model(IDX, [torch.zeros(2, 4, 16, 16)] * 2)


def test_step_takes_one_token_per_sequence(model):
    with pytest.raises(ValueError, match=r"^token: expected token ids \[B\] .*got shape \(\); add a batch"):
        model.step(torch.tensor(3))
    with pytest.raises(ValueError, match=r"^token: expected token ids \[B\] .*got shape \(2, 8\)$"):
        model.step(IDX)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        model.step(torch.tensor([V]))


def test_a_meta_model_is_named():
    meta = make_model().to("meta")
    with pytest.raises(ValueError, match=r"^model: its weights are on the meta device"):
        meta(IDX)
    with pytest.raises(UserError, match=r"^attach: the model's weights are on the meta device"):
        attach(meta, MethodConfig(kind="lora", r=4))


def test_rwkv7_wants_a_config():
    with pytest.raises(TypeError, match=r"^RWKV7: expected an RWKV7Config .*got int$"):
        RWKV7(4)


def test_token_nll_labels_must_match_idx(model):
    with pytest.raises(ValueError, match=r"^labels: shape \(2, 7\) differs from idx's \(2, 8\)"):
        model.token_nll(IDX, IDX[:, 1:])


# ---- sequence_loss / sequence_loss_sum ----


def test_labels_shorter_than_idx_are_refused(model):
    """idx [2, 8] with labels [2, 7] (ids[:, 1:] beside ids, not ids[:, :-1]) scored the first 7 positions of idx
    against labels shifted by one: a plausible loss of the wrong pairs."""
    with pytest.raises(ValueError, match=r"^labels: shape \(2, 7\) differs from idx's \(2, 8\); labels\[b, t\] is"):
        sequence_loss(model, IDX, IDX[:, 1:])
    with pytest.raises(ValueError, match=r"^labels: shape \(1, 8\) differs"):
        sequence_loss_sum(model, IDX, IDX[:1])


@pytest.mark.parametrize("chunk_len", [-1, 2.5, "4"])
def test_chunk_len_must_be_a_count(model, chunk_len):
    """chunk_len -1 ran no chunk at all: a loss of 0."""
    with pytest.raises(ValueError, match=r"^chunk_len: expected an integer >= 0"):
        sequence_loss(model, IDX, IDX, chunk_len=chunk_len)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_width(model, dtype):
    with torch.no_grad():
        assert torch.equal(sequence_loss(model, IDX, IDX.to(dtype)), sequence_loss(model, IDX, IDX))


@pytest.mark.parametrize("args, error, words", [
    (("x.pth", IDX, IDX), TypeError, r"^model: expected an RWKV7 or an adapted model, got str$"),
    ((None, IDX[0], IDX[0]), ValueError, r"^idx: expected \[B, T\] .*got shape \(8,\)$"),
    ((None, IDX.tolist(), IDX), TypeError, r"^idx: expected a LongTensor \[B, T\], got list$"),
    ((None, IDX, IDX.float()), TypeError, r"^labels: expected integer token ids .*got torch.float32$"),
], ids=["model-str", "idx-1d", "idx-list", "labels-float"])
def test_loss_names_the_wrong_argument(model, args, error, words):
    args = (model if args[0] is None else args[0], *args[1:])
    with pytest.raises(error, match=words):
        sequence_loss(*args)


# ---- param_groups ----


def test_param_groups_read_a_generator_once_for_both_groups(model):
    """model.named_parameters() is a generator: the first group's list consumed it, the second came out empty."""
    from_list = param_groups(list(model.named_parameters()), 0.1)
    from_gen = param_groups(model.named_parameters(), 0.1)
    assert [len(g["params"]) for g in from_gen] == [len(g["params"]) for g in from_list]
    assert all(len(g["params"]) for g in from_gen)


@pytest.mark.parametrize("named, wd, error, words", [
    ("model", 0.1, TypeError, r"^param_groups: expected \(name, parameter\) pairs, got the model \(RWKV7\)"),
    ("params", 0.1, TypeError, r"^param_groups: expected \(name, parameter\) pairs such as"),
    ("named", float("nan"), ValueError, r"^param_groups: weight_decay must be a finite number >= 0, got nan$"),
    ("named", -0.1, ValueError, r"^param_groups: weight_decay must be a finite number >= 0, got -0.1$"),
    ("named", "0.1", TypeError, r"^param_groups: weight_decay must be a number >= 0, got str$"),
])
def test_param_groups_name_a_wrong_argument(model, named, wd, error, words):
    arg = {"model": model, "params": list(model.parameters()), "named": list(model.named_parameters())}[named]
    with pytest.raises(error, match=words):
        param_groups(arg, wd)


# ---- attach / detach / merge / disable_adapter ----


@pytest.mark.parametrize("cfg", [4, {"kind": "lora"}, "lora", None])
def test_attach_wants_a_method_config(cfg):
    with pytest.raises(TypeError, match=r"^attach: cfg must be a MethodConfig .*got "):
        attach(make_model(), cfg)


@pytest.mark.parametrize("kind", ["lora", "state", "full"])
def test_attach_twice_to_the_same_model_is_refused(kind):
    """The adapted model's .model (modified in place) took a second method on top of the first."""
    adapted = attach(make_model(), MethodConfig(kind=kind, r=4))
    with pytest.raises(UserError, match=r"^attach: this RWKV7 has a method attached already"):
        attach(adapted.model, MethodConfig(kind=kind, r=4))
    base = detach(adapted)
    assert "peft_config" not in base.__dict__  # peft's record of the first: the next attach warned of two adapters
    assert isinstance(attach(base, MethodConfig(kind=kind, r=4)).model, RWKV7)  # after detach it is a base again


@pytest.mark.parametrize("call", [detach, merge, lambda m: disable_adapter(m).__enter__()],
                         ids=["detach", "merge", "disable_adapter"])
def test_a_plain_model_is_not_an_adapted_one(call):
    with pytest.raises(TypeError, match=r"^\w+: expected an adapted model \(what attach or load_adapter returns\), "
                                        r"got RWKV7$"):
        call(make_model())


@pytest.mark.parametrize("kind", ["lora", "state"])
@pytest.mark.parametrize("call", [detach, merge, lambda m: disable_adapter(m).__enter__()],
                         ids=["detach", "merge", "disable_adapter"])
def test_after_detach_the_adapted_model_is_refused(kind, call):
    """A second detach of state tuning raised AttributeError; merge after detach gave the base as 'merged'."""
    adapted = attach(make_model(), MethodConfig(kind=kind, r=4))
    detach(adapted)
    with pytest.raises(UserError, match=r"^\w+: the method was detached from this model already"):
        call(adapted)


def _trained_lora():
    adapted = attach(make_model(), MethodConfig(kind="lora", r=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainable_parameters(adapted):
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapted


def test_nested_disable_adapter_stays_off_until_the_outer_one_ends():
    """The inner context's exit switched the adapter on again inside the outer one (state tuning: KeyError)."""
    adapted = _trained_lora()
    base = make_model()
    with torch.no_grad():
        want_base, want_adapted = base(IDX), adapted(IDX)
        assert not torch.allclose(want_base, want_adapted)
        with disable_adapter(adapted):
            with disable_adapter(adapted):
                assert torch.equal(adapted(IDX), want_base)
            assert torch.equal(adapted(IDX), want_base)
        assert torch.equal(adapted(IDX), want_adapted)
    state = attach(make_model(), MethodConfig(kind="state"))
    with disable_adapter(state), disable_adapter(state):
        pass
    assert all(isinstance(b.att.time_state, torch.nn.Parameter) for b in state.model.blocks)


def test_merge_dtype_by_name_or_refused():
    adapted = _trained_lora()
    assert merge(adapted, dtype="bf16").emb.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"^merge: dtype must be a float dtype .*got torch.int64$"):
        merge(adapted, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^merge: dtype must be .*got 'bfloat'$"):
        merge(adapted, dtype="bfloat")


def test_trainable_parameters_wants_a_model():
    with pytest.raises(TypeError, match=r"^trainable_parameters: expected a model .*got str$"):
        trainable_parameters("runs/lora")


@pytest.mark.parametrize("d", ["lora", None, ["kind"]])
def test_method_config_from_dict_wants_a_mapping(d):
    """A string was read as its letters: "unknown keys a, l, o"; None raised a bare TypeError."""
    with pytest.raises(UserError, match=r"^method: expected a mapping of method fields \(kind, r, \.\.\.\), got "):
        MethodConfig.from_dict(d)
