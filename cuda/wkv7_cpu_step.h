// The per-step functions of the CPU WKV7 kernel (wkv7_cpu.cpp): one step of the recurrence forward (and the
// sa = S^T a it needs), one step backward, on key-major states; the formulas and the layout are described at
// the top of wkv7_cpu.cpp. Every function is inlined into the kernel's per-head functions, which are compiled
// once per CPU target (WKV_CLONES), so they take the target's vector width.
#pragma once

#include <initializer_list>

#include "wkv7_cpu_simd.h"

namespace {

// Asks for rows of per-step arrays (N floats each) ahead of their use. The arrays are [T, H, N]: one head's
// rows lie H * N floats apart, a stride the hardware prefetcher picks up late once a GEMM has evicted them
// (one layer at 0.1B ctx 512 right after a GEMM: forward 2.9-3.3 -> 2.3-2.7 ms, backward 8.7-9.7 -> 7.7-8.2 ms).
// kWrite: rows about to be written.
template <bool kWrite = false>
WKV_INLINE void prefetch_rows(std::initializer_list<const float*> rows, int N) {
  for (const float* p : rows)
    for (int i = 0; i < N; i += 16) __builtin_prefetch(p + i, kWrite ? 1 : 0, 3);
}

WKV_INLINE void transpose(int N, const float* src, float* dst) {
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) dst[j * N + i] = src[i * N + j];
}

// Column tile width: 16 values (2 AVX registers per tile vector) keeps the five tile vectors of
// step_forward (sa, v, y, next sa and the row) in the 16 AVX2 registers.
template <int NT, int W>
constexpr int tile_width() {
  return NT == 0 ? 8 : (NT < W ? NT : W);
}

// sa = st^T a for a key-major state st (the S a of the value-major formula).
template <int NT, int W>
WKV_INLINE void state_dot_a(int n, const float* st, const float* a, float* sa) {
  const int N = NT > 0 ? NT : n;
  constexpr int IT = tile_width<NT, W>();
  for (int i0 = 0; i0 < N; i0 += IT) {
    // Two accumulators (even and odd keys) halve the FMA dependency chain.
    float s0[IT] = {}, s1[IT] = {};
    for (int j = 0; j < N; j += 2) {
      const float *p0 = st + j * N + i0, *p1 = p0 + N;
      const float a0 = a[j], a1 = a[j + 1];
#pragma omp simd
      for (int l = 0; l < IT; ++l) {
        s0[l] += a0 * p0[l];
        s1[l] += a1 * p1[l];
      }
    }
    for (int l = 0; l < IT; ++l) sa[i0 + l] = s0[l] + s1[l];
  }
}

// One step on key-major states, given sa = st_in^T a of this step:
//   st_out = diag(d) st_in + b sa^T + k v^T   (may alias st_in)
//   y = st_out^T r                            when kWantY
//   sa_next = st_out^T a_next                 when kNext (the next step's sa, summed while the
//                                             new rows are in registers: the state is read once)
template <int NT, int W, bool kWantY, bool kNext>
WKV_INLINE void step_forward(int n, const float* st_in, float* st_out, const float* sa, const float* d,
                             const float* b, const float* k, const float* v, const float* r, float* y,
                             const float* a_next, float* sa_next) {
  const int N = NT > 0 ? NT : n;
  constexpr int IT = tile_width<NT, W>();
  for (int i0 = 0; i0 < N; i0 += IT) {
    float sat[IT], vt[IT], yt[IT] = {}, snt[IT] = {};
    for (int l = 0; l < IT; ++l) {
      sat[l] = sa[i0 + l];
      vt[l] = v[i0 + l];
    }
    for (int j = 0; j < N; ++j) {
      const float* p = st_in + j * N + i0;
      float* q = st_out + j * N + i0;
      const float dj = d[j], bj = b[j], kj = k[j];
      const float rj = kWantY ? r[j] : 0.f, aj = kNext ? a_next[j] : 0.f;
#pragma omp simd
      for (int l = 0; l < IT; ++l) {
        const float x = p[l] * dj + bj * sat[l] + kj * vt[l];
        q[l] = x;
        if constexpr (kWantY) yt[l] += rj * x;
        if constexpr (kNext) snt[l] += aj * x;
      }
    }
    for (int l = 0; l < IT; ++l) {
      if constexpr (kWantY) y[i0 + l] = yt[l];
      if constexpr (kNext) sa_next[i0 + l] = snt[l];
    }
  }
}

// Pass A of a backward step on key-major gt = G^T: G += dy r^T, then gb = G b and, when kDv, dv = G k, per column
// tile. Shared by step_backward and step_backward_state, so that both make G and gb with the same arithmetic.
template <int NT, int W, bool kDv>
WKV_INLINE void backward_pass_a(int N, float* gt, const float* r, const float* k, const float* b, const float* dy,
                                float* dv, float* gb) {
  constexpr int IT = tile_width<NT, W>();
  for (int i0 = 0; i0 < N; i0 += IT) {
    float dvt[IT] = {}, gbt[IT] = {}, dyt[IT];
    for (int l = 0; l < IT; ++l) dyt[l] = dy[i0 + l];
    for (int j = 0; j < N; ++j) {
      float* g = gt + j * N + i0;
      const float rj = r[j], kj = kDv ? k[j] : 0.f, bj = b[j];
#pragma omp simd
      for (int l = 0; l < IT; ++l) {
        const float x = g[l] + rj * dyt[l];
        g[l] = x;
        if constexpr (kDv) dvt[l] += kj * x;
        gbt[l] += bj * x;
      }
    }
    for (int l = 0; l < IT; ++l) {
      if constexpr (kDv) dv[i0 + l] = dvt[l];
      gb[i0 + l] = gbt[l];
    }
  }
}

// The vector width of pass B (and of step_backward_state's update of G).
template <int NT, int W>
constexpr int pass_b_lanes() {
  return (W >= 32 && NT > 0 && NT % 16 == 0) ? 16 : 8;
}

// G's row j after pass A -> its row of G diag(d) + gb a^T (pass B's update, also step_backward_state's).
template <int L>
WKV_INLINE typename Lanes<L>::V next_g(typename Lanes<L>::V x, float dj, typename Lanes<L>::V gbv, float aj) {
  return x * dj + gbv * aj;
}

// One backward step at time t on key-major gt = G^T: enters holding dL/dS_t without y_t's term and
// leaves holding dL/dS_{t-1}. Writes dr, dd (= dL/dd), dk, dv, da, db of step t.
// Scratch: gb [N], part [5, N, 8].
template <int NT, int W>
WKV_INLINE void step_backward(int n, float* gt, const float* so, const float* sa, const float* d, const float* r,
                              const float* k, const float* v, const float* a, const float* b, const float* dy,
                              float* dr, float* dd, float* dk, float* dv, float* da, float* db, float* gb,
                              float* part) {
  const int N = NT > 0 ? NT : n;
  constexpr int IT = tile_width<NT, W>();
  // Pass A: G += dy r^T, then dv = G k and gb = G b, per column tile.
  backward_pass_a<NT, W, true>(N, gt, r, k, b, dy, dv, gb);
  // Pass B, row by row: the five per-key sums over the row as 8-lane partial sums, and
  // G <- G diag(d) + gb a^T. Written with explicit 8-lane vectors so the accumulators stay in
  // registers; the lane sums of 8 rows at a time are finished by reduce_rows8.
  constexpr int L = pass_b_lanes<NT, W>();
  using V = typename Lanes<L>::V;
  // Row j: the five per-key sums as L-lane partials, then G's row updated. inv(q, i) is the row-invariant
  // vector q (0: gb, 1: v, 2: sa, 3: dy) at column i. Both lambdas must inline into the target clone: compiled
  // out of line they would get the default target, whose ABI returns a 16-lane vector in memory, not in zmm0.
  auto rows = [&](auto inv) WKV_LAMBDA_INLINE {
    for (int j = 0; j < N; ++j) {
      float* g = gt + j * N;
      const float* po = so + j * N;
      const float dj = d[j], aj = a[j];
      V acc_k = {}, acc_d = {}, acc_a = {}, acc_b = {}, acc_r = {};
      for (int i = 0; i < N; i += L) {
        const V x = loadv<L>(g + i), p = loadv<L>(po + i), gbv = inv(0, i);
        acc_k += x * inv(1, i);
        acc_d += p * x;
        acc_a += p * gbv;
        acc_b += x * inv(2, i);
        acc_r += p * inv(3, i);
        storev<L>(g + i, next_g<L>(x, dj, gbv, aj));
      }
      const wkv_v8f acc[5] = {fold8<L>(acc_k), fold8<L>(acc_d), fold8<L>(acc_a), fold8<L>(acc_b), fold8<L>(acc_r)};
      for (int q = 0; q < 5; ++q) store8(part + (q * N + j) * 8, acc[q]);
    }
  };
  const float* invariant[4] = {gb, v, sa, dy};
  // With a compile-time N of at most 4 vectors (AVX-512, N <= 64) the invariants are loaded once and stay in
  // 16 registers for the whole pass: read through the pointers, the compiler must reload them every row,
  // since the stores to G may alias them.
  constexpr int K = NT > 0 && NT % L == 0 ? NT / L : 0;
  if constexpr (K > 0 && K <= 4) {
    V held[4][K];
    for (int q = 0; q < 4; ++q)
      for (int c = 0; c < K; ++c) held[q][c] = loadv<L>(invariant[q] + c * L);
    rows([&](int q, int i) WKV_LAMBDA_INLINE { return held[q][i / L]; });
  } else {
    rows([&](int q, int i) WKV_LAMBDA_INLINE { return loadv<L>(invariant[q] + i); });
  }
  float* outs[5] = {dk, dd, da, db, dr};
  for (int q = 0; q < 5; ++q)
    for (int j0 = 0; j0 < N; j0 += 8) reduce_rows8(part + (q * N + j0) * 8, outs[q] + j0);
  // dr = S_t^T dy, with row j of S_t^T = d_j S_{t-1}^T[j] + b_j (S_{t-1} a) + k_j v: pass B summed
  // S_{t-1}^T[j] . dy, so S_t itself is never read.
  float sa_dy = 0.f, v_dy = 0.f;
#pragma omp simd reduction(+ : sa_dy, v_dy)
  for (int i = 0; i < N; ++i) {
    sa_dy += sa[i] * dy[i];
    v_dy += v[i] * dy[i];
  }
#pragma omp simd
  for (int j = 0; j < N; ++j) dr[j] = d[j] * dr[j] + b[j] * sa_dy + k[j] * v_dy;
}

// One backward step of dL/dS alone, where no input of the step asks for a gradient (state tuning's first layer:
// its r, w, k, v, a, b come from frozen weights and the embedding): G += dy r^T, gb = G b, G <- G diag(d) + gb a^T,
// the same arithmetic as step_backward's (its pass A, then pass B's update of G), so dL/dS_0 is the same bits;
// no recomputed state is read and none of the five per-key sums is made. Scratch: gb [N].
template <int NT, int W>
WKV_INLINE void step_backward_state(int n, float* gt, const float* d, const float* r, const float* a, const float* b,
                                    const float* dy, float* gb) {
  const int N = NT > 0 ? NT : n;
  backward_pass_a<NT, W, false>(N, gt, r, nullptr, b, dy, nullptr, gb);
  constexpr int L = pass_b_lanes<NT, W>();
  for (int j = 0; j < N; ++j) {
    float* g = gt + j * N;
    const float dj = d[j], aj = a[j];
    for (int i = 0; i < N; i += L) storev<L>(g + i, next_g<L>(loadv<L>(g + i), dj, loadv<L>(gb + i), aj));
  }
}

}  // namespace
