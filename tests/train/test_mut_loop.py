"""One SFT optimizer step of train/loop.py against a plain autograd oracle (found by `scripts/mutation.sh loop`).

The step is run on a tiny LoRA + state model with a hand-made data source and plain SGD, so that the update is
exactly -lr * (clipped gradient). The oracle: the whole global batch (every micro-batch) in one forward, the
token-mean cross-entropy in float64 by hand, one backward; the learning rate written out from the schedule's
formula; clipping by torch's documented rule (scale clip / (norm + 1e-6) when that is below 1)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from peft_rwkv7.adapters import MethodConfig, attach, trainable_parameters
from peft_rwkv7.train.loop import Dist, Run, _precision_context, train_step
from peft_rwkv7.train.tasks import sum_over_ranks as _sum_over_ranks
from tests.conftest import make_model

V, T, MICRO, ACCUM = 97, 12, 2, 2


class Rows:
    """A data source whose batch b of step s is rows [(s * accum + b) * world + rank] * micro_bsz ... of a fixed
    pool: the batch a call gets depends on every argument, and each call is recorded."""

    def __init__(self, masked_per_row):
        g = torch.Generator().manual_seed(9)
        n = len(masked_per_row)
        self.idx = torch.randint(0, V, (n, T), generator=g)
        self.labels = torch.randint(0, V, (n, T), generator=g)
        for r, positions in enumerate(masked_per_row):
            self.labels[r, positions] = -100
        self.calls = []

    def rows(self, step, micro, micro_bsz, grad_accum, rank, world_size):
        start = ((step * grad_accum + micro) * world_size + rank) * micro_bsz
        return slice(start, start + micro_bsz)

    def batch(self, step, micro, micro_bsz, grad_accum, rank, world_size):
        self.calls.append((step, micro, micro_bsz, grad_accum, rank, world_size))
        r = self.rows(step, micro, micro_bsz, grad_accum, rank, world_size)
        assert r.stop <= len(self.idx), "the pool has no such rows"
        return self.idx[r], self.labels[r]


def make_run(data, *, grad_clip, lr=1.0, schedule="constant", warmup_steps=0, max_steps=10, decay_frac=0.2):
    base = make_model(seed=21, n_layer=2, n_embd=64, head_size=16, vocab_size=V)
    base.set_wkv_backend("reference")
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same start in any process and order
    model = attach(base, MethodConfig(kind="lora", r=4, alpha=8, state=True))
    named = trainable_parameters(model)
    with torch.no_grad():  # LoRA B and the state off zero, so that every trained tensor has a gradient
        for _, p in named:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tc = SimpleNamespace(lr=lr, final_lr=lr / 10, max_steps=max_steps, warmup_steps=warmup_steps, schedule=schedule,
                         decay_frac=decay_frac, micro_bsz=MICRO, grad_accum=ACCUM, grad_clip=grad_clip, chunk_len=0)
    opt = torch.optim.SGD([p for _, p in named], lr=0.0)
    return Run(SimpleNamespace(train=tc), Dist(), torch.device("cpu"), base, None, model, named, data, None, opt,
               None, _precision_context(torch.device("cpu"), False), start=0)


def oracle(run, data, step):
    """(token-mean loss of the step's global batch in float64, gradient per trained tensor)."""
    rows = [data.rows(step, m, MICRO, ACCUM, 0, 1) for m in range(ACCUM)]
    idx, labels = torch.cat([data.idx[r] for r in rows]), torch.cat([data.labels[r] for r in rows])
    keep = labels != -100
    logp = torch.log_softmax(run.model(idx).double(), dim=-1)
    loss = -logp[keep].gather(-1, labels[keep][:, None]).sum() / keep.sum()
    params = [p for _, p in run.named]
    return loss.item(), torch.autograd.grad(loss, params)


def flat(ts):
    return torch.cat([t.detach().double().flatten() for t in ts])


# Uneven masks: 12, 9, 1 and 4 loss tokens; step 1 reads rows 4..7.
MASKS = [[], [0, 1, 2], list(range(11)), list(range(8)), [3], [0, 5, 6, 7, 8, 9, 10, 11], [], [1, 2]]


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_sft_step_is_the_global_batch_mean_gradient_clipped(grad_clip):
    data = Rows(MASKS)
    run = make_run(data, grad_clip=grad_clip, lr=0.5)
    want_loss, grads = oracle(run, data, step=1)
    g = flat(grads)
    norm = g.norm().item()
    assert norm > 20 * 0.05  # the clipped case really clips
    coef = min(1.0, grad_clip / (norm + 1e-6)) if grad_clip else 1.0
    before = flat(p for _, p in run.named)
    loss, lr = train_step(run, 1)
    delta = flat(p for _, p in run.named) - before
    assert data.calls == [(1, 0, MICRO, ACCUM, 0, 1), (1, 1, MICRO, ACCUM, 0, 1)]
    assert lr == 0.5 and all(group["lr"] == 0.5 for group in run.optimizer.param_groups)
    # fp32 forward and loss sums over 26 tokens vs the float64 oracle: ~1e2 roundings of 2^-24 of a loss ~5
    assert abs(loss - want_loss) <= 1e-4, (loss, want_loss)
    # gradients: fp32 sums in another order than the oracle's (relative ~1e-5 at most); the update adds the
    # fp32 rounding of the parameters (|p| < 2, 2^-24 each) over ~1e4 entries: ~1e-5 in norm
    want = -0.5 * coef * g
    assert (delta - want).norm() <= 1e-4 * want.norm() + 1e-5, ((delta - want).norm(), want.norm())
    assert all(p.grad is None for _, p in run.named)  # zero_grad(set_to_none=True) after the step


def test_one_loss_token_in_the_whole_step():
    """The mean over one token is that token's loss: neither halved nor doubled."""
    masks = [list(range(T))] * 3 + [[t for t in range(T) if t != 4]]
    data = Rows(masks)
    run = make_run(data, grad_clip=0.0, lr=0.1)
    want_loss, grads = oracle(run, data, step=0)
    before = flat(p for _, p in run.named)
    loss, _ = train_step(run, 0)
    assert abs(loss - want_loss) <= 1e-5
    want = -0.1 * flat(grads)
    assert ((flat(p for _, p in run.named) - before) - want).norm() <= 1e-4 * want.norm() + 1e-5


@pytest.mark.parametrize("schedule,step,want", [
    # cosine: warmup 2, span max(10 - 2 - 1, 1) = 7, progress (5 - 2) / 7
    ("cosine", 5, 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 3 / 7))),
    # wsd: round(10 * 0.3) = 3 decay steps from step 7; step 8 is 2/3 of the way from lr to lr_final
    ("wsd", 8, 1e-3 + (1e-4 - 1e-3) * 2 / 3),
    ("cosine", 0, 1e-3 / 2),  # warmup: lr * (step + 1) / warmup_steps
])
def test_the_step_uses_the_schedule_of_the_recipe(schedule, step, want):
    data = Rows([[]] * (2 * ACCUM * MICRO * 9))
    run = make_run(data, grad_clip=0.0, lr=1e-3, schedule=schedule, warmup_steps=2, max_steps=10, decay_frac=0.3)
    _, lr = train_step(run, step)
    assert lr == pytest.approx(want, rel=1e-12)
    assert all(group["lr"] == lr for group in run.optimizer.param_groups)


def test_a_non_finite_gradient_stops_before_the_update():
    data = Rows(MASKS)
    run = make_run(data, grad_clip=1.0)
    _, p = run.named[0]
    p.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = flat(q for _, q in run.named)
    with pytest.raises(FloatingPointError, match=r"^step 2: gradient norm is inf$"):
        train_step(run, 1)
    assert torch.equal(flat(q for _, q in run.named), before)


def test_precision_context_is_bf16_autocast_or_nothing():
    """bf16 by name: autocast's default dtype is bf16 on the CPU but fp16 on CUDA, so here the CPU default is
    set to fp16 while the context is made."""
    cpu = torch.device("cpu")
    default = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    try:
        with _precision_context(cpu, True)():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    finally:
        torch.set_autocast_dtype("cpu", default)
    with _precision_context(cpu, False)():
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_sum_over_ranks_is_float64(tmp_path):
    """One process: the value itself. A process group of one: all_reduce in float64, so 2^24 + 1 survives (fp32
    would round it to 2^24)."""
    assert _sum_over_ranks(16777217.0, Dist(0, 1), torch.device("cpu")) == 16777217.0
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert _sum_over_ranks(16777217.0, Dist(0, 2), torch.device("cpu")) == 16777217.0
    finally:
        tdist.destroy_process_group()


def test_chunk_len_reaches_the_loss():
    """train.chunk_len 4 runs each 12-token micro-batch as chunks of 4 (recomputed once more in backward)."""
    data = Rows(MASKS)
    run = make_run(data, grad_clip=0.0)
    model, lengths = run.model, []

    def counting(x, state, return_state):
        lengths.append(x.shape[1])
        return model(x, state, return_state=return_state)

    run.model = counting
    train_step(run, 0)
    assert lengths == [T, T]
    run.recipe.train.chunk_len, lengths[:] = 4, []
    train_step(run, 0)
    assert lengths == [4] * 12  # 2 micro-batches x 3 chunks, each in forward and again in backward


class Engine:
    """DeepSpeed's engine as the loop uses it: backward of each micro-batch's share, then step()."""

    def __init__(self):
        self.losses, self.steps = [], 0

    def backward(self, loss, scale_wrt_gas):
        assert scale_wrt_gas is False
        self.losses.append(loss.item())
        loss.backward()

    def step(self):
        self.steps += 1


def test_an_engine_gets_each_micro_batch_share_and_steps_itself():
    data = Rows(MASKS)
    run = make_run(data, grad_clip=0.05)
    run.engine = Engine()
    want_loss, grads = oracle(run, data, step=1)
    before = flat(p for _, p in run.named)
    loss, _ = train_step(run, 1)
    assert run.engine.steps == ACCUM and len(run.engine.losses) == ACCUM
    assert abs(sum(run.engine.losses) - want_loss) <= 1e-4 and abs(loss - want_loss) <= 1e-4
    # the engine clips and steps: the loop leaves the gradients (unclipped) and the weights to it
    assert torch.equal(flat(p for _, p in run.named), before)
    g = flat(grads)
    assert (flat(p.grad for _, p in run.named) - g).norm() <= 1e-4 * g.norm()


def test_a_non_finite_loss_names_the_step():
    data = Rows(MASKS)
    run = make_run(data, grad_clip=1.0)
    with torch.no_grad():
        run.named[0][1].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"^step 2: loss is nan$"):
        train_step(run, 1)
