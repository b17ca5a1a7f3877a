"""The CPU bf16 check behind `train.precision: auto` and `--dtype auto` (ops/precision.py): auto trains and
loads in bf16 on a CPU the check finds fast and in fp32 on one it finds slow (the measurement injected, so
both hold on any machine); forced bf16 on a slow CPU runs but warns once; the verdict is cached per machine
(thread count and torch version in the key), an unreadable cache is measured again; the real measurement
is well formed and leaves the global RNG alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from peft_rwkv7.cli import _load_for_inference
from peft_rwkv7.ops import precision
from peft_rwkv7.train.loop import setup
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.runner import train_from_cli
from tests.conftest import inject_measurement
from tests.train.conftest import tiny_overrides, tiny_world  # noqa: F401 (tiny_world: a fixture)

ROOT = Path(__file__).resolve().parents[2]
# Two machines' measurements (GFLOP/s of one op, fp32 then bf16): the AVX2-only CPU's scalar bf16 path
# of issue 23 (F.linear 5.5 against fp32's 27) and a native-bf16 CPU (3x).
SLOW = {"fast": False, "ratio": 0.2, "seconds": 0.05,
        "gflops": {"F.linear x[16,768] W[3072,768]": {"fp32": 27.0, "bf16": 5.5}}}
FAST = {"fast": True, "ratio": 3.0, "seconds": 0.6,
        "gflops": {"F.linear x[512,768] W[3072,768]": {"fp32": 60.0, "bf16": 180.0}}}


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """machine(fast) makes this CPU measure as FAST or SLOW, with the cache in a temporary folder (never the
    user's); returns the list of measurements taken."""
    return lambda fast: inject_measurement(monkeypatch, tmp_path / "bf16-cache", precision, "measure_bf16",
                                           FAST if fast else SLOW)


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.mark.parametrize("fast", [True, False], ids=["fast-cpu", "slow-cpu"])
def test_train_precision_auto_follows_the_check_on_cpu(tiny_world, tmp_path, machine, capsys, fast):  # noqa: F811
    taken = machine(fast)
    over = tiny_overrides(tiny_world, tmp_path / "run", steps=1, **{"train.precision": "auto", "train.device": "cpu"})
    run = setup(load_recipe(str(ROOT / "recipes/lora.yaml"), over))
    trained = {id(p) for _, p in run.named}
    frozen = {p.dtype for p in run.model.parameters() if id(p) not in trained and p.dtype.is_floating_point}
    assert frozen == {torch.bfloat16 if fast else torch.float32}
    with run.precision():
        assert torch.is_autocast_enabled("cpu") is fast
    err = capsys.readouterr().err
    said = lines_with(err, "train.precision: auto chose")
    assert len(said) == 1 and f"auto chose {'bf16' if fast else 'fp32'}" in said[0], err
    assert f"{FAST['ratio'] if fast else SLOW['ratio']:.2g}x fp32" in said[0] and "measured now" in said[0]
    assert "warning" not in err and len(taken) == 1


@pytest.mark.parametrize("fast", [True, False], ids=["fast-cpu", "slow-cpu"])
def test_forced_bf16_warns_once_on_a_slow_cpu_and_runs(tiny_world, tmp_path, machine, capsys, fast):  # noqa: F811
    machine(fast)
    over = tiny_overrides(tiny_world, tmp_path / "run", steps=2, **{
        "train.precision": "bf16", "train.device": "cpu", "train.eval_every": 1})
    assert train_from_cli(str(ROOT / "recipes/state_tune.yaml"), over) == 0  # bf16 all the same
    err = capsys.readouterr().err
    warned = lines_with(err, "bf16 matmuls run at")
    if fast:
        assert warned == [], err
        return
    assert len(warned) == 1, err  # once per run, not per step or evaluation
    assert warned[0].startswith("warning: train.precision: bf16: bf16 matmuls run at 0.2x fp32's speed")
    assert "expect a much slower run; train.precision: fp32 or auto avoids it" in warned[0]


@pytest.mark.parametrize("fast", [True, False], ids=["fast-cpu", "slow-cpu"])
def test_dtype_auto_loads_for_inference_by_the_check_on_cpu(tmp_path, machine, capsys, fast):
    from peft_rwkv7.model import save_model
    from tests.conftest import make_model

    machine(fast)
    save_model(make_model(seed=1), tmp_path / "m.pth")
    args = argparse.Namespace(model=str(tmp_path / "m.pth"), device="cpu", dtype="auto", adapter=None,
                              lora_alpha=None)
    model = _load_for_inference(args)
    matrices = {p.dtype for p in model.parameters() if p.dim() == 2}
    assert matrices == {torch.bfloat16 if fast else torch.float32}
    said = lines_with(capsys.readouterr().err, "--dtype auto chose")
    assert len(said) == 1 and f"chose {'bf16' if fast else 'fp32'}" in said[0]
    args.dtype = "fp32"  # asked for: no check, no line
    assert {p.dtype for p in _load_for_inference(args).parameters()} == {torch.float32}
    assert capsys.readouterr().err == ""


def test_a_resumed_auto_run_goes_on_in_the_precision_it_began_in(tiny_world, tmp_path, machine, capsys):  # noqa: F811
    """`auto` chose bf16 (a CPU measured fast). The run is cut and resumed where the check says slow (another
    machine, or another device: train.device may change on resume): it goes on in bf16, as its checkpoints were
    made, and ends bit for bit as the run that was never cut."""
    import shutil

    from safetensors.torch import load_file

    lora = str(ROOT / "recipes" / "lora.yaml")
    extra = {"train.precision": "auto", "train.save_every": 2, "train.device": "cpu"}
    machine(True)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_from_cli(lora, tiny_overrides(tiny_world, full, steps=4, **extra))
    train_from_cli(lora, tiny_overrides(tiny_world, cut, steps=4, **extra) + ["train.stop_after=2"])
    shutil.rmtree(tmp_path / "bf16-cache")  # the cached verdict is this machine's: now a slow one
    machine(False)
    capsys.readouterr()
    train_from_cli(lora, tiny_overrides(tiny_world, cut, steps=4, **extra), resume=True)
    err = capsys.readouterr().err
    assert lines_with(err, "train.precision: auto resumes in bf16, the precision of the run's checkpoints"), err
    assert not lines_with(err, "auto chose fp32")
    a, b = load_file(full / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_choose_bf16_on_cuda_and_fp32_never_measures(monkeypatch, capsys):
    def never():
        raise AssertionError("measured although the answer needs no measurement")

    monkeypatch.setattr(precision, "cuda_bf16_native", lambda: True)  # an Ampere or later GPU
    assert precision.choose_bf16("auto", "cuda", "train.precision", check=never) is True
    assert precision.choose_bf16("bf16", "cuda", "train.precision", check=never) is True
    assert precision.choose_bf16("fp32", "cpu", "train.precision", check=never) is False
    assert precision.choose_bf16("fp32", "cuda", "--dtype", check=never) is False
    assert capsys.readouterr().err == ""


def test_auto_takes_fp32_on_a_gpu_that_only_emulates_bf16(monkeypatch, capsys):
    """A GPU before compute capability 8.0 (T4, V100) runs bf16 emulated: `auto` takes fp32 there and says so; bf16
    asked for runs all the same, with a warning, as on a slow CPU."""
    monkeypatch.setattr(precision, "cuda_bf16_native", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert precision.choose_bf16("auto", "cuda", "train.precision") is False
    said = capsys.readouterr().err.strip().splitlines()
    assert said == ["train.precision: auto chose fp32: Tesla T4 has no native bf16 (torch would emulate it)"]
    assert precision.choose_bf16("bf16", "cuda", "--dtype") is True
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("warning: --dtype bf16: Tesla T4 has no native bf16")
    assert precision.choose_bf16("auto", "cuda", "train.precision", say=False) is False
    assert capsys.readouterr().err == ""


def test_the_verdict_is_cached_and_a_broken_cache_is_measured_again(tmp_path):
    taken = []

    def measure():
        taken.append(1)
        return dict(FAST)

    first = precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure)
    second = precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure)
    assert len(taken) == 1 and not first.cached and second.cached
    assert (second.fast, second.ratio, second.gflops) == (FAST["fast"], FAST["ratio"], FAST["gflops"])
    (path,) = tmp_path.iterdir()  # one file, no temporary left behind
    assert path.name.startswith("bf16-check-") and json.loads(path.read_text())["fields"] == precision.machine_fields()
    for broken in ("{not json", json.dumps({**FAST, "ratio": "3"}), json.dumps({**FAST, "gflops": {"op": 1}}), ""):
        path.write_text(broken)
        again = precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure)
        assert not again.cached and again.fast
        assert json.loads(path.read_text())["ratio"] == FAST["ratio"]  # rewritten whole
    assert len(taken) == 5
    path.write_bytes(b"\xff\xfe")  # not even text
    assert not precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure).cached


def test_the_cache_key_changes_with_threads_and_torch_version(tmp_path, monkeypatch):
    taken = []

    def measure():
        taken.append(1)
        return dict(SLOW)

    key = precision.cache_file(tmp_path, precision.machine_fields())
    precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    assert precision.cache_file(tmp_path, precision.machine_fields()) != key
    assert not precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure).cached  # not the other count's
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure).cached
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert precision.cache_file(tmp_path, precision.machine_fields()) != key
    assert not precision.cpu_bf16_check(cache_dir=tmp_path, measure=measure).cached
    assert len(taken) == 3


def _fake_timings(monkeypatch, ratio_of: dict[int, float]) -> list[int]:
    """_best_seconds replaced: op number i (counting from 0 over both shapes) runs bf16 at ratio_of[i] (default
    3) times fp32's speed; returns the numbers of the ops timed."""
    timed: list[int] = []

    def best(f32, f16, rounds, budget_s, warm_up):
        i = len(timed)
        timed.append(i)
        return 1.0, 1.0 / ratio_of.get(i, 3.0)

    monkeypatch.setattr(precision, "_best_seconds", best)
    monkeypatch.setattr(precision, "_row_chunks_speedup", lambda gen: 1.0)  # its own timings: not these tests'
    return timed


def test_every_op_must_beat_fp32_by_the_margin(monkeypatch):
    # 2 shapes x 3 ops, each timed on the slice and then at the full shape: 12 timings in all.
    timed = _fake_timings(monkeypatch, {})
    got = precision._measure_once()
    assert len(timed) == 12 and len(got["gflops"]) == 6 and got["fast"] and got["ratio"] == 3.0
    timed = _fake_timings(monkeypatch, {10: 1.1})  # one full-shape op only 10% faster: not fast
    got = precision._measure_once()
    assert len(timed) == 12 and not got["fast"] and got["ratio"] == 1.1


def test_a_clearly_slow_op_ends_the_check(monkeypatch):
    timed = _fake_timings(monkeypatch, {1: 0.01})  # the slice's input gradient at 1% of fp32 (AVX2's scalar path)
    got = precision._measure_once()
    assert len(timed) == 2 and not got["fast"] and got["ratio"] == 0.01
    assert list(got["gflops"]) == ["F.linear x[16,768] W[3072,768]", "g[16,3072] @ W[3072,768]"]


def test_the_real_measurement_is_well_formed_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    got = precision.measure_bf16()
    assert torch.equal(torch.rand(4), want)  # training seeds before it draws; this must not shift the stream
    assert precision._valid(got) and got["gflops"]
    ratios = [r["bf16"] / r["fp32"] for r in got["gflops"].values()]
    # The verdict is the rule applied to the rates it reports (rounded to 2 decimals: ratio to ~1%).
    assert got["ratio"] == pytest.approx(min(ratios), rel=0.02)
    assert got["fast"] == (got["ratio"] >= precision.FAST_MARGIN)
    if got["fast"]:  # and the row-chunk verdict is its rule applied to the speed-up it reports
        assert got["row_chunks"] == (got["row_chunks_speedup"] >= precision.ROW_CHUNKS_MARGIN)
    else:
        assert "row_chunks" not in got


@pytest.mark.parametrize("speedup", [1.05, 1.3])
def test_row_chunks_are_chosen_where_they_are_faster_by_the_margin(monkeypatch, speedup):
    _fake_timings(monkeypatch, {})  # bf16 fast
    monkeypatch.setattr(precision, "_row_chunks_speedup", lambda gen: speedup)
    got = precision._measure_once()
    assert got["row_chunks"] is (speedup >= precision.ROW_CHUNKS_MARGIN) and got["row_chunks_speedup"] == speedup
    _fake_timings(monkeypatch, {1: 0.01})  # bf16 slow: no row-chunk probe (bf16 is not used)
    monkeypatch.setattr(precision, "_row_chunks_speedup", lambda gen: pytest.fail("probed a slow CPU"))
    assert "row_chunks" not in precision._measure_once()


def test_the_row_chunk_probe_times_whole_against_chunked_calls(monkeypatch):
    """Its speed-up is the whole calls' time over the chunked calls' (each op's best), over every row count and
    shape, forward and input gradient: here each mm call takes its row count over its chunk count (a machine
    where chunks save nothing but the calls' rows) and chunked calls cost what whole ones do."""
    from peft_rwkv7.ops import rowsplit

    calls = []
    monkeypatch.setattr(rowsplit, "mm_rows", lambda a, b, chunks: calls.append((a.shape[0], chunks)))
    clock = iter(range(10**6))
    monkeypatch.setattr(precision.time, "perf_counter", lambda: float(next(clock)))
    assert precision._row_chunks_speedup(torch.Generator().manual_seed(0)) == 1.0
    rows = {r for r, _ in calls}
    assert rows == set(precision.ROW_CHUNKS_ROWS) and {c for _, c in calls} == {1, 2, 3}
    per_op = 2 + 2 * precision.ROW_CHUNKS_ROUNDS  # warm-up pair, then alternated rounds
    assert len(calls) == len(precision.ROW_CHUNKS_ROWS) * len(precision.ROW_CHUNKS_SHAPES) * 2 * per_op


@pytest.mark.parametrize("row_chunks", [True, False])
def test_training_and_loading_take_row_chunks_by_the_check(tiny_world, tmp_path, monkeypatch, row_chunks):  # noqa: F811
    """bf16 on a CPU whose check found row chunks faster: every Linear of the trained and of the loaded model
    makes its products in chunks (ops/rowsplit.py); where it did not, or in fp32, none does."""
    from peft_rwkv7.model import save_model
    from peft_rwkv7.model.rwkv7 import Linear
    from tests.conftest import make_model

    record = {**FAST, "row_chunks": row_chunks, "row_chunks_speedup": 1.8 if row_chunks else 1.0}
    monkeypatch.setattr(precision, "default_cache_dir", lambda: tmp_path / "bf16-cache")
    monkeypatch.setattr(precision, "measure_bf16", lambda: dict(record))

    def flags(model):
        got = {m.bf16_row_chunks for m in model.modules() if isinstance(m, Linear)}
        assert len(got) == 1, got
        return got.pop()

    for prec in ("auto", "fp32"):
        over = tiny_overrides(tiny_world, tmp_path / prec, steps=1, **{"train.precision": prec, "train.device": "cpu"})
        run = setup(load_recipe(str(ROOT / "recipes/lora.yaml"), over))
        assert flags(run.model) is (row_chunks and prec == "auto")
    save_model(make_model(seed=1), tmp_path / "m.pth")
    for dtype in ("auto", "fp32"):
        args = argparse.Namespace(model=str(tmp_path / "m.pth"), device="cpu", dtype=dtype, adapter=None,
                                  lora_alpha=None)
        assert flags(_load_for_inference(args)) is (row_chunks and dtype == "auto")
