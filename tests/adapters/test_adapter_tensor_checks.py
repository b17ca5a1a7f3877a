"""`merge` and `export` on adapter files damaged or edited by hand: they build no model, so before these checks a
LoRA pair with a half missing ended in a traceback, and a factor of the wrong shape, a module past the model's layers
or a state of another shape was merged or exported without a word (exit 0, a broken model). Each is now one line
naming the file and the tensor, exit 2. Expectations are written out by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_rwkv7 import MethodConfig, attach
from peft_rwkv7.adapters.files import read_adapter, save_adapter
from peft_rwkv7.cli import main
from peft_rwkv7.model import load_model, read_state_dict


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_path):
    """A LoRA (r 4, alpha 8) run and a state run, with nonzero trained tensors, on the 2-layer, 64-wide base."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, method in (("lora", MethodConfig(kind="lora", r=4, alpha=8)), ("state", MethodConfig(kind="state")),
                         ("pissa", MethodConfig(kind="pissa", r=4, alpha=8))):
        adapted = attach(load_model(base_path), method)
        with torch.no_grad():
            for n, p in adapted.named_parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        save_adapter(adapted, root / name, base_path=str(base_path))
        out[name] = root / name
    return out


def damaged(run: Path, tmp_path: Path, edit_tensors=None, edit_meta=None) -> Path:
    copy = tmp_path / f"{run.name}_copy"
    shutil.copytree(run, copy)
    if edit_tensors is not None:
        t = load_file(copy / "adapter.safetensors")
        edit_tensors(t)
        save_file(t, copy / "adapter.safetensors")
    if edit_meta is not None:
        meta = json.loads((copy / "adapter.json").read_text())
        edit_meta(meta)
        (copy / "adapter.json").write_text(json.dumps(meta))
    return copy


def merge_error(capsys, base_path, adapter: Path, tmp_path: Path) -> str:
    out = tmp_path / "merged.pth"
    rc = main(["merge", "--base", str(base_path), "--adapter", str(adapter), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not out.exists()  # nothing written
    return lines[0].removeprefix("error: ")


KEY = "blocks.0.att.key"


def _drop(key):
    return lambda t: t.pop(key)


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


LORA_CASES = {
    "no-lora_B": (_drop(f"{KEY}.lora_B"), f"adapter has no tensor {KEY}.lora_B"),
    "1-D lora_A": (_set(f"{KEY}.lora_A", torch.zeros(64)),
                   f"{KEY}.lora_A is [64] and lora_B [64, 4], expected [4, in] and [out, 4] for rank 4"),
    "lora_A too wide": (_set(f"{KEY}.lora_A", torch.zeros(4, 65)),
                        f"{KEY}.lora_B @ lora_A is [64, 65], the base's {KEY}.weight is [64, 64]"),
    "rank 8": (lambda t: t.update({f"{KEY}.lora_A": torch.zeros(8, 64), f"{KEY}.lora_B": torch.zeros(64, 8)}),
               f"{KEY}.lora_A is [8, 64] and lora_B [64, 8], expected [4, in] and [out, 4] for rank 4"),
    "layer 9": (lambda t: t.update({"blocks.9.att.key.lora_A": torch.zeros(4, 64),
                                    "blocks.9.att.key.lora_B": torch.zeros(64, 4)}),
                "blocks.9.att.key.lora_A adapts blocks.9.att.key, which a model of 2 layers does not have"),
    "int lora_A": (_set(f"{KEY}.lora_A", torch.zeros(4, 64, dtype=torch.int64)),
                   f"{KEY}.lora_A has dtype torch.int64, expected a floating-point tensor"),
    "state in a LoRA run": (_set("blocks.0.att.time_state", torch.zeros(4, 16, 16)),
                            "blocks.0.att.time_state is a trained state, which this adapter's method (lora) does not "
                            "train"),
}


STATE_CASES = {
    "shape": (_set("blocks.1.att.time_state", torch.zeros(2, 32, 16)),
              "blocks.1.att.time_state is [2, 32, 16], expected [4, 16, 16]"),
    "layer 9": (_set("blocks.9.att.time_state", torch.zeros(4, 16, 16)),
                "blocks.9.att.time_state is for layer 9, the model has 2 layers"),
    "lora_A": (_set(f"{KEY}.lora_A", torch.zeros(4, 64)),
               f"{KEY}.lora_A adapts att.key, which this adapter's method (state) does not"),
}


CASES = {**{("lora", k): v for k, v in LORA_CASES.items()}, **{("state", k): v for k, v in STATE_CASES.items()}}


@pytest.mark.parametrize("case", list(CASES), ids=[f"{run}-{name}" for run, name in CASES])
def test_a_damaged_adapter_is_refused_by_merge(runs, base_path, tmp_path, capsys, case):
    edit, expected = CASES[case]
    run = damaged(runs[case[0]], tmp_path, edit_tensors=edit)
    msg = merge_error(capsys, base_path, run, tmp_path)
    assert msg.startswith(str(run)) and msg.endswith(expected), msg


def test_an_edited_r_is_refused_not_merged_with_the_wrong_scale(runs, base_path, tmp_path, capsys):
    """adapter.json says r 8 where the factors are rank 4: alpha / r would halve the update."""
    run = damaged(runs["lora"], tmp_path, edit_meta=lambda m: m["method"].update(r=8))
    msg = merge_error(capsys, base_path, run, tmp_path)
    assert msg.endswith("lora_A is [4, 64] and lora_B [64, 4], expected [8, in] and [out, 8] for rank 8"), msg
    # PiSSA stores rank 2r (the trained factors and the start): an r of 2 would split them in the wrong place
    run = damaged(runs["pissa"], tmp_path, edit_meta=lambda m: m["method"].update(r=2))
    msg = merge_error(capsys, base_path, run, tmp_path)
    assert msg.endswith("lora_A is [8, 64] and lora_B [64, 8], expected [4, in] and [out, 4] for rank 4 (r 2, stored "
                        "as rank 4: the trained factors and the start)"), msg


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda m: m["base"].update(dtype="fp8"), "base.dtype is 'fp8', expected one of fp32, bf16, fp16"),
    (lambda m: m["base"].update(dtype=None), "base.dtype is None, expected one of fp32, bf16, fp16"),
    (lambda m: m["base"].update(dtype=["bf16"]), "base.dtype is ['bf16'], expected one of fp32, bf16, fp16"),
    (lambda m: m.update(base=[]), "base is list, expected an object (fingerprint, path, dtype)"),
    (lambda m: m["base"].update(fingerprint=7), "base.fingerprint is 7, expected a string"),
    (lambda m: m["base"].update(config={"layers": 2}), "base.config is not a model shape (n_layer, n_embd, ...)"),
], ids=["fp8", "null", "list", "base-list", "fingerprint", "config"])
def test_a_damaged_base_section_is_one_line(runs, base_path, tmp_path, capsys, edit, expected):
    run = damaged(runs["lora"], tmp_path, edit_meta=edit)
    msg = merge_error(capsys, base_path, run, tmp_path)
    assert msg == f"{run / 'adapter.json'}: {expected}", msg


def test_an_fp16_copy_of_an_adapter_merges_as_its_values(runs, base_path, tmp_path):
    """An adapter whose tensors were cast to fp16 elsewhere reads as fp32 of those values (it ended in
    "expected m1 and m2 to have the same dtype")."""
    half = damaged(runs["lora"], tmp_path, edit_tensors=lambda t: t.update({k: v.half() for k, v in t.items()}))
    af = read_adapter(half)
    want = load_file(runs["lora"] / "adapter.safetensors")
    assert all(t.dtype == torch.float32 and torch.equal(t, want[k].half().float()) for k, t in af.tensors.items())
    assert main(["merge", "--base", str(base_path), "--adapter", str(half), "--out", str(tmp_path / "m.pth")]) == 0


def test_the_exports_refuse_what_merge_refuses(runs, base_path, tmp_path, capsys):
    run = damaged(runs["lora"], tmp_path, edit_tensors=_drop(f"{KEY}.lora_B"))
    for fmt, out in (("rwkv-peft", "a.pth"), ("st", "a.st")):
        rc = main(["export", "--adapter", str(run), "--format", fmt, "--out", str(tmp_path / out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.strip() == f"error: {run / 'adapter.safetensors'}: adapter has no tensor {KEY}.lora_B"
        assert not (tmp_path / out).exists()


def test_a_state_dict_with_a_name_that_is_no_string_is_refused(tmp_path, base_path):
    sd = read_state_dict(base_path)
    torch.save({**sd, 5: torch.zeros(1)}, tmp_path / "intkey.pth")
    with pytest.raises(Exception) as e:
        read_state_dict(tmp_path / "intkey.pth")
    assert str(e.value) == f"{tmp_path / 'intkey.pth'}: expected a dict of tensors under string names (an RWKV .pth " \
                           "state dict)"


def test_a_training_checkpoint_given_as_the_adapter_says_what_to_give(runs, base_path, tmp_path, capsys):
    pt = tmp_path / "run" / "checkpoints" / "step_000002.pt"
    pt.parent.mkdir(parents=True)
    torch.save({"step": 2}, pt)
    msg = merge_error(capsys, base_path, pt, tmp_path)
    assert msg == (f"{pt}: a training checkpoint (for --resume), not an adapter; give the run directory "
                   f"{tmp_path / 'run'}: its adapter is the one of its newest checkpoint")


def test_a_damaged_base_is_named_by_its_path(runs, base_path, tmp_path, capsys):
    sd = read_state_dict(base_path)
    sd["blocks.1.att.key.weight"] = torch.zeros(64, 32)
    torch.save(sd, tmp_path / "shape.pth")
    msg = merge_error(capsys, tmp_path / "shape.pth", runs["lora"], tmp_path)
    assert msg == (f"{tmp_path / 'shape.pth'}: inconsistent shapes: blocks.1.att.key.weight is [64, 32], expected "
                   "[64, 64]")


def test_an_adapter_json_that_is_no_text_says_so(runs, base_path, tmp_path, capsys):
    run = damaged(runs["lora"], tmp_path)
    (run / "adapter.json").write_bytes(b"\xc9\x00\xff{}")
    msg = merge_error(capsys, base_path, run, tmp_path)
    assert msg == f"{run / 'adapter.json'}: not UTF-8 text (byte 0), expected a JSON file"
