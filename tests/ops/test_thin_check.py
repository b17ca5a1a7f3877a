"""ops/thin_check.py: the measured check that routes LoRA's thin products to the CPU kernel or BLAS, with the
measurement injected both ways, its cache, and one real measurement."""

from __future__ import annotations

import json

import pytest
import torch

from peft_rwkv7.ops import cpu, thin_check
from peft_rwkv7.ops.thin_check import MARGIN, ThinCheck, cpu_thin_check


def thin_record(nt: dict, tn: dict) -> dict:
    """A thin-check measurement: the kernel's speed over BLAS's per kind and rank (1.0 where not given)."""
    return {"speedup": {"nt": {str(r): nt.get(r, 1.0) for r in cpu.THIN_RANKS},
                        "tn": {str(r): tn.get(r, 1.0) for r in cpu.THIN_RANKS}}, "seconds": 0.25}


def test_a_kind_and_rank_run_in_the_kernel_only_where_it_was_measured_faster_by_the_margin(tmp_path):
    record = thin_record(nt={8: 0.9, 16: MARGIN, 32: MARGIN - 0.01, 64: 2.5}, tn={8: 3.0, 16: 0.5})
    check = cpu_thin_check(cache_dir=tmp_path, measure=lambda: record)
    assert check.nt == {16, 64} and check.tn == {8}
    assert check.speedup["nt"][32] == pytest.approx(MARGIN - 0.01) and not check.cached
    slow = cpu_thin_check(cache_dir=tmp_path / "slow", measure=lambda: thin_record(nt={}, tn={}))
    assert slow.nt == slow.tn == frozenset()
    assert "r16 1.10x, r32 1.09x (BLAS)" in check.summary() and "measured now" in check.summary()


def test_the_check_is_measured_once_and_then_read_from_its_cache(tmp_path, monkeypatch):
    runs = []

    def measure():
        runs.append(1)
        return thin_record(nt={16: 1.5}, tn={16: 2.0})

    first = cpu_thin_check(cache_dir=tmp_path, measure=measure)
    second = cpu_thin_check(cache_dir=tmp_path, measure=measure)
    assert len(runs) == 1 and not first.cached and second.cached
    assert (second.nt, second.tn, second.speedup) == (first.nt, first.tn, first.speedup)
    assert "cached measurement" in second.summary()
    (path,) = tmp_path.glob("thin-check-*.json")
    assert json.loads(path.read_text())["fields"]["probe"].startswith("thin-")
    path.write_text("{not json")  # unreadable: measured again, and rewritten
    assert not cpu_thin_check(cache_dir=tmp_path, measure=measure).cached and len(runs) == 2
    assert cpu_thin_check(cache_dir=tmp_path, measure=measure).cached
    fields = thin_check._fields()
    monkeypatch.setattr(thin_check, "_fields", lambda: {**fields, "kernel": "another"})  # the kernel changed
    assert not cpu_thin_check(cache_dir=tmp_path, measure=measure).cached and len(runs) == 3


def test_a_bad_measurement_is_refused_and_an_unwritable_cache_only_costs_a_measurement(tmp_path, capsys):
    with pytest.raises(TypeError, match="thin-product measurement returned"):
        cpu_thin_check(cache_dir=tmp_path, measure=lambda: {"speedup": {"nt": {}}, "seconds": 1.0})
    blocked = tmp_path / "file"
    blocked.write_text("")
    check = cpu_thin_check(cache_dir=blocked, measure=lambda: thin_record(nt={16: 2.0}, tn={}))
    assert check.nt == {16} and "could not cache the thin-product check" in capsys.readouterr().err


def test_without_the_extension_nothing_is_measured_and_blas_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "_extension", lambda: None)
    check = cpu_thin_check(cache_dir=tmp_path)
    assert check == ThinCheck(cpu=check.cpu) and "not measured" in check.summary()
    assert not list(tmp_path.iterdir())


def test_a_real_measurement_has_every_kind_and_rank():
    """The probe itself, on this CPU (about 0.3-0.6 s on 2 cores): a valid record; which way it goes is the CPU's."""
    assert cpu.is_available(torch.device("cpu"))
    record = thin_check.measure_thin()
    assert thin_check._valid(record) and 0 < record["seconds"] < 30, record
