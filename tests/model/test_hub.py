"""hf://OWNER/REPO/FILE.pth references resolve from a local Hugging Face cache without network."""

from __future__ import annotations

import pytest

from peft_rwkv7.errors import UserError
from peft_rwkv7.model import load_model, save_model
from peft_rwkv7.model.hub import resolve_model_path
from tests.conftest import make_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root, repo: str, filename: str, model) -> None:
    """The folder layout huggingface_hub itself writes: models--OWNER--REPO/{refs/main, snapshots/SHA/FILE}."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snap = folder / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    save_model(model, snap / filename)


def test_hf_reference_loads_from_cache_offline(tmp_path):
    model = make_model(seed=31)
    fake_cache(tmp_path, "BlinkDL/rwkv-7-world", "tiny.pth", model)
    path = resolve_model_path("hf://BlinkDL/rwkv-7-world/tiny.pth", cache_dir=str(tmp_path))
    assert path.name == "tiny.pth" and COMMIT in str(path)
    assert load_model(path).config == model.config


def test_local_paths_pass_through(tmp_path):
    assert str(resolve_model_path(str(tmp_path / "x.pth"))) == str(tmp_path / "x.pth")


@pytest.mark.parametrize("ref", ["hf://only-owner", "hf://owner/repo", "hf://owner//file.pth"])
def test_malformed_hf_reference(ref):
    with pytest.raises(UserError, match="expected hf://OWNER/REPO/FILE.pth"):
        resolve_model_path(ref)
