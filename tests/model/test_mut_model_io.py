"""What model/io.py's tests had left open (mutation testing, `scripts/mutation.sh model_io`): a tuned initial state
kept in fp32 through a bf16 save and a bf16 load, the device choice, and where an atomic write puts its temp file.
Expectations are written out by hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from peft_rwkv7.errors import UserError
from peft_rwkv7.model import CheckpointError, load_model, model_from_state_dict, pick_device, save_model
from peft_rwkv7.model.io import atomic_write, atomic_write_all, official_state_dict, read_state_dict
from tests.conftest import make_model


def tuned_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """make_model's weights in fp32 with a time_state per layer whose values bf16 cannot hold (1 + 2^-20 steps)."""
    sd = {k: v.clone() for k, v in make_model(seed=seed).state_dict().items()}
    for i in range(2):
        sd[f"blocks.{i}.att.time_state"] = 1 + torch.arange(4 * 16 * 16, dtype=torch.float32).view(4, 16, 16) * 2**-20
    return sd


def test_a_tuned_state_stays_fp32_through_a_bf16_save_and_load(tmp_path):
    sd = tuned_state_dict()
    model = model_from_state_dict(sd, dtype=torch.bfloat16)
    for i, blk in enumerate(model.blocks):
        ts = blk.att.time_state
        assert ts.dtype == torch.float32 and torch.equal(ts, sd[f"blocks.{i}.att.time_state"])
    assert model.blocks[0].att.key.weight.dtype == torch.bfloat16
    save_model(model, tmp_path / "tuned.pth")  # bf16 by default
    back = torch.load(tmp_path / "tuned.pth", weights_only=True)
    for i in range(2):
        assert back[f"blocks.{i}.att.time_state"].dtype == torch.float32
        assert torch.equal(back[f"blocks.{i}.att.time_state"], sd[f"blocks.{i}.att.time_state"])
    assert back["blocks.1.att.key.weight"].dtype == torch.bfloat16
    out = official_state_dict(load_model(tmp_path / "tuned.pth"), torch.float16)
    assert out["blocks.1.att.time_state"].dtype == torch.float32 and out["emb.weight"].dtype == torch.float16
    assert all(t.is_contiguous() for t in out.values())


def test_a_state_of_the_wrong_shape_is_refused(tmp_path):
    sd = tuned_state_dict()
    sd["blocks.1.att.time_state"] = torch.zeros(4, 16, 8)
    with pytest.raises(CheckpointError, match=r"^m.pth: inconsistent shapes: blocks.1.att.time_state is "
                                              r"\[4, 16, 8\], expected \[4, 16, 16\]$"):
        model_from_state_dict(sd, source="m.pth")


def test_an_integer_tensor_is_refused_by_name():
    sd = tuned_state_dict()
    sd["blocks.0.att.x_r"] = sd["blocks.0.att.x_r"].to(torch.int32)
    with pytest.raises(CheckpointError, match=r"^m.pth: blocks.0.att.x_r has dtype torch.int32, expected bf16, "
                                              r"fp16 or fp32$"):
        model_from_state_dict(sd, source="m.pth")


def test_a_legacy_non_zip_checkpoint_reads(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False): older tools' files, which mmap cannot open."""
    sd = tuned_state_dict()
    torch.save(sd, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    back = read_state_dict(tmp_path / "old.pth")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_the_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", "train.device") == torch.device("cpu")
    assert pick_device("cpu", "train.device") == torch.device("cpu")
    with pytest.raises(UserError, match=r"^train.device cuda: no CUDA device is available \(use cpu or auto\)$"):
        pick_device("cuda", "train.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto", "--device") == torch.device("cuda")
    assert pick_device("cuda", "--device") == torch.device("cuda")
    assert pick_device("cpu", "--device") == torch.device("cpu")


def test_an_atomic_write_makes_its_folders_and_its_temp_file_beside_the_target(tmp_path):
    target = tmp_path / "a" / "b" / "out.pth"
    seen = []

    def write(f):
        seen.extend(target.parent.iterdir())  # while it is written: the temp file (f.name is only its descriptor)
        f.write(b"data")

    old = os.umask(0o022)
    try:
        atomic_write(target, write)
    finally:
        os.umask(old)
    assert target.read_bytes() == b"data" and (target.stat().st_mode & 0o777) == 0o644
    assert len(seen) == 1
    tmp = seen[0]
    # same folder, so the rename is atomic (one file system); hidden and named after the target
    assert tmp.parent == target.parent and tmp.name.startswith(".out.pth.") and tmp.name.endswith(".tmp")
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.pth"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "out.pth"
    target.write_bytes(b"the user's file")

    def full_disk(f):
        f.write(b"part")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError) as e:
        atomic_write(target, full_disk)
    assert str(e.value) == f"{target}: cannot write here (No space left on device); choose another path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"] and target.read_bytes() == b"the user's file"

    def interrupted(f):
        f.write(b"part")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"] and target.read_bytes() == b"the user's file"


def test_files_written_together_replace_none_until_all_are_written(tmp_path):
    """atomic_write_all: an adapter's tensors, state and metadata are one save. While a later file is written the
    earlier targets still hold the old save; a write that fails (disk full, Ctrl-C) replaces none of them."""
    names = ["adapter.safetensors", "state.pth", "adapter.json"]
    for n in names:
        (tmp_path / n).write_bytes(b"old " + n.encode())
    seen = []

    def writer(n):
        def write(f):
            seen.append([(tmp_path / m).read_bytes() for m in names])  # the targets while this one is written
            f.write(b"new " + n.encode())
        return write

    atomic_write_all([(tmp_path / n, writer(n)) for n in names])
    assert seen == [[b"old " + n.encode() for n in names]] * 3
    assert [(tmp_path / n).read_bytes() for n in names] == [b"new " + n.encode() for n in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)

    for fail in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        def failing(f, fail=fail):
            f.write(b"part")
            raise fail

        files = [(tmp_path / names[0], lambda f: f.write(b"newer")), (tmp_path / names[1], failing),
                 (tmp_path / names[2], lambda f: f.write(b"newer"))]
        with pytest.raises(UserError if isinstance(fail, OSError) else KeyboardInterrupt) as e:
            atomic_write_all(files)
        if isinstance(fail, OSError):  # the file that failed, by its own name
            assert str(e.value) == f"{tmp_path / names[1]}: cannot write here (No space left on device); " \
                                   "choose another path"
        assert [(tmp_path / n).read_bytes() for n in names] == [b"new " + n.encode() for n in names]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temp file left


def test_a_folder_that_cannot_be_made_names_the_reason(tmp_path):
    (tmp_path / "a_file").write_text("x")
    target = tmp_path / "a_file" / "out.pth"
    with pytest.raises(UserError) as e:
        atomic_write(target, lambda f: f.write(b"data"))
    assert str(e.value) in (f"{target}: cannot write here (Not a directory); choose another path",
                            f"{target}: cannot write here (File exists); choose another path")


class _Planted:
    """Unpickling this runs code: a file that holds it must be refused without running it (weights_only)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path, zipfile):
    marker = tmp_path / "ran"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": _Planted(str(marker))}, tmp_path / "evil.pth",
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError, match=r"^.*evil\.pth: cannot read as a PyTorch checkpoint \(truncated or "
                                              r"corrupt\?\): "):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_model_file_is_mapped_not_read_into_memory_and_lands_on_the_cpu(tmp_path, monkeypatch):
    save_model(make_model(seed=2), tmp_path / "m.pth")
    calls, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    read_state_dict(tmp_path / "m.pth")
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


@pytest.mark.parametrize(("content", "reason"), [
    (b"not a checkpoint\n", "UnpicklingError"),
    (b"", "EOFError"),
], ids=["text", "empty"])
def test_the_reason_a_file_cannot_be_read_is_one_short_phrase(tmp_path, content, reason):
    (tmp_path / "bad.pth").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(tmp_path / "bad.pth")
    head = f"{tmp_path / 'bad.pth'}: cannot read as a PyTorch checkpoint (truncated or corrupt?): "
    assert str(e.value) == head + reason


def test_load_model_and_new_model_pass_their_settings_on(tmp_path):
    save_model(make_model(seed=2), tmp_path / "m.pth", dtype=torch.float32)
    m = load_model(tmp_path / "m.pth", torch.bfloat16, "cpu", wkv_backend="reference")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and m.blocks[0].att.wkv_backend == "reference"
    from peft_rwkv7.model import RWKV7Config, new_model
    from peft_rwkv7.model.init import init_weights
    from peft_rwkv7.model.rwkv7 import RWKV7

    cfg = RWKV7Config.new(n_layer=2, n_embd=64, vocab_size=97, head_size=16)
    a, b = new_model(cfg, seed=3, wkv_backend="reference"), init_weights(RWKV7(cfg), seed=3)
    assert a.blocks[1].att.wkv_backend == "reference"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(new_model(cfg).blocks[0].att.key.weight, a.blocks[0].att.key.weight)  # seed 0 differs


@pytest.mark.parametrize("payload", [{"emb.weight": torch.zeros(2), "step": 3}, [torch.zeros(2)]], ids=["int", "list"])
def test_a_file_of_something_else_than_named_tensors_is_refused(tmp_path, payload):
    torch.save(payload, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as e:
        read_state_dict(tmp_path / "other.pth")
    assert str(e.value).startswith(f"{tmp_path / 'other.pth'}: expected a dict of tensors")


def test_torchs_reason_for_a_cut_zip_is_kept(tmp_path):
    save_model(make_model(seed=2), tmp_path / "m.pth")
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        read_state_dict(tmp_path / "cut.pth")
    # torch's RuntimeError, its first sentence: not the bare type name
    assert str(e.value).startswith(f"{tmp_path / 'cut.pth'}: cannot read as a PyTorch checkpoint (truncated or "
                                   "corrupt?): PytorchStreamReader failed")


def test_defaults_name_the_checkpoint_and_seed_zero():
    sd = tuned_state_dict()
    sd["blocks.1.att.time_state"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"^checkpoint: inconsistent shapes: blocks\.1\.att\.time_state is \[1\]"):
        model_from_state_dict(sd)
    from peft_rwkv7.model import RWKV7Config, new_model
    from peft_rwkv7.model.init import init_weights
    from peft_rwkv7.model.rwkv7 import RWKV7

    cfg = RWKV7Config.new(n_layer=1, n_embd=32, vocab_size=11, head_size=16)
    a, b = new_model(cfg), init_weights(RWKV7(cfg), seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_an_error_without_words_is_named_by_its_type(tmp_path, monkeypatch):
    (tmp_path / "m.pth").write_bytes(b"x")

    def fail(*args, **kwargs):
        raise RuntimeError("")

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(tmp_path / "m.pth")
    assert str(e.value) == f"{tmp_path / 'm.pth'}: cannot read as a PyTorch checkpoint (truncated or corrupt?): " \
                           "RuntimeError"
