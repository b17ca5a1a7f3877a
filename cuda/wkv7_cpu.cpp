// WKV7 recurrence on CPU: fused forward and backward, the C++ twin of the CUDA kernel.
//
// Per (batch, head), with the state S value-major (S[i][j]: i = value index, j = key index):
//
//   S_t = S_{t-1} (diag(d_t) + a_t b_t^T) + v_t k_t^T,   y_t = S_t r_t,   d_t = exp(-exp(w_t))
//
// Backward, with G_t = dL/dS_t (starting from dL/dS_T) and walking t = T-1 .. 0:
//   G_t += dy_t r_t^T
//   dv_t = G_t k_t           gb = G_t b_t           dk_t = G_t^T v_t
//   dd_t = sum_i S_{t-1} * G_t (per key j)          da_t = S_{t-1}^T gb
//   db_t = G_t^T (S_{t-1} a_t)                      dr_t = S_t^T dy_t
//   G_{t-1} = G_t diag(d_t) + gb a_t^T              (dw_t = -dd_t d_t exp(w_t) is left to the caller)
// and dL/dS_0 = G_0. The forward stores S every kChunk steps; the backward recomputes the states
// of one chunk at a time from its checkpoint (they stay in L2), then walks the chunk backwards.
//
// Inside the kernel S and G are kept key-major (ST[j][i] = S[i][j]): then S a, S r, G k, G b and
// the updates are sums of contiguous rows scaled by scalars (vectorised over i without horizontal
// sums), and only the five per-key sums of the backward (dk, dd, da, db, dr) reduce along a row;
// those are kept as 8-lane partial sums and reduced 8 rows at a time by a shuffle tree. The caller
// pads N to a multiple of 8 with zeros (exact: padded rows and columns of S stay zero).
//
// Everything is fp32: bf16 r, k, v, a, b (and y, dy and their gradients) are staged per head in fp32
// (wkv7_cpu_stage.h); the caller makes d = exp(-exp(w)) in fp32. The hot loops are `omp simd` loops over
// compile-time widths so GCC vectorises them; on x86-64 every per-head function is compiled three times
// (AVX-512, AVX2+FMA and baseline) and picked at load time from the CPU's features (GCC target_clones),
// so the build never depends on the build machine (no -march=native). On AVX-512 CPUs the column tiles
// are whole rows (up to 64 values: 4 of its 32 registers per tile vector) and pass B of the backward runs
// on 16 lanes: 0.1B ctx 512 forward 2x, backward 1.3-1.5x the AVX2 tiles' speed on one Xeon.

#include "cpu_aten.h"


#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "wkv7_cpu_simd.h"
#include "wkv7_cpu_stage.h"

namespace {

constexpr int kChunk = 32;  // steps between stored states (ops/cpu.py CHUNK); 16 before: twice the memory, same speed
constexpr int kAhead = 4;  // the forward asks for step t + kAhead's rows at step t (prefetch_rows)
constexpr int kLanes = 8;   // lanes of the 8-wide vectors below; the kernel requires N % 8 == 0

// One (batch, head) sequence. Inputs and per-step outputs: element (t, n) at ptr[t * stride + n].
struct Head {
  const float *r, *d, *k, *v, *a, *b;  // d = exp(-exp(w)), the per-step decay
  int64_t stride;
  int T, N;
  const float* s0;  // [N, N] initial state (value-major), or nullptr for zeros
  float* ckpt;      // [n_chunks + 1, N, N] key-major: S before steps 0, kChunk, ...; last is S_T
  // forward
  float* y;
  float* s_final;  // [N, N] value-major
  // backward
  const float* dy;
  const float* ds_final;  // [N, N] dL/dS_T, value-major
  float *dr, *dd, *dk, *dv, *da, *db;  // dd = dL/dd; the caller chains it to dL/dw
  float* ds0;  // [N, N] value-major
};

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

// One backward step at time t on key-major gt = G^T: enters holding dL/dS_t without y_t's term and
// leaves holding dL/dS_{t-1}. Writes dr, dd (= dL/dd), dk, dv, da, db of step t.
// Scratch: gb [N], part [5, N, 8].
template <int NT, int W>
WKV_INLINE void step_backward(int n, float* gt, const float* so, const float* sa, const float* d, const float* r,
                              const float* k, const float* v, const float* a, const float* b, const float* dy, float* dr, float* dd, float* dk, float* dv,
                              float* da, float* db, float* gb, float* part) {
  const int N = NT > 0 ? NT : n;
  constexpr int IT = tile_width<NT, W>();
  // Pass A: G += dy r^T, then dv = G k and gb = G b, per column tile.
  for (int i0 = 0; i0 < N; i0 += IT) {
    float dvt[IT] = {}, gbt[IT] = {}, dyt[IT];
    for (int l = 0; l < IT; ++l) dyt[l] = dy[i0 + l];
    for (int j = 0; j < N; ++j) {
      float* g = gt + j * N + i0;
      const float rj = r[j], kj = k[j], bj = b[j];
#pragma omp simd
      for (int l = 0; l < IT; ++l) {
        const float x = g[l] + rj * dyt[l];
        g[l] = x;
        dvt[l] += kj * x;
        gbt[l] += bj * x;
      }
    }
    for (int l = 0; l < IT; ++l) {
      dv[i0 + l] = dvt[l];
      gb[i0 + l] = gbt[l];
    }
  }
  // Pass B, row by row: the five per-key sums over the row as 8-lane partial sums, and
  // G <- G diag(d) + gb a^T. Written with explicit 8-lane vectors so the accumulators stay in
  // registers; the lane sums of 8 rows at a time are finished by reduce_rows8.
  constexpr int L = (W >= 32 && NT > 0 && NT % 16 == 0) ? 16 : 8;
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
        storev<L>(g + i, x * dj + gbv * aj);
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

template <int NT, int W>
WKV_INLINE void forward_head_n(const Head& h) {
  const int N = NT > 0 ? NT : h.N;
  const size_t NN = size_t(N) * N;
  std::vector<float> st(NN, 0.f), sa(N), sa_next(N);  // key-major state
  if (h.s0) transpose(N, h.s0, st.data());
  if (h.T > 0) state_dot_a<NT, W>(N, st.data(), h.a, sa.data());
  for (int t = 0; t < h.T; ++t) {
    if (t % kChunk == 0) std::memcpy(h.ckpt + (t / kChunk) * NN, st.data(), NN * sizeof(float));
    const int64_t o = t * h.stride;
    float* s = st.data();
    if (t + kAhead < h.T) {
      const int64_t f = o + kAhead * h.stride;
      prefetch_rows({h.r + f, h.d + f, h.k + f, h.v + f, h.a + f, h.b + f}, N);
    }
    if (t + 1 < h.T)
      step_forward<NT, W, true, true>(N, s, s, sa.data(), h.d + o, h.b + o, h.k + o, h.v + o, h.r + o, h.y + o,
                                   h.a + o + h.stride, sa_next.data());
    else
      step_forward<NT, W, true, false>(N, s, s, sa.data(), h.d + o, h.b + o, h.k + o, h.v + o, h.r + o, h.y + o,
                                    nullptr, nullptr);
    sa.swap(sa_next);
  }
  const int n_chunks = (h.T + kChunk - 1) / kChunk;
  std::memcpy(h.ckpt + n_chunks * NN, st.data(), NN * sizeof(float));
  transpose(N, st.data(), h.s_final);
}

template <int NT, int W>
WKV_INLINE void backward_head_n(const Head& h) {
  const int N = NT > 0 ? NT : h.N;
  const size_t NN = size_t(N) * N;
  // states[m] = S_{t0 + m + 1} of the current chunk; S_{t0} is read from its checkpoint in place.
  std::vector<float> gt(NN), states((kChunk - 1) * NN), part(5 * size_t(N) * kLanes);
  std::vector<float> sa(kChunk * N), gb(N);
  transpose(N, h.ds_final, gt.data());
  const int n_chunks = (h.T + kChunk - 1) / kChunk;
  for (int c = n_chunks - 1; c >= 0; --c) {
    const int t0 = c * kChunk, len = std::min(kChunk, h.T - t0);
    const float* s_first = h.ckpt + c * NN;
    auto s_at = [&](int m) { return m == 0 ? s_first : states.data() + (m - 1) * NN; };
    // Recompute the chunk: the backward of step m needs S_{t0+m} and sa_m = S_{t0+m}^T a.
    state_dot_a<NT, W>(N, s_first, h.a + t0 * h.stride, sa.data());
    for (int m = 0; m + 1 < len; ++m) {
      const int64_t o = (t0 + m) * h.stride;
      step_forward<NT, W, false, true>(N, s_at(m), states.data() + m * NN, sa.data() + m * N, h.d + o, h.b + o,
                                    h.k + o, h.v + o, nullptr, nullptr, h.a + o + h.stride,
                                    sa.data() + (m + 1) * N);
    }
    for (int m = len - 1; m >= 0; --m) {
      const int64_t o = (t0 + m) * h.stride;
      step_backward<NT, W>(N, gt.data(), s_at(m), sa.data() + m * N, h.d + o, h.r + o, h.k + o, h.v + o, h.a + o,
                        h.b + o, h.dy + o, h.dr + o, h.dd + o, h.dk + o, h.dv + o, h.da + o, h.db + o, gb.data(),
                        part.data());
      if (c > 0) {  // the next chunk's rows (the one before this), one step's worth per step
        const int64_t f = o - int64_t(kChunk) * h.stride;
        prefetch_rows({h.r + f, h.d + f, h.k + f, h.v + f, h.a + f, h.b + f, h.dy + f}, N);
        prefetch_rows<true>({h.dr + f, h.dd + f, h.dk + f, h.dv + f, h.da + f, h.db + f}, N);
      }
    }
  }
  transpose(N, gt.data(), h.ds0);
}

// Compile-time head sizes for the common cases; any other N runs the same code with runtime bounds.
// W: the widest column tile. 16 values fit the AVX2 registers; with AVX-512 (32 registers of 16 floats)
// a whole row of up to 64 values is one tile: 4x the independent FMA chains, one pass over the state.
// The tile width changes no result: every sum runs over the keys in the same order.
template <int W>
WKV_INLINE void forward_head_w(const Head& h) {
  switch (h.N) {
    case 16: return forward_head_n<16, W>(h);
    case 32: return forward_head_n<32, W>(h);
    case 64: return forward_head_n<64, W>(h);
    case 128: return forward_head_n<128, W>(h);
    default: return forward_head_n<0, W>(h);
  }
}

template <int W>
WKV_INLINE void backward_head_w(const Head& h) {
  switch (h.N) {
    case 16: return backward_head_n<16, W>(h);
    case 32: return backward_head_n<32, W>(h);
    case 64: return backward_head_n<64, W>(h);
    case 128: return backward_head_n<128, W>(h);
    default: return backward_head_n<0, W>(h);
  }
}

// tiles: 0 = by the CPU (64 where it has AVX-512F, else 16), or 16 / 64 (tests run both anywhere).
bool wide_tiles(int64_t tiles) {
  TORCH_CHECK(tiles == 0 || tiles == 16 || tiles == 64, "wkv7_cpu: tiles must be 0, 16 or 64, got ", tiles);
#if defined(__GNUC__) && defined(__x86_64__)
  if (tiles == 0) return __builtin_cpu_supports("avx512f");
#else
  if (tiles == 0) return false;
#endif
  return tiles == 64;
}

WKV_CLONES void forward_head(const Head& h, bool wide) {
  if (wide) return forward_head_w<64>(h);
  return forward_head_w<16>(h);
}

WKV_CLONES void backward_head(const Head& h, bool wide) {
  if (wide) return backward_head_w<64>(h);
  return backward_head_w<16>(h);
}

void check(const at::Tensor& x, const char* name, at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  check_rows(x, dtype, "wkv7_cpu", name, shape);
}

// Checks the six inputs; returns their rows' dtype: fp32, or bf16 for r, k, v, a, b (d is fp32 either way),
// which y, dy and the gradients other than dd share.
at::ScalarType check_inputs(const std::vector<at::Tensor>& rdkvab, at::IntArrayRef shape) {
  const auto dt = rows_dtype(rdkvab[0], "wkv7_cpu");
  for (size_t i = 0; i < rdkvab.size(); ++i) check(rdkvab[i], "input", shape, i == 1 ? at::kFloat : dt);
  return dt;
}

// Pointers for sequence (b, h) of [B, T, H, N] tensors and of [B, H, ..., N, N] tensors. `stage` (bf16 rows):
// the six inputs' rows are gathered into stage[i T N ...] as fp32 and the pointers (stride N) point there.
Head head_at(const std::vector<at::Tensor>& rdkvab, int64_t bi, int64_t hi, int64_t T, int64_t H,
             int64_t N, int64_t n_ckpt, const at::Tensor& ckpt, float* stage) {
  Head h{};
  const int64_t seq = bi * T * H * N + hi * N;
  const float** in[6] = {&h.r, &h.d, &h.k, &h.v, &h.a, &h.b};
  for (int i = 0; i < 6; ++i) {
    if (stage) {
      gather_head(rdkvab[i], seq, H * N, T, N, stage + i * T * N);
      *in[i] = stage + i * T * N;
    } else {
      *in[i] = rdkvab[i].data_ptr<float>() + seq;
    }
  }
  h.stride = stage ? N : H * N;
  h.T = int(T);
  h.N = int(N);
  h.ckpt = ckpt.data_ptr<float>() + (bi * H + hi) * n_ckpt * N * N;
  return h;
}

}  // namespace

// rdkvab: [r, d, k, v, a, b], each [B, T, H, N] with d = exp(-exp(w)) (fp32; the others fp32 or bf16, one
// dtype); s0: [B, H, N, N] or empty (zeros). Writes y [B, T, H, N] (r's dtype), ckpt [B, H, ceil(T / kChunk) + 1,
// N, N] and s_final [B, H, N, N].
void wkv7_forward(const std::vector<at::Tensor>& rdkvab, const at::Tensor& s0, at::Tensor y,
                  at::Tensor ckpt, at::Tensor s_final, int64_t tiles) {
  const bool wide = wide_tiles(tiles);
  TORCH_CHECK(rdkvab.size() == 6, "wkv7_cpu: expected 6 inputs r, d, k, v, a, b");
  const auto shape = rdkvab[0].sizes().vec();
  TORCH_CHECK(shape.size() == 4 && shape[3] % kLanes == 0, "wkv7_cpu: inputs must be [B, T, H, N], N % 8 == 0");
  const int64_t B = shape[0], T = shape[1], H = shape[2], N = shape[3];
  const int64_t n_ckpt = (T + kChunk - 1) / kChunk + 1;
  const auto dt = check_inputs(rdkvab, shape);
  const bool staged = dt == at::kBFloat16;
  check(y, "y", shape, dt);
  check(ckpt, "ckpt", {B, H, n_ckpt, N, N});
  check(s_final, "s_final", {B, H, N, N});
  const bool has_s0 = s0.defined() && s0.numel() > 0;
  if (has_s0) check(s0, "state", {B, H, N, N});
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> stage(staged ? 7 * T * N : 0);  // r d k v a b y
    for (int64_t bh = begin; bh < end; ++bh) {
      Head h = head_at(rdkvab, bh / H, bh % H, T, H, N, n_ckpt, ckpt, staged ? stage.data() : nullptr);
      const int64_t seq = (bh / H) * T * H * N + (bh % H) * N;
      h.s0 = has_s0 ? s0.data_ptr<float>() + bh * N * N : nullptr;
      h.y = staged ? stage.data() + 6 * T * N : y.data_ptr<float>() + seq;
      h.s_final = s_final.data_ptr<float>() + bh * N * N;
      forward_head(h, wide);
      if (staged) scatter_head(h.y, T, N, y, seq, H * N);
    }
  });
}

// grads: [dr, dd, dk, dv, da, db] (dd = dL/dd, fp32; the others and dy in r's dtype), each [B, T, H, N] and
// written in full; ds0 [B, H, N, N].
void wkv7_backward(const std::vector<at::Tensor>& rdkvab, const at::Tensor& ckpt, const at::Tensor& dy,
                   const at::Tensor& ds_final, std::vector<at::Tensor> grads, at::Tensor ds0, int64_t tiles) {
  const bool wide = wide_tiles(tiles);
  TORCH_CHECK(rdkvab.size() == 6 && grads.size() == 6, "wkv7_cpu: expected 6 inputs and 6 gradients");
  const auto shape = rdkvab[0].sizes().vec();
  TORCH_CHECK(shape.size() == 4 && shape[3] % kLanes == 0, "wkv7_cpu: inputs must be [B, T, H, N], N % 8 == 0");
  const int64_t B = shape[0], T = shape[1], H = shape[2], N = shape[3];
  const int64_t n_ckpt = (T + kChunk - 1) / kChunk + 1;
  const auto dt = check_inputs(rdkvab, shape);
  const bool staged = dt == at::kBFloat16;
  for (size_t i = 0; i < grads.size(); ++i) check(grads[i], "gradient", shape, i == 1 ? at::kFloat : dt);
  check(dy, "dy", shape, dt);
  check(ckpt, "ckpt", {B, H, n_ckpt, N, N});
  check(ds_final, "ds_final", {B, H, N, N});
  check(ds0, "ds0", {B, H, N, N});
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> stage(staged ? 13 * T * N : 0);  // r d k v a b, dy, dr dd dk dv da db
    for (int64_t bh = begin; bh < end; ++bh) {
      float* sp = staged ? stage.data() : nullptr;
      Head h = head_at(rdkvab, bh / H, bh % H, T, H, N, n_ckpt, ckpt, sp);
      const int64_t seq = (bh / H) * T * H * N + (bh % H) * N;
      if (staged) gather_head(dy, seq, H * N, T, N, sp + 6 * T * N);
      h.dy = staged ? sp + 6 * T * N : dy.data_ptr<float>() + seq;
      h.ds_final = ds_final.data_ptr<float>() + bh * N * N;
      float** out[6] = {&h.dr, &h.dd, &h.dk, &h.dv, &h.da, &h.db};
      for (int i = 0; i < 6; ++i) *out[i] = staged ? sp + (7 + i) * T * N : grads[i].data_ptr<float>() + seq;
      h.ds0 = ds0.data_ptr<float>() + bh * N * N;
      backward_head(h, wide);
      if (staged)
        for (int i = 0; i < 6; ++i) scatter_head(*out[i], T, N, grads[i], seq, H * N);
    }
  });
}
