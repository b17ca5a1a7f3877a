"""The CPU extension's caching allocator (cuda/cpu_alloc.cpp, ops.cpu.cache_large_blocks, train/memory.py):
freed blocks are handed back to the next request of their size class, classes no step asked for are returned
to the OS, the free bytes stay bounded, a training step computes the same bits on reused memory, forks work,
the trainer installs it on the CPU for a run and uninstalls it at the run's end, and a second run in the same
process has it again. It is process-wide: every case runs in its own process."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from peft_rwkv7.ops import cpu

pytestmark = pytest.mark.skipif(not cpu.is_available(torch.device("cpu")), reason="the CPU extension is not built")

MIB = 1 << 20


def _run(code: str, timeout: float = 240) -> dict:
    prog = "import json, os, sys, torch\nfrom peft_rwkv7.ops import cpu\n" + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_freed_block_serves_the_next_request_of_its_size_class_or_one_up_to_half_its_size():
    got = _run("""
        assert cpu.cache_large_blocks(2**20) and cpu.cache_large_blocks(2**20)  # installed, then already
        a = torch.empty(3 * 2**20 // 4); pa = a.data_ptr(); del a  # 3 MiB: the class [2.5, 3] MiB
        b = torch.empty(int(2.9 * 2**20) // 4)  # 2.9 MiB: the same class, so a's block
        c = torch.empty(5 * 2**20 // 4); pc = c.data_ptr()  # none free: a fresh block
        small = torch.empty(1000)  # under 1 MiB: the allocator that was there before
        s1 = cpu.block_cache_stats()
        del c
        d = torch.empty(3 * 2**20 // 4)  # 3 MiB, its class empty: c's 5 MiB block (at most twice its size)
        pd = d.data_ptr(); del d
        e = torch.empty(2 * 2**20 // 4)  # 2 MiB: the 5 MiB block is more than twice that, a fresh one
        print(json.dumps({"same": b.data_ptr() == pa, "fresh": pc != pa, "larger": pd == pc,
                          "not_too_large": e.data_ptr() != pc, "s1": s1, **cpu.block_cache_stats()}))
    """)
    assert got["same"] and got["fresh"] and got["larger"] and got["not_too_large"]
    assert (got["s1"]["hits"], got["s1"]["misses"]) == (1, 2)
    assert got["s1"]["live"] == 3 * MIB + 5 * MIB  # each block its class's size: 2.9 MiB rounded up to 3
    assert got["s1"]["mapped"] == got["s1"]["live"] and got["s1"]["free"] == 0
    assert (got["hits"], got["misses"]) == (2, 3) and got["free"] == 5 * MIB


def test_trim_returns_blocks_no_request_was_given_for_four_steps():
    got = _run("""
        cpu.cache_large_blocks(2**20)
        a = torch.empty(2 * 2**20 // 4); b = torch.empty(8 * 2**20 // 4); del a, b
        back = []
        for step in range(5):  # each step asks for 8 MiB only
            c = torch.empty(8 * 2**20 // 4); del c
            back.append(cpu.trim_block_cache())
        print(json.dumps({"back": back, **cpu.block_cache_stats()}))
    """)
    assert got["back"] == [0, 0, 0, 2 * MIB, 0]  # the 2 MiB block after its fourth idle step
    assert got["free"] == got["mapped"] == 8 * MIB and got["returned"] == 1


def test_the_free_bytes_never_exceed_the_most_bytes_ever_live():
    """Shapes that change every time and no trim: each block is freed before the next, of another class, is
    made; what is kept free stays within the largest live footprint seen."""
    got = _run("""
        cpu.cache_large_blocks(2**20)
        worst = 0
        for i in range(40):
            t = torch.empty((2 + i) * 2**20 // 4); del t
            s = cpu.block_cache_stats(); worst = max(worst, s["free"] - s["peak_live"])
        print(json.dumps({"worst": worst, **cpu.block_cache_stats()}))
    """)
    assert got["worst"] <= 0
    assert got["peak_live"] == 48 * MIB and got["returned"] > 0  # 41 MiB in its class [40, 48] MiB


def test_a_training_step_on_reused_blocks_computes_the_same_bits():
    """Blocks come back holding the last step's values (glibc's do too): a step must not read them. Two
    steps with every block cached (down to one page) against two with none, same bits for loss and grads."""
    step = """
        torch.manual_seed(0)
        from peft_rwkv7.model import RWKV7Config, new_model
        from peft_rwkv7.adapters import MethodConfig, attach
        model = attach(new_model(RWKV7Config.new(2, 64, 300, head_size=16)), MethodConfig(kind="lora", r=4))
        if sys.argv[1:] == ["cache"]:
            assert cpu.cache_large_blocks(4096)
        idx = torch.randint(0, 300, (2, 65), generator=torch.Generator().manual_seed(1))
        out = []
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
            loss.backward()
            out.append(loss.item())
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        out.append(torch.cat(grads).double().sum().item())
        out.append(torch.cat(grads).view(torch.int32).long().sum().item())  # every bit of every gradient
        print(json.dumps({"out": out, "hits": cpu.block_cache_stats()["hits"]}))
    """
    prog = "import json, sys, torch\nfrom peft_rwkv7.ops import cpu\n" + textwrap.dedent(step)
    runs = {}
    for mode in ("cache", "plain"):
        res = subprocess.run([sys.executable, "-c", prog, mode], capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    assert runs["cache"]["hits"] > 50 and runs["plain"]["hits"] == 0  # the second step ran on reused blocks
    assert runs["cache"]["out"] == runs["plain"]["out"]


def test_a_forked_child_allocates_and_frees():
    """pthread_atfork holds the allocator's lock across fork (data loader workers fork)."""
    got = _run("""
        import threading
        cpu.cache_large_blocks(2**20)
        stop = False
        def churn():  # another thread allocating while the main one forks
            while not stop:
                t = torch.empty(2**20); del t
        th = threading.Thread(target=churn); th.start()
        codes = []
        for _ in range(5):
            pid = os.fork()
            if pid == 0:
                x = torch.ones(3 * 2**20 // 4); y = x * 2; del x, y
                os._exit(0)
            codes.append(os.waitpid(pid, 0)[1])
        stop = True; th.join()
        print(json.dumps({"codes": codes}))
    """, timeout=120)
    assert got["codes"] == [0] * 5


def test_uninstalled_it_gives_every_block_back():
    got = _run("""
        cpu.cache_large_blocks(2**20)
        a = torch.empty(4 * 2**20 // 4); b = torch.empty(6 * 2**20 // 4); del b  # a live, b's block free
        assert cpu.uncache_large_blocks() and not cpu.uncache_large_blocks()
        s1 = cpu.block_cache_stats()
        c = torch.empty(6 * 2**20 // 4)  # the allocator from before: not counted here
        s2 = cpu.block_cache_stats()
        del a  # a cached block freed after: unmapped
        print(json.dumps({"s1": s1, "s2": s2, **cpu.block_cache_stats()}))
    """)
    assert got["s1"]["free"] == 0 and got["s1"]["mapped"] == 4 * MIB == got["s1"]["live"]
    assert got["s2"] == got["s1"]
    assert got["mapped"] == got["live"] == 0 and got["returned"] == 2


def test_a_bare_pointer_is_freed_as_onednn_frees_it():
    """oneDNN (bf16 matmuls on AVX512-BF16/AMX CPUs) takes its buffers with raw_allocate and frees them with the
    allocator's raw deleter: c10 aborts the process where there is none (rwkv-peft's README command crashed so
    on an AMX Xeon). Large blocks go back to this cache, small ones to the allocator from before."""
    got = _run("""
        ext = cpu._extension()
        before = ext.cpu_cache_raw_roundtrip(4 * 2**20)  # not installed: torch's own allocator
        cpu.cache_large_blocks(2**20)
        large = ext.cpu_cache_raw_roundtrip(4 * 2**20)
        s1 = cpu.block_cache_stats()
        again = ext.cpu_cache_raw_roundtrip(4 * 2**20)  # the block freed above, from the cache
        small = ext.cpu_cache_raw_roundtrip(1000)  # under min_bytes: the allocator from before serves and frees it
        s2 = cpu.block_cache_stats()
        cpu.uncache_large_blocks()
        after = ext.cpu_cache_raw_roundtrip(4 * 2**20)
        print(json.dumps({"before": before, "large": large, "again": again, "small": small, "after": after,
                          "s1": s1, "s2": s2}))
    """)
    assert (got["before"], got["large"], got["again"], got["small"], got["after"]) == (False, True, True, False, False)
    assert got["s1"]["live"] == 0 and got["s1"]["free"] == 4 * MIB
    assert (got["s1"]["hits"], got["s1"]["misses"]) == (0, 1)
    assert got["s2"]["free"] == 4 * MIB and (got["s2"]["hits"], got["s2"]["misses"]) == (1, 1)


def test_bf16_matmuls_and_their_gradients_run_on_it():
    """CPU autocast bf16 through the cache, as `train.precision: bf16` runs: where torch hands bf16 GEMMs to
    oneDNN (AVX512-BF16, AMX) its scratch buffers come and go through the cache; the bits equal those without."""
    got = _run("""
        def run():
            torch.manual_seed(0)
            lin = torch.nn.Linear(768, 3072)
            lin.weight.data = lin.weight.data.bfloat16(); lin.bias.data = lin.bias.data.bfloat16()
            x = torch.randn(512, 768, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = lin(x)
            y.float().square().sum().backward()
            return [y.float().sum().item(), x.grad.sum().item()]
        plain = run()
        cpu.cache_large_blocks(2**20)
        cached = [run() for _ in range(2)]
        print(json.dumps({"plain": plain, "cached": cached}))
    """)
    assert got["cached"] == [got["plain"], got["plain"]]


def test_each_run_in_a_process_has_it_and_gives_every_free_block_back_at_its_end():
    got = _run("""
        from peft_rwkv7.train.memory import CpuBlocks
        runs = []
        for _ in range(2):  # two training runs in one process (the Python API called twice)
            s0 = cpu.block_cache_stats()
            with CpuBlocks(True) as blocks:
                on = blocks.on
                for _ in range(3):
                    with blocks.step():
                        x = torch.empty(3 * 2**20); del x  # 12 MiB: a miss, then hits
                during = cpu.block_cache_stats()
            y = torch.empty(3 * 2**20)  # after the run: the allocator from before
            runs.append({"on": on, "hits": during["hits"] - s0["hits"], "misses": during["misses"] - s0["misses"],
                         "during_free": during["free"], "after": cpu.block_cache_stats()})
            del y
        print(json.dumps(runs))
    """)
    for run in got:
        assert run["on"] and (run["hits"], run["misses"]) == (2, 1)
        assert run["during_free"] == 12 * MIB  # kept between the steps
        assert run["after"]["free"] == run["after"]["mapped"] == run["after"]["live"] == 0  # all back at its end
    assert got[1]["after"]["misses"] == 2  # y's blocks were not the cache's


class _FakeCpu:
    """ops.cpu as CpuBlocks sees it, with the hit and miss counts each step adds given."""

    def __init__(self, per_step):
        self.per_step, self.stats, self.calls = list(per_step), {"hits": 0, "misses": 0}, []

    def is_available(self, device):
        return True

    def cache_large_blocks(self):
        self.calls.append("install")
        return True

    def block_cache_stats(self):
        return dict(self.stats)

    def uncache_large_blocks(self):
        self.calls.append("uninstall")
        return True

    def trim_block_cache(self):
        self.calls.append("trim")
        return 0

    def run_step(self):
        hits, misses = self.per_step.pop(0)
        self.stats = {"hits": self.stats["hits"] + hits, "misses": self.stats["misses"] + misses}


@pytest.mark.parametrize("steps, expect", [
    ([(0, 300), (300, 0), (299, 1), (300, 0)], ["install", "trim", "trim", "trim", "trim"]),  # one shape
    ([(0, 300), (250, 50), (300, 0)], ["install", "trim", "uninstall"]),  # shapes that change: given up
], ids=["one-shape", "changing-shapes"])
def test_a_step_after_the_first_that_misses_often_gives_it_up(steps, expect):
    from peft_rwkv7.train.memory import CpuBlocks

    fake = _FakeCpu(steps)
    blocks = CpuBlocks(True, ops_cpu=fake)
    for _ in steps:
        with blocks.step():
            fake.run_step()
    assert fake.calls == expect
    assert blocks.on == ("uninstall" not in expect)
    blocks.close()  # the run's end: given up once
    assert fake.calls == (expect if "uninstall" in expect else [*expect, "uninstall"]) and not blocks.on
    assert CpuBlocks(False, ops_cpu=_FakeCpu([])).on is False  # not on the CPU: nothing installed


def test_training_on_the_cpu_uses_it_around_each_step(tiny_world, tmp_path, monkeypatch):
    from pathlib import Path

    from peft_rwkv7.train import loop
    from peft_rwkv7.train.runner import train_from_cli
    from tests.train.conftest import tiny_overrides

    calls = []

    class Recorder:
        def __init__(self, enabled):
            calls.append(("init", enabled))

        def step(self):
            calls.append("step")
            return contextlib.nullcontext()

        def close(self):
            calls.append("close")

    monkeypatch.setattr(loop, "CpuBlocks", Recorder)
    lora = Path(__file__).resolve().parents[2] / "recipes" / "lora.yaml"
    train_from_cli(lora, tiny_overrides(tiny_world, tmp_path / "run", steps=2))
    assert calls == [("init", True), "step", "step", "close"]
