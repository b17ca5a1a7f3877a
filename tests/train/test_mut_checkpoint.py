"""What the tests of train/checkpoint.py (one process's checkpoints: exact resume) had left open, found by
`scripts/mutation.sh checkpoint`: the RNG states of every generator coming back (a GPU's included, its functions
faked here), Ctrl-C held until a save is written, which checkpoints pruning keeps, what a checkpoint holds, which
one a resume reads when the newest is damaged, the extra state (AdaLoRA's) restored, and every refusal's line.

Expectations are by hand: the numbers each generator draws, file names, exact messages."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_rwkv7.errors import UserError
from peft_rwkv7.train import checkpoint as ckpt


def _draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_every_generators_state_comes_back():
    saved = ckpt.rng_state()
    first = _draws()
    _draws()
    ckpt.set_rng_state(saved)
    assert _draws() == first


class _FakeCuda:
    """torch.cuda's RNG functions on a machine without a GPU: what they were called with."""

    def __init__(self, monkeypatch, available: bool = True):
        self.calls = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7, 8], dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: self.calls.append("get_all") or [])
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: self.calls.append(("set", s.tolist())))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: self.calls.append(("set_all", len(s))))


def test_a_gpus_rng_state_is_its_own_devices(monkeypatch):
    """This process's device only (get_rng_state_all would open a context on every visible GPU), and restored so;
    a checkpoint of before (every device's states, a list) restores every device's."""
    cuda = _FakeCuda(monkeypatch)
    state = ckpt.rng_state()
    assert state["cuda"].tolist() == [7, 8] and cuda.calls == []
    ckpt.set_rng_state(state)
    assert cuda.calls == [("set", [7, 8])]
    cuda.calls.clear()
    ckpt.set_rng_state({**state, "cuda": [torch.zeros(2), torch.zeros(2)]})
    assert cuda.calls == [("set_all", 2)]
    cuda.calls.clear()
    ckpt.set_rng_state({k: v for k, v in state.items() if k != "cuda"})  # written on a CPU: the GPU keeps its own
    assert cuda.calls == []


def test_a_gpu_state_is_not_restored_where_there_is_no_gpu(monkeypatch):
    saved = ckpt.rng_state()
    cuda = _FakeCuda(monkeypatch, available=False)
    ckpt.set_rng_state({**saved, "cuda": torch.tensor([1], dtype=torch.uint8)})  # a GPU run resumed on a CPU
    assert cuda.calls == []


def _layout(run: Path, files=(1, 2, 3), folders=(), garbage=()) -> Path:
    d = run / "checkpoints"
    d.mkdir(parents=True)
    for s in files:
        (d / f"step_{s:06d}.pt").write_bytes(b"x")
    for s in folders:
        (d / f"step_{s:06d}").mkdir()
        (d / f"step_{s:06d}" / "meta.json").write_text("{}")
    for name in garbage:
        (d / name).mkdir()
    return d


def test_pruning_keeps_the_newest_and_clears_what_killed_saves_left(tmp_path):
    d = _layout(tmp_path, files=(1, 2, 5), folders=(3, 4), garbage=("step_000006.tmp", "step_000002.old"))
    (d / "step_000007.tmp.file").write_bytes(b"x")  # not a checkpoint's leftover: kept
    ckpt._prune(tmp_path, 2)
    assert sorted(p.name for p in d.iterdir()) == ["step_000004", "step_000005.pt", "step_000007.tmp.file"]
    d = _layout(tmp_path / "all", files=(1, 2), folders=(3,), garbage=("step_000009.tmp",))
    ckpt._prune(tmp_path / "all", 0)  # 0 keeps every checkpoint
    assert sorted(p.name for p in d.iterdir()) == ["step_000001.pt", "step_000002.pt", "step_000003"]
    assert ckpt.has_checkpoint(tmp_path / "all", 3) and not ckpt.has_checkpoint(tmp_path / "all", 4)


class _Extra:
    """An object with training state of its own (AdaLoRA's rank allocator)."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _trained(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [(n, torch.nn.Parameter(torch.randn(*shape, generator=g))) for n, shape in (("a", (2, 3)), ("b", (4,)))]
    opt = torch.optim.AdamW([p for _, p in params], lr=0.1)
    sum(p.square().sum() for _, p in params).backward()
    opt.step()
    return params, opt


def test_a_checkpoint_holds_the_run_as_it_was_and_comes_back(tmp_path):
    params, opt = _trained()
    want = {n: p.detach().clone() for n, p in params}
    path = ckpt.save_checkpoint(tmp_path, 12, params, opt, keep=0, extra={"alloc": _Extra(5)}, precision="bf16",
                                routes={"thin": [16]})
    assert path == tmp_path / "checkpoints" / "step_000012.pt"
    with torch.no_grad():
        for _, p in params:
            p.add_(1.0)  # trained on after the save: the checkpoint keeps what it was
    payload = torch.load(path, weights_only=False)
    assert payload["step"] == 12 and payload["precision"] == "bf16" and payload["routes"] == {"thin": [16]}
    assert payload["extra"] == {"alloc": {"value": 5}}
    assert all(torch.equal(payload["params"][n], want[n]) for n in want)
    assert not any(t.requires_grad for t in payload["params"].values())
    assert ckpt.saved_choices(tmp_path) == ("bf16", {"thin": [16]})

    fresh, fresh_opt = _trained(seed=1)
    extra = _Extra(0)
    assert ckpt.resume(tmp_path, fresh, fresh_opt, extra={"alloc": extra}) == 12
    assert all(torch.equal(p, want[n]) for n, p in fresh)
    assert extra.value == 5
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_a_checkpoint_without_extra_state_is_saved_without_it(tmp_path):
    params, opt = _trained()
    payload = torch.load(ckpt.save_checkpoint(tmp_path, 1, params, opt), weights_only=False)
    assert "extra" not in payload and payload["precision"] is None and payload["routes"] is None
    assert ckpt.resume(tmp_path, *_trained(seed=2)) == 1  # and resumes without extra objects


@pytest.mark.parametrize("precision, want", [("bf16", "bf16"), ("fp32", "fp32"), ("fp16", None), (None, None)])
def test_saved_choices_read_back_only_a_precision_a_run_can_have(tmp_path, precision, want):
    params, opt = _trained()
    ckpt.save_checkpoint(tmp_path, 3, params, opt, precision=precision, routes=[1])
    assert ckpt.saved_choices(tmp_path) == (want, [1])


def test_saved_choices_of_a_deepspeed_checkpoint_and_of_none(tmp_path):
    d = _layout(tmp_path, files=(), folders=(4,))
    (d / "step_000004" / "meta.json").write_text(json.dumps({"precision": "bf16", "routes": {"r": 1}}))
    assert ckpt.saved_choices(tmp_path) == ("bf16", {"r": 1})
    (d / "step_000004" / "meta.json").write_text("{not json")
    assert ckpt.saved_choices(tmp_path) == (None, None)
    assert ckpt.saved_choices(tmp_path / "none") == (None, None)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    params, opt = _trained()
    ckpt.save_checkpoint(tmp_path, 2, params, opt, keep=0)
    ckpt.save_checkpoint(tmp_path, 4, params, opt, keep=0)
    d = tmp_path / "checkpoints"
    (d / "step_000004.pt").write_bytes(b"not a checkpoint")
    (d / "step_000006").mkdir()  # a DeepSpeed folder: not one process's, skipped
    assert ckpt.load_latest_checkpoint(tmp_path)["step"] == 2
    os.replace(d / "step_000002.pt", d / "step_000003.pt")  # a file whose name and step disagree: not trusted
    with pytest.raises(UserError, match=r"step_000004\.pt: cannot be read \(truncated or corrupt: "):
        ckpt.load_latest_checkpoint(tmp_path)
    (d / "step_000004.pt").unlink()
    (d / "step_000003.pt").unlink()
    assert ckpt.load_latest_checkpoint(tmp_path) is None  # no file: a DeepSpeed run's folders only


def test_the_checkpoints_tensors_load_onto_the_cpu(tmp_path, monkeypatch):
    params, opt = _trained()
    ckpt.save_checkpoint(tmp_path, 1, params, opt)
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.append(kw.get("map_location")) or real(*a, **kw))
    ckpt.load_latest_checkpoint(tmp_path)
    assert seen == ["cpu"]


def test_a_checkpoint_for_other_parameters_is_refused_naming_them(tmp_path):
    params, opt = _trained()
    ckpt.save_checkpoint(tmp_path, 1, params, opt)
    payload = ckpt.load_latest_checkpoint(tmp_path)
    others = [(n, torch.nn.Parameter(torch.zeros(1))) for n in ("a", "c", "d", "e", "f")]
    with pytest.raises(UserError) as e:
        ckpt.restore(payload, others, opt, "runs/x")
    assert str(e.value) == "runs/x: checkpoint does not match this recipe's trainable parameters (b, c, d)"
    wrong = [("a", torch.nn.Parameter(torch.zeros(3, 2))), ("b", torch.nn.Parameter(torch.zeros(4)))]
    with pytest.raises(UserError) as e:
        ckpt.restore(payload, wrong, opt, "runs/x")
    assert str(e.value) == "runs/x: checkpoint tensor a is [2, 3], the recipe makes [3, 2]"


def test_a_zero3_partition_is_checked_by_its_full_shape():
    """Under ZeRO-3 a parameter is an empty partition that carries its full shape as ds_shape."""
    p = torch.nn.Parameter(torch.zeros(0))
    p.ds_shape = torch.Size([2, 3])
    ckpt._check_params({"a": [2, 3]}, [("a", p)], "src")
    with pytest.raises(UserError, match=r"^src: checkpoint tensor a is \[0\], the recipe makes \[2, 3\]$"):
        ckpt._check_params({"a": [0]}, [("a", p)], "src")


def test_a_run_needing_state_the_checkpoint_lacks_is_refused(tmp_path):
    params, opt = _trained()
    ckpt.save_checkpoint(tmp_path, 1, params, opt)
    with pytest.raises(UserError) as e:
        ckpt.resume(tmp_path, params, opt, extra={"rankallocator": _Extra(0)})
    assert str(e.value) == (f"{tmp_path}: the checkpoint holds no rankallocator state, which this run needs; resume "
                            "with the run's own recipe or train into a new out_dir")
    ckpt._check_extra({"x": 1}, {"x": {}}, "s")  # held: no error


def test_resume_refusals_are_one_line_each(tmp_path):
    params, opt = _trained()
    with pytest.raises(UserError) as e:
        ckpt.resume(tmp_path, params, opt)
    assert str(e.value) == f"{tmp_path}: nothing to resume (no checkpoints/); run without --resume"
    d = _layout(tmp_path, files=(2,))
    with pytest.raises(UserError) as e:
        ckpt.resume(tmp_path, params, opt)  # its only checkpoint is damaged
    assert str(e.value) == (f"{d / 'step_000002.pt'}: cannot be read (truncated or corrupt: UnpicklingError); no "
                            "readable checkpoint to resume from (train into a new out_dir=... to start over)")
    (d / "step_000003").mkdir()
    with pytest.raises(UserError) as e:
        ckpt.resume(tmp_path, params, opt)  # a DeepSpeed folder without a meta.json
    assert str(e.value).startswith(f"{d / 'step_000003'}: not a readable checkpoint (")


def test_the_default_keeps_the_two_newest(tmp_path):
    params, opt = _trained()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, params, opt)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003.pt", "step_000004.pt"]


def test_a_delete_that_fails_never_stops_a_run_and_the_next_prune_finishes_it(tmp_path, monkeypatch):
    """A checkpoint folder that cannot be deleted now (a file held open elsewhere) is renamed to step_N.old, never
    left half-deleted under a checkpoint's name, and no error stops the training; the next prune deletes it. A
    checkpoint file deleted meanwhile by someone else is no error either."""
    d = _layout(tmp_path, files=(4,), folders=(1, 2, 3))
    real = ckpt.shutil.rmtree

    def failing(path, ignore_errors=False):  # what rmtree does on a file it cannot delete
        if not ignore_errors:
            raise OSError(f"cannot delete {path}")

    monkeypatch.setattr(ckpt.shutil, "rmtree", failing)
    ckpt._prune(tmp_path, 2)
    assert sorted(p.name for p in d.iterdir()) == ["step_000001.old", "step_000002.old", "step_000003",
                                                    "step_000004.pt"]
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    ckpt._prune(tmp_path, 2)
    assert sorted(p.name for p in d.iterdir()) == ["step_000003", "step_000004.pt"]
    monkeypatch.setattr(ckpt, "list_checkpoints", lambda run: [(0, d / "step_000000.pt"), (3, d / "step_000003"),
                                                               (4, d / "step_000004.pt")])
    ckpt._prune(tmp_path, 2)  # step_000000.pt listed, then gone


def test_the_newest_record_is_read_without_its_tensors(tmp_path, monkeypatch):
    """saved_choices maps the newest checkpoint (mmap, onto the CPU) instead of reading its tensors into memory,
    and a file holding something else than a checkpoint's dict is passed over, as resume passes it over."""
    params, opt = _trained()
    ckpt.save_checkpoint(tmp_path, 1, params, opt, precision="fp32")
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    assert ckpt.saved_choices(tmp_path) == ("fp32", None)
    assert seen == [{"map_location": "cpu", "weights_only": False, "mmap": True}]
    torch.save([1, 2], tmp_path / "checkpoints" / "step_000002.pt")
    assert ckpt.saved_choices(tmp_path) == ("fp32", None) and ckpt.resumable_step(tmp_path) == 1
    torch.save([1, 2], tmp_path / "checkpoints" / "step_000001.pt")
    assert ckpt.saved_choices(tmp_path) == (None, None) and ckpt.resumable_step(tmp_path) is None


def _deepspeed_checkpoint(run: Path, step: int, world_size: int) -> Path:
    """A committed DeepSpeed checkpoint of `_trained`'s parameters under ZeRO-2 as resume reads it: meta.json and
    rank 0's RNG states (now's), the engine's shards left to the fake engine."""
    folder = run / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"step": step, "world_size": world_size, "zero_stage": 2,
            "params": {"a": {"shape": [2, 3]}, "b": {"shape": [4]}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    torch.save(ckpt.rng_state(), folder / "rng_rank00000.pt")
    return folder


class _FakeEngine:
    """DeepSpeed's engine as resume sees it: load_checkpoint's arguments recorded, its shards not read."""

    def __init__(self):
        self.loads = []

    def load_checkpoint(self, path, **kw):
        self.loads.append((path, kw))
        return path, {}


def test_a_deepspeed_checkpoint_resumes_through_the_engine_with_this_ranks_own_state(tmp_path):
    """One process under DeepSpeed: the engine loads its shards (frozen weights left out), this rank's RNG states
    and extra state come from its own files, the step from meta.json."""
    params, _ = _trained()
    folder = _deepspeed_checkpoint(tmp_path, 5, world_size=1)
    first = _draws()
    torch.save({"alloc": {"value": 9}}, folder / "extra_rank00000.pt")
    engine, extra = _FakeEngine(), _Extra(0)
    assert ckpt.resume(tmp_path, params, None, engine=engine, stage=2, rank=0, world_size=1,
                       extra={"alloc": extra}) == 5
    assert engine.loads == [(str(folder), {"tag": "ds", "load_module_strict": False, "load_optimizer_states": True,
                                           "load_lr_scheduler_states": False})]
    assert extra.value == 9 and _draws() == first
    wrong = [("a", torch.nn.Parameter(torch.zeros(3, 2))), ("b", torch.nn.Parameter(torch.zeros(4)))]
    with pytest.raises(UserError, match=r"checkpoint tensor a is \[2, 3\], the recipe makes \[3, 2\]$"):
        ckpt.resume(tmp_path, wrong, None, engine=_FakeEngine(), stage=2, world_size=1)


def test_several_processes_resume_from_the_newest_checkpoint_every_one_finds(tmp_path, monkeypatch):
    """Two processes under DeepSpeed, each node with its own out_dir: rank 1's lacks step 4 (killed between two
    commits), so both resume from step 2, through the engine (the other rank's list faked, as in test_multinode)."""
    params, _ = _trained()
    older = _deepspeed_checkpoint(tmp_path, 2, world_size=2)
    _deepspeed_checkpoint(tmp_path, 4, world_size=2)
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda out, mine: out.__setitem__(slice(None), [mine, [2]]))
    engine = _FakeEngine()
    assert ckpt.resume(tmp_path, params, None, engine=engine, stage=2, rank=0, world_size=2) == 2
    assert [path for path, _ in engine.loads] == [str(older)]
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda out, mine: out.__setitem__(slice(None), [mine, []]))  # rank 1 finds none
    with pytest.raises(UserError) as e:
        ckpt.resume(tmp_path, params, None, engine=engine, stage=2, rank=0, world_size=2)
    assert str(e.value).startswith(f"{tmp_path}: no checkpoint is there for every process (rank 0 finds steps [2, 4]")
