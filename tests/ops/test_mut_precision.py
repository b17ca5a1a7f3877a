"""ops/precision.py, what its mutation run (scripts/mutation.sh precision) found untested: reading the CPU's name
and flags, the cache's place and key, the atomic write into a folder not made yet, the timing rounds and their
budget, the probe's products, rates and rounding, the second look at a slow answer, the row-chunk probe's sums,
devices other than CPU and CUDA, and what "native" bf16 on a GPU means. Timings are faked (a clock that the
faked calls advance), so every expectation is exact and holds on any machine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peft_rwkv7.ops import build, cpu, rowsplit
from peft_rwkv7.ops import precision as p
from tests.conftest import inject_measurement

X86 = """processor\t: 0
model name\t: AMD EPYC 9R14: 96-Core Processor
flags\t\t: sse avx2 fma avx512f
processor\t: 1
model name\t: another name
flags\t\t: other
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n\nModel\t\t: Raspberry Pi 5\n"
MIPS = "system type\t: X\ncpu model\t\t: MIPS 24Kc V7.4\nFeatures\t: mips16\n"


def _cpuinfo_reads(monkeypatch, text):
    real = p.Path

    def fake(path):
        if str(path) != "/proc/cpuinfo":
            return real(path)
        if text is None:
            return SimpleNamespace(read_text=lambda: (_ for _ in ()).throw(PermissionError(path)))
        return SimpleNamespace(read_text=lambda: text)

    monkeypatch.setattr(p, "Path", fake)


@pytest.mark.parametrize("text, name, flags", [
    (X86, "AMD EPYC 9R14: 96-Core Processor", "avx2 avx512f fma sse"),  # the first processor's, flags sorted
    (ARM, "Raspberry Pi 5", "asimd fp sve"),
    (MIPS, "MIPS 24Kc V7.4", "mips16"),
])
def test_the_cpus_name_and_flags_from_cpuinfo(monkeypatch, text, name, flags):
    _cpuinfo_reads(monkeypatch, text)
    assert p._cpuinfo() == (name, flags)


def test_without_cpuinfo_the_platform_names_the_cpu(monkeypatch):
    _cpuinfo_reads(monkeypatch, None)  # unreadable (not Linux, or no permission): not an error
    monkeypatch.setattr(p.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(p.platform, "processor", lambda: "")
    assert p._cpuinfo() == ("x86_64", "")
    monkeypatch.setattr(p.platform, "processor", lambda: "arm")
    assert p._cpuinfo() == ("arm", "")
    _cpuinfo_reads(monkeypatch, "processor\t: 0\n")  # readable, without a name: the platform's too
    assert p._cpuinfo() == ("arm", "")


def test_the_cache_sits_beside_the_kernels_and_is_keyed_by_the_fields_not_their_order(tmp_path):
    assert p.default_cache_dir() == build.extensions_root() / "peft_rwkv7"
    ext = cpu._extension()
    if ext is not None:  # the built CPU extension's folder is in it
        assert Path(ext.__file__).resolve().parent.parent == p.default_cache_dir().resolve()
    one = p.cache_file(tmp_path, {"cpu": "A", "threads": 2})
    assert one == p.cache_file(tmp_path, {"threads": 2, "cpu": "A"})
    assert one != p.cache_file(tmp_path, {"cpu": "B", "threads": 2})
    assert one.parent == tmp_path and one.name.startswith("bf16-check-") and one.suffix == ".json"


def test_an_atomic_write_makes_its_folders_and_renames_within_them(tmp_path, monkeypatch):
    renames = []
    real = os.replace
    monkeypatch.setattr(p.os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real(src, dst)))
    path = tmp_path / "a" / "b" / "check.json"
    p.write_atomic(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    ((src, dst),) = renames
    assert dst == path and src.parent == path.parent  # the same folder: a rename, never a copy
    assert sorted(q.name for q in path.parent.iterdir()) == ["check.json"]


class _Clock:
    """time.perf_counter for precision: starts at 1.0 and moves only by the faked calls' costs (binary fractions,
    so sums are exact)."""

    def __init__(self, monkeypatch):
        self.now = 1.0
        monkeypatch.setattr(p.time, "perf_counter", lambda: self.now)


def _fake_calls(monkeypatch, clock, costs):
    calls = []

    def timed(fn):
        fn()
        calls.append(fn)
        clock.now += costs[fn]
        return costs[fn]

    monkeypatch.setattr(p, "_timed", timed)
    return calls


def test_best_seconds_repeats_the_faster_call_and_stops_at_its_budget(monkeypatch):
    clock = _Clock(monkeypatch)
    warm = []

    def f32():
        warm.append("f32")

    def f16():
        warm.append("f16")

    calls = _fake_calls(monkeypatch, clock, {f32: 2 ** -8, f16: 2 ** -10})  # fp32 4x bf16's time
    # round 0: fp32 once, bf16 once; round 1 (after 5/1024 s): fp32, then bf16 4 times (4x faster); round 2 only
    # while under the budget
    got = p._best_seconds(f32, f16, rounds=5, budget_s=5 * 2 ** -10, warm_up=True)
    assert got == (2 ** -8, 2 ** -10)
    assert calls == [f32, f16, f32, f16, f16, f16, f16] and warm[:2] == ["f32", "f16"] and len(warm) == 9
    calls.clear()
    p._best_seconds(f32, f16, rounds=5, budget_s=5 * 2 ** -10 - 2 ** -20, warm_up=False)  # spent after round 0
    assert calls == [f32, f16]
    costs = {f32: 2 ** -10, f16: 2 ** -10}  # equal: one bf16 call a round
    calls = _fake_calls(monkeypatch, clock, costs)
    p._best_seconds(f32, f16, rounds=3, budget_s=1.0, warm_up=False)
    assert calls == [f32, f16] * 3


def test_the_probes_products(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((5, 3), (4, 3), (5, 4)))
    ops = p._ops(x, w, g)
    assert list(ops) == ["F.linear x[5,3] W[4,3]", "g[5,4] @ W[4,3]", "g.T @ x -> [4,3] over 5 rows"]
    want = [x @ w.T, g @ w, g.T @ x]  # forward, input gradient, weight gradient
    for fn, expected in zip(ops.values(), want, strict=True):
        torch.testing.assert_close(fn(), expected)


def test_rates_are_flop_over_seconds_and_a_clearly_slow_op_ends_them(monkeypatch):
    seen = []

    def best(f32, f16, rounds, budget_s, warm_up):
        seen.append((f32().dtype, f16().dtype, rounds, budget_s, warm_up))
        return 0.5, 1.0  # bf16 at exactly CLEARLY_SLOW: not clearly slow, the next op is timed

    monkeypatch.setattr(p, "_best_seconds", best)
    x, w, g = torch.ones(6, 5), torch.ones(7, 5), torch.ones(6, 7)
    rates = p._rates(x, w, g, screen=True)
    flop = 2 * 6 * 5 * 7
    assert rates == [(name, flop / 0.5 / 1e9, flop / 1.0 / 1e9) for name in p._ops(x, w, g)]
    assert seen == [(torch.float32, torch.bfloat16, p.SCREEN_ROUNDS, p.SCREEN_BUDGET_S, True)] * 3
    seen.clear()
    monkeypatch.setattr(p, "_best_seconds", lambda *a, **k: (seen.append(a[2:] + (k["warm_up"],)), (0.5, 1.01))[1])
    assert len(p._rates(x, w, g, screen=False)) == 1 and seen == [(p.FULL_ROUNDS, p.FULL_BUDGET_S, False)]


def test_the_row_chunk_probe_takes_each_ops_best_and_sums_them(monkeypatch):
    clock = _Clock(monkeypatch)
    seen, last = [], []

    def mm_rows(a, b, chunks):
        seen.append((a.dtype, b.dtype, chunks))
        last[:] = [chunks]

    monkeypatch.setattr(rowsplit, "mm_rows", mm_rows)
    monkeypatch.setattr(rowsplit, "row_chunks", lambda rows, w: 3)
    n = iter(range(10**6))

    def timed(fn):
        fn()
        k = next(n)
        cost = (2 ** -9 if last[0] == 1 else 2 ** -11) * (1 + (k // 2) % 3)  # later rounds slower: best = first
        clock.now += cost
        return cost

    monkeypatch.setattr(p, "_timed", timed)
    assert p._row_chunks_speedup(torch.Generator().manual_seed(0)) == 4.0
    assert {c for *_, c in seen} == {1, 3} and {(a, b) for a, b, _ in seen} == {(torch.bfloat16, torch.bfloat16)}


def _measure_fakes(monkeypatch, screen_rates, full_rates, chunk_speedup=1.5):
    asked = []

    def rates(x, w, g, screen):
        asked.append((x.shape[0], screen))
        return screen_rates if screen else full_rates

    monkeypatch.setattr(p, "_rates", rates)
    monkeypatch.setattr(p, "_row_chunks_speedup", lambda gen: chunk_speedup)
    return asked


def test_measure_once_screens_then_times_the_full_shapes_and_rounds_what_it_keeps(monkeypatch):
    full = [("op a", 100.123456, 123.456789), ("op b", 50.0, 61.72839)]
    asked = _measure_fakes(monkeypatch, [("screen", 10.0, 20.0)], full, chunk_speedup=1.1)
    record = p._measure_once()
    assert asked == [(p.SCREEN_ROWS, True), (512, False), (p.SCREEN_ROWS, True), (128, False)]
    assert record["gflops"] == {"op a": {"fp32": 100.12, "bf16": 123.46}, "op b": {"fp32": 50.0, "bf16": 61.73}}
    assert record["ratio"] == 1.233 and record["fast"] is True  # the worst op's 1.2345678, to 3 decimals
    assert record["row_chunks"] is True and record["row_chunks_speedup"] == 1.1  # 1.1 is the margin: taken
    assert isinstance(record["seconds"], float) and 0 <= record["seconds"] < 1  # its own time (fakes: ~0)
    asked = _measure_fakes(monkeypatch, [("screen", 10.0, 20.0)], [("op", 100.0, 120.0)], chunk_speedup=1.23456)
    record = p._measure_once()
    assert record["fast"] is True and record["ratio"] == 1.2 and record["row_chunks_speedup"] == 1.235
    _measure_fakes(monkeypatch, [("screen", 10.0, 20.0)], [("op", 100.0, 119.0)])
    assert p._measure_once()["fast"] is False and "row_chunks" not in p._measure_once()


def test_a_screen_at_exactly_half_speed_is_not_clearly_slow(monkeypatch):
    asked = _measure_fakes(monkeypatch, [("screen", 10.0, 5.0)], [("op", 10.0, 30.0)])
    assert p._measure_once()["fast"] is True and (512, False) in asked
    asked = _measure_fakes(monkeypatch, [("screen", 10.0, 4.99)], [("op", 10.0, 30.0)])
    record = p._measure_once()
    assert record["fast"] is False and asked == [(p.SCREEN_ROWS, True)] and list(record["gflops"]) == ["screen"]


def test_a_slow_answer_is_measured_twice_and_the_better_kept(monkeypatch):
    answers = iter([{"fast": False, "ratio": 0.9, "gflops": {}, "seconds": 0.25},
                    {"fast": True, "ratio": 1.5, "gflops": {"x": {}}, "seconds": 0.5}])
    monkeypatch.setattr(p, "_measure_once", lambda: next(answers))
    assert p.measure_bf16() == {"fast": True, "ratio": 1.5, "gflops": {"x": {}}, "seconds": 0.75}
    answers = iter([{"fast": False, "ratio": 0.9, "gflops": {"first": {}}, "seconds": 0.125},
                    {"fast": False, "ratio": 0.5, "gflops": {}, "seconds": 0.25}])
    assert p.measure_bf16() == {"fast": False, "ratio": 0.9, "gflops": {"first": {}}, "seconds": 0.375}
    answers = iter([{"fast": True, "ratio": 2.0, "gflops": {}, "seconds": 0.25}])
    assert p.measure_bf16()["seconds"] == 0.25  # a fast answer is not measured again (next() would stop it)


def test_a_cached_check_says_so():
    check = p.Bf16Check(fast=True, ratio=2.25, gflops={}, cpu="EPYC", seconds=0.3, cached=True)
    assert check.summary() == "bf16 matmuls run at 2.2x fp32's speed on this CPU at worst (cached measurement)"


def test_another_device_takes_bf16_only_when_asked(monkeypatch, capsys):
    monkeypatch.setattr(p, "cpu_bf16_check", lambda: pytest.fail("no CPU check for another device"))
    assert p.choose_bf16("bf16", "mps", "train.precision") is True
    assert p.choose_bf16("auto", "xpu", "train.precision") is False
    assert p.choose_bf16("fp32", "mps", "train.precision") is False
    assert capsys.readouterr().err == ""


def test_a_quiet_rank_does_not_ask_for_its_gpus_name(monkeypatch):
    monkeypatch.setattr(p, "cuda_bf16_native", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: pytest.fail("asked for the GPU's name"))
    assert p.choose_bf16("auto", "cuda", "train.precision", say=False) is False


@pytest.mark.parametrize("emulates, native", [(True, False), (False, True)])
def test_native_bf16_on_a_gpu_does_not_count_emulation(monkeypatch, emulates, native):
    """A GPU before compute capability 8.0 runs bf16 only emulated: torch.cuda.is_bf16_supported() says yes
    there unless asked not to count emulation."""
    def supported(including_emulation=True):
        return including_emulation if emulates else True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert p.cuda_bf16_native() is native


GOOD = {"fast": True, "ratio": 2.5, "seconds": 0.375, "row_chunks": True, "row_chunks_speedup": 1.375,
        "gflops": {"F.linear": {"fp32": 60.0, "bf16": 150.0}}}


def test_a_checks_fields_come_from_its_record(tmp_path):
    name = str(p.machine_fields()["cpu"])
    first = p.cpu_bf16_check(cache_dir=tmp_path, measure=lambda: dict(GOOD))
    again = p.cpu_bf16_check(cache_dir=tmp_path, measure=lambda: pytest.fail("measured twice"))
    for check, cached in ((first, False), (again, True)):
        assert (check.fast, check.ratio, check.seconds, check.cpu, check.cached) == (True, 2.5, 0.375, name, cached)
        assert check.row_chunks is True and check.row_chunks_speedup == 1.375 and check.gflops == GOOD["gflops"]
    plain = {k: v for k, v in GOOD.items() if not k.startswith("row_chunks")}  # a CPU where bf16 is slow has none
    check = p.cpu_bf16_check(cache_dir=tmp_path / "plain", measure=lambda: dict(plain))
    assert check.row_chunks is False and check.row_chunks_speedup is None


def _bad_bf16_records() -> list:
    out = [{**GOOD, key: value} for key, value in (
        ("fast", 1), ("fast", None), ("ratio", None), ("ratio", "2.5"), ("ratio", float("inf")), ("ratio", True),
        ("seconds", None), ("seconds", float("nan")), ("gflops", [1.0]), ("row_chunks", "yes"), ("row_chunks", 1),
        ("row_chunks_speedup", "1.3"), ("row_chunks_speedup", float("inf")),
        ("gflops", {"op": {"fp32": 60.0}}), ("gflops", {"op": {"fp32": 60.0, "bf16": "fast"}}),
        ("gflops", {"op": [60.0, 150.0]}))]
    out += [{k: v for k, v in GOOD.items() if k != key} for key in ("fast", "ratio", "seconds", "gflops")]
    return out + [[GOOD], "good"]


@pytest.mark.parametrize("bad", _bad_bf16_records())
def test_a_malformed_cached_bf16_record_is_measured_again(tmp_path, monkeypatch, bad):
    runs = inject_measurement(monkeypatch, tmp_path, p, "measure_bf16", GOOD)
    p.cpu_bf16_check(cache_dir=tmp_path)
    (path,) = tmp_path.glob("bf16-check-*.json")
    fields = json.loads(path.read_text())["fields"]
    path.write_text(json.dumps({**bad, "fields": fields} if isinstance(bad, dict) else bad))
    assert p.cpu_bf16_check(cache_dir=tmp_path).cached is False and len(runs) == 2


def test_another_machines_record_is_not_read_and_a_bad_measurement_is_refused(tmp_path, monkeypatch, capsys):
    p.cpu_bf16_check(cache_dir=tmp_path, measure=lambda: dict(GOOD))
    (path,) = tmp_path.glob("bf16-check-*.json")
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "fields": {**record["fields"], "cpu": "another CPU"}}))
    assert p.cpu_bf16_check(cache_dir=tmp_path, measure=lambda: dict(GOOD)).cached is False
    with pytest.raises(TypeError, match="^bf16 measurement returned {'fast': 'yes'}$"):
        p.cpu_bf16_check(cache_dir=tmp_path / "new", measure=lambda: {"fast": "yes"})
    blocked = tmp_path / "a file"
    blocked.write_text("")
    capsys.readouterr()
    assert p.cpu_bf16_check(cache_dir=blocked, measure=lambda: dict(GOOD)).fast
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"peft_rwkv7: could not cache the bf16 check in {blocked}/")


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "check.json"
    p.write_atomic(path, {"x": 1})
    with pytest.raises(TypeError):
        p.write_atomic(path, {"x": object()})  # not JSON: fails halfway through the write
    assert json.loads(path.read_text()) == {"x": 1} and [q.name for q in tmp_path.iterdir()] == ["check.json"]
