"""DeepSpeed with 2 CPU processes (gloo): sharded engine checkpoints resume exactly under ZeRO-2 and ZeRO-3,
trained tensors stay fp32 under bf16 autocast, and rank 0 alone tokenizes a cold data cache.

(Two processes against one on the same global batch: tests/train/test_batch_split.py.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_rwkv7.errors import UserError
from peft_rwkv7.train import checkpoint as ckpt
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")
# bf16 autocast (frozen weights stored in bf16) and dropout, so the result depends on the restored RNG too
COMMON = {"train.save_every": 2, "train.lr": 3e-3, "train.device": "cpu", "train.warmup_steps": 0,
          "train.micro_bsz": 1, "train.precision": "bf16", "method.dropout": 0.1, "data.eval_path": "null"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def adapter_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys() and x
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_engine_config_leaves_precision_to_the_loop():
    """DeepSpeed's bf16 mode would cast the trained tensors to bf16, its torch_autocast would reduce LoRA
    gradients in bf16: both stay off on a GPU under bf16 too (the loop autocasts the forward itself)."""
    from peft_rwkv7.train.distributed import deepspeed_config
    from peft_rwkv7.train.recipe import load_recipe

    recipe = load_recipe(LORA, ["train.precision=bf16", "train.device=cuda", "train.deepspeed.stage=3",
                                "train.grad_clip=0.5", "train.micro_bsz=3", "train.grad_accum=2"])
    config = deepspeed_config(recipe)
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    assert "torch_autocast" not in config and "communication_data_type" not in config
    assert config["gradient_predivide_factor"] == 1.0 and not config["prescale_gradients"]
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (3, 2)
    assert config["gradient_clipping"] == 0.5 and config["zero_optimization"]["stage"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sharded_checkpoint_resumes_exactly(tiny_world, tmp_path, stage):
    pytest.importorskip("deepspeed")
    run, full = tmp_path / "run", tmp_path / "full"
    over = tiny_overrides(tiny_world, run, steps=4, **COMMON, **{"train.deepspeed.stage": stage})
    run_two_processes(over)
    shutil.copytree(run, full)  # the uninterrupted run, kept
    assert [s for s, _ in ckpt.list_checkpoints(full)] == [2, 4]
    last = full / "checkpoints/step_000004"
    # each rank wrote its own shard and RNG state; nothing was gathered to rank 0
    shards = sorted(p.name for p in (last / "ds").iterdir() if p.name.startswith("zero_pp_rank_"))
    assert [s for s in shards if s.endswith("optim_states.pt")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(p.name for p in last.glob("rng_rank*.pt")) == ["rng_rank00000.pt", "rng_rank00001.pt"]
    # bf16 autocast, but the trained tensors are stored and updated in fp32 (DeepSpeed's bf16 mode would cast them)
    meta = json.loads((last / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == stage
    assert {v["dtype"] for v in meta["params"].values()} == {"float32"}
    if stage == 2:
        module = torch.load(last / "ds/mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        assert sorted(module) and {t.dtype for t in module.values()} == {torch.float32}
    assert load_file(full / "adapter.safetensors").keys() == meta["params"].keys()  # one file, as one process

    # Resume the run from its step-2 checkpoint, as if stopped there; a save killed at step 3 left a temp folder.
    shutil.rmtree(run / "checkpoints/step_000004")
    (run / "checkpoints/step_000003.tmp/ds").mkdir(parents=True)
    run_two_processes([*over, "--resume"])
    assert losses(run) == losses(full) and len(losses(full)) == 4
    assert adapter_diff(full, run) == 0.0  # bit for bit
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]  # swept

    # Another process layout is refused in one line that says what to do (before DeepSpeed touches anything).
    with pytest.raises(UserError, match=rf"written by 2 processes under ZeRO-{stage}; resume with 2 processes and "
                                        rf"train\.deepspeed\.stage={stage} .*not 1 under") as e:
        ckpt.resume(full, [], None, engine=object(), stage=stage, rank=0, world_size=1)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=rf"written with DeepSpeed; resume with train\.deepspeed\.stage={stage} on 2"):
        ckpt.resume(full, [], None)


@pytest.mark.slow
def test_rank_0_alone_tokenizes_a_cold_cache(tiny_world, tmp_path):
    pytest.importorskip("deepspeed")
    from peft_rwkv7.data.dataset import DEFAULT_CACHE_DIR

    tag = uuid.uuid4().hex[:12]  # a new file content: nothing of it is cached yet
    data = tmp_path / f"cold_{tag}.jsonl"
    data.write_text(tiny_world[1].read_text() + json.dumps({"text": f"cold cache {tag}"}) + "\n")
    cache = DEFAULT_CACHE_DIR.expanduser()
    try:
        errs = run_two_processes(tiny_overrides(tiny_world, tmp_path / "out", steps=1, **{
            **COMMON, "data.path": data, "train.deepspeed.stage": 2, "train.precision": "fp32", "method.dropout": 0}))
        # a rank that could not open rank 0's cache would say so and tokenize again itself
        assert not any("doing it again here" in e for e in errs), errs
        assert sorted(p.suffix for p in cache.glob(f"{data.stem}-*")) == [".bin", ".idx"]
        assert not list(cache.glob(f".{data.stem}-*"))  # no temp files left
    finally:
        for p in [*cache.glob(f"{data.stem}-*"), *cache.glob(f".{data.stem}-*")]:
            p.unlink()

    # rank 0 failing to tokenize stops every rank with its error instead of leaving them waiting
    bad = tmp_path / f"bad_{tag}.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    errs = run_two_processes(tiny_overrides(tiny_world, tmp_path / "bad", steps=1, **{
        **COMMON, "data.path": bad, "train.deepspeed.stage": 2}), expect_ok=False)
    assert "bad_" in errs[0] and ":2: invalid JSON" in errs[0]
    assert "rank 0 stopped" in errs[1] and ":2: invalid JSON" in errs[1]


def run_two_processes(overrides: list[str], expect_ok: bool = True) -> list[str]:
    """`rwkv-peft train LORA overrides` as ranks 0 and 1 of a gloo group; returns each rank's stderr."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, DS_ACCELERATOR="cpu")
        procs.append(subprocess.Popen([sys.executable, "-m", "peft_rwkv7.cli", "train", LORA, *overrides], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert (p.returncode == 0) == expect_ok, err[-3000:]
    return [err for _, err in outs]
