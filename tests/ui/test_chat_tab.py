"""The Chat tab's model loading and A/B sessions, without a browser (the browser test compares replies with the
CLI's `generate --chat`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from peft_rwkv7.errors import UserError
from peft_rwkv7.ui.app import Ui
from peft_rwkv7.ui.chat_tab import load, sessions

ROOT = Path(__file__).resolve().parents[2]
MODEL = str(ROOT / "data/demo/rwkv7-demo.pth")


def test_bad_model_paths_are_the_clis_one_line(tmp_path):
    ui = Ui(tmp_path)
    missing = str(tmp_path / "missing.pth")
    cli = subprocess.run([sys.executable, "-m", "peft_rwkv7.cli", "chat", "--model", missing], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    assert cli.returncode == 2
    with pytest.raises(UserError) as e:
        load(ui, missing, None)
    assert cli.stderr.strip() == f"error: {e.value}"  # the same line the CLI prints
    with pytest.raises(UserError) as e:
        load(ui, MODEL, str(tmp_path / "no_run"))
    assert "--adapter" in str(e.value) and "no_run" in str(e.value)
    not_model = tmp_path / "notes.pth"
    not_model.write_text("not a checkpoint")
    with pytest.raises(UserError) as e:
        load(ui, str(not_model), None)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="model"):
        load(ui, "  ", None)


def test_a_and_b_share_seed_and_settings_and_the_model_is_cached(tmp_path):
    from peft_rwkv7.model import save_model
    from tests.conftest import make_model

    ui = Ui(tmp_path)
    path = tmp_path / "random.pth"  # random weights: a reply of many tokens, each a draw from the sampler
    save_model(make_model(seed=3, n_layer=2, n_embd=64, head_size=16, vocab_size=65536), path)
    cfg = (str(path), "", "world", "Be brief.", 12, 1.0, 0.85, 7, True)
    chats = sessions(ui, cfg)
    assert set(chats) == {"tuned", "base"}
    # without an adapter A and B are the same model: the same seed must give the same reply, token for token
    a, b = "".join(chats["tuned"].ask("Where are we?")), "".join(chats["base"].ask("Where are we?"))
    assert a == b and len(a) > 12  # 12 tokens sampled (not an empty reply, where any seed would agree)
    assert chats["tuned"].model is chats["base"].model  # loaded once, kept on the Ui
    assert list(sessions(ui, cfg[:-1] + (False,))) == ["tuned"]


def test_the_cache_holds_one_chats_models_in_the_clis_dtype(tmp_path):
    """Each model tried in the tab used to stay loaded, in fp32, for the life of the server. Now the cache keeps
    the current chat's pair (tuned and base) and loads as `rwkv-peft chat` does (--dtype auto)."""
    import gc
    import weakref

    import torch

    from peft_rwkv7.model import save_model
    from peft_rwkv7.ops.precision import choose_bf16
    from tests.conftest import make_model

    ui = Ui(tmp_path)
    paths = []
    for seed in (3, 4):
        paths.append(str(tmp_path / f"m{seed}.pth"))
        save_model(make_model(seed=seed, n_layer=1, n_embd=64, head_size=16, vocab_size=65536), paths[-1])
    first = sessions(ui, (paths[0], "", "world", "", 4, 1.0, 0.85, 0, True))
    want = torch.bfloat16 if choose_bf16("auto", "cpu", "--dtype", say=False) else torch.float32
    assert first["tuned"].model.emb.weight.dtype == want
    gone = weakref.ref(first["tuned"].model)
    del first
    second = sessions(ui, (paths[1], "", "world", "", 4, 1.0, 0.85, 0, True))
    gc.collect()
    assert gone() is None  # the first chat's model was let go
    assert [k for k in ui.cache if k[0] == "chat"] == [("chat", paths[1], None)]
    assert second["tuned"].model is second["base"].model
