"""The fused CPU WKV7 kernel against the reference op: outputs, every gradient, dispatch, the model.

Outputs are allocated NaN-filled in these tests, so any element the kernel fails to write shows.
"""

from __future__ import annotations

import functools
import math
import sys

import pytest
import torch

from peft_rwkv7.ops import available_backends, cpu, dispatch, linear, wkv7, wkv7_reference
from tests.conftest import make_model
from tests.fp_oracle import forward_rounding, gamma
from tests.ops.conftest import assert_close, wkv_inputs, wkv_rtol

NAMES = ("y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate")


def nan_alloc(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=torch.float32)


kernel = functools.partial(cpu.wkv7_cpu, alloc=nan_alloc)


@pytest.fixture(scope="module", autouse=True)
def built():
    # The kernel ships with the package: a build failure here is a test failure, not a skip.
    assert cpu.is_available(torch.device("cpu")), "the CPU kernel did not build (see the warning above)"


def fwd_bwd(fn, inputs, state, seed=1, use_y=True, use_state=True) -> list[torch.Tensor]:
    """[y, final state, grads of r w k v a b (, initial state)] for a random upstream gradient."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    s0 = None if state is None else state.clone().requires_grad_()
    y, s = fn(*leaves, s0)
    g = torch.Generator().manual_seed(seed)
    dy, ds = torch.randn(y.shape, generator=g).to(y.dtype), torch.randn(s.shape, generator=g)
    loss = 0.0
    if use_y:
        loss = loss + (y.float() * dy.float()).sum()
    if use_state:
        loss = loss + (s * ds).sum()
    loss.backward()
    return [y.detach(), s.detach()] + [x.grad for x in leaves] + ([] if s0 is None else [s0.grad])


def compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Outputs and gradients of two WKV7 implementations within wkv_rtol (T and N from y [B, T, H, N])."""
    assert len(got) == len(want)
    _, T, _, N = want[0].shape
    for name, a, b in zip(NAMES, got, want):
        if b is None:  # autograd gives None where an input cannot reach the loss; zeros are equal
            assert a is None or not a.any(), f"{name}: expected no gradient"
            continue
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert_close(a, b, wkv_rtol(T, N, a.dtype), name)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, cpu.CHUNK - 1, cpu.CHUNK, cpu.CHUNK + 1, 3 * cpu.CHUNK + 4])  # checkpoint edges
def test_lengths_match_reference(T, dtype, with_state):
    inputs, state = wkv_inputs(3, T, 3, 32, dtype, seed=T, with_state=with_state)
    compare(fwd_bwd(kernel, inputs, state), fwd_bwd(wkv7_reference, inputs, state))


@pytest.mark.parametrize("tiles", [16, 64], ids=["tiles16", "tiles64"])
@pytest.mark.parametrize(
    "B, H, N, dtype",
    [
        (1, 1, 16, torch.float32),
        (3, 12, 16, torch.float32),
        (1, 12, 64, torch.float32),
        (3, 3, 64, torch.bfloat16),
        (2, 2, 128, torch.float32),
        (2, 3, 20, torch.float32),  # N % 8 != 0: padded inside (to 24: the runtime-N code)
    ],
)
def test_shapes_match_reference(B, H, N, dtype, tiles):
    """Both column tile widths on any CPU (the CPU picks one of them by itself: 64 with AVX-512)."""
    inputs, state = wkv_inputs(B, 33, H, N, dtype, seed=N + H, with_state=True)
    compare(fwd_bwd(functools.partial(kernel, tiles=tiles), inputs, state), fwd_bwd(wkv7_reference, inputs, state))


def test_tile_widths_give_the_same_forward_bits():
    """The forward sums over the keys in one order whatever the tile: y and the state are bit-identical."""
    inputs, state = wkv_inputs(2, 40, 3, 64, seed=11, with_state=True)
    narrow, wide, auto = (kernel(*inputs, state, tiles=t) for t in (16, 64, 0))
    for a, b, c in zip(narrow, wide, auto):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(RuntimeError, match="tiles must be 0, 16 or 64"):
        kernel(*inputs, state, tiles=32)


@pytest.mark.parametrize("use_y, use_state", [(False, True), (True, False)], ids=["state-only", "y-only"])
def test_one_output_used(use_y, use_state):
    # The unused output's gradient arrives as None/zeros; the other must still be exact.
    inputs, state = wkv_inputs(2, 21, 2, 32, seed=7, with_state=True)
    got = fwd_bwd(kernel, inputs, state, use_y=use_y, use_state=use_state)
    want = fwd_bwd(wkv7_reference, inputs, state, use_y=use_y, use_state=use_state)
    compare(got, want)


def test_only_the_state_trainable():
    # State tuning with a frozen model: only the initial state asks for a gradient.
    inputs, state = wkv_inputs(2, 19, 2, 32, seed=9, with_state=True)
    grads = []
    for fn in (kernel, wkv7_reference):
        s0 = state.clone().requires_grad_()
        y, s = fn(*inputs, s0)
        (y.square().sum() + s.sum()).backward()
        grads.append(s0.grad)
    assert_close(grads[0], grads[1], wkv_rtol(19, 32, torch.float32), "dstate")


def test_chunked_bptt_equals_whole_sequence():
    # Long-context training: the sequence in uneven pieces, the state carried between them with
    # gradients flowing back through it, must equal one pass over the whole sequence.
    inputs, state = wkv_inputs(2, 40, 3, 32, seed=11, with_state=True)

    def pieces(*args):
        *rwkvab, s = args
        ys = []
        for lo, hi in ((0, 7), (7, 23), (23, 40)):
            y, s = kernel(*(x[:, lo:hi] for x in rwkvab), s)
            ys.append(y)
        return torch.cat(ys, dim=1), s

    compare(fwd_bwd(pieces, inputs, state), fwd_bwd(wkv7_reference, inputs, state))


def test_empty_sequence_passes_state_through():
    inputs, state = wkv_inputs(2, 0, 2, 16, with_state=True)
    y, s, *grads = fwd_bwd(kernel, inputs, state, use_y=False)
    assert y.shape == (2, 0, 2, 16)
    assert torch.equal(s, state)
    g = torch.Generator().manual_seed(1)
    torch.randn(y.shape, generator=g)
    assert torch.equal(grads[-1], torch.randn(s.shape, generator=g))  # dL/dS_0 = dL/dS_T


def test_default_allocator_gives_identical_results():
    inputs, state = wkv_inputs(2, 20, 2, 24, seed=3, with_state=True)
    a = fwd_bwd(kernel, inputs, state)
    b = fwd_bwd(cpu.wkv7_cpu, inputs, state)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def threads():
    """Set torch's intra-op threads for one test, restored after it."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


openmp_linux = pytest.mark.skipif(
    not (torch.backends.openmp.is_available() and sys.platform.startswith("linux")),
    reason="torch without its OpenMP backend (or not Linux): the kernels are built single-threaded there")


@openmp_linux
def test_the_kernels_split_work_over_torchs_threads(threads):
    # ATen's parallel_for is compiled into the extension: built without OpenMP it is a serial loop.
    threads(2)
    assert cpu.kernel_threads() == 2
    threads(1)
    assert cpu.kernel_threads() == 1


@openmp_linux
def test_one_openmp_runtime_in_the_process():
    cpu.kernel_threads()  # the extension is loaded
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) <= 1, f"two OpenMP runtimes loaded: {sorted(gomp)}"


def test_threads_give_bitwise_the_single_thread_results(threads):
    """Sequences are independent: splitting them over threads changes no bit (a race would)."""
    inputs, state = wkv_inputs(3, 40, 4, 32, seed=7, with_state=True)
    threads(1)
    one = fwd_bwd(kernel, inputs, state)
    threads(2)
    two = fwd_bwd(kernel, inputs, state)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_auto_uses_the_cpu_kernel():
    assert "cpu" in available_backends("cpu")
    assert dispatch.resolve("auto", torch.device("cpu")) is cpu.wkv7_cpu
    inputs, state = wkv_inputs(1, 5, 2, 16, with_state=True)
    y, _ = wkv7(*(x.requires_grad_() for x in inputs), state=state, backend="auto")
    assert type(y.grad_fn).__name__ == "_Wkv7CpuBackward"


def test_only_cpu_tensors():
    assert not cpu.is_available(torch.device("cuda"))
    assert not cpu.is_available(torch.device("meta"))


def test_build_failure_falls_back_to_reference(monkeypatch, tmp_path):
    inputs, _ = wkv_inputs(1, 3, 1, 16)
    monkeypatch.setattr(cpu, "_SOURCES", (tmp_path / "missing.cpp",))
    cpu._extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert not cpu.is_available(torch.device("cpu"))
        assert dispatch.resolve("auto", torch.device("cpu")) is wkv7_reference
        with pytest.raises(RuntimeError, match="not available"):
            wkv7(*inputs, backend="cpu")
        x, weight = torch.randn(1, 1, 24), torch.randn(40, 24)
        assert torch.equal(linear(x, weight), torch.nn.functional.linear(x, weight))  # F.linear fallback
    finally:
        monkeypatch.undo()
        cpu._extension.cache_clear()
    assert cpu.is_available(torch.device("cpu"))


@pytest.mark.parametrize("head_size", [16, 32])
def test_model_cpu_backend_equals_reference(head_size):
    """A tiny random RWKV7, forward + backward, with a trainable initial state (state tuning)."""
    model = make_model(seed=2, n_layer=2, n_embd=64, head_size=head_size)
    H, N = model.config.n_head, head_size
    idx = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(5))
    s0 = torch.randn(H, N, N, generator=torch.Generator().manual_seed(6)) * 0.3

    def run(backend):
        model.zero_grad()
        model.set_wkv_backend(backend)
        state = [blk_state._replace(wkv=s0.clone().requires_grad_()) for blk_state in model.initial_state()]
        logits = model(idx, state)
        logits.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads, [st.wkv.grad for st in state]

    logits_ref, grads_ref, sgrad_ref = run("reference")
    logits_cpu, grads_cpu, sgrad_cpu = run("cpu")
    model.set_wkv_backend("auto")
    # Two fp32 forwards of one network: twice the forward's rounding bound. Gradients: the backward is the
    # forward's chain in reverse (x2) plus sums over the batch's B x T positions, for each implementation.
    fwd = forward_rounding(model.config, idx.shape[1])
    assert (logits_cpu - logits_ref).abs().max() <= 2 * fwd * logits_ref.abs().max()
    grad_rtol = 2 * (2 * fwd + gamma(idx.numel()))
    assert grads_cpu.keys() == grads_ref.keys() and len(grads_ref) > 10
    for name, g in grads_ref.items():
        err = (grads_cpu[name] - g).abs().max() / g.abs().max().clamp_min(1e-12)
        assert err <= grad_rtol, f"{name}: relative error {err:.1e}"
    for got, want in zip(sgrad_cpu, sgrad_ref):
        assert (got - want).abs().max() <= grad_rtol * want.abs().max()


def test_bf16_inputs_are_staged_by_the_kernel_not_copied():
    """bf16 r, k, v, a, b reach the kernel as they are: it stages their rows in fp32 (a chunk at a time) and writes y
    and their gradients in bf16 (cuda/wkv7_cpu_stage.h), so no [B, T, H, N] tensor is widened or rounded on the way
    but z's (the decay's input, widened for decay_forward) and dL/dz's (made in fp32 with the decay's factor). Before:
    19 such copies a call, ~20 ms of a 0.48 s bf16 step at 0.1B ctx 512. And what is kept for backward is bf16
    but for the decay and its factor, which the op makes in fp32 (fp32 copies of r, k, v, a and b would be ~50 MB
    a layer at 0.1B ctx 4096). The values: the reference's, within the WKV bound for bf16."""
    from torch.profiler import ProfilerActivity, profile

    inputs, state = wkv_inputs(2, 40, 3, 16, torch.bfloat16, seed=3, with_state=True)
    z = torch.randn(inputs[1].shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    leaves = [x.clone().requires_grad_() for x in (inputs[0], z, *inputs[2:])]
    wkv7(*leaves, state, backend="cpu", decay_offset=0.5)  # a backend's first use checks it once (ops._resolve)
    gy = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    kept = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, t.shape)) or t, lambda t: t):
            y, s = wkv7(*leaves, state, backend="cpu", decay_offset=0.5)
        assert y.dtype == torch.bfloat16
        ((y * gy).sum() + s.sum()).backward()  # y's gradient a contiguous bf16 tensor, as the model's
    big = inputs[0].numel()
    copies = [e.input_shapes for e in prof.events() if e.name == "aten::copy_"  # one per cast or copy
              and any(isinstance(x, list) and len(x) and math.prod(x) >= big for x in e.input_shapes)]
    assert len(copies) == 2, copies  # z widened, dL/dz rounded
    rows = [dt for dt, shape in kept if shape == inputs[0].shape]
    assert sorted(map(str, rows)) == ["torch.bfloat16"] * 5 + ["torch.float32"] * 2, kept


def test_bf16_inputs_are_kept_for_backward_in_bf16():
    """w given (not z): the same, the decay and its factor made by torch's exp in fp32."""
    inputs, state = wkv_inputs(2, 40, 3, 16, torch.bfloat16, seed=3, with_state=True)
    leaves = [x.clone().requires_grad_() for x in inputs]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, t.shape)) or t, lambda t: t):
        kernel(*leaves, state)
    rows = [dt for dt, shape in kept if shape == inputs[0].shape]
    assert sorted(map(str, rows)) == ["torch.bfloat16"] * 5 + ["torch.float32"] * 2, kept
    # and the gradients through the widened-again inputs are the reference's
    compare(fwd_bwd(kernel, inputs, state), fwd_bwd(wkv7_reference, inputs, state))


@pytest.mark.parametrize("T", [1, cpu.CHUNK - 1, cpu.CHUNK, cpu.CHUNK + 1, 3 * cpu.CHUNK + 4])  # chunk edges
@pytest.mark.parametrize("N", [16, 64])
def test_bf16_staging_is_the_fp32_kernel_rounded_once(T, N):
    """The kernel stages bf16 rows in fp32 one chunk at a time and runs its fp32 code on them: y and every
    gradient must be the fp32 kernel's on the same values (widened: exact) rounded once to bf16, and dL/dd and
    the states its fp32 results, bit for bit. Chunk edges: the forward's last step of a chunk reads the next
    chunk's first a."""
    ext = cpu._extension()
    g = torch.Generator().manual_seed(T + N)
    B, H = 2, 3
    rows = [torch.randn(B, T, H, N, generator=g).bfloat16() for _ in range(5)]  # r k v a b
    rows[3] = torch.nn.functional.normalize(rows[3].float(), dim=-1).neg().bfloat16()  # a = -kk
    d = torch.rand(B, T, H, N, generator=g) * 0.5 + 0.5
    s0 = torch.randn(B, H, N, N, generator=g) * 0.1
    dy = torch.randn(B, T, H, N, generator=g).bfloat16()
    ds = torch.randn(B, H, N, N, generator=g)
    results = []
    for dt in (torch.bfloat16, torch.float32):
        r, k, v, a, b = (x.to(dt) for x in rows)
        x = [r, d, k, v, a, b]
        y, ckpt, s_final = cpu._forward(ext, x, s0, nan_alloc)
        grads, ds0 = cpu._backward(ext, x, ckpt, dy.to(dt), ds, nan_alloc)
        results.append([y, ckpt, s_final, *grads, ds0])
    staged, plain = results
    names = ["y", "ckpt", "s_final", "dr", "dd", "dk", "dv", "da", "db", "ds0"]
    for name, got, want in zip(names, staged, plain):
        assert got.dtype == (torch.float32 if name in ("ckpt", "s_final", "dd", "ds0") else torch.bfloat16), name
        assert torch.equal(got, want.to(got.dtype)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tiles", [16, 64])
@pytest.mark.parametrize("T", [1, cpu.CHUNK - 1, cpu.CHUNK, cpu.CHUNK + 1, 3 * cpu.CHUNK + 4])  # chunk edges
@pytest.mark.parametrize("N", [16, 24, 64])  # 24: the runtime-N code
def test_state_only_backward_is_the_full_backwards_ds0(T, N, tiles, dtype):
    """Where no input asks for a gradient (state tuning's first layer), the backward runs only G's recurrence
    (cuda/wkv7_cpu_step.h, step_backward_state): its dL/dS_0 must be the full backward's, bit for bit (the same
    arithmetic on G), for fp32 and staged bf16 rows, both tile widths, at the chunk edges."""
    ext = cpu._extension()
    g = torch.Generator().manual_seed(100 * T + N)
    B, H = 2, 3
    rows = [torch.randn(B, T, H, N, generator=g) * 0.5 for _ in range(5)]  # r k v a b
    rows[3] = torch.nn.functional.normalize(rows[3], dim=-1).neg()  # a = -kk
    r, k, v, a, b = (x.to(dtype) for x in rows)
    x = [r, torch.rand(B, T, H, N, generator=g) * 0.45 + 0.545, k, v, a, b]
    s0 = torch.randn(B, H, N, N, generator=g) * 0.1
    dy = torch.randn(B, T, H, N, generator=g).to(dtype)
    ds = torch.randn(B, H, N, N, generator=g)
    _, ckpt, _ = cpu._forward(ext, x, s0, nan_alloc, tiles)
    _, want = cpu._backward(ext, x, ckpt, dy, ds, nan_alloc, tiles)
    got = cpu._backward_state(ext, x, dy, ds, nan_alloc, tiles)
    assert torch.equal(got, want)
    # and the recurrence it runs is the reference's: G_{t-1} = G_t diag(d_t) + (G_t b_t) a_t^T after G_t += dy_t r_t^T
    G = ds.double().clone()
    for t in reversed(range(T)):
        rt, dt_, at, bt, dyt = (z[:, t].double() for z in (x[0], x[1], x[4], x[5], dy))
        G += dyt[..., :, None] * rt[..., None, :]
        G = G * dt_[..., None, :] + (G @ bt[..., None]) * at[..., None, :]
    assert (got.double() - G).abs().max() <= 1e-5 * max(1.0, G.abs().max().item())


def test_state_tunings_first_layer_takes_the_state_only_backward(monkeypatch):
    """In state tuning the first layer's r, w, k, v, a, b come from frozen weights and the embedding: its WKV
    backward asks for dL/dS_0 alone and takes the state-only path; the other layers (whose inputs carry the
    gradient to the layers below) take the full one. The state gradients are those of the full path everywhere."""
    from peft_rwkv7.adapters import MethodConfig, attach

    base = make_model(seed=3, n_layer=3, n_embd=64, head_size=16)
    base.set_wkv_backend("cpu")
    model = attach(base, MethodConfig(kind="state"))
    idx = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(0))

    def state_grads():
        model.zero_grad(set_to_none=True)
        model(idx).float().square().mean().backward()
        return [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]

    calls = {"state": 0, "full": 0}
    real_state, real_full = cpu._backward_state, cpu._backward

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(cpu, "_backward_state", count("state", real_state))
    monkeypatch.setattr(cpu, "_backward", count("full", real_full))
    got = state_grads()
    assert calls == {"state": 1, "full": 2}
    assert len(got) == 3  # one trained state per layer

    # The embedding made trainable: the first layer's inputs ask for gradients, and every layer takes the full path.
    base.emb.weight.requires_grad_(True)
    calls.update(state=0, full=0)
    want = state_grads()[1:]  # the embedding's gradient first, then the states'
    assert calls == {"state": 0, "full": 3}
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_the_forward_writes_checkpoints_only_where_a_backward_reads_them():
    """The checkpoints (a state every CHUNK steps: 3.3 MB a layer at 0.1B ctx 512 batch 1) are read only by the
    backward of r, w, k, v, a, b. Where none of them asks for a gradient (state tuning's first layer: dL/dS_0 alone)
    or no graph is recorded (evaluation, generation's prefill), the forward neither makes nor writes them; y, the
    final state and dL/dS_0 are the same bits as with them."""
    g = torch.Generator().manual_seed(7)
    B, T, H, N = 2, 2 * cpu.CHUNK + 3, 2, 16
    ckpt_shape = (B, H, -(-T // cpu.CHUNK) + 1, N, N)
    r, w, k, v, a, b = (torch.randn(B, T, H, N, generator=g) * 0.5 for _ in range(6))
    a = torch.nn.functional.normalize(a, dim=-1).neg()
    s0 = torch.randn(B, H, N, N, generator=g) * 0.1
    made = []

    def alloc(shape):
        made.append(tuple(shape))
        return nan_alloc(shape)

    def run(grad_r: bool, grad_mode: bool = True):
        made.clear()
        state = s0.clone().requires_grad_()
        rr = r.clone().requires_grad_(grad_r)
        with torch.set_grad_enabled(grad_mode):
            y, s_final = cpu.wkv7_cpu(rr, w, k, v, a, b, state, alloc=alloc)
        checkpointed = ckpt_shape in made
        if grad_mode:
            (y.square().sum() + s_final.sum()).backward()
        return checkpointed, y.detach(), s_final.detach(), state.grad

    full = run(grad_r=True)
    state_only = run(grad_r=False)
    inference = run(grad_r=True, grad_mode=False)
    assert (full[0], state_only[0], inference[0]) == (True, False, False)
    for got in (state_only, inference):
        assert torch.equal(got[1], full[1]) and torch.equal(got[2], full[2])
    assert torch.equal(state_only[3], full[3])
