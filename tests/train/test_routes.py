"""train/routes.py: a run's measured choices (precision auto's bf16 check, its row chunks, LoRA's thin-product
routing) are made once, by rank 0, and kept in its checkpoints: a resume computes as the run began whatever the
machine measures now, and two processes compute alike whatever each would have measured. The measurements are
injected, so both hold on any machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_rwkv7.adapters.fused_lora import FusedLoraLinear
from peft_rwkv7.ops import cpu, thin_check
from peft_rwkv7.ops import precision as ops_precision
from peft_rwkv7.train import checkpoint as ckpt
from peft_rwkv7.train import routes
from peft_rwkv7.train.distributed import Dist
from peft_rwkv7.train.loop import setup
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.runner import train_from_cli
from tests.conftest import inject_measurement
from tests.ops.test_thin_check import thin_record
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes" / "lora.yaml")


@pytest.fixture
def thin_machine(monkeypatch, tmp_path):
    """thin_machine(record) makes this CPU measure the thin check as `record`, with the cache in a temporary
    folder (never the user's); returns the list of measurements taken from then on."""
    return lambda record: inject_measurement(monkeypatch, tmp_path / "cache", thin_check, "measure_thin", record)


def test_a_checkpoints_record_is_read_back_and_a_bad_one_chosen_again():
    kept = routes.Routes(bf16=False, row_chunks=True, thin=((16, 64), (8,)))
    assert routes.saved(json.loads(json.dumps(kept.record()))) == {"row_chunks": True, "thin": ((16, 64), (8,))}
    assert routes.saved(routes.Routes().record()) == {"row_chunks": False}  # thin not decided: decided again
    assert routes.saved(None) == {} and routes.saved("x") == {}  # a checkpoint from before routes were kept
    assert routes.saved({"row_chunks": 1, "thin": {"nt": [12], "tn": []}}) == {}  # 12 is not a kernel rank
    assert routes.saved({"thin": {"nt": [True], "tn": []}}) == {}
    assert routes.saved({"thin": {"nt": [16]}}) == {}


def test_bf16_row_chunks_are_the_checkpoints_where_it_has_them(monkeypatch):
    """A resume in bf16 takes the row chunks its checkpoint says, whatever the check says now; a new run the check's."""
    from types import SimpleNamespace

    from peft_rwkv7.train.distributed import Dist

    cpu_dev = torch.device("cpu")
    monkeypatch.setattr(routes, "choose_bf16", lambda *a, **k: True)
    monkeypatch.setattr(routes, "cpu_bf16_check", lambda: SimpleNamespace(row_chunks=False))
    assert routes.decide_precision("auto", cpu_dev, Dist(), {"row_chunks": True}) == routes.Routes(True, True)
    assert routes.decide_precision("auto", cpu_dev, Dist(), {}) == routes.Routes(True, False)
    monkeypatch.setattr(routes, "choose_bf16", lambda *a, **k: False)
    assert routes.decide_precision("auto", cpu_dev, Dist(), {"row_chunks": True}) == routes.Routes()


def _layers_thin(model) -> set[tuple[frozenset, frozenset] | None]:
    return {m.thin_check and (m.thin_check.nt, m.thin_check.tn) for m in model.modules()
            if isinstance(m, FusedLoraLinear)}


def test_a_resumed_run_keeps_the_thin_routes_it_began_with(tiny_world, tmp_path, thin_machine):
    """LoRA r16 in fp32 with 256-row micro-batches (the kernel's least): the check routes both kinds of rank 16 to
    the kernel and the run is cut. The cache is lost and this CPU now measures BLAS faster: the resume still runs
    them in the kernel, as its checkpoint says, and ends bit for bit as the run that was never cut. A new run
    routes by the new measurement: its bits differ, which is what lets this test fail."""
    if cpu._extension() is None:
        pytest.skip("the CPU extension is not built here: nothing to route")
    extra = {"train.save_every": 2, "train.device": "cpu", "method.r": 16, "train.micro_bsz": 8,
             "train.lr": 3e-3, "data.eval_path": "null"}
    taken = thin_machine(thin_record(nt={16: 2.0}, tn={16: 2.0}))
    full, cut, fresh = tmp_path / "full", tmp_path / "cut", tmp_path / "fresh"
    train_from_cli(LORA, tiny_overrides(tiny_world, full, steps=4, **extra))
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=4, **extra) + ["train.stop_after=2"])
    assert len(taken) == 1  # measured once, then cached
    assert ckpt.saved_choices(cut)[1] == {"row_chunks": False, "thin": {"nt": [16], "tn": [16]}}

    shutil.rmtree(tmp_path / "cache")
    taken = thin_machine(thin_record(nt={}, tn={}))
    run = setup(load_recipe(LORA, tiny_overrides(tiny_world, cut, steps=4, **extra)), resume=True)
    assert run.routes.thin == ((16,), (16,)) and not taken
    assert _layers_thin(run.model) == {(frozenset({16}), frozenset({16}))}
    del run
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=4, **extra), resume=True)
    assert not taken  # the resume measured nothing
    train_from_cli(LORA, tiny_overrides(tiny_world, fresh, steps=4, **extra))
    assert len(taken) == 1 and ckpt.saved_choices(fresh)[1]["thin"] == {"nt": [], "tn": []}

    a, b, c = (load_file(d / "adapter.safetensors") for d in (full, cut, fresh))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a), "the kernel and BLAS gave the same bits: nothing tested"


def test_evas_start_measures_nothing(tiny_world, tmp_path, thin_machine, monkeypatch):
    """EVA's pass over the first batches (256-row micro-batches: the kernel could take them) runs before the run
    decides the routing; with B at 0 it takes BLAS's products instead of measuring the check in every process.
    The run then routes by its decision (here: switched off, so nothing at all is measured and the layers are
    left to their own lazy check)."""
    if cpu._extension() is None:
        pytest.skip("the CPU extension is not built here: nothing to route")
    taken = thin_machine(thin_record(nt={16: 2.0}, tn={16: 2.0}))
    monkeypatch.setattr(routes, "decide_thin", lambda model, kept, *a: kept)
    over = tiny_overrides(tiny_world, tmp_path / "eva", steps=2, **{
        "method.init": "eva", "method.r": 16, "train.micro_bsz": 8, "train.device": "cpu"})
    run = setup(load_recipe(LORA, over))
    assert not taken and _layers_thin(run.model) == {None}


def test_another_precision_on_resume_chooses_again(tiny_world, tmp_path, thin_machine):
    """A run made in fp32 and resumed in bf16 (forced): the checkpoint's thin routes were for fp32; nothing of
    them is taken (under bf16 no thin product runs in the kernel)."""
    extra = {"train.save_every": 2, "train.device": "cpu", "method.r": 16, "data.eval_path": "null"}
    thin_machine(thin_record(nt={16: 2.0}, tn={}))
    cut = tmp_path / "cut"
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=4, **extra) + ["train.stop_after=2"])
    resumed = load_recipe(LORA, tiny_overrides(tiny_world, cut, steps=4, **{**extra, "train.precision": "bf16"}))
    run = setup(resumed, resume=True)
    assert run.routes.bf16 and run.routes.thin is None


# Wraps the CLI in a rank whose CPU measures its own way: rank 0 finds bf16 slow and rank 16's x A^T faster in the
# kernel, rank 1 finds bf16 fast and the kernel never faster (caches: each rank its own folder). At setup's end it
# writes to $SPY_OUT<rank> what the run computes in, its LoRA layers' thin routing and the measurements it took.
RANK_SPY = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.getcwd())  # the checkout (this file is in a temporary folder): its tests' records
from peft_rwkv7.adapters.fused_lora import FusedLoraLinear
from peft_rwkv7.ops import precision, thin_check
from peft_rwkv7.train import loop
from tests.ops.test_precision_auto import FAST, SLOW
from tests.ops.test_thin_check import thin_record
rank, out = int(os.environ["RANK"]), os.environ["SPY_OUT"]
taken = []
def bf16():
    taken.append("bf16")
    return dict(SLOW if rank == 0 else FAST)
def thin():
    taken.append("thin")
    return thin_record(nt={16: 2.0} if rank == 0 else {}, tn={})
precision.default_cache_dir = lambda: Path(out + f"cache{rank}")
precision.measure_bf16, thin_check.measure_thin = bf16, thin
real = loop.setup
def setup(*args, **kwargs):
    run = real(*args, **kwargs)
    checks = {(tuple(sorted(m.thin_check.nt)), tuple(sorted(m.thin_check.tn))) if m.thin_check else None
              for m in run.model.modules() if isinstance(m, FusedLoraLinear)}
    Path(out + str(rank)).write_text(json.dumps({"computes_in": run.computes_in, "thin": sorted(checks, key=str),
                                                 "taken": taken}))
    return run
loop.setup = setup
from peft_rwkv7.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_every_rank_computes_as_rank_0_measured(tiny_world, tmp_path):
    """Two processes whose CPUs measure differently (injected): rank 0 alone measures, and both train in its
    precision (fp32; rank 1 alone would have taken bf16) with its thin routing (rank 16's x A^T in the kernel)."""
    pytest.importorskip("deepspeed")
    if cpu._extension() is None:
        pytest.skip("the CPU extension is not built here: nothing to route")
    from tests.train.test_deepspeed import run_two_processes

    spy = tmp_path / "spy.py"
    spy.write_text(RANK_SPY)
    over = tiny_overrides(tiny_world, tmp_path / "run", steps=1, **{
        "train.precision": "auto", "train.device": "cpu", "train.deepspeed.stage": 2, "train.micro_bsz": 1,
        "method.r": 16, "data.eval_path": "null"})
    errs = run_two_processes(over, launcher=(str(spy),), env_extra={"SPY_OUT": str(tmp_path / "seen")}, timeout=300)
    seen = [json.loads((tmp_path / f"seen{rank}").read_text()) for rank in range(2)]
    assert seen[0] == {"computes_in": "fp32", "thin": [[[16], []]], "taken": ["bf16", "thin"]}, (seen, errs[0])
    assert seen[1] == {"computes_in": "fp32", "thin": [[[16], []]], "taken": []}, (seen, errs[1])
    assert "train.precision: auto chose fp32" in errs[0] and "auto chose" not in errs[1]
    assert ckpt.saved_choices(tmp_path / "run")[1] == {"row_chunks": False, "thin": {"nt": [16], "tn": []}}


def test_a_dpo_reference_copied_from_the_model_routes_as_it_does(tiny_world, tmp_path, thin_machine):
    """LoRA with parts trained in full cannot be switched off, so DPO's reference is a frozen copy: made after the
    routing, it routes as the model does (one routing, no second measurement)."""
    from tests.train.test_preference_train import DPO, overrides

    taken = thin_machine(thin_record(nt={16: 2.0}, tn={8: 2.0}))
    over = overrides(tiny_world, tmp_path, tmp_path / "dpo", **{"method.train_parts": "[time]",
                                                               "method.state": "false"})
    run = setup(load_recipe(DPO, over))
    assert run.reference is not None and run.reference is not run.model and len(taken) == 1
    assert _layers_thin(run.model) == _layers_thin(run.reference) == {(frozenset({16}), frozenset({8}))}


def _rank(rank: int, port: int, out: str) -> None:
    """A process of test_an_error_on_rank_0_stops_every_rank: rank 0's decision fails."""
    from peft_rwkv7.errors import UserError
    from peft_rwkv7.train.distributed import Dist, on_rank0

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []

    def decide():
        calls.append(rank)
        raise UserError("the bf16 check failed here")

    try:
        on_rank0(Dist(rank=rank, world_size=2), decide)
        seen = "returned"
    except UserError as e:
        seen = str(e)
    finally:
        torch.distributed.destroy_process_group()
    Path(f"{out}{rank}").write_text(json.dumps({"seen": seen, "calls": calls}))


def test_an_error_on_rank_0_stops_every_rank(tmp_path):
    """distributed.on_rank0: rank 0 alone decides; its error is raised there as it was and on the other ranks as
    one line naming rank 0, instead of leaving them waiting in the broadcast."""
    import torch.multiprocessing as mp

    from tests.train.test_deepspeed import free_port

    mp.start_processes(_rank, args=(free_port(), str(tmp_path / "seen")), nprocs=2, start_method="spawn")
    seen = [json.loads((tmp_path / f"seen{r}").read_text()) for r in range(2)]
    assert seen[0] == {"seen": "the bf16 check failed here", "calls": [0]}
    assert seen[1] == {"seen": "the bf16 check failed here (on rank 0)", "calls": []}


def test_on_a_gpu_nothing_is_measured_and_each_rank_asks_its_gpu(monkeypatch, capsys):
    """On a GPU no CPU check runs and no broadcast is made (a rank of several asks its own GPU): bf16 where the GPU
    has native bf16, fp32 under auto where it would emulate it; the thin routing is left undecided (the CPU
    kernel never takes GPU tensors)."""
    def no_cpu_check(*a, **k):
        raise AssertionError("a CPU check was measured for a GPU run")

    monkeypatch.setattr(routes, "cpu_bf16_check", no_cpu_check)
    monkeypatch.setattr(routes, "cpu_thin_check", no_cpu_check)
    monkeypatch.setattr(routes, "on_rank0", no_cpu_check)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    gpu, rank1 = torch.device("cuda"), Dist(rank=1, world_size=2)
    for native, auto in ((True, routes.Routes(bf16=True)), (False, routes.Routes())):
        monkeypatch.setattr(ops_precision, "cuda_bf16_native", lambda native=native: native)
        assert routes.decide_precision("auto", gpu, rank1, {"row_chunks": True}) == auto
        assert routes.decide_precision("fp32", gpu, rank1, {}) == routes.Routes()
        assert routes.decide_thin(torch.nn.Linear(2, 2), auto, gpu, rank1, {"thin": ((16,), ())}) == auto
    assert capsys.readouterr().err == ""  # rank 1 says nothing
