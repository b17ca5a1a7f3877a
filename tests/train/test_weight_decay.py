"""Weight decay by role (what the tensor is), not by its rank as a tensor."""

from __future__ import annotations

import pytest

from peft_rwkv7.adapters import MethodConfig, attach, trainable_parameters
from peft_rwkv7.train.loop import decays, param_groups
from tests.conftest import make_model

# Written out by hand: which trained tensors of one block (and the model's ends) are decayed.
DECAYED = {"emb.weight", "head.weight", "att.receptance.weight", "att.key.weight", "att.value.weight",
           "att.output.weight", "ffn.key.weight", "ffn.value.weight"}
NOT_DECAYED = {"att.time_state", "att.r_k", "att.w1", "att.w2", "att.a1", "att.g2", "att.v1", "att.x_r", "att.w0",
               "att.k_k", "att.ln_x.weight", "att.ln_x.bias", "ln1.weight", "ln0.bias", "ln_out.weight", "ffn.x_k"}


@pytest.mark.parametrize("mode", ["bone", "bat"])
def test_disha_shards_are_decayed_whatever_their_rank(mode):
    model = attach(make_model(seed=0, n_layer=1, n_embd=64, head_size=16, vocab_size=64),
                   MethodConfig(kind="disha", r=16, disha_mode=mode))
    named = trainable_parameters(model)
    assert {p.dim() for _, p in named} == ({2} if mode == "bone" else {3})
    assert named and all(decays(n) for n, _ in named)
    groups = param_groups(named, 0.1)
    assert [len(g["params"]) for g in groups] == [0, len(named)] and groups[1]["weight_decay"] == 0.1


def test_roles_of_full_and_lora_tensors():
    parts = ["emb", "head", "ln", "time", "ffn"]
    model = attach(make_model(seed=0, n_layer=1, n_embd=64, head_size=16, vocab_size=64),
                   MethodConfig(kind="lora", r=4, alpha=8, state=True, train_parts=parts))
    names = {n for n, _ in trainable_parameters(model)}
    short = {n.removeprefix("blocks.0.") for n in names}
    assert {"att.key.lora_A", "att.key.lora_B"} <= short
    for n in names:
        s = n.removeprefix("blocks.0.")
        want = "lora_" in s or s in DECAYED
        assert decays(n) == want, n
    assert {s for s in short if s in NOT_DECAYED} == NOT_DECAYED & short and len(NOT_DECAYED & short) >= 12
    full = attach(make_model(seed=0, n_layer=1, n_embd=64, head_size=16, vocab_size=64), MethodConfig(kind="full"))
    full_names = {n.removeprefix("blocks.0.") for n, _ in trainable_parameters(full)}
    assert {n for n in full_names if decays(n)} == DECAYED
