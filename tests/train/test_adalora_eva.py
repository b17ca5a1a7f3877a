"""AdaLoRA and EVA in real training runs (`rwkv-peft train`, train/adalora.py, train/method_start.py).

AdaLoRA: the allocator prunes each step to the budget of the cubic schedule of the paper (computed here from
its formula, not by peft), ends at target_r per matrix on average, saves its ranks in adapter.json (= the
nonzero lora_E the file holds) and shows them in `inspect`; a run cut and resumed equals the uninterrupted
one bit for bit (the allocator's state travels in the checkpoint); the orthogonality penalty is peft's own;
the merged .pth equals the adapter and each merged delta has at most its allocated rank.
EVA: lora_A at step 0 spans the top right singular vectors of each layer's (centered) inputs on the run's
first batches, collected here by hooks on a fresh base and decomposed in fp64; the start draws no random
number (the run's RNG stream is the default start's) and a resume does not pass over the data again.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from peft_rwkv7.adapters import load_adapter, merge_into_pth
from peft_rwkv7.infer.inspect import inspect_path
from peft_rwkv7.model import load_model
from peft_rwkv7.train import adalora
from peft_rwkv7.train.loop import setup, train_step
from peft_rwkv7.train.recipe import load_recipe
from peft_rwkv7.train.runner import train_from_cli
from tests.adapters.test_merge import fp32_logits_bound
from tests.fp_oracle import U32, forward_rounding, gamma
from tests.train.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "recipes/lora.yaml")
R, TARGET_R, STEPS, TFINAL = 8, 2, 6, 2
ADALORA = {"method.kind": "adalora", "method.r": R, "method.adalora.target_r": TARGET_R,
           "method.adalora.tfinal": TFINAL, "method.dropout": 0.1, "train.lr": 1e-2, "train.save_every": 1,
           "train.keep_checkpoints": 0, "data.eval_path": "null"}
EVA_R, EVA_TOKENS = 4, 128  # 128 rows = the first two micro-batches of 2 x 32 tokens
EVA = {"method.init": "eva", "method.r": EVA_R, "method.eva_tokens": EVA_TOKENS, "method.dropout": 0.1,
       "train.lr": 1e-2, "data.eval_path": "null"}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter.safetensors")


def log(out: Path) -> list[dict]:
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in records]


def nonzero_e(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k.removesuffix(".lora_E"): int((t != 0).sum()) for k, t in tensors.items() if k.endswith(".lora_E")}


def cut_and_resume(tiny_world, out: Path, steps: int, cuts: list[int], extra: dict) -> None:
    """A run stopped after each step in `cuts` and resumed until it is done."""
    over = tiny_overrides(tiny_world, out, steps=steps, **extra)
    for i, at in enumerate([*cuts, None]):
        train_from_cli(LORA, over + ([f"train.stop_after={at}"] if at else []), resume=i > 0)


@pytest.fixture(scope="module")
def adalora_run(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adalora") / "run"
    train_from_cli(LORA, tiny_overrides(tiny_world, out, steps=STEPS, **ADALORA))
    return out


def test_adalora_prunes_on_the_papers_schedule_down_to_the_budget(adalora_run):
    ranks = json.loads((adalora_run / "adapter.json").read_text())["ranks"]
    assert ranks == nonzero_e(adapter(adalora_run))  # what the file holds
    assert len(ranks) == 12 and max(ranks.values()) <= R and min(ranks.values()) < R
    # The budget after step s (0-based; tinit 0: no pruning at s = 0): b(s) = int((b0 - bT) (1 - s / (S - tfinal))^3
    # + bT) with b0 = r per matrix and bT = target_r per matrix (Zhang et al. 2023, eq. 11); from s = S - tfinal on
    # it is bT (the final phase keeps the last pattern). Checkpoint c holds the weights after step c - 1, its
    # allocation included.
    b0, bt = R * len(ranks), TARGET_R * len(ranks)
    want = [b0] + [int((b0 - bt) * max(0.0, 1 - s / (STEPS - TFINAL)) ** 3 + bt) for s in range(1, STEPS)]
    saved = [torch.load(adalora_run / f"checkpoints/step_{c:06d}.pt", weights_only=False) for c in range(1, STEPS + 1)]
    got = [sum(nonzero_e(c["params"]).values()) for c in saved]
    assert got == want and want[-1] == bt and len(set(want)) > 2


def test_inspect_shows_the_ranks(adalora_run):
    ranks = json.loads((adalora_run / "adapter.json").read_text())["ranks"]
    assert json.loads(inspect_path(str(adalora_run), as_json=True))["ranks"] == ranks
    text = inspect_path(str(adalora_run))
    assert f"ranks after allocation: {TARGET_R * 12} in 12 matrices" in text
    for block in (0, 1):
        parts = [f"{m.split('.', 2)[2]} {r}" for m, r in ranks.items() if m.startswith(f"blocks.{block}.")]
        assert f"    block {block}: {', '.join(parts)}" in text


def test_adalora_resume_is_exact(tiny_world, adalora_run, tmp_path):
    cut = tmp_path / "cut"
    # cut in the pruning phase (step 3 masks by the importance EMAs of steps 0-2), then in the final phase (step 5
    # masks with the pattern that step 4 fixed)
    cut_and_resume(tiny_world, cut, STEPS, [3, STEPS - 1], ADALORA)
    a, b = adapter(adalora_run), adapter(cut)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert log(adalora_run) == log(cut)  # losses and orthogonality penalties of every step
    assert all("orth_reg" in r for r in log(cut) if "loss" in r)


def test_orth_penalty_is_peft_s_and_reaches_the_step_s_gradient(tiny_world, tmp_path):
    """peft's AdaLoraModel.forward adds the penalty to a model output's .loss (run here on an output of loss 0);
    the gradient the optimizer steps with is the loss's plus the penalty's (the run with orth_reg_weight 0 gives
    the loss's), to one fp32 addition."""
    from peft.tuners.adalora import AdaLoraModel

    grads, runs = {}, {}
    for weight in (0.5, 0.0):
        extra = {**ADALORA, "method.adalora.orth_reg_weight": weight, "train.grad_clip": 0}
        over = tiny_overrides(tiny_world, tmp_path / str(weight), steps=STEPS, **extra)
        runs[weight] = run = setup(load_recipe(LORA, over))
        if weight:
            tuner = run.model.tuner
            inner = SimpleNamespace(forward=lambda: SimpleNamespace(loss=torch.zeros(())),
                                    named_parameters=tuner.model.named_parameters)
            shim = SimpleNamespace(model=inner, peft_config=tuner.peft_config, trainable_adapter_name="default")
            theirs = AdaLoraModel.forward(shim).loss
            assert torch.equal(adalora.orth_penalty(run.model), theirs) and theirs > 0
            penalty_grad = torch.autograd.grad(theirs, [p for _, p in run.named], allow_unused=True)
        seen = grads[weight] = {}
        run.optimizer.register_step_pre_hook(lambda *_, run=run, seen=seen: seen.update(
            {n: p.grad.clone() for n, p in run.named}))
        train_step(run, 0)
    moved = 0
    for (name, _), g_pen in zip(runs[0.5].named, penalty_grad, strict=True):
        with_pen, without = grads[0.5][name].double(), grads[0.0][name].double()
        want = torch.zeros_like(with_pen) if g_pen is None else g_pen.double()
        assert ((with_pen - without - want).abs() <= U32 * with_pen.abs()).all(), name
        moved += bool((want.abs() > U32 * with_pen.abs()).any())
    assert moved > 0  # the penalty's share is above the rounding somewhere: the check can tell


def test_merged_adalora_equals_the_adapter_and_keeps_its_ranks(tiny_world, adalora_run, tmp_path):
    base_path = tiny_world[0]
    merge_into_pth(base_path, adalora_run, tmp_path / "merged.pth", dtype="fp32")
    merged = load_model(tmp_path / "merged.pth", wkv_backend="reference")
    adapted = load_adapter(load_model(base_path, wkv_backend="reference"), adalora_run).eval()  # no dropout
    idx = torch.randint(0, 65536, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got, untrained = adapted(idx), merged(idx), load_model(base_path, wkv_backend="reference")(idx)
    tol = fp32_logits_bound(merged, idx)
    assert (got - want).abs().max() <= tol
    assert (want - untrained).abs().max() > 10 * tol  # training moved the logits: the check has teeth

    ranks = json.loads((adalora_run / "adapter.json").read_text())["ranks"]
    tensors, base, new = adapter(adalora_run), torch.load(base_path), torch.load(tmp_path / "merged.pth")
    scale = adapted.method.alpha / (R + 1e-5)  # peft: alpha / r * B (A * E) / (ranknum + 1e-5), ranknum = r
    exact = 0
    for module, rank in ranks.items():
        w0, w1 = base[f"{module}.weight"].double(), new[f"{module}.weight"].double()
        b = tensors[f"{module}.lora_B"].double()
        ae = (tensors[f"{module}.lora_A"] * tensors[f"{module}.lora_E"]).double()  # P diag(E), fp32 as peft forms it
        # rounding of the merged weight: the delta's fp32 product (R terms) and scaling, then one addition
        err = gamma(R + 3) * abs(scale) * (b.abs() @ ae.abs()) + U32 * w1.abs()
        delta_rank = int(torch.linalg.matrix_rank(w1 - w0, atol=err.norm().item()))  # sigma_(k+1) <= ||noise||_F
        assert delta_rank <= rank, module
        exact += delta_rank == rank and 0 < rank < R
    assert exact > 0  # a pruned matrix whose remaining rank the merge keeps: the check can tell


def independent_inputs(tiny_world, recipe, targets: list[str]) -> dict[str, torch.Tensor]:
    """The first EVA_TOKENS rows each target Linear of a fresh base receives on the run's steps 0, 1, ...
    (data.batch as train_step reads it), fp32, by forward pre-hooks."""
    run_data = setup(load_recipe(LORA, recipe)).data
    base = load_model(tiny_world[0])
    rows: dict[str, list[torch.Tensor]] = {t: [] for t in targets}

    def keep(t: str):
        return lambda _module, args: rows[t].append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [base.get_submodule(t).register_forward_pre_hook(keep(t)) for t in targets]
    with torch.no_grad():
        for step in range(2):
            base(run_data.batch(step, 0, 2, 1)[0])
    for h in hooks:
        h.remove()
    return {t: torch.cat(x)[:EVA_TOKENS] for t, x in rows.items()}


def test_eva_start_is_the_top_right_singular_vectors_of_the_inputs(tiny_world, tmp_path):
    over = tiny_overrides(tiny_world, tmp_path / "e", steps=4, **EVA)
    model = setup(load_recipe(LORA, over)).model
    targets = [f"blocks.{i}.{t}" for i in range(2) for t in model.method.effective_targets()]
    inputs = independent_inputs(tiny_world, over, targets)
    for t in targets:
        layer = model.model.get_submodule(t)
        a = layer.lora_A["default"].weight.detach().double()  # [r, in]
        assert torch.equal(layer.lora_B["default"].weight, torch.zeros_like(layer.lora_B["default"].weight))
        x = inputs[t].double()
        xc = x - x.mean(0)
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        v = vh[:EVA_R]
        # Wedin: sin of the largest angle <= ||perturbation||_2 / (s_r - s_(r+1)); the perturbation: fp32 centering
        # and SVD (backward stable, gamma_(n+d) ||X||_F) and the run's fp32 forward (forward_rounding)
        n, d = x.shape
        noise = (gamma(n + d) + forward_rounding(model.config, 32)) * xc.norm().item()
        bound = noise / (s[EVA_R - 1] - s[EVA_R]).item()
        assert bound < 0.1, t  # the gap is wide enough for the check to mean something
        sin = torch.linalg.matrix_norm(a - a @ v.T @ v, ord=2).item()
        assert sin <= bound, (t, sin, bound)
        assert (a @ a.T - torch.eye(EVA_R, dtype=torch.float64)).abs().max() <= 2 * gamma(d)


def test_eva_draws_no_random_number(tiny_world, tmp_path):
    states = {}
    for init in ("eva", "default"):
        over = tiny_overrides(tiny_world, tmp_path / init, steps=4, **{**EVA, "method.init": init})
        run = setup(load_recipe(LORA, over))
        states[init] = (torch.get_rng_state(), run.data.batch(0, 0, 2, 1)[0])
    assert torch.equal(states["eva"][0], states["default"][0])  # dropout masks and every later draw: the same
    assert torch.equal(states["eva"][1], states["default"][1])


def test_eva_resume_is_exact_without_a_second_pass(tiny_world, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_from_cli(LORA, tiny_overrides(tiny_world, full, steps=4, **EVA))
    train_from_cli(LORA, [*tiny_overrides(tiny_world, cut, steps=4, **EVA), "train.stop_after=2"])
    import peft_rwkv7.adapters.inits as inits

    def no_pass(*_a, **_k):
        raise AssertionError("EVA collected inputs again on resume")

    monkeypatch.setattr(inits, "collect_inputs", no_pass)
    train_from_cli(LORA, tiny_overrides(tiny_world, cut, steps=4, **EVA), resume=True)
    a, b = adapter(full), adapter(cut)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert log(full) == log(cut)
    assert json.loads((cut / "adapter.json").read_text())["method"]["init"] == "eva"
