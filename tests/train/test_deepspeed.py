"""DeepSpeed with 2 CPU processes (gloo): sharded engine checkpoints resume exactly under ZeRO-2 and ZeRO-3 and
with the optimizer offloaded (DeepSpeed's CPU Adam), trained tensors stay fp32 under bf16 autocast, and rank 0
alone tokenizes a cold data cache.

(Two processes against one on the same global batch: tests/train/test_batch_split.py; two machines without a
shared filesystem: tests/train/test_multinode.py.)"""

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
from peft_rwkv7.run_dir import ENDING
from peft_rwkv7.train import checkpoint as ckpt
from tests.conftest import log_records
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
    assert "offload_optimizer" not in config["zero_optimization"] and "checkpoint" not in config
    offload = load_recipe(LORA, ["train.deepspeed.stage=2", "train.deepspeed.offload=true"])
    config = deepspeed_config(offload, node_local_out_dir=True)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert config["checkpoint"] == {"use_node_local_storage": True}


def test_offload_refusals(monkeypatch):
    """Offload without ZeRO, Muon with offload, and a CPU Adam that does not build: each one line saying what to do."""
    from peft_rwkv7.train.distributed import launcher_dist
    from peft_rwkv7.train.optim import build_optimizer
    from peft_rwkv7.train.recipe import load_recipe

    with pytest.raises(UserError, match=r"offload.*set train\.deepspeed\.stage to 1, 2 or 3") as e:
        launcher_dist(load_recipe(LORA, ["train.deepspeed.offload=true"]))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"muon is not available under train\.deepspeed.*use adamw") as e:
        load_recipe(LORA, ["train.optimizer=muon", "train.deepspeed.stage=2", "train.deepspeed.offload=true"])
    assert "\n" not in str(e.value)

    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import CPUAdamBuilder

    def no_ninja(self, verbose=False):  # what DeepSpeed raises on a machine without ninja
        raise RuntimeError("Unable to JIT load the cpu_adam op due to ninja not being installed.")

    monkeypatch.setattr(CPUAdamBuilder, "load", no_ninja)
    tc = load_recipe(LORA, ["train.deepspeed.stage=2", "train.deepspeed.offload=true"]).train
    with pytest.raises(UserError, match=r"CPU Adam .*does not build here \(Unable to JIT load the cpu_adam op due to "
                                        r"ninja not being installed\.\); .*pip install ninja.*offload=false") as e:
        build_optimizer([("p", torch.nn.Parameter(torch.zeros(3)))], tc, torch.device("cpu"))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_cpu_adam_is_adamw_and_resumes_exactly():
    """The offload optimizer (DeepSpeed's CPU Adam, compiled on first use) takes the recipe's lr, betas, eps and
    weight decay by group, as torch's AdamW does; and one rebuilt from a state_dict after step 2 takes step 3
    exactly as the one that ran on (the op's own beta^t would differ in the last bit)."""
    pytest.importorskip("deepspeed")
    from peft_rwkv7.train.losses import param_groups
    from peft_rwkv7.train.optim import build_optimizer, cpu_adam_op
    from peft_rwkv7.train.recipe import load_recipe

    try:
        cpu_adam_op()
    except UserError as e:
        pytest.skip(str(e))
    tc = load_recipe(LORA, ["train.deepspeed.stage=2", "train.deepspeed.offload=true", "train.weight_decay=0.1",
                            "train.lr=1e-2", "train.beta2=0.99"]).train
    g = torch.Generator().manual_seed(0)
    shapes = {"blocks.0.att.receptance.lora_A.default.weight": (8, 16), "blocks.0.att.time_state": (2, 4, 4)}
    init = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(4)]

    def run(make, steps, start=None):
        named = [(n, torch.nn.Parameter((start or init)[n].clone())) for n in shapes]
        opt = make(named)
        for step in steps:
            for n, p in named:
                p.grad = grads[step][n].clone()
            opt.step()
        return {n: p.detach().clone() for n, p in named}, opt

    cpu_adam = lambda named: build_optimizer(named, tc, torch.device("cpu"))  # noqa: E731
    adamw = lambda named: torch.optim.AdamW(param_groups(named, tc.weight_decay), lr=tc.lr,  # noqa: E731
                                            betas=(tc.beta1, tc.beta2), eps=tc.eps)
    ours, opt = run(cpu_adam, range(4))
    assert type(opt).__name__ == "DeepSpeedCPUAdam"
    ref, _ = run(adamw, range(4))
    p_max = max(t.abs().max().item() for t in init.values())
    # Per step the two round the decayed parameter and its update at |p| (2 roundings each, 4 between them, of
    # 2^-24 |p|), and the CPU op holds the betas in fp32, where 1 - beta2 loses 2^-24 / (1 - beta2) = 6e-6 of
    # itself, so v by that and the Adam direction m/sqrt(v) (|.| <= 1.01 for these betas at t <= 4, Cauchy-Schwarz)
    # by half of it: < 1e-5 of lr. Decay applied to the wrong group, or another lr or beta, moves p by ~1e-3.
    bound = 4 * (4 * 2**-24 * p_max + 1e-5 * tc.lr)
    for n in shapes:
        assert (ours[n] - ref[n]).abs().max().item() <= bound, n

    half, opt2 = run(cpu_adam, range(2))
    state = opt2.state_dict()
    resumed, _ = run(lambda named: _loaded(cpu_adam(named), state), range(2, 4), start=half)
    for n in shapes:
        assert torch.equal(resumed[n], ours[n]), n  # bit for bit


def _loaded(optimizer, state):
    optimizer.load_state_dict(state)
    return optimizer


@pytest.mark.slow
@pytest.mark.parametrize("stage, offload", [(2, False), (3, False), (2, True)])
def test_sharded_checkpoint_resumes_exactly(tiny_world, tmp_path, stage, offload):
    pytest.importorskip("deepspeed")
    run, full = tmp_path / "run", tmp_path / "full"
    over = tiny_overrides(tiny_world, run, steps=4, **COMMON,
                          **{"train.deepspeed.stage": stage, "train.deepspeed.offload": offload})
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
        optim = torch.load(last / "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                           weights_only=False)["optimizer_state_dict"]
        # DeepSpeed's CPU Adam keeps a bias_correction flag in its groups, torch's AdamW does not
        groups = optim["base_optimizer_state"]["param_groups"]
        assert all(("bias_correction" in group) is offload for group in groups)
    assert load_file(full / "adapter.safetensors").keys() == meta["params"].keys()  # one file, as one process
    assert not (full / ENDING).exists() and (full / "loss.png").is_file()  # the end written, its marker cleared

    # Stopped in its end (after the last checkpoint, before the plot): --resume takes no step and writes the end.
    (run / ENDING).touch()
    (run / "loss.png").unlink()
    run_two_processes([*over, "--resume"])
    assert not (run / ENDING).exists() and (run / "loss.png").is_file()
    assert log_records(run) == log_records(full) and adapter_diff(full, run) == 0.0

    # Resume the run from its step-2 checkpoint, as if stopped there; a save killed at step 3 left a temp folder.
    shutil.rmtree(run / "checkpoints/step_000004")
    (run / "checkpoints/step_000003.tmp/ds").mkdir(parents=True)
    run_two_processes([*over, "--resume"])
    assert losses(run) == losses(full) and len(losses(full)) == 4 and not (run / ENDING).exists()
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


def run_two_processes(overrides: list[str], expect_ok: bool = True, launcher: tuple = ("-m", "peft_rwkv7.cli"),
                      env_extra: dict | None = None, timeout: float = 900) -> list[str]:
    """`rwkv-peft train LORA overrides` as ranks 0 and 1 of a gloo group; returns each rank's stderr. Ranks still
    running after `timeout` seconds are killed and the test fails (a hang)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, DS_ACCELERATOR="cpu", **(env_extra or {}))
        procs.append(subprocess.Popen([sys.executable, *launcher, "train", LORA, *overrides], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"the two ranks did not finish in {timeout:.0f} s (a hang)")
    for p, (_, err) in zip(procs, outs):
        assert (p.returncode == 0) == expect_ok, err[-3000:]
    return [err for _, err in outs]


def test_full_finetuning_gathers_every_weight_for_model_pth(tiny_world, tmp_path, monkeypatch):
    """ZeRO-3 partitions the frozen weights too (layer 0's unused v0/v1/v2: past its 1e5-element threshold from 2.9B
    up), so the model.pth that full fine-tuning writes must gather every weight of the base, not the trained ones
    alone (which left those as empty placeholders)."""
    from peft_rwkv7.train import loop
    from peft_rwkv7.train.runner import train_from_cli

    names: list[list[str]] = []
    real = loop.gathered

    def spy(named, stage):
        names.append([n for n, _ in named])
        return real(named, stage)

    monkeypatch.setattr(loop, "gathered", spy)
    out = tmp_path / "run"
    train_from_cli(str(ROOT / "recipes" / "full.yaml"), tiny_overrides(tiny_world, out, steps=1))
    saved = torch.load(out / "model.pth", map_location="cpu", weights_only=True)
    last = names[-1]
    assert len(last) == len(saved)  # one gathered weight for each tensor of the file
    assert any(n.endswith("blocks.0.att.v1") for n in last) and any(k.endswith("att.v1") for k in saved)


# Wraps the CLI in a rank: the trace mode of each ZeRO-3 module fetch, in runs of one mode ("complete": the state
# in which DeepSpeed prefetches the next modules' weights), and whether torch.distributed is still initialised,
# written to $SPY_OUT<rank> at exit.
FETCH_SPY = """
import atexit, json, os, sys
import torch
from deepspeed.runtime.zero import partitioned_param_coordinator as ppc
seen = []  # [trace mode, fetches in a row]
real = ppc.PartitionedParameterCoordinator.fetch_sub_module
def spy(self, module, forward):
    mode = "complete" if self.is_complete_trace() else ("record" if self.is_record_trace() else "invalid")
    if seen and seen[-1][0] == mode:
        seen[-1][1] += 1
    else:
        seen.append([mode, 1])
    return real(self, module, forward)
ppc.PartitionedParameterCoordinator.fetch_sub_module = spy
atexit.register(lambda: open(os.environ["SPY_OUT"] + os.environ["RANK"], "w").write(
    json.dumps({"fetches": seen, "initialized": torch.distributed.is_initialized()})))
from peft_rwkv7.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_zero3_prefetches_once_a_step_is_traced(tiny_world, tmp_path):
    """ZeRO-3 prefetches a module's weights only with a complete trace of a step, which it starts in a hook on the
    root module's call. The loop's loss (token_nll) went past that call, so no trace was ever made and every
    weight was gathered on demand; now it goes through it. Steps 2-4 of 4 fetch with a complete trace.
    A finished run destroys its process groups before exit: left to the interpreter's finalisation, gloo's threads
    killed a finished rank with SIGABRT (1 run of 10 of the chunked ZeRO-3 test here, and in CI)."""
    pytest.importorskip("deepspeed")
    spy = tmp_path / "spy.py"
    spy.write_text(FETCH_SPY)
    over = tiny_overrides(tiny_world, tmp_path / "run", steps=4, **COMMON, **{"train.deepspeed.stage": 3})
    run_two_processes(over, launcher=(str(spy),), env_extra={"SPY_OUT": str(tmp_path / "seen")})
    for rank in range(2):
        spied = json.loads((tmp_path / f"seen{rank}").read_text())
        assert spied["initialized"] is False  # the process groups went before the interpreter's exit
        seen = spied["fetches"]
        (first, n), (then, m) = seen[:2]  # (after them: the final evaluation's forward, another order of modules)
        assert (first, then, m) == ("record", "complete", 3 * n), seen  # step 1 records, steps 2-4 prefetch
