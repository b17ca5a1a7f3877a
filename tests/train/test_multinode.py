"""Several machines, and several processes without DeepSpeed.

Two "machines" on this one: `torchrun --nnodes 2 --nproc_per_node 1` started twice (static rendezvous on
127.0.0.1), each node in a working folder of its own with its own copy of the model and data, its own out_dir
and its own data cache (its own HOME), as two machines without a shared filesystem have. Each node's local
rank 0 tokenizes its node's cache, each node keeps its processes' checkpoint shards, global rank 0 alone
writes the log and adapter, and the run resumes bit for bit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from peft_rwkv7.errors import UserError
from tests.train.test_deepspeed import COMMON, LORA, adapter_diff, free_port, losses

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 600  # s for one launch of both nodes on a loaded 2-core machine (a hang fails the test)


def test_several_processes_without_deepspeed_are_refused(monkeypatch):
    """torchrun without train.deepspeed would start N independent copies of the whole run (no DDP here)."""
    from peft_rwkv7.train.distributed import launcher_dist
    from peft_rwkv7.train.recipe import load_recipe

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match=r"launched as 2 processes .*train\.deepspeed\.stage is 0.*set "
                                        r"train\.deepspeed\.stage=1, 2 or 3") as e:
        launcher_dist(load_recipe(LORA, []))
    assert "\n" not in str(e.value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert launcher_dist(load_recipe(LORA, [])).world_size == 1


def test_which_folders_are_shared():
    """The decision from every rank's (local rank, ranks whose probe files it sees)."""
    from peft_rwkv7.train.distributed import sharing

    f = Path("out")
    assert sharing(f, "out_dir", [(0, [0]), (1, [0])]) is True  # one node, two processes
    assert sharing(f, "out_dir", [(0, [0, 2]), (1, [0, 2]), (0, [0, 2]), (1, [0, 2])]) is True  # two nodes, shared
    assert sharing(f, "out_dir", [(0, [0]), (1, [0]), (0, [2]), (1, [2])]) is False  # two nodes, each its own
    assert sharing(f, "out_dir", [(0, [0]), (0, [1])]) is False  # two nodes of one process
    with pytest.raises(UserError, match=r"out_dir out is shared by some nodes and not others \(rank 0 sees the files "
                                        r"of ranks \[0, 1\], the nodes' local rank 0 are \[0, 1, 2\]\)") as e:
        sharing(f, "out_dir", [(0, [0, 1]), (0, [0, 1]), (0, [2])])
    assert "\n" not in str(e.value)


def node_env(home: Path) -> dict:
    """A node's environment: its own HOME (so its own ~/.cache/rwkv-peft/data); the compiled kernels and the
    matplotlib cache are shared with this machine only to save their build time."""
    from torch.utils.cpp_extension import get_default_build_root

    env = dict(os.environ, HOME=str(home), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if "MPLCONFIGDIR" not in os.environ:
        import matplotlib

        env["MPLCONFIGDIR"] = matplotlib.get_configdir()
    return env


def run_two_nodes(nodes: list[Path], overrides: list[str], expect_ok: bool = True) -> list[str]:
    """`rwkv-peft train LORA overrides` through torchrun as node 0 and node 1 of 2 (one process each), each in
    its own folder (nodes[i] / "work", HOME nodes[i] / "home"); returns each node's stderr."""
    port = str(free_port())
    procs = []
    for rank, node in enumerate(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
               "-m", "peft_rwkv7.cli", "train", LORA, *overrides]
        procs.append(subprocess.Popen(cmd, env=node_env(node / "home"), cwd=node / "work", stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=LAUNCH_TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate() for p in procs]
        pytest.fail("the two nodes did not finish in time:\n" + "\n".join(err[-2000:] for _, err in outs))
    for p, (_, err) in zip(procs, outs):
        assert (p.returncode == 0) == expect_ok, err[-3000:]
    return [err for _, err in outs]


@pytest.mark.slow
def test_two_nodes_without_a_shared_filesystem_resume_exactly(tiny_world, tmp_path):
    pytest.importorskip("deepspeed")
    model, train, _ = tiny_world
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    text = train.read_text() + f'{{"text": "a new file {uuid.uuid4().hex}"}}\n'  # cold in any cache
    for node in nodes:
        (node / "home").mkdir(parents=True)
        (node / "work").mkdir()
        shutil.copy(model, node / "work/tiny.pth")  # each machine its own copy, by the same relative path
        (node / "work/train.jsonl").write_text(text)
    over = [f"{k}={v}" for k, v in {
        **COMMON, "model.path": "tiny.pth", "data.path": "train.jsonl", "data.ctx_len": 32, "train.max_steps": 4,
        "train.eval_every": 0, "log.progress": "false", "out_dir": "run", "train.deepspeed.stage": 2}.items()]
    errs = run_two_nodes(nodes, over)
    runs = [node / "work/run" for node in nodes]

    # each node's local rank 0 tokenized its own cache; nobody waited for a file from the other machine
    for node in nodes:
        cached = sorted(p.suffix for p in (node / "home/.cache/rwkv-peft/data").glob("train-*"))
        assert cached == [".bin", ".idx"], node
    assert not any("doing it again here" in e for e in errs), errs
    assert "each node's own" in errs[0]
    # global rank 0 alone wrote the log and adapter; each node holds its own rank's shards and RNG state,
    # DeepSpeed's module states and the metadata its resume reads
    assert len(losses(runs[0])) == 4 and (runs[0] / "adapter.safetensors").is_file()
    assert not (runs[1] / "log.jsonl").exists() and not (runs[1] / "adapter.safetensors").exists()
    for rank, run in enumerate(runs):
        last = run / "checkpoints/step_000004"
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
        assert sorted(p.name for p in (last / "ds").iterdir()) == [
            "mp_rank_00_model_states.pt", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
        assert sorted(p.name for p in last.glob("rng_rank*.pt")) == [f"rng_rank{rank:05d}.pt"]
        assert (last / "meta.json").is_file() and (run / "recipe.yaml").is_file()

    # resume both nodes from step 2, each from its own folder, as if the run had stopped there
    full = [tmp_path / f"full{i}" for i in range(2)]
    for run, keep in zip(runs, full):
        shutil.copytree(run, keep)
        shutil.rmtree(run / "checkpoints/step_000004")
    run_two_nodes(nodes, [*over, "--resume"])
    assert losses(runs[0]) == losses(full[0])
    assert adapter_diff(full[0], runs[0]) == 0.0  # bit for bit


def test_resume_takes_the_newest_checkpoint_every_process_finds(tmp_path, monkeypatch):
    """Each node's out_dir lists its own checkpoints; all ranks agree on the newest step found everywhere (a node
    killed between two commits lacks the last one), or all refuse in the same one line."""
    import torch

    from peft_rwkv7.train import checkpoint as ckpt

    for step in (2, 4):
        (tmp_path / f"checkpoints/step_{step:06d}").mkdir(parents=True)
    found = ckpt.list_checkpoints(tmp_path)
    for others, pick in [([2, 4], 4), ([2], 2), ([2, 4, 6], 4)]:
        monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, mine, o=others: out.__setitem__(
            slice(None), [mine, o]))
        assert [s for s, _ in ckpt._found_everywhere(tmp_path, found, 2)] == [pick]
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, mine: out.__setitem__(
        slice(None), [mine, []]))
    with pytest.raises(UserError, match=r"no checkpoint is there for every process \(rank 0 finds steps \[2, 4\], "
                                        r"rank 1 \[\]\); each node must keep") as e:
        ckpt._found_everywhere(tmp_path, found, 2)
    assert "\n" not in str(e.value)
