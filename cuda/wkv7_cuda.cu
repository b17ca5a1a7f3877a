// WKV7 recurrence on CUDA: forward and backward with a trainable initial state.
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
// The reductions run over rows (dv, dsa) or columns (dr, dk, db, dd, da), so thread i holds both
// row i (g_row) and column i (g_col) of G and updates both copies.
//
// Only CUDA runtime headers: this file compiles standalone with nvcc (see the compile test);
// the torch-facing glue lives in wkv7_cuda_op.cpp.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

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

template <int N, typename T>
__global__ void __launch_bounds__(N) forward_kernel(
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
        __syncthreads();
        r_sh[i] = to_float(r[idx]);
        d_sh[i] = expf(-expf(to_float(w[idx])));
        k_sh[i] = to_float(k[idx]);
        a_sh[i] = to_float(a[idx]);
        b_sh[i] = to_float(b[idx]);
        __syncthreads();

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
    const int bh = blockIdx.x, i = threadIdx.x;
    const int bb = bh / H, hh = bh % H;
    const int n_chunks = (T_len + kChunk - 1) / kChunk;
    const i64 stride_t = i64(H) * N;
    const i64 base = (i64(bb) * T_len * H + hh) * N + i;
    float* hist = scratch + i64(bh) * kChunk * N * N;  // states after each step of the chunk

    float g_row[N], g_col[N];  // g_row[j] = G[i][j], g_col[j] = G[j][i]
#pragma unroll
    for (int j = 0; j < N; ++j) {
        g_row[j] = ds_out ? ds_out[(i64(bh) * N + i) * N + j] : 0.0f;
        g_col[j] = ds_out ? ds_out[(i64(bh) * N + j) * N + i] : 0.0f;
    }

    __shared__ float r_sh[N], d_sh[N], k_sh[N], v_sh[N], a_sh[N], b_sh[N], dy_sh[N], dsa_sh[N];
    __shared__ float sa_sh[kChunk][N];

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
            __syncthreads();
            const float ri = to_float(r[idx]);
            const float ew = expf(to_float(w[idx]));
            const float di = expf(-ew);
            const float ai = to_float(a[idx]);
            const float dyi = to_float(dy[idx]);
            r_sh[i] = ri;
            d_sh[i] = di;
            k_sh[i] = to_float(k[idx]);
            v_sh[i] = to_float(v[idx]);
            a_sh[i] = ai;
            b_sh[i] = to_float(b[idx]);
            dy_sh[i] = dyi;
            __syncthreads();

#pragma unroll
            for (int j = 0; j < N; ++j) {
                g_row[j] += dyi * r_sh[j];
                g_col[j] += dy_sh[j] * ri;
            }
            // Column i of S_t is contiguous in the scratch layout.
            const float dri = dot_contig<N>(hist + tt * N * N + i * N, dy_sh);

            float dvi = 0.0f, dsai = 0.0f, dki = 0.0f, dbi = 0.0f;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                dvi += g_row[j] * k_sh[j];
                dsai += g_row[j] * b_sh[j];
                dki += g_col[j] * v_sh[j];
                dbi += g_col[j] * sa_sh[tt][j];
            }
            dsa_sh[i] = dsai;
            __syncthreads();

            // Column i of S_{t-1}: the previous step's scratch slot, or the checkpoint at chunk start.
            const float* sp = (tt > 0 ? hist + (tt - 1) * N * N : cp) + i * N;
            const float4* sp4 = reinterpret_cast<const float4*>(sp);
            float ddi = 0.0f, dai = 0.0f;
#pragma unroll
            for (int j4 = 0; j4 < N / 4; ++j4) {
                const float4 q = sp4[j4];
                const int j = 4 * j4;
                ddi += g_col[j] * q.x + g_col[j + 1] * q.y + g_col[j + 2] * q.z + g_col[j + 3] * q.w;
                dai += q.x * dsa_sh[j] + q.y * dsa_sh[j + 1] + q.z * dsa_sh[j + 2] + q.w * dsa_sh[j + 3];
            }
#pragma unroll
            for (int j = 0; j < N; ++j) {
                g_row[j] = g_row[j] * d_sh[j] + dsai * a_sh[j];
                g_col[j] = g_col[j] * di + dsa_sh[j] * ai;
            }
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

template <int N, typename T>
int launch_forward(int B, int T_len, int H, const void* r, const void* w, const void* k, const void* v,
                   const void* a, const void* b, const float* s0, void* y, float* s_out, float* ckpt,
                   cudaStream_t stream) {
    forward_kernel<N, T><<<B * H, N, 0, stream>>>(
        T_len, H, static_cast<const T*>(r), static_cast<const T*>(w), static_cast<const T*>(k),
        static_cast<const T*>(v), static_cast<const T*>(a), static_cast<const T*>(b), s0, static_cast<T*>(y),
        s_out, ckpt);
    return static_cast<int>(cudaGetLastError());
}

template <int N, typename T>
int launch_backward(int B, int T_len, int H, const void* r, const void* w, const void* k, const void* v,
                    const void* a, const void* b, const void* dy, const float* ds_out, const float* ckpt,
                    float* scratch, void* dr, void* dw, void* dk, void* dv, void* da, void* db, float* ds0,
                    cudaStream_t stream) {
    backward_kernel<N, T><<<B * H, N, 0, stream>>>(
        T_len, H, static_cast<const T*>(r), static_cast<const T*>(w), static_cast<const T*>(k),
        static_cast<const T*>(v), static_cast<const T*>(a), static_cast<const T*>(b),
        static_cast<const T*>(dy), ds_out, ckpt, scratch, static_cast<T*>(dr), static_cast<T*>(dw),
        static_cast<T*>(dk), static_cast<T*>(dv), static_cast<T*>(da), static_cast<T*>(db), ds0);
    return static_cast<int>(cudaGetLastError());
}

}  // namespace wkv7

// Head sizes compiled in; the binding rejects others before launching.
#define WKV7_FOR_EACH_HEAD_SIZE(X) X(16) X(32) X(64) X(128)

// Host entry points used by wkv7_cuda_op.cpp. Pointers may be null where noted (s0: zero initial
// state; ckpt: inference, no checkpoints; ds_out: no gradient on the final state; ds0: not needed).
// Return 0 on success, -1 for an unsupported head size, else a cudaError_t from the launch.
int wkv7_cuda_forward(int head_size, bool bf16, int B, int T_len, int H, const void* r, const void* w,
                      const void* k, const void* v, const void* a, const void* b, const float* s0, void* y,
                      float* s_out, float* ckpt, cudaStream_t stream) {
#define WKV7_FWD_CASE(NN)                                                                              \
    case NN:                                                                                           \
        return bf16 ? wkv7::launch_forward<NN, __nv_bfloat16>(B, T_len, H, r, w, k, v, a, b, s0, y,   \
                                                              s_out, ckpt, stream)                     \
                    : wkv7::launch_forward<NN, float>(B, T_len, H, r, w, k, v, a, b, s0, y, s_out, ckpt, \
                                                      stream);
    switch (head_size) {
        WKV7_FOR_EACH_HEAD_SIZE(WKV7_FWD_CASE)
        default:
            return -1;
    }
#undef WKV7_FWD_CASE
}

int wkv7_cuda_backward(int head_size, bool bf16, int B, int T_len, int H, const void* r, const void* w,
                       const void* k, const void* v, const void* a, const void* b, const void* dy,
                       const float* ds_out, const float* ckpt, float* scratch, void* dr, void* dw, void* dk,
                       void* dv, void* da, void* db, float* ds0, cudaStream_t stream) {
#define WKV7_BWD_CASE(NN)                                                                              \
    case NN:                                                                                           \
        return bf16 ? wkv7::launch_backward<NN, __nv_bfloat16>(B, T_len, H, r, w, k, v, a, b, dy, ds_out, \
                                                               ckpt, scratch, dr, dw, dk, dv, da, db, ds0, \
                                                               stream)                                 \
                    : wkv7::launch_backward<NN, float>(B, T_len, H, r, w, k, v, a, b, dy, ds_out, ckpt,  \
                                                       scratch, dr, dw, dk, dv, da, db, ds0, stream);
    switch (head_size) {
        WKV7_FOR_EACH_HEAD_SIZE(WKV7_BWD_CASE)
        default:
            return -1;
    }
#undef WKV7_BWD_CASE
}

int wkv7_cuda_chunk_len() { return wkv7::kChunk; }
