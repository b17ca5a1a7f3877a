"""The public API's file functions (load_model, save_model, save_adapter, load_adapter) called with plausible
mistakes: each names the argument it got wrong in one line, and none writes a file another function then refuses.
Found by fuzzing the Python API; every expected line is written out by hand."""

from __future__ import annotations

import pytest
import torch

from peft_rwkv7 import MethodConfig, attach, load_adapter, load_model, merge, save_adapter, save_model
from peft_rwkv7.errors import UserError
from tests.conftest import make_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "base.pth"
    save_model(make_model(seed=5), path, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("api") / "run"
    save_adapter(attach(load_model(base), MethodConfig(kind="lora", r=2)), d)
    return d


@pytest.mark.parametrize("name, want", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32),
                                        (torch.float16, torch.float16)])
def test_a_dtype_by_name_or_as_torchs_loads_and_saves(base, tmp_path, name, want):
    m = load_model(base, dtype=name)
    assert m.emb.weight.dtype == want
    save_model(m, tmp_path / "m.pth", dtype=name)
    assert torch.load(tmp_path / "m.pth", weights_only=True)["head.weight"].dtype == want


@pytest.mark.parametrize("fn", ["load_model", "save_model"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "float16", "int8", None])
def test_any_other_dtype_is_refused_before_anything_is_written(base, tmp_path, fn, dtype):
    """save_model(dtype=torch.int8) wrote int8 weights that load_model refuses; "fp16" was "Invalid device string"."""
    with pytest.raises(ValueError) as e:
        load_model(base, dtype=dtype) if fn == "load_model" else save_model(make_model(), tmp_path / "m.pth", dtype)
    assert str(e.value) == (f"{fn}: dtype must be one of bf16, fp16, fp32 (or torch.bfloat16, torch.float16, "
                            f"torch.float32), got {dtype!r}")
    assert not (tmp_path / "m.pth").exists()


@pytest.mark.parametrize("device, want", [
    ("gpu", "load_model: device gpu: not a device (cpu, cuda, cuda:N or auto)"),
    ("cuda:0", "load_model: device cuda:0: no CUDA device is available (use cpu or auto)"),
])
def test_a_device_that_is_none_or_absent_is_one_line(base, monkeypatch, device, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as e:
        load_model(base, device=device)
    assert str(e.value) == want


def test_auto_and_a_torch_device_load_on_the_cpu(base, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_model(base, device="auto").emb.weight.device.type == "cpu"
    assert load_model(base, device=torch.device("cpu")).emb.weight.device.type == "cpu"


def test_save_model_of_an_adapted_model_is_refused(base, tmp_path):
    """It wrote a .pth under peft's key names (model.blocks...) that load_model refused as "missing keys"."""
    adapted = attach(load_model(base), MethodConfig(kind="lora", r=2))
    with pytest.raises(TypeError) as e:
        save_model(adapted, tmp_path / "m.pth")
    assert str(e.value) == ("save_model: expected an RWKV7, got AdaptedRWKV7; an adapted model is saved with "
                            "save_adapter, or merge(adapted) gives the RWKV7 to save")
    assert not (tmp_path / "m.pth").exists()
    save_model(merge(adapted), tmp_path / "m.pth")  # what the message says works
    load_model(tmp_path / "m.pth")


def test_save_adapter_of_a_plain_model_and_into_a_file(base, tmp_path):
    with pytest.raises(TypeError) as e:
        save_adapter(load_model(base), tmp_path / "run")
    assert str(e.value) == ("save_adapter: expected an adapted model (what attach or load_adapter returns), got RWKV7; "
                            "a plain RWKV7 is saved with save_model")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError) as e:
        save_adapter(attach(load_model(base), MethodConfig(kind="lora", r=2)), tmp_path / "file" / "run")
    assert str(e.value) == f"{tmp_path / 'file' / 'run'}: cannot write an adapter folder here (Not a directory); " \
                           "choose another path"
    assert (tmp_path / "file").read_text() == "mine"


def test_load_adapter_onto_what_is_no_fresh_base(base, run):
    """A path given as the model was "'str' object has no attribute 'state_dict'"; an adapted model's .model was
    "adapter was trained on base X, but this model is Y"."""
    with pytest.raises(TypeError) as e:
        load_adapter(str(base), run)
    assert str(e.value) == ("load_adapter expects a plain RWKV7 (load a fresh base model to attach another method), "
                            "got str")
    adapted = load_adapter(load_model(base), run)
    with pytest.raises(UserError) as e:
        load_adapter(adapted.model, run)
    assert str(e.value) == ("load_adapter: this RWKV7 has a method attached already (it is an adapted model's .model); "
                            "detach it first, or load a fresh base model to attach another method")
