"""ops/thin_check.py, what its mutation run (scripts/mutation.sh thin_check) found untested: which cached records
are refused, that each machine keeps its own cache, what the probe times and how it sums it, that it leaves the
global RNG alone, the CPU's name and the measurement's time on the check, and the summary doctor prints."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from peft_rwkv7.ops import cpu, precision, thin_check
from peft_rwkv7.ops.thin_check import ThinCheck, cpu_thin_check
from tests.conftest import inject_measurement
from tests.ops.test_thin_check import thin_record


def _bad_records() -> list:
    good = thin_record(nt={16: 1.5}, tn={})
    out = []
    for seconds in (None, 0, -1.0, float("inf"), float("nan"), True, "0.3"):
        out.append({**good, "seconds": seconds})
    for value in (0, -1.5, float("inf"), float("nan"), True, "2.0"):
        bad = json.loads(json.dumps(good))
        bad["speedup"]["tn"]["16"] = value
        out.append(bad)
    missing_rank = json.loads(json.dumps(good))
    del missing_rank["speedup"]["nt"]["64"]
    extra_rank = json.loads(json.dumps(good))
    extra_rank["speedup"]["tn"]["12"] = 1.0
    out += [missing_rank, extra_rank, {"seconds": 0.3}, {**good, "speedup": [1.0]},
            {**good, "speedup": {"nt": good["speedup"]["nt"]}}, {**good, "speedup": {**good["speedup"], "nn": {}}},
            {**good, "speedup": {"nt": good["speedup"]["nt"], "tn": [1.0]}}, [good], "good"]
    return out


@pytest.mark.parametrize("bad", _bad_records())
def test_a_malformed_cached_record_is_measured_again(tmp_path, monkeypatch, bad):
    runs = inject_measurement(monkeypatch, tmp_path, thin_check, "measure_thin", thin_record(nt={16: 2.0}, tn={}))
    cpu_thin_check(cache_dir=tmp_path)
    (path,) = tmp_path.glob("thin-check-*.json")
    fields = json.loads(path.read_text())["fields"]
    path.write_text(json.dumps({**bad, "fields": fields} if isinstance(bad, dict) else bad))
    check = cpu_thin_check(cache_dir=tmp_path)
    assert len(runs) == 2 and check.cached is False and check.nt == {16}


def test_each_machine_keeps_its_own_cache(tmp_path, monkeypatch):
    """Two machines sharing a cache folder (a home on NFS): neither's measurement replaces the other's, and a
    record measured on another machine is never read as this one's."""
    real = precision.machine_fields()
    runs = inject_measurement(monkeypatch, tmp_path, thin_check, "measure_thin", thin_record(nt={16: 2.0}, tn={}))
    for cpu_name in ("CPU A", "CPU B", "CPU A", "CPU B"):
        monkeypatch.setattr(precision, "machine_fields", lambda cpu_name=cpu_name: {**real, "cpu": cpu_name})
        check = cpu_thin_check(cache_dir=tmp_path)
        assert check.cpu == cpu_name
    assert len(runs) == 2 and len(list(tmp_path.glob("thin-check-*.json"))) == 2
    (a, b) = sorted(tmp_path.glob("thin-check-*.json"))
    b.write_text(a.read_text())  # machine A's record where machine B's cache is: not B's
    for cpu_name in ("CPU A", "CPU B"):
        monkeypatch.setattr(precision, "machine_fields", lambda cpu_name=cpu_name: {**real, "cpu": cpu_name})
        cpu_thin_check(cache_dir=tmp_path)
    assert len(runs) == 3


def test_a_changed_kernel_source_is_measured_again_and_the_check_names_its_cpu(tmp_path, monkeypatch):
    source = tmp_path / "thin_cpu.cpp"
    source.write_text("// one kernel")
    monkeypatch.setattr(thin_check, "_SOURCE", source)
    record = {**thin_record(nt={}, tn={8: 3.0}), "seconds": 0.375}
    runs = inject_measurement(monkeypatch, tmp_path / "cache", thin_check, "measure_thin", record)
    name = str(precision.machine_fields()["cpu"])
    first = cpu_thin_check()  # the default folder (default_cache_dir)
    assert list((tmp_path / "cache").glob("thin-check-*.json"))
    assert (first.cpu, first.seconds, first.cached, first.tn) == (name, 0.375, False, {8})
    again = cpu_thin_check()
    assert (again.cpu, again.seconds, again.cached) == (name, 0.375, True) and len(runs) == 1
    source.write_text("// another kernel")
    assert cpu_thin_check().cached is False and len(runs) == 2
    source.unlink()  # no source to hash: measured again, then cached under that name
    assert cpu_thin_check().cached is False and cpu_thin_check().cached
    monkeypatch.setattr(cpu, "_extension", lambda: None)
    assert cpu_thin_check(cache_dir=tmp_path / "none") == ThinCheck(cpu=name)


def test_best_times_each_function_and_keeps_them_apart():
    calls = []

    def slow(j):
        calls.append(("slow", j))
        time.sleep(0.003)

    def fast(j):
        calls.append(("fast", j))

    kern, blas = thin_check._best((slow, fast))
    assert kern >= 0.003 and blas < 0.003
    per = thin_check.ROUNDS * thin_check.CALLS + 1
    assert sorted(calls).count(("slow", 0)) == thin_check.ROUNDS + 1 and len(calls) == 2 * per
    assert {j for _, j in calls} == set(range(thin_check.CALLS))


def test_the_probe_times_the_kernels_products_and_sums_both_widths(monkeypatch):
    """measure_thin with the extension and _best faked: it times ext.thin_nt(x, A, 1, w_rk) and ext.thin_tn(g, x,
    1, [R, K]) at both widths and every rank, and reports BLAS's time summed over the widths over the kernel's,
    rounded to 3 decimals."""
    seen = []
    ext = SimpleNamespace(
        thin_nt=lambda x, a, alpha, w_rk: seen.append(("nt", x.shape[1], a.shape[0], alpha, w_rk)),
        thin_tn=lambda g, x, alpha, out_kr: seen.append(("tn", x.shape[1], g.shape[1], alpha, out_kr)))
    monkeypatch.setattr(cpu, "_extension", lambda: ext)
    times = {768: (0.001, 0.003), 3072: (0.002, 0.002)}  # kernel, BLAS: sums 0.003 and 0.005 -> 1.667

    blas_dtypes = set()

    def fake_best(fns):
        before = len(seen)
        fns[0](0)
        assert len(seen) == before + 1
        blas_dtypes.add(fns[1](0).dtype)  # BLAS's product in fp32, as the kernel's, even under an outer autocast
        return times[seen[-1][1]]

    monkeypatch.setattr(thin_check, "_best", fake_best)
    state = torch.random.get_rng_state()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        record = thin_check.measure_thin()
    elapsed = time.perf_counter() - t0
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe's own generator, never the global RNG
    assert record["speedup"] == {kind: {str(r): 1.667 for r in cpu.THIN_RANKS} for kind in ("nt", "tn")}
    assert thin_check._valid(record) and record["seconds"] <= elapsed + 0.001  # its own time, to the ms
    assert blas_dtypes == {torch.float32}
    assert sorted(set(seen)) == sorted({("nt", k, r, 1.0, True) for k in (768, 3072) for r in cpu.THIN_RANKS}
                                       | {("tn", k, r, 1.0, False) for k in (768, 3072) for r in cpu.THIN_RANKS})
    monkeypatch.setattr(cpu, "_extension", lambda: None)
    with pytest.raises(RuntimeError, match="^the CPU extension is not built: nothing to measure$"):
        thin_check.measure_thin()


def test_a_real_check_is_measured_and_cached_here(tmp_path):
    """No measurement injected, the extension built: the real probe runs once, and its routing is cached."""
    state = torch.random.get_rng_state()
    first = cpu_thin_check(cache_dir=tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.cached is False and set(first.speedup) == {"nt", "tn"} and 0 < first.seconds < 30
    assert all(set(first.speedup[kind]) == set(cpu.THIN_RANKS) for kind in ("nt", "tn"))
    again = cpu_thin_check(cache_dir=tmp_path)
    assert again.cached and (again.nt, again.tn, again.speedup) == (first.nt, first.tn, first.speedup)


def test_the_summary_doctor_prints():
    check = ThinCheck(nt=frozenset({16}), tn=frozenset(), speedup={"nt": {8: 0.9, 16: 1.25}, "tn": {8: 1.05}},
                      cpu="EPYC", seconds=0.3, cached=False)
    assert check.summary() == ("kernel's speed over BLAS's: nt: r8 0.90x (BLAS), r16 1.25x; tn: r8 1.05x (BLAS) "
                               "(needs 1.1x; measured now in 0.30 s)")
    assert ThinCheck(speedup=check.speedup, cached=True).summary().endswith("(needs 1.1x; cached measurement)")
    assert ThinCheck().summary() == "not measured (the CPU extension is not built): BLAS"
