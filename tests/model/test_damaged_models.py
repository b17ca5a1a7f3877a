"""`convert` and the HF reader on model files damaged or edited by hand (found by fuzzing the CLI): an integer
weight was converted (exit 0) though `generate` refuses it, a NaN weight was called "beyond the fp16 range" under
the output's name, a damaged model was named "model", and a config.json with a quoted number or bytes that are no
UTF-8 gave messages that did not say so. Each is one line naming the input, exit 2. Expectations written by hand."""

from __future__ import annotations

import json

import pytest
import torch

from peft_rwkv7.cli import main
from peft_rwkv7.model import save_model
from tests.conftest import make_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    save_model(make_model(seed=4), d / "good.pth")
    return d / "good.pth"


def convert_error(capsys, src, out) -> str:
    rc = main(["convert", str(src), str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not out.exists()
    return lines[0].removeprefix("error: ")


def damaged(good, tmp_path, name, edit):
    sd = torch.load(good, weights_only=True)
    edit(sd)
    torch.save(sd, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("out", ["m.st", "m.pth", "hf"])
def test_an_integer_weight_is_refused_by_convert(good, tmp_path, capsys, out):
    src = damaged(good, tmp_path, "int.pth", lambda sd: sd.update({"blocks.0.att.w0": torch.zeros(1, 1, 64,
                                                                                                   dtype=torch.int32)}))
    msg = convert_error(capsys, src, tmp_path / out)
    assert msg == f"{src}: blocks.0.att.w0 has dtype torch.int32, expected bf16, fp16 or fp32"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_named_as_such_under_the_inputs_name(good, tmp_path, capsys, value):
    src = damaged(good, tmp_path, "nan.pth", lambda sd: sd["blocks.0.att.w0"].view(-1).__setitem__(3, value))
    msg = convert_error(capsys, src, tmp_path / "m.st")
    assert msg == f"{src}: blocks.0.att.w0 has non-finite values (NaN or inf); the model is damaged"


def test_a_value_beyond_fp16_is_still_its_own_message(good, tmp_path, capsys):
    src = damaged(good, tmp_path, "big.pth", lambda sd: sd.update({"blocks.0.att.w0": torch.full((1, 1, 64), 7e4)}))
    msg = convert_error(capsys, src, tmp_path / "m.st")
    assert msg == (f"{src}: blocks.0.att.w0 has values beyond the fp16 range (max |x| = 70000); the .st format "
                   "stores fp16")


def test_a_damaged_model_is_named_by_its_path(good, tmp_path, capsys):
    src = damaged(good, tmp_path, "shape.pth", lambda sd: sd.update({"blocks.1.att.key.weight": torch.zeros(64, 32)}))
    msg = convert_error(capsys, src, tmp_path / "m.st")
    assert msg == f"{src}: inconsistent shapes: blocks.1.att.key.weight is [64, 32], expected [64, 64]"


@pytest.fixture(scope="module")
def hf_dir(good, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "hf"
    assert main(["convert", str(good), str(d)]) == 0
    return d


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda c: c.update(hidden_size="64"), "hidden_size is '64', expected an integer"),
    (lambda c: c.update(num_hidden_layers=2.0), "num_hidden_layers is 2.0, expected an integer"),
    (lambda c: c.update(head_dim=True), "head_dim is True, expected an integer"),
    (lambda c: (c.pop("intermediate_size"), c.update(hidden_ratio="x")), "hidden_ratio is 'x', expected a number"),
], ids=["str", "float", "bool", "ratio"])
def test_a_config_number_of_another_type_is_named(hf_dir, tmp_path, capsys, edit, expected):
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    conf = json.loads((d / "config.json").read_text())
    edit(conf)
    (d / "config.json").write_text(json.dumps(conf))
    msg = convert_error(capsys, d, tmp_path / "m.pth")
    assert msg == f"{d / 'config.json'}: {expected}"


def test_a_config_that_is_no_text_says_so(hf_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    (d / "config.json").write_bytes(b"\xc9\x00\xff{}")
    msg = convert_error(capsys, d, tmp_path / "m.pth")
    assert msg == f"{d / 'config.json'}: not UTF-8 text (byte 0), expected a JSON file"


@pytest.mark.parametrize("key, shape, want", [
    ("blocks.0.att.time_state", (4, 16, 8), "inconsistent shapes: blocks.0.att.time_state is [4, 16, 8], expected "
                                            "[4, 16, 16]"),
    ("blocks.1.att.time_state", (64,), "inconsistent shapes: blocks.1.att.time_state is [64], expected [4, 16, 16]"),
    ("blocks.7.att.time_state", (4, 16, 16), "unexpected keys for RWKV-7: blocks.7.att.time_state"),
    ("blocks.x.att.time_state", (4, 16, 16), "unexpected keys for RWKV-7: blocks.x.att.time_state"),
])
def test_a_state_tuned_models_time_state_is_checked_like_its_weights(good, tmp_path, capsys, key, shape, want):
    """Found by fuzzing: convert wrote a model whose time_state had any shape, or was for a layer the model does not
    have (the 2-layer model here has 4 heads of 16: a state is 4 x 16 x 16 per layer)."""
    src = damaged(good, tmp_path, "state.pth", lambda sd: sd.update({key: torch.zeros(shape)}))
    assert convert_error(capsys, src, tmp_path / "m.pth") == f"{src}: {want}"


def test_a_well_shaped_time_state_converts(good, tmp_path, capsys):
    state = torch.randn(4, 16, 16)
    src = damaged(good, tmp_path, "state.pth", lambda sd: sd.update({"blocks.1.att.time_state": state}))
    assert main(["convert", str(src), str(tmp_path / "m.pth")]) == 0, capsys.readouterr().err
    assert torch.equal(torch.load(tmp_path / "m.pth", weights_only=True)["blocks.1.att.time_state"].float(), state)
