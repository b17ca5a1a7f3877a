// TimeMix's element-wise chains on CPU, fused: each one pass over [tokens, C] forward and one backward,
// where torch's autograd takes 8-20 passes for the same formulas (issue 23's profile). The formulas,
// their gradients and the torch reference they must equal are in peft_rwkv7/ops/timemix.py.
//
//   key_prep    kk = normalize(k0 * k_k) per head, k = k0 ((1 - k_a) + a k_a), out -kk and kk a
//   wkv_output  o = (group_norm(y) + (sum_n r k r_k) v) * g  (per head: ln_x, the bonus, the gate)
//
// Rows (tokens) are split over torch's threads in blocks of kBlock rows. Parameter gradients are sums
// over rows: each block writes its own partial sum, which the caller adds in block order, so results
// never depend on the number of threads. Everything is contiguous; the rows (k0, a, y, r, k, v, g, the
// outputs and the gradients) are fp32 or bf16 (cpu_bf16.h: read and written in place, computed in fp32), the
// parameters and their gradients fp32. The per-row functions are compiled for AVX-512, AVX2 and baseline
// x86-64 and picked at load time (WKV_CLONES).

#include "cpu_aten.h"


#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_bf16.h"
#include "cpu_rows.h"
#include "wkv7_cpu_simd.h"

namespace {

// ---- key_prep ----------------------------------------------------------------------------------------

template <typename T>
struct Key {
  int64_t H, N;
  const T *k0, *a;
  const float *k_k, *k_a;
};

constexpr float kNormEps = 1e-12f;  // F.normalize's default eps

// |k0 k_k| over one head's N values (the norm F.normalize divides by, before its eps clamp).
template <typename T>
WKV_INLINE float head_norm(const T* k0, const float* k_k, int64_t N) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t n = 0; n < N; ++n) ss += (ld(k0[n]) * k_k[n]) * (ld(k0[n]) * k_k[n]);
  return std::sqrt(ss);
}

template <typename T>
WKV_INLINE void key_forward(const Key<T>& p, int64_t r0, int64_t r1, T* k, T* nkk, T* kka) {
  const int64_t N = p.N, C = p.H * p.N;
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t o = row * C + h * N, q = h * N;
      const T *k0 = p.k0 + o, *a = p.a + o;
      const float *k_k = p.k_k + q, *k_a = p.k_a + q;
      const float den = std::max(head_norm(k0, k_k, N), kNormEps);
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        const float kk = (ld(k0[n]) * k_k[n]) / den;
        st(&nkk[o + n], -kk);
        st(&kka[o + n], kk * ld(a[n]));
        st(&k[o + n], ld(k0[n]) * ((1.f - k_a[n]) + ld(a[n]) * k_a[n]));
      }
    }
  }
}

WKV_CLONES void key_forward_rows(const Key<float>& p, int64_t r0, int64_t r1, float* k, float* nkk, float* kka) {
  key_forward(p, r0, r1, k, nkk, kka);
}
WKV_CLONES void key_forward_rows(const Key<bf16>& p, int64_t r0, int64_t r1, bf16* k, bf16* nkk, bf16* kka) {
  key_forward(p, r0, r1, k, nkk, kka);
}

// gkk = gkka a - gnkk; gkr = (gkk - kk (kk . gkk)) / den (norm >= eps; gkk / den below it, where the clamp
// holds the norm); gk0 = gk ((1 - k_a) + a k_a) + gkr k_k; ga = gkka kk + gk k0 k_a;
// partials: gk_k += gkr k0, gk_a += gk k0 (a - 1).
// kAll: gk, gnkk and gkka are all given (the model's case). The loops then hold no test on a pointer: GCC
// if-converts a load under such a test only with AVX-512's masked loads, and on AVX2 or baseline x86-64 the
// whole loop stayed scalar (0.1B ctx 512 on an AVX2 CPU: 0.66 ms a layer, 5x the forward). The parameter
// partials are their own loops for the same reason. Same operations in the same order either way.
template <bool kAll, typename T>
WKV_INLINE void key_backward_head(const Key<T>& p, const T* gk, const T* gnkk, const T* gkka, int64_t o, int64_t q,
                                  T* gk0, T* ga, float* gk_k, float* gk_a, float* gkk, float* gkr) {
  const int64_t N = p.N;
  const T *k0 = p.k0 + o, *a = p.a + o;
  const float *k_k = p.k_k + q, *k_a = p.k_a + q;
  const float norm = head_norm(k0, k_k, N);
  const float den = std::max(norm, kNormEps);
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t n = 0; n < N; ++n) {
    const float g = ((kAll || gkka) ? ld(gkka[o + n]) * ld(a[n]) : 0.f) - ((kAll || gnkk) ? ld(gnkk[o + n]) : 0.f);
    gkk[n] = g;
    dot += g * ((ld(k0[n]) * k_k[n]) / den);
  }
  if (!(norm >= kNormEps)) dot = 0.f;
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    const float kk = (ld(k0[n]) * k_k[n]) / den;
    gkr[n] = (gkk[n] - kk * dot) / den;
    const float gkn = (kAll || gk) ? ld(gk[o + n]) : 0.f;
    st(&gk0[o + n], gkn * ((1.f - k_a[n]) + ld(a[n]) * k_a[n]) + gkr[n] * k_k[n]);
    st(&ga[o + n], ((kAll || gkka) ? ld(gkka[o + n]) * kk : 0.f) + gkn * ld(k0[n]) * k_a[n]);
  }
  if (gk_k) {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) gk_k[q + n] += gkr[n] * ld(k0[n]);
  }
  if (gk_a) {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) gk_a[q + n] += ((kAll || gk) ? ld(gk[o + n]) : 0.f) * ld(k0[n]) * (ld(a[n]) - 1.f);
  }
}

// scratch: [2 N]
template <typename T>
WKV_INLINE void key_backward(const Key<T>& p, const T* gk, const T* gnkk, const T* gkka, int64_t r0, int64_t r1,
                             T* gk0, T* ga, float* gk_k, float* gk_a, float* scratch) {
  const int64_t N = p.N, C = p.H * p.N;
  const bool all = gk && gnkk && gkka;
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t o = row * C + h * N, q = h * N;
      if (all)
        key_backward_head<true>(p, gk, gnkk, gkka, o, q, gk0, ga, gk_k, gk_a, scratch, scratch + N);
      else
        key_backward_head<false>(p, gk, gnkk, gkka, o, q, gk0, ga, gk_k, gk_a, scratch, scratch + N);
    }
  }
}

WKV_CLONES void key_backward_rows(const Key<float>& p, const float* gk, const float* gnkk, const float* gkka,
                                  int64_t r0, int64_t r1, float* gk0, float* ga, float* gk_k, float* gk_a,
                                  float* scratch) {
  key_backward(p, gk, gnkk, gkka, r0, r1, gk0, ga, gk_k, gk_a, scratch);
}
WKV_CLONES void key_backward_rows(const Key<bf16>& p, const bf16* gk, const bf16* gnkk, const bf16* gkka, int64_t r0,
                                  int64_t r1, bf16* gk0, bf16* ga, float* gk_k, float* gk_a, float* scratch) {
  key_backward(p, gk, gnkk, gkka, r0, r1, gk0, ga, gk_k, gk_a, scratch);
}

// ---- wkv_output --------------------------------------------------------------------------------------

// TI: the element type of y, r, k, v, g and their gradients; TO: the output's and its gradient's.
template <typename TI>
struct Out {
  int64_t H, N;
  float eps;
  const TI *y, *r, *k, *v, *g;
  const float *gn_w, *gn_b, *r_k;
};

// stats per (row, head): mean, rstd and the bonus scale sum_n r k r_k.
template <typename TI, typename TO>
WKV_INLINE void out_forward(const Out<TI>& p, int64_t r0, int64_t r1, TO* o, float* stats) {
  const int64_t N = p.N, C = p.H * p.N;
  const float inv_n = 1.f / float(N);
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t i = row * C + h * N, q = h * N;
      const TI *y = p.y + i, *r = p.r + i, *k = p.k + i, *v = p.v + i, *g = p.g + i;
      // the parameters through local pointers: read through `p` inside a loop that stores floats, GCC
      // reloads the pointer every iteration (the store might change it) and does not vectorise on AVX2
      const float *gn_w = p.gn_w + q, *gn_b = p.gn_b + q, *r_k = p.r_k + q;
      float sum = 0.f, bs = 0.f;
#pragma omp simd reduction(+ : sum, bs)
      for (int64_t n = 0; n < N; ++n) {
        sum += ld(y[n]);
        bs += ld(r[n]) * ld(k[n]) * r_k[n];
      }
      const float mean = sum * inv_n;
      float var = 0.f;
#pragma omp simd reduction(+ : var)
      for (int64_t n = 0; n < N; ++n) var += (ld(y[n]) - mean) * (ld(y[n]) - mean);
      const float rstd = 1.f / std::sqrt(var * inv_n + p.eps);
#pragma omp simd
      for (int64_t n = 0; n < N; ++n)
        st(&o[i + n], (((ld(y[n]) - mean) * rstd) * gn_w[n] + gn_b[n] + bs * ld(v[n])) * ld(g[n]));
      float* stat = stats + (row * p.H + h) * 3;
      stat[0] = mean;
      stat[1] = rstd;
      stat[2] = bs;
    }
  }
}

// gz = go g; gg = go (z + bs v); gv = gz bs; gbs = sum gz v; gr = gbs k r_k; gk = gbs r r_k;
// gy = rstd (gyn - mean(gyn) - yn mean(gyn yn)) with gyn = gz gn_w;
// partials: ggn_w += gz yn, ggn_b += gz, gr_k += gbs r k.
template <typename TI, typename TO>
WKV_INLINE void out_backward(const Out<TI>& p, const TO* go, const float* stats, int64_t r0, int64_t r1,
                             const std::vector<TI*>& gin, float* part) {
  const int64_t N = p.N, C = p.H * p.N;
  const float inv_n = 1.f / float(N);
  TI *gy = gin[0], *gr = gin[1], *gk = gin[2], *gv = gin[3], *gg = gin[4];
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t i = row * C + h * N, q = h * N;
      const TI *y = p.y + i, *r = p.r + i, *k = p.k + i, *v = p.v + i, *g = p.g + i;
      const TO* d = go + i;
      const float* stat = stats + (row * p.H + h) * 3;
      const float mean = stat[0], rstd = stat[1], bs = stat[2];
      const float *gn_w = p.gn_w + q, *gn_b = p.gn_b + q, *r_k = p.r_k + q;
      float gbs = 0.f, m1 = 0.f, m2 = 0.f;
#pragma omp simd reduction(+ : gbs, m1, m2)
      for (int64_t n = 0; n < N; ++n) {
        const float gz = ld(d[n]) * ld(g[n]);
        const float yn = (ld(y[n]) - mean) * rstd;
        gbs += gz * ld(v[n]);
        m1 += gz * gn_w[n];
        m2 += gz * gn_w[n] * yn;
      }
      m1 *= inv_n;
      m2 *= inv_n;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        const float gz = ld(d[n]) * ld(g[n]);
        const float yn = (ld(y[n]) - mean) * rstd;
        st(&gy[i + n], rstd * (gz * gn_w[n] - m1 - yn * m2));
        st(&gg[i + n], ld(d[n]) * ((yn * gn_w[n] + gn_b[n]) + bs * ld(v[n])));
        st(&gv[i + n], gz * bs);
        st(&gr[i + n], gbs * ld(k[n]) * r_k[n]);
        st(&gk[i + n], gbs * ld(r[n]) * r_k[n]);
      }
      if (part) {  // a loop of its own: a test on a pointer inside the loop above keeps it scalar on AVX2
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          const float gz = ld(d[n]) * ld(g[n]);
          const float yn = (ld(y[n]) - mean) * rstd;
          part[q + n] += gz * yn;
          part[C + q + n] += gz;
          part[2 * C + q + n] += gbs * ld(r[n]) * ld(k[n]);
        }
      }
    }
  }
}

#define WKV_OUT_CLONES(TI, TO)                                                                                 \
  WKV_CLONES void out_forward_rows(const Out<TI>& p, int64_t r0, int64_t r1, TO* o, float* stats) {            \
    out_forward(p, r0, r1, o, stats);                                                                          \
  }                                                                                                            \
  WKV_CLONES void out_backward_rows(const Out<TI>& p, const TO* go, const float* stats, int64_t r0, int64_t r1, \
                                    const std::vector<TI*>& gin, float* part) {                                \
    out_backward(p, go, stats, r0, r1, gin, part);                                                             \
  }
WKV_OUT_CLONES(float, float)
WKV_OUT_CLONES(bf16, bf16)
WKV_OUT_CLONES(bf16, float)  // bf16 rows with fp32 parameters: the output in the promoted dtype (autocast's case)
#undef WKV_OUT_CLONES

}  // namespace

namespace {

template <typename T>
Key<T> make_key(const at::Tensor& k0, const at::Tensor& a, const at::Tensor& k_k, const at::Tensor& k_a, int64_t H) {
  TORCH_CHECK(k0.dim() == 2 && H > 0 && k0.size(1) % H == 0, "key_prep: k0 must be [rows, H * N]");
  check_rows(k0, scalar_type_of<T>(), "key_prep", "k0", k0.sizes());
  check_rows(a, scalar_type_of<T>(), "key_prep", "a", k0.sizes());
  check_f32(k_k, "key_prep", "k_k", {k0.size(1)});
  check_f32(k_a, "key_prep", "k_a", {k0.size(1)});
  return Key<T>{H, k0.size(1) / H, rows_in<T>(k0), rows_in<T>(a), k_k.data_ptr<float>(), k_a.data_ptr<float>()};
}

template <typename T>
std::vector<at::Tensor> key_forward_op(const at::Tensor& k0, const at::Tensor& a, const at::Tensor& k_k,
                                       const at::Tensor& k_a, int64_t H) {
  const Key<T> p = make_key<T>(k0, a, k_k, k_a, H);
  auto k = at::empty_like(k0), nkk = at::empty_like(k0), kka = at::empty_like(k0);
  const int64_t rows = k0.size(0);
  at::parallel_for(0, n_blocks(rows), 1, [&](int64_t b0, int64_t b1) {
    key_forward_rows(p, b0 * kBlock, std::min(b1 * kBlock, rows), rows_out<T>(k), rows_out<T>(nkk), rows_out<T>(kka));
  });
  return {k, nkk, kka};
}

template <typename T>
std::vector<at::Tensor> key_backward_op(const at::Tensor& gk, const at::Tensor& gnkk, const at::Tensor& gkka,
                                        const at::Tensor& k0, const at::Tensor& a, const at::Tensor& k_k,
                                        const at::Tensor& k_a, int64_t H, bool want_params) {
  const Key<T> p = make_key<T>(k0, a, k_k, k_a, H);
  for (const auto* t : {&gk, &gnkk, &gkka})
    if (t->numel()) check_rows(*t, scalar_type_of<T>(), "key_prep", "gradient", k0.sizes());
  const int64_t rows = k0.size(0), C = k0.size(1), nb = n_blocks(rows);
  auto gk0 = at::empty_like(k0), ga = at::empty_like(k0);
  const auto f32 = k0.options().dtype(at::kFloat);
  auto part = want_params ? at::zeros({nb, 2, C}, f32) : at::empty({0}, f32);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(2 * p.N);
    for (int64_t b = b0; b < b1; ++b) {
      float* pb = want_params ? part.data_ptr<float>() + b * 2 * C : nullptr;
      key_backward_rows(p, rows_in<T>(gk), rows_in<T>(gnkk), rows_in<T>(gkka), b * kBlock,
                        std::min((b + 1) * kBlock, rows), rows_out<T>(gk0), rows_out<T>(ga), pb, pb ? pb + C : nullptr,
                        scratch.data());
    }
  });
  return {gk0, ga, sum_blocks(part)};
}

template <typename TI>
Out<TI> make_out(const std::vector<at::Tensor>& yrkvg, const at::Tensor& gn_w, const at::Tensor& gn_b,
                 const at::Tensor& r_k, int64_t H, double eps) {
  TORCH_CHECK(yrkvg.size() == 5, "wkv_output: expected y, r, k, v, g");
  const auto& y = yrkvg[0];
  TORCH_CHECK(y.dim() == 2 && H > 0 && y.size(1) % H == 0, "wkv_output: y must be [rows, H * N]");
  const char* names[5] = {"y", "r", "k", "v", "g"};
  for (int i = 0; i < 5; ++i) check_rows(yrkvg[i], scalar_type_of<TI>(), "wkv_output", names[i], y.sizes());
  for (const auto* t : {&gn_w, &gn_b, &r_k}) check_f32(*t, "wkv_output", "parameter", {y.size(1)});
  return Out<TI>{H,
                 y.size(1) / H,
                 float(eps),
                 rows_in<TI>(y),
                 rows_in<TI>(yrkvg[1]),
                 rows_in<TI>(yrkvg[2]),
                 rows_in<TI>(yrkvg[3]),
                 rows_in<TI>(yrkvg[4]),
                 gn_w.data_ptr<float>(),
                 gn_b.data_ptr<float>(),
                 r_k.data_ptr<float>()};
}

template <typename TI, typename TO>
std::vector<at::Tensor> out_forward_op(const std::vector<at::Tensor>& yrkvg, const at::Tensor& gn_w,
                                       const at::Tensor& gn_b, const at::Tensor& r_k, int64_t H, double eps) {
  const Out<TI> p = make_out<TI>(yrkvg, gn_w, gn_b, r_k, H, eps);
  const int64_t rows = yrkvg[0].size(0);
  at::Tensor o = at::empty_like(yrkvg[0], yrkvg[0].options().dtype(scalar_type_of<TO>()));
  at::Tensor stats = at::empty({rows, H, 3}, o.options().dtype(at::kFloat));
  at::parallel_for(0, n_blocks(rows), 1, [&](int64_t b0, int64_t b1) {
    out_forward_rows(p, b0 * kBlock, std::min(b1 * kBlock, rows), rows_out<TO>(o), stats.data_ptr<float>());
  });
  return {o, stats};
}

template <typename TI, typename TO>
std::vector<at::Tensor> out_backward_op(const at::Tensor& go, const std::vector<at::Tensor>& yrkvg,
                                        const at::Tensor& stats, const at::Tensor& gn_w, const at::Tensor& gn_b,
                                        const at::Tensor& r_k, int64_t H, double eps, bool want_params) {
  const Out<TI> p = make_out<TI>(yrkvg, gn_w, gn_b, r_k, H, eps);
  const int64_t rows = yrkvg[0].size(0), C = yrkvg[0].size(1), nb = n_blocks(rows);
  check_rows(go, scalar_type_of<TO>(), "wkv_output", "gradient", {rows, C});
  check_f32(stats, "wkv_output", "stats", {rows, H, 3});
  std::vector<at::Tensor> out;
  for (int i = 0; i < 5; ++i) out.push_back(at::empty_like(yrkvg[0]));
  const auto f32 = go.options().dtype(at::kFloat);
  out.push_back(want_params ? at::zeros({nb, 3, C}, f32) : at::empty({0}, f32));
  std::vector<TI*> gin;
  for (int i = 0; i < 5; ++i) gin.push_back(rows_out<TI>(out[i]));
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      out_backward_rows(p, rows_in<TO>(go), stats.data_ptr<float>(), b * kBlock, std::min((b + 1) * kBlock, rows),
                        gin, want_params ? out[5].data_ptr<float>() + b * 3 * C : nullptr);
  });
  out[5] = sum_blocks(out[5]);
  return out;
}

// The (rows, output) dtypes of wkv_output: (fp32, fp32), (bf16, bf16) or (bf16, fp32).
void check_out_dtypes(at::ScalarType ti, at::ScalarType to) {
  TORCH_CHECK(to == at::kFloat || to == ti, "wkv_output: the output must be fp32 or the rows' dtype");
}

}  // namespace

// k0, a [rows, C] (fp32 or bf16, the same); k_k, k_a [C] fp32 -> [k, -kk, kk a], each [rows, C] in k0's dtype.
std::vector<at::Tensor> key_prep_forward(const at::Tensor& k0, const at::Tensor& a, const at::Tensor& k_k,
                                            const at::Tensor& k_a, int64_t H) {
  if (rows_dtype(k0, "key_prep") == at::kBFloat16) return key_forward_op<bf16>(k0, a, k_k, k_a, H);
  return key_forward_op<float>(k0, a, k_k, k_a, H);
}

// gk, gnkk, gkka [rows, C] in k0's dtype or empty (zero) -> [gk0, ga (k0's dtype), [2, C] fp32 (the gradients
// of k_k, k_a) or empty].
std::vector<at::Tensor> key_prep_backward(const at::Tensor& gk, const at::Tensor& gnkk,
                                             const at::Tensor& gkka, const at::Tensor& k0, const at::Tensor& a,
                                             const at::Tensor& k_k, const at::Tensor& k_a, int64_t H,
                                             bool want_params) {
  if (rows_dtype(k0, "key_prep") == at::kBFloat16)
    return key_backward_op<bf16>(gk, gnkk, gkka, k0, a, k_k, k_a, H, want_params);
  return key_backward_op<float>(gk, gnkk, gkka, k0, a, k_k, k_a, H, want_params);
}

// yrkvg: [y, r, k, v, g], each [rows, C] (fp32 or bf16, the same); gn_w, gn_b, r_k [C] fp32; out_fp32: the
// output in fp32 (else in the rows' dtype) -> [o [rows, C], stats [rows, H, 3] fp32].
std::vector<at::Tensor> wkv_output_forward(const std::vector<at::Tensor>& yrkvg, const at::Tensor& gn_w,
                                              const at::Tensor& gn_b, const at::Tensor& r_k, int64_t H,
                                              double eps, bool out_fp32) {
  TORCH_CHECK(!yrkvg.empty(), "wkv_output: expected y, r, k, v, g");
  if (rows_dtype(yrkvg[0], "wkv_output") == at::kFloat) return out_forward_op<float, float>(yrkvg, gn_w, gn_b, r_k, H, eps);
  if (out_fp32) return out_forward_op<bf16, float>(yrkvg, gn_w, gn_b, r_k, H, eps);
  return out_forward_op<bf16, bf16>(yrkvg, gn_w, gn_b, r_k, H, eps);
}

// go [rows, C] in the output's dtype -> [gy, gr, gk, gv, gg (the rows' dtype), [3, C] fp32 (the gradients of gn_w,
// gn_b, r_k) or empty].
std::vector<at::Tensor> wkv_output_backward(const at::Tensor& go, const std::vector<at::Tensor>& yrkvg,
                                               const at::Tensor& stats, const at::Tensor& gn_w,
                                               const at::Tensor& gn_b, const at::Tensor& r_k, int64_t H,
                                               double eps, bool want_params) {
  TORCH_CHECK(!yrkvg.empty(), "wkv_output: expected y, r, k, v, g");
  const auto ti = rows_dtype(yrkvg[0], "wkv_output"), to = go.scalar_type();
  check_out_dtypes(ti, to);
  if (ti == at::kFloat) return out_backward_op<float, float>(go, yrkvg, stats, gn_w, gn_b, r_k, H, eps, want_params);
  if (to == at::kFloat) return out_backward_op<bf16, float>(go, yrkvg, stats, gn_w, gn_b, r_k, H, eps, want_params);
  return out_backward_op<bf16, bf16>(go, yrkvg, stats, gn_w, gn_b, r_k, H, eps, want_params);
}
