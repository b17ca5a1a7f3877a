// WKV7 recurrence kernels (forward and backward with a trainable initial state): the bodies only.
//
// Per (batch, head), S value-major (S[i][j]: i = value index, j = key index):
//   S_t = S_{t-1} (diag(d_t) + a_t b_t^T) + v_t k_t^T,   y_t = S_t r_t,   d_t = exp(-exp(w_t))
//
// One block per (b, h), one thread per value row i (blockDim = N); thread i keeps S[i][:] in
// registers, so the forward needs only the per-step key vectors in shared memory.
//
// Training memory: the forward stores S at the start of every kChunk-step chunk (checkpoints).
// The backward walks the chunks last to first; for each chunk it first recomputes the chunk's
// states forward from its checkpoint (row layout, as in the forward) into a small per-block
// scratch, then runs the reverse-time recursion reading those states column-wise. Recomputing
// forward (instead of inverting the update, S_{t-1} = (S_t - ...) / d_t) stays exact for any
// decay, including d_t -> 0.
//
// Backward per step, with G = dL/dS_t (incoming from the future and from the final-state grad):
//   G += dy r^T;  dr = S_t^T dy;  dv = G k;  dk = G^T v;  dsa = G b;  db = G^T sa;
//   dd[j] = sum_i G[i][j] S_{t-1}[i][j];  da = S_{t-1}^T dsa;  G <- G diag(d) + dsa a^T
// Thread i holds row i of G in registers (row sums dv, dsa and the update need nothing else).
// The column sums (dk, db, dd) need column i: the rows are staged through shared memory
// (kTile rows at a time) and read back transposed. Holding column i in registers too (a
// second copy of G, updated in step) needs 2N registers: N = 64 then spilled at 255.
//
// This file compiles with nvcc (wkv7_cuda.cu adds the launchers and host entry points) and with
// the host compiler through cuda_emu.h (wkv7_cuda_emu_op.cpp runs it on the CPU in tests).

#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#else
#include "cuda_emu.h"
#endif

#include <cstdint>

namespace wkv7 {

constexpr int kChunk = 16;  // steps between forward checkpoints; also the recompute window
using i64 = long long;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Checkpoint and scratch layout per state: element S[i][j] at j * N + i. The row-owning thread i
// then writes coalesced, and a column reader (thread i' wanting S[:][i']) reads N contiguous floats.

// __launch_bounds__(N, 1): one resident block per SM is enough (the grid is B * H blocks, each a
// serial recurrence). Given only the thread count, ptxas traded registers for occupancy and spilled
// (8 bytes at 96 registers, N = 64 on sm_90); with the minimum stated it keeps everything in
// registers at every head size (about 150 for N = 64, 196 for N = 128: still 2 blocks/SM there).
template <int N, typename T>
__global__ void __launch_bounds__(N, 1) forward_kernel(
    int T_len, int H, const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k,
    const T* __restrict__ v, const T* __restrict__ a, const T* __restrict__ b,
    const float* __restrict__ s0, T* __restrict__ y, float* __restrict__ s_out, float* __restrict__ ckpt) {
    const int bh = blockIdx.x, i = threadIdx.x;
    const int bb = bh / H, hh = bh % H;
    const int n_chunks = (T_len + kChunk - 1) / kChunk;
    const i64 stride_t = i64(H) * N;
    const i64 base = (i64(bb) * T_len * H + hh) * N + i;

    float s[N];
#pragma unroll
    for (int j = 0; j < N; ++j) s[j] = s0 ? s0[(i64(bh) * N + i) * N + j] : 0.0f;

    __shared__ float r_sh[N], d_sh[N], k_sh[N], a_sh[N], b_sh[N];
    for (int t = 0; t < T_len; ++t) {
        const i64 idx = base + t * stride_t;
        if (ckpt && t % kChunk == 0) {
            float* c = ckpt + (i64(bh) * n_chunks + t / kChunk) * N * N;
#pragma unroll
            for (int j = 0; j < N; ++j) c[j * N + i] = s[j];
        }
        __syncthreads();  // everyone has read the previous step's vectors
        r_sh[i] = to_float(r[idx]);
        d_sh[i] = expf(-expf(to_float(w[idx])));
        k_sh[i] = to_float(k[idx]);
        a_sh[i] = to_float(a[idx]);
        b_sh[i] = to_float(b[idx]);
        __syncthreads();  // this step's vectors are complete

        float sa = 0.0f;
#pragma unroll
        for (int j = 0; j < N; ++j) sa += s[j] * a_sh[j];
        const float vi = to_float(v[idx]);
        float yi = 0.0f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            s[j] = s[j] * d_sh[j] + (sa * b_sh[j] + vi * k_sh[j]);
            yi += s[j] * r_sh[j];
        }
        y[idx] = from_float<T>(yi);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) s_out[(i64(bh) * N + i) * N + j] = s[j];
}

// Dot product of N contiguous floats (16-byte aligned: N is a multiple of 4) with a shared vector.
template <int N>
__device__ __forceinline__ float dot_contig(const float* p, const float* sh) {
    const float4* p4 = reinterpret_cast<const float4*>(p);
    float acc = 0.0f;
#pragma unroll
    for (int j4 = 0; j4 < N / 4; ++j4) {
        const float4 q = p4[j4];
        acc += q.x * sh[4 * j4] + q.y * sh[4 * j4 + 1] + q.z * sh[4 * j4 + 2] + q.w * sh[4 * j4 + 3];
    }
    return acc;
}

template <int N, typename T>
__global__ void __launch_bounds__(N) backward_kernel(
    int T_len, int H, const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k,
    const T* __restrict__ v, const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ dy,
    const float* __restrict__ ds_out, const float* __restrict__ ckpt,
    float* scratch,  // written and read back inside this kernel: no __restrict__/const (no nc loads)
    T* __restrict__ dr, T* __restrict__ dw, T* __restrict__ dk, T* __restrict__ dv, T* __restrict__ da,
    T* __restrict__ db, float* __restrict__ ds0) {
    // Rows of G staged in shared memory per pass: all of them up to N = 64 (16.6 KB); N = 128
    // takes two passes so that the block stays under the 48 KB of static shared memory.
    constexpr int kTile = N < 64 ? N : 64;
    const int bh = blockIdx.x, i = threadIdx.x;
    const int bb = bh / H, hh = bh % H;
    const int n_chunks = (T_len + kChunk - 1) / kChunk;
    const i64 stride_t = i64(H) * N;
    const i64 base = (i64(bb) * T_len * H + hh) * N + i;
    float* hist = scratch + i64(bh) * kChunk * N * N;  // states after each step of the chunk

    float g_row[N];  // g_row[j] = G[i][j]
#pragma unroll
    for (int j = 0; j < N; ++j) g_row[j] = ds_out ? ds_out[(i64(bh) * N + i) * N + j] : 0.0f;

    __shared__ float r_sh[N], d_sh[N], k_sh[N], v_sh[N], a_sh[N], b_sh[N], dy_sh[N], dsa_sh[N];
    __shared__ float sa_sh[kChunk][N];
    // g_sh[i'][j] = G[i' + tile start][j]. Row stride N + 1 (odd): the row writes (fixed j, i' across
    // a warp) and the column reads (fixed i', j across a warp) both hit 32 distinct banks.
    __shared__ float g_sh[kTile][N + 1];

    for (int c = n_chunks - 1; c >= 0; --c) {
        const int t0 = c * kChunk;
        const int len = min(kChunk, T_len - t0);
        const float* cp = ckpt + (i64(bh) * n_chunks + c) * N * N;

        // Recompute the chunk forward from its checkpoint (row i in registers).
        {
            float s[N];
#pragma unroll
            for (int j = 0; j < N; ++j) s[j] = cp[j * N + i];
            for (int tt = 0; tt < len; ++tt) {
                const i64 idx = base + (t0 + tt) * stride_t;
                __syncthreads();  // also orders the previous chunk's reads of hist before these writes
                d_sh[i] = expf(-expf(to_float(w[idx])));
                k_sh[i] = to_float(k[idx]);
                a_sh[i] = to_float(a[idx]);
                b_sh[i] = to_float(b[idx]);
                __syncthreads();
                float sa = 0.0f;
#pragma unroll
                for (int j = 0; j < N; ++j) sa += s[j] * a_sh[j];
                sa_sh[tt][i] = sa;
                const float vi = to_float(v[idx]);
                float* hs = hist + tt * N * N;
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    s[j] = s[j] * d_sh[j] + (sa * b_sh[j] + vi * k_sh[j]);
                    hs[j * N + i] = s[j];
                }
            }
        }

        // Reverse-time recursion over the chunk.
        for (int tt = len - 1; tt >= 0; --tt) {
            const i64 idx = base + (t0 + tt) * stride_t;
            __syncthreads();  // the previous step's reads of the shared vectors and of g_sh are done
            const float ri = to_float(r[idx]);
            const float ew = expf(to_float(w[idx]));
            const float di = expf(-ew);
            const float dyi = to_float(dy[idx]);
            r_sh[i] = ri;
            d_sh[i] = di;
            k_sh[i] = to_float(k[idx]);
            v_sh[i] = to_float(v[idx]);
            a_sh[i] = to_float(a[idx]);
            b_sh[i] = to_float(b[idx]);
            dy_sh[i] = dyi;
            __syncthreads();

            // Row i of G: add dy r^T, then the row sums.
            float dvi = 0.0f, dsai = 0.0f;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                g_row[j] += dyi * r_sh[j];
                dvi += g_row[j] * k_sh[j];
                dsai += g_row[j] * b_sh[j];
            }
            dsa_sh[i] = dsai;
            // Column i of S_t is contiguous in the scratch layout.
            const float dri = dot_contig<N>(hist + tt * N * N + i * N, dy_sh);

            // Column i of S_{t-1}: the previous step's scratch slot, or the checkpoint at chunk start.
            const float* sp = (tt > 0 ? hist + (tt - 1) * N * N : cp) + i * N;
            const float4* sp4 = reinterpret_cast<const float4*>(sp);
            float dki = 0.0f, dbi = 0.0f, ddi = 0.0f;
#pragma unroll
            for (int p = 0; p < N / kTile; ++p) {
                if (p > 0) __syncthreads();  // every column read of the previous tile is done
                if (i >= p * kTile && i < (p + 1) * kTile) {
#pragma unroll
                    for (int j = 0; j < N; ++j) g_sh[i - p * kTile][j] = g_row[j];
                }
                __syncthreads();  // tile p of G (and, on the first pass, all of dsa_sh) is written
#pragma unroll
                for (int j4 = 0; j4 < kTile / 4; ++j4) {
                    const float4 q = sp4[p * (kTile / 4) + j4];
                    const float sq[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        const int jt = 4 * j4 + u, j = p * kTile + jt;
                        const float g = g_sh[jt][i];  // G[j][i]
                        dki += g * v_sh[j];
                        dbi += g * sa_sh[tt][j];
                        ddi += g * sq[u];
                    }
                }
            }
            const float dai = dot_contig<N>(sp, dsa_sh);
#pragma unroll
            for (int j = 0; j < N; ++j) g_row[j] = g_row[j] * d_sh[j] + dsai * a_sh[j];
            dr[idx] = from_float<T>(dri);
            dk[idx] = from_float<T>(dki);
            dv[idx] = from_float<T>(dvi);
            da[idx] = from_float<T>(dai);
            db[idx] = from_float<T>(dbi);
            // d/dw exp(-exp(w)) = -exp(w) * exp(-exp(w))
            dw[idx] = from_float<T>(-ddi * di * ew);
        }
    }
    if (ds0) {
#pragma unroll
        for (int j = 0; j < N; ++j) ds0[(i64(bh) * N + i) * N + j] = g_row[j];
    }
}

}  // namespace wkv7
