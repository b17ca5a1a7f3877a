// LoRA's thin products on CPU (fp32): an activation [T, K] times a rank-R factor, and the factor's gradient.
// Compiled into the same extension as wkv7_cpu.cpp, which binds them, with its AVX-512 / AVX2+FMA / baseline
// target clones.
//
// thin_nt:     out [T, R] = alpha x [T, K] wt [K, R]    (g B with wt = B; x A^T from A [R, K], transposed here)
// thin_tn:     out [R, K] = alpha g [T, R]^T x [T, K]   (A's gradient (g B)^T x; B's (x A^T)^T g, stored [K, R])
// (The in-place sums y += s (x A^T) B^T and dx += s (g B) A stay BLAS's addmm_: a kernel of this kind, 4 rows x 64
// columns of accumulators, ran them at 0.6-0.8x its speed.)
//
// For R = 8..64 the BLAS torch calls runs these at 55-90 GFLOP/s on a 2-core AVX-512 machine, where the big
// products of the same step run at ~190 and reading the activation once takes a third of their time (issue 23,
// round 21). Here each thread takes bands of rows (thin_nt) or of columns (thin_tn) and keeps the whole band of
// outputs in registers while it walks the activation once: the factor (R x K floats, 48 KB at R 16, K 768) stays
// in L1/L2, the activation streams. Each output is one thread's fp32 sum in a fixed order (over k for thin_nt,
// over t for thin_tn): the result does not depend on the thread count. LoRA takes them only for the ranks and
// products that a measured check found faster than BLAS on this CPU (ops/thin_check.py, issue 23, round 22).

#include "cpu_aten.h"
#include "cpu_rows.h"  // check_f32

#include <algorithm>
#include <cstdint>

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(PEFT_RWKV7_NO_AVX512)
#define THIN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))  // see wkv7_cpu_simd.h
#define THIN_WIDE_CPU() false
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define THIN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define THIN_WIDE_CPU() __builtin_cpu_supports("avx512f")
#else
#define THIN_CLONES
#define THIN_WIDE_CPU() false
#endif

// out rows [t0, t0 + RB) of x wt, RB rows walked together (RB x R accumulators)
template <int R, int RB>
THIN_CLONES void nt_band(const float* __restrict x, const float* __restrict wt, float* __restrict out, int64_t t0,
                         int64_t K, float alpha) {
  float acc[RB][R] = {};
  const float* xr = x + t0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = wt + k * R;
#pragma GCC unroll 16
    for (int b = 0; b < RB; ++b) {
      const float xv = xr[b * K + k];
#pragma omp simd
      for (int j = 0; j < R; ++j) acc[b][j] += xv * w[j];
    }
  }
  float* o = out + t0 * R;
  for (int b = 0; b < RB; ++b)
#pragma omp simd
    for (int j = 0; j < R; ++j) o[b * R + j] = alpha * acc[b][j];
}

// out rows [j0, j0 + RS) x columns [k0, k0 + KB) of g^T x for g [T, R], over every t (RS x KB accumulators)
template <int RS, int KB>
THIN_CLONES void tn_band(const float* __restrict g, int64_t R, int64_t j0, const float* __restrict x,
                         float* __restrict out, int64_t T, int64_t K, int64_t k0, float alpha, bool out_kr) {
  float acc[RS][KB] = {};
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * K + k0;
    const float* gr = g + t * R + j0;
#pragma GCC unroll 64
    for (int j = 0; j < RS; ++j) {
      const float gv = gr[j];
#pragma omp simd
      for (int c = 0; c < KB; ++c) acc[j][c] += gv * xr[c];
    }
  }
  if (out_kr) {  // out [K, R]
    for (int c = 0; c < KB; ++c)
      for (int j = 0; j < RS; ++j) out[(k0 + c) * R + j0 + j] = alpha * acc[j][c];
  } else {
    for (int j = 0; j < RS; ++j)
#pragma omp simd
      for (int c = 0; c < KB; ++c) out[(j0 + j) * K + k0 + c] = alpha * acc[j][c];
  }
}

// rows of RB (the last band one row at a time), split over threads
template <int R, int RB>
void nt_rows(const float* x, const float* wt, float* out, int64_t T, int64_t K, float alpha) {
  const int64_t bands = (T + RB - 1) / RB;
  at::parallel_for(0, bands, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * RB;
      if (t0 + RB <= T) {
        nt_band<R, RB>(x, wt, out, t0, K, alpha);
      } else {
        for (int64_t t = t0; t < T; ++t) nt_band<R, 1>(x, wt, out, t, K, alpha);
      }
    }
  });
}

// columns in blocks of KB (the last block one column at a time) by rows of the output in blocks of RS, split over
// threads (each output is still one sequential sum over t: the same bits for any RS and thread count)
template <int RS, int KB>
void tn_cols(const float* g, const float* x, float* out, int64_t T, int64_t K, int64_t R, float alpha, bool out_kr) {
  const int64_t blocks = (K + KB - 1) / KB, parts = R / RS;
  at::parallel_for(0, blocks * parts, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k0 = (i / parts) * KB, j0 = (i % parts) * RS;
      if (k0 + KB <= K) {
        tn_band<RS, KB>(g, R, j0, x, out, T, K, k0, alpha, out_kr);
      } else {
        for (int64_t k = k0; k < K; ++k) tn_band<RS, 1>(g, R, j0, x, out, T, K, k, alpha, out_kr);
      }
    }
  });
}

// Band sizes (accumulator floats), measured on a 2-core AMD EPYC (Zen 4) with each clone:
// - walking rows with AVX-512's 32 registers: 128 (8 zmm) up to R 16; 384 (24 zmm) at R 32 and 64, where a band of
//   fewer rows reads the factor (up to 768 KB at R 64, K 3072) from L2 more often: R 64, K 3072 1.86 -> 1.51 ms;
// - walking rows with AVX2's 16 registers: 96 (12 ymm), R 16 at K 768 0.135 -> 0.090 ms (32 floats before);
// - walking columns with AVX-512: all R outputs x 512 / R columns (256 floats ran at 70%, 1024 at 60% of it);
// - walking columns with AVX2: 4 of the R outputs x 16 columns (8 ymm; 8 x 16 at R 64, where x's column block is
//   read R / 8 times instead of R / 4), R 16 at K 768 0.104 -> 0.071 ms, K 3072 0.59 -> 0.37 (all R outputs x 8
//   columns before: 16-64 accumulator registers, most spilled).
// Which products run here at all is decided per CPU by a measured check against BLAS (ops/thin_check.py).
template <int R>
void nt_dispatch(const float* x, const float* wt, float* out, int64_t T, int64_t K, float alpha, bool wide) {
  if (wide) {
    nt_rows<R, (R >= 32 ? 384 / R : 128 / R)>(x, wt, out, T, K, alpha);
  } else {
    nt_rows<R, std::max(1, 96 / R)>(x, wt, out, T, K, alpha);
  }
}

template <int R>
void tn_dispatch(const float* g, const float* x, float* out, int64_t T, int64_t K, float alpha, bool out_kr,
                 bool wide) {
  if (wide) {
    tn_cols<R, std::max(8, 512 / R)>(g, x, out, T, K, R, alpha, out_kr);
  } else {
    tn_cols<(R == 64 ? 8 : 4), 16>(g, x, out, T, K, R, alpha, out_kr);
  }
}

// [rows, cols] -> [cols, rows], contiguous (a factor: at most 64 x a few thousand)
at::Tensor transposed(const at::Tensor& m) {
  const int64_t rows = m.size(0), cols = m.size(1);
  at::Tensor out = at::empty({cols, rows}, m.options());
  const float* src = m.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t j = 0; j < cols; ++j)  // written in order, read in `rows` streams
    for (int64_t i = 0; i < rows; ++i) dst[j * rows + i] = src[i * cols + j];
  return out;
}

// the ranks it is compiled for (ops.cpu.THIN_RANKS on the Python side, which routes only these here)
bool thin_rank_supported(int64_t r) { return r == 8 || r == 16 || r == 32 || r == 64; }

}  // namespace

at::Tensor thin_nt(const at::Tensor& x, const at::Tensor& w, double alpha, bool w_rk) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "thin_nt: x and w must be matrices");
  const int64_t T = x.size(0), K = x.size(1), R = w.size(w_rk ? 0 : 1);
  check_f32(x, "thin_nt", "x", {T, K});
  check_f32(w, "thin_nt", "w", w_rk ? at::IntArrayRef({R, K}) : at::IntArrayRef({K, R}));
  TORCH_CHECK(thin_rank_supported(R), "thin_nt: rank ", R, " is not 8, 16, 32 or 64");
  const at::Tensor wt = w_rk ? transposed(w) : w;  // [K, R]
  at::Tensor out = at::empty({T, R}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = wt.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  static const bool wide = THIN_WIDE_CPU();
  switch (R) {
    case 8: nt_dispatch<8>(xp, wp, op, T, K, a, wide); break;
    case 16: nt_dispatch<16>(xp, wp, op, T, K, a, wide); break;
    case 32: nt_dispatch<32>(xp, wp, op, T, K, a, wide); break;
    default: nt_dispatch<64>(xp, wp, op, T, K, a, wide); break;
  }
  return out;
}

at::Tensor thin_tn(const at::Tensor& g, const at::Tensor& x, double alpha, bool out_kr) {
  TORCH_CHECK(g.dim() == 2 && x.dim() == 2, "thin_tn: g and x must be matrices");
  const int64_t T = x.size(0), K = x.size(1), R = g.size(1);
  check_f32(x, "thin_tn", "x", {T, K});
  check_f32(g, "thin_tn", "g", {T, R});
  TORCH_CHECK(thin_rank_supported(R), "thin_tn: rank ", R, " is not 8, 16, 32 or 64");
  at::Tensor out = out_kr ? at::empty({K, R}, x.options()) : at::empty({R, K}, x.options());
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  static const bool wide = THIN_WIDE_CPU();
  switch (R) {
    case 8: tn_dispatch<8>(gp, xp, op, T, K, a, out_kr, wide); break;
    case 16: tn_dispatch<16>(gp, xp, op, T, K, a, out_kr, wide); break;
    case 32: tn_dispatch<32>(gp, xp, op, T, K, a, out_kr, wide); break;
    default: tn_dispatch<64>(gp, xp, op, T, K, a, out_kr, wide); break;
  }
  return out;
}

