"""Method keys the chosen kind never reads (found by fuzzing recipe combinations: `method.r: 8` with kind state,
`dropout` with ia3, `svd_niter` with lora were accepted without a word). They are named in a warning when training
starts; not refused, so that a run's own recipe.yaml and adapter.json written before still resume and load."""

from __future__ import annotations

import pytest

from peft_rwkv7.adapters.config import MethodConfig
from peft_rwkv7.train.runner import train_from_cli
from tests.train.conftest import tiny_overrides

# What each kind reads, by hand from adapters/kinds.py's peft_config (LoHa/LoKr: r and alpha, their dropouts 0;
# OFT/BOFT: r as the block size and dropout; VeRA: r and dropout; IA3: nothing of these; AdaLoRA: r, alpha, dropout)
# and the LoRA/PiSSA/DiSHA layers (Bone has a dropout, Bat none).
SET = {"r": 8, "alpha": 8.0, "dropout": 0.1, "svd_niter": 2, "disha_mode": "bat", "loftq_iters": 3,
       "eva_tokens": 100, "target_modules": ["att.key"]}
UNREAD = {
    "state": ["r", "alpha", "dropout", "svd_niter", "disha_mode", "loftq_iters", "eva_tokens", "target_modules"],
    "full": ["r", "alpha", "dropout", "svd_niter", "disha_mode", "loftq_iters", "eva_tokens", "target_modules"],
    "lora": ["svd_niter", "disha_mode", "loftq_iters", "eva_tokens"],
    "pissa": ["disha_mode", "loftq_iters", "eva_tokens"],
    "loha": ["dropout", "svd_niter", "disha_mode", "loftq_iters", "eva_tokens"],
    "lokr": ["dropout", "svd_niter", "disha_mode", "loftq_iters", "eva_tokens"],
    "oft": ["alpha", "svd_niter", "disha_mode", "loftq_iters", "eva_tokens"],
    "vera": ["alpha", "svd_niter", "disha_mode", "loftq_iters", "eva_tokens"],
    "ia3": ["r", "alpha", "dropout", "svd_niter", "disha_mode", "loftq_iters", "eva_tokens"],
    "adalora": ["svd_niter", "disha_mode", "loftq_iters", "eva_tokens"],
}


@pytest.mark.parametrize("kind", list(UNREAD))
def test_each_kind_names_the_keys_it_does_not_read(kind):
    got = MethodConfig.from_dict({"kind": kind, **SET}).unread_keys()
    assert sorted(g.split()[0] for g in got) == sorted(UNREAD[kind]), got


def test_disha_s_modes_and_lora_s_starts():
    bat = MethodConfig.from_dict({"kind": "disha", "disha_mode": "bat", "dropout": 0.1, "r": 8}).unread_keys()
    bone = MethodConfig.from_dict({"kind": "disha", "disha_mode": "bone", "dropout": 0.1, "r": 8}).unread_keys()
    assert bat == ["dropout 0.1"] and bone == []  # Bat has no dropout
    assert MethodConfig.from_dict({"kind": "lora", "init": "eva", "eva_tokens": 100}).unread_keys() == []
    loftq = {"kind": "lora", "init": "loftq", "quant": "nf4", "loftq_iters": 3, "eva_tokens": 100}
    assert MethodConfig.from_dict(loftq).unread_keys() == ["eva_tokens 100"]
    assert MethodConfig.from_dict({"kind": "lora", "adalora": {"target_r": 2}}).unread_keys() == ["adalora"]
    assert MethodConfig.from_dict({"kind": "boft", "r": 4, "boft_factors": 1}).unread_keys() == []
    # the defaults are never named, whatever the kind
    assert all(MethodConfig.from_dict({"kind": k}).unread_keys() == [] for k in UNREAD)


def test_training_names_them_in_one_warning_and_trains(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    from pathlib import Path

    lora = str(Path(__file__).resolve().parents[2] / "recipes/lora.yaml")
    train_from_cli(lora, tiny_overrides(tiny_world, out, steps=1, **{"method.kind": "state", "method.r": 8}))
    err = capsys.readouterr().err
    assert "warning: method.kind state does not read method.r 8; they change nothing (remove them)" in err, err
    assert (out / "state.pth").exists()
