"""Fused WKV7 on CPU: the C++ kernel in cuda/wkv7_cpu.cpp, built on first use.

The same extension holds the single-token RNN step's pieces (cuda/rnn_step_cpu.cpp): `matvec`,
`vecmat` and `wkv7_step`, which batch-1 generation uses, and the fused element-wise ops of ops/timemix.py
and ops/pointwise.py (cuda/token_mix_cpu.cpp, cuda/timemix_cpu.cpp), the decay made from its pre-activation
for this kernel (cuda/decay_cpu.cpp, `decay_offset`) and the fused loss's online softmax (cuda/loss_cpu.cpp,
ops/linear_ce.py); cuda/cpu_module.cpp binds them all.

The extension is compiled by `ops.build.load_extension` (one cache folder per source hash, torch
version, compiler and flags, so installs never evict each other; later processes import it at once)
the first time `is_available` or `wkv7_cpu` is called. If the build fails, `is_available` returns
False, the reason is warned once, and `wkv7(..., backend="auto")` falls back to the reference.

The kernel computes in fp32 whatever the input dtype. Its forward stores the state every 32 steps;
the backward recomputes the states of one 32-step chunk at a time from those checkpoints, so memory
is O(T / 32 * N^2) per head instead of one state per step (at N 64 the checkpoints are ~2 floats per
key per step, a third of what the six inputs it saves take; the 31 recomputed states, 496 KiB, stay
in a 512 KiB L2: a 64-step chunk made the backward ~6% slower on such a CPU). The first build takes about half a minute
on two cores; later processes load the built library directly.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from .build import load_extension

__all__ = ["block_cache_stats", "cache_large_blocks", "is_available", "kernel_threads", "matvec", "trim_block_cache",
           "uncache_large_blocks", "vecmat", "wkv7_cpu", "wkv7_step_cpu"]

CHUNK = 32  # steps between stored states; must match kChunk in wkv7_cpu.cpp (the kernel checks ckpt's shape)
LANES = 8  # the kernel's head size must be a multiple of this (kLanes in wkv7_cpu.cpp)
_KERNELS = Path(__file__).parent / "kernels"  # a link to the repository's cuda/
_SOURCES = tuple(_KERNELS / f for f in ("wkv7_cpu.cpp", "rnn_step_cpu.cpp", "token_mix_cpu.cpp", "timemix_cpu.cpp",
                                          "gate_cpu.cpp", "decay_cpu.cpp", "loss_cpu.cpp", "thin_cpu.cpp",
                                          "cpu_alloc.cpp", "cpu_module.cpp"))
# Portable flags only: the source itself compiles an AVX2+FMA variant beside the baseline one and
# picks between them from the CPU it runs on (GCC target_clones), so no -march=native here.
# Threads come from torch: at::parallel_for splits the (batch, head) sequences. With torch's OpenMP
# backend (Linux wheels) at::parallel_for is a `#pragma omp parallel` compiled into this library, so it
# is built with -fopenmp; the linked libgomp.so.1 resolves at load time to the one torch has already
# loaded (same soname: one runtime, one thread pool). Without -fopenmp the kernels would run on one
# thread whatever torch.get_num_threads() says (they did until issue 23: half the speed on 2 cores).
# -fno-math-errno: std::sqrt becomes the (correctly rounded) instruction and vectorises; nothing reads errno.
_CFLAGS_SERIAL = ["-O3", "-fno-math-errno", "-fopenmp-simd"]  # `omp simd` vectorisation only, no OpenMP runtime
_CFLAGS_OPENMP = ["-O3", "-fno-math-errno", "-fopenmp"]


def _build_flags() -> list[dict]:
    """load_extension keyword sets to try in order: OpenMP where torch runs on OpenMP, then serial."""
    serial = {"extra_cflags": _CFLAGS_SERIAL}
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        return [{"extra_cflags": _CFLAGS_OPENMP, "extra_ldflags": ["-fopenmp"]}, serial]
    return [serial]


Alloc = Callable[[tuple[int, ...]], torch.Tensor]


def _empty(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def _extension() -> ModuleType | None:
    """Build (or load from the kernel cache) the extension once per process; None on failure."""
    flag_sets = _build_flags()
    for i, flags in enumerate(flag_sets):
        try:
            return load_extension("peft_rwkv7_wkv7_cpu", _SOURCES, "the CPU kernels, about half a minute", **flags)
        except Exception as e:  # any build or load failure means "not available", never a crash
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if i + 1 < len(flag_sets):
                warnings.warn(f"wkv7: the CPU kernel could not be built with OpenMP ({reason}); building it "
                              "single-threaded instead", RuntimeWarning, stacklevel=3)
                continue
            warnings.warn(
                f"wkv7: the CPU kernel could not be built, using the reference op instead ({reason})",
                RuntimeWarning,
                stacklevel=3,
            )
    return None


def kernel_threads() -> int:
    """How many threads the CPU kernels split their work over in this process (torch.get_num_threads()
    when the extension is built with OpenMP; 1 for a single-threaded build)."""
    return int(_ext("kernel_threads").parallel_threads(1 << 16))


def is_available(device: torch.device) -> bool:
    """True for CPU tensors once the extension has been built and loaded in this process."""
    return torch.device(device).type == "cpu" and _extension() is not None


def _forward(
    ext: ModuleType, rdkvab: list[torch.Tensor], state: torch.Tensor | None, alloc: Alloc, tiles: int = 0,
    checkpoints: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rdkvab: [r, d, k, v, a, b], contiguous [B, T, H, N] with d = exp(-exp(w)) fp32, the others fp32 or all
    bf16 (the kernel stages the bf16 rows in fp32, a chunk of 32 steps at a time), N % 8 == 0; state: contiguous
    fp32 [B, H, N, N] or None.

    Returns y [B, T, H, N] (r's dtype), checkpoints [B, H, ceil(T / CHUNK) + 1, N, N] (the kernel's own layout;
    an empty tensor without `checkpoints`: only `_backward` reads them) and the final state [B, H, N, N].
    """
    B, T, H, N = rdkvab[0].shape
    y = _rows((B, T, H, N), rdkvab[0].dtype, alloc)
    ckpt = alloc((B, H, -(-T // CHUNK) + 1, N, N)) if checkpoints else torch.empty(0)
    s_final = alloc((B, H, N, N))
    ext.forward(rdkvab, torch.empty(0) if state is None else state, y, ckpt, s_final, tiles)
    return y, ckpt, s_final


def _backward(
    ext: ModuleType,
    rdkvab: list[torch.Tensor],
    ckpt: torch.Tensor,
    dy: torch.Tensor,
    ds_final: torch.Tensor,
    alloc: Alloc,
    tiles: int = 0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradients [dr, dd, dk, dv, da, db] (each [B, T, H, N], dd = dL/dd fp32, the others and dy in r's dtype)
    and dL/dS_0 [B, H, N, N]."""
    B, T, H, N = rdkvab[0].shape
    grads = [_rows((B, T, H, N), torch.float32 if i == 1 else rdkvab[0].dtype, alloc) for i in range(6)]
    ds0 = alloc((B, H, N, N))
    ext.backward(rdkvab, ckpt, dy, ds_final, grads, ds0, tiles)
    return grads, ds0


def _backward_state(
    ext: ModuleType, rdkvab: list[torch.Tensor], dy: torch.Tensor, ds_final: torch.Tensor, alloc: Alloc, tiles: int = 0
) -> torch.Tensor:
    """dL/dS_0 [B, H, N, N] alone, for a call where none of r, w, k, v, a, b wants a gradient: the same bits as
    `_backward`'s, at a fraction of its work (no state recomputed, none of the per-key sums made)."""
    B, T, H, N = rdkvab[0].shape
    ds0 = alloc((B, H, N, N))
    ext.backward_state(rdkvab, dy, ds_final, ds0, tiles)
    return ds0


def _rows(shape: tuple[int, ...], dtype: torch.dtype, alloc: Alloc) -> torch.Tensor:
    """An output of the kernel: fp32 from `alloc` (tests pass a NaN-filled one), bf16 from torch.empty."""
    return alloc(shape) if dtype == torch.float32 else torch.empty(shape, dtype=dtype)


def _fp32(x: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Detached contiguous fp32 (no copy when already so), the last dim zero-padded by `pad`."""
    x = x.detach().to(torch.float32)
    return F.pad(x, (0, pad)).contiguous() if pad else x.contiguous()


def _pad_square(x: torch.Tensor, pad: int) -> torch.Tensor:
    """[..., N, N] -> [..., N + pad, N + pad], contiguous fp32, zeros in the new rows and columns."""
    return F.pad(_fp32(x), (0, pad, 0, pad)) if pad else _fp32(x)


class _Wkv7Cpu(torch.autograd.Function):
    # The kernel wants N % 8 == 0. Zero padding is exact: padded keys have a = b = k = r = 0 and
    # padded values have v = 0, so the padded rows and columns of the state stay zero.
    @staticmethod
    def forward(ctx, alloc, tiles, offset, inputs_grad, r, w, k, v, a, b, state):
        """inputs_grad: whether a backward may ask for r's, w's, k's, v's, a's or b's gradient (grad mode on and
        one of them requires it), the only backward that reads the checkpoints."""
        N = r.shape[-1]
        pad = -N % LANES
        # The kernel gets the decay d and returns dL/dd, chained to dL/dw in backward by dd/dw.
        if offset is None:  # w is the log-log decay: d = exp(-exp(w)), dd/dw = -d exp(w), with torch's exp
            nw = torch.exp(_fp32(w, pad)).neg_()  # -exp(w), in place: one buffer and one pass fewer
            d = torch.exp(nw)
            dd_dw = nw.mul_(d) if ctx.needs_input_grad[5] else None  # -exp(w) d, in nw's buffer
        else:  # w holds z, the log-log decay being logsigmoid(z) - offset: d and dd/dz in one pass
            d, dd_dw = _ext("wkv7").decay_forward(_fp32(w, pad), offset, ctx.needs_input_grad[5])
            dd_dw = dd_dw if ctx.needs_input_grad[5] else None
        # bf16 r, k, v, a, b (the model under bf16 autocast) go to the kernel as they are: it stages their rows
        # in fp32 a chunk at a time (cuda/wkv7_cpu_stage.h) and writes y and their gradients in bf16, and they are
        # kept for backward in bf16 (r, k, v the model keeps anyway). Otherwise fp32 copies, N padded to a multiple
        # of 8.
        staged = not pad and all(x.dtype == torch.bfloat16 for x in (r, k, v, a, b))
        prep = (lambda x: x.detach().contiguous()) if staged else (lambda x: _fp32(x, pad))
        rdkvab = [prep(r), d, *(prep(x) for x in (k, v, a, b))]
        s0 = None if state is None else _pad_square(state, pad)
        y, ckpt, s_final = _forward(_extension(), rdkvab, s0, alloc, tiles, checkpoints=inputs_grad)
        ctx.save_for_backward(*rdkvab, ckpt, dd_dw)
        ctx.alloc, ctx.tiles, ctx.N = alloc, tiles, N
        ctx.dtypes = [x.dtype for x in (r, w, k, v, a, b)]
        ctx.state_dtype = None if state is None else state.dtype
        return y[..., :N].to(r.dtype), s_final[..., :N, :N]

    @staticmethod
    def backward(ctx, dy, ds_final):
        *rdkvab, ckpt, dd_dw = ctx.saved_tensors
        N = ctx.N
        pad = -N % LANES
        staged = rdkvab[0].dtype == torch.bfloat16  # kept as given only where staged (else fp32 copies)
        dy = dy.detach().to(torch.bfloat16).contiguous() if staged else _fp32(dy, pad)
        need_in, need_state = ctx.needs_input_grad[4:10], ctx.needs_input_grad[10]  # r, w, k, v, a, b; state
        if need_state and not any(need_in):  # dL/dS_0 alone (state tuning's first layer): no recomputed state, no sums
            ds0 = _backward_state(_extension(), rdkvab, dy, _pad_square(ds_final, pad), ctx.alloc, ctx.tiles)
            return (None,) * 10 + (ds0[..., :N, :N].to(ctx.state_dtype),)
        grads, ds0 = _backward(_extension(), rdkvab, ckpt, dy, _pad_square(ds_final, pad), ctx.alloc, ctx.tiles)
        if dd_dw is not None:
            grads[1].mul_(dd_dw)
        grads = [g[..., :N].to(dt) if need_in[i] else None for i, (g, dt) in enumerate(zip(grads, ctx.dtypes))]
        ds0 = ds0[..., :N, :N].to(ctx.state_dtype) if need_state else None
        return (None, None, None, None, *grads, ds0)


def wkv7_cpu(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    alloc: Alloc = _empty,
    tiles: int = 0,
    decay_offset: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused CPU kernel with `wkv7_reference`'s semantics.

    r, w, k, v, a, b: [B, T, H, N] fp32 or bf16 CPU tensors; state: [B, H, N, N] or None (zeros).
    Returns y [B, T, H, N] in r's dtype and the final state [B, H, N, N] fp32; differentiable in every
    input and the initial state, with gradients flowing from both outputs. `alloc(shape)` makes the
    kernel's fp32 output buffers (tests pass a NaN-filled allocator to catch unwritten memory); `tiles`
    the kernel's column tile width: 0 = by the CPU (64 with AVX-512, else 16; the same results either way
    up to the rounding of the backward's per-key sums), 16 or 64 (tests run both on any CPU).
    `decay_offset` given: w holds the decay's pre-activation z and the log-log decay is logsigmoid(z) -
    decay_offset (ops.wkv7's form); the decay and its gradient come from z in one pass (cuda/decay_cpu.cpp).
    """
    _ext("wkv7")  # raises when the extension could not be built
    off = None if decay_offset is None else float(decay_offset)
    inputs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (r, w, k, v, a, b))
    return _Wkv7Cpu.apply(alloc, tiles, off, inputs_grad, r, w, k, v, a, b, state)


wkv7_cpu.takes_decay_logit = True  # ops.wkv7 passes decay_offset on instead of computing w


def _ext(name: str) -> ModuleType:
    ext = _extension()
    if ext is None:
        raise RuntimeError(f"{name}: the CPU extension is not available in this process (see the earlier warning)")
    return ext


def matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight [O, K] (contiguous fp32 or bf16) times the K elements of x -> [O] in x's dtype, no autograd.

    A single row is memory-bound; this streams the weight about twice as fast as BLAS's gemv here."""
    return _ext("matvec").matvec(weight, x)


def vecmat(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The K elements of x times weight [K, O] (contiguous fp32) -> [O] fp32, no autograd."""
    return _ext("vecmat").vecmat(x, weight)


# Rows from which the thin kernel beats BLAS even on an activation in cache (round 21, AVX-512: 256 rows 0.88x of
# BLAS's time, 128 rows equal, 1 row 3x: the factor's transpose and the call cost ~6 us); training's are 512 and up.
THIN_MIN_ROWS = 256
THIN_RANKS = (8, 16, 32, 64)  # the ranks the kernel takes


def _thin_ext(*tensors: torch.Tensor, rank: int, rows: int) -> ModuleType | None:
    """The extension where its thin products can take these tensors: fp32 CPU matrices, a rank of THIN_RANKS, at
    least THIN_MIN_ROWS rows. Whether they are faster there than BLAS is ops/thin_check.py's to measure."""
    if rank not in THIN_RANKS or rows < THIN_MIN_ROWS or not all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 for t in tensors):
        return None
    return _extension()


def thin_takes(x: torch.Tensor, rank: int) -> bool:
    """Whether the kernel of thin_nt and thin_tn can take an activation like x [rows, in] at this rank: fp32 CPU, a
    kernel rank, at least THIN_MIN_ROWS rows (one-row generation keeps BLAS), the extension built. LoRA's layer
    runs it where this holds and its measured check (ops/thin_check.py) found the kernel faster."""
    return x.dim() == 2 and _thin_ext(x, rank=rank, rows=x.shape[0]) is not None


def thin_nt(x: torch.Tensor, w: torch.Tensor, alpha: float = 1.0, *, w_rk: bool = False,
            kernel: bool = False) -> torch.Tensor:
    """alpha x [T, K] w [K, R] -> [T, R] (w_rk: w is [R, K], used transposed), no autograd: LoRA's g B and x A^T.

    With `kernel`, where thin_takes(x, R), the extension's kernel (cuda/thin_cpu.cpp); anything else torch's product."""
    ext = _thin_ext(x, w, rank=w.shape[0] if w_rk else w.shape[1], rows=x.shape[0]) if kernel else None
    if ext is not None:
        return ext.thin_nt(x.contiguous(), w.contiguous(), alpha, w_rk)
    out = torch.mm(x, w.t() if w_rk else w)
    return out if alpha == 1.0 else out.mul_(alpha)


def thin_tn(g: torch.Tensor, x: torch.Tensor, alpha: float = 1.0, *, out_kr: bool = False,
            kernel: bool = False) -> torch.Tensor:
    """alpha g [T, R]^T x [T, K] -> [R, K] (out_kr: its transpose [K, R], contiguous), no autograd: LoRA's factor
    gradients, A's (g B)^T x and B's (x A^T)^T g. With `kernel`, where thin_takes(x, R), the extension's kernel;
    anything else torch's product."""
    ext = _thin_ext(g, x, rank=g.shape[1], rows=g.shape[0]) if kernel else None
    if ext is not None:
        return ext.thin_tn(g.contiguous(), x.contiguous(), alpha, out_kr)
    out = torch.mm(x.t(), g) if out_kr else torch.mm(g.t(), x)
    return out if alpha == 1.0 else out.mul_(alpha)


def logsumexp_f64(rows: torch.Tensor) -> torch.Tensor:
    """fp64 log-sum-exp [R] of each row of a contiguous fp32 or bf16 CPU tensor [R, V] (evaluation's exact
    log-probabilities, infer/longctx.py): the row's max in the logits' own precision, then the sum of exp(z - max)
    in double in one C++ pass over the row (no fp64 copy of the rows). A row with a non-finite logit goes through
    torch's fp64 logsumexp, which keeps its rules for infinities and NaN."""
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    ok = torch.empty(rows.shape[0], dtype=torch.uint8)
    _ext("logsumexp_f64").logsumexp_f64(rows, out, ok)
    bad = (ok == 0).nonzero().squeeze(1)
    if bad.numel():
        out[bad] = torch.logsumexp(rows.index_select(0, bad).double(), dim=1)
    return out


def wkv7_step_cpu(r, w, k, v, a, b, state):
    """One token of the WKV7 recurrence, no autograd: inputs [B, H, N], state [B, H, N, N] or None.

    Returns y [B, H, N] and the new state [B, H, N, N], both fp32."""
    ext = _ext("wkv7_step")
    d = torch.exp(-torch.exp(w.float()))
    rdkvab = [t.float().contiguous() for t in (r, d, k, v, a, b)]
    if state is None:
        state = r.new_zeros(*r.shape, r.shape[-1], dtype=torch.float32)
    y, s = ext.wkv7_step(rdkvab, state.float().contiguous())  # the binding returns a list
    return y, s


def cache_large_blocks(min_bytes: int = 8 << 20) -> bool:
    """Make the extension's caching allocator (cuda/cpu_alloc.cpp) torch's CPU allocator for blocks of at least
    `min_bytes`: freed blocks are kept by size class and handed to the next request of their class (or of a
    class up to half their size), so a training step reuses the last one's memory without the holes glibc's
    heap leaves. Process-wide, until uncache_large_blocks (tensors made before keep their allocator). True
    once it is installed (by this call or before); False when the extension is not built."""
    ext = _extension()
    if ext is not None:
        ext.cpu_cache_install(int(min_bytes))
    return ext is not None


def uncache_large_blocks() -> bool:
    """Give torch's CPU allocator back to the one before cache_large_blocks and the cached free blocks back to
    the OS (blocks in use are returned as they are freed), until it is installed again; False if it was not
    installed."""
    ext = _extension()
    return bool(ext is not None and ext.cpu_cache_uninstall())


def trim_block_cache() -> int:
    """A step has ended: cached free blocks that no request was given for the last 4 steps go back to the OS
    (the trainer calls it after each step); returns their bytes. 0 without the extension."""
    ext = _extension()
    return 0 if ext is None else int(ext.cpu_cache_trim())


def block_cache_stats() -> dict:
    """The caching allocator's counters: bytes live / free / mapped / most ever live, hits, misses, blocks
    returned to the OS (all 0 before it is installed)."""
    keys = ("live", "free", "mapped", "peak_live", "hits", "misses", "returned")
    ext = _extension()
    return dict(zip(keys, ext.cpu_cache_stats() if ext is not None else [0] * len(keys)))
