// TimeMix's element-wise chains on CPU, fused: each one pass over [tokens, C] forward and one backward,
// where torch's autograd takes 8-20 passes for the same formulas (issue 23's profile). The formulas,
// their gradients and the torch reference they must equal are in peft_rwkv7/ops/timemix.py.
//
//   key_prep    kk = normalize(k0 * k_k) per head, k = k0 ((1 - k_a) + a k_a), out -kk and kk a
//   wkv_output  o = (group_norm(y) + (sum_n r k r_k) v) * g  (per head: ln_x, the bonus, the gate)
//
// Rows (tokens) are split over torch's threads in blocks of kBlock rows. Parameter gradients are sums
// over rows: each block writes its own partial sum, which the caller adds in block order, so results
// never depend on the number of threads. Everything is fp32 and contiguous; the per-row functions are
// compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (WKV_CLONES).

#include "cpu_aten.h"


#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_rows.h"
#include "wkv7_cpu_simd.h"

namespace {

// ---- key_prep ----------------------------------------------------------------------------------------

struct Key {
  int64_t H, N;
  const float *k0, *a, *k_k, *k_a;
};

constexpr float kNormEps = 1e-12f;  // F.normalize's default eps

// |k0 k_k| over one head's N values (the norm F.normalize divides by, before its eps clamp).
WKV_INLINE float head_norm(const float* k0, const float* k_k, int64_t N) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t n = 0; n < N; ++n) ss += (k0[n] * k_k[n]) * (k0[n] * k_k[n]);
  return std::sqrt(ss);
}

WKV_CLONES void key_forward_rows(const Key& p, int64_t r0, int64_t r1, float* k, float* nkk, float* kka) {
  const int64_t N = p.N, C = p.H * p.N;
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t o = row * C + h * N, q = h * N;
      const float *k0 = p.k0 + o, *a = p.a + o, *k_k = p.k_k + q, *k_a = p.k_a + q;
      const float den = std::max(head_norm(k0, k_k, N), kNormEps);
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        const float kk = (k0[n] * k_k[n]) / den;
        nkk[o + n] = -kk;
        kka[o + n] = kk * a[n];
        k[o + n] = k0[n] * ((1.f - k_a[n]) + a[n] * k_a[n]);
      }
    }
  }
}

// gkk = gkka a - gnkk; gkr = (gkk - kk (kk . gkk)) / den (norm >= eps; gkk / den below it, where the clamp
// holds the norm); gk0 = gk ((1 - k_a) + a k_a) + gkr k_k; ga = gkka kk + gk k0 k_a;
// partials: gk_k += gkr k0, gk_a += gk k0 (a - 1).
// kAll: gk, gnkk and gkka are all given (the model's case). The loops then hold no test on a pointer: GCC
// if-converts a load under such a test only with AVX-512's masked loads, and on AVX2 or baseline x86-64 the
// whole loop stayed scalar (0.1B ctx 512 on an AVX2 CPU: 0.66 ms a layer, 5x the forward). The parameter
// partials are their own loops for the same reason. Same operations in the same order either way.
template <bool kAll>
WKV_INLINE void key_backward_head(const Key& p, const float* gk, const float* gnkk, const float* gkka, int64_t o,
                                  int64_t q, float* gk0, float* ga, float* gk_k, float* gk_a, float* gkk,
                                  float* gkr) {
  const int64_t N = p.N;
  const float *k0 = p.k0 + o, *a = p.a + o, *k_k = p.k_k + q, *k_a = p.k_a + q;
  const float norm = head_norm(k0, k_k, N);
  const float den = std::max(norm, kNormEps);
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t n = 0; n < N; ++n) {
    const float g = ((kAll || gkka) ? gkka[o + n] * a[n] : 0.f) - ((kAll || gnkk) ? gnkk[o + n] : 0.f);
    gkk[n] = g;
    dot += g * ((k0[n] * k_k[n]) / den);
  }
  if (!(norm >= kNormEps)) dot = 0.f;
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    const float kk = (k0[n] * k_k[n]) / den;
    gkr[n] = (gkk[n] - kk * dot) / den;
    const float gkn = (kAll || gk) ? gk[o + n] : 0.f;
    gk0[o + n] = gkn * ((1.f - k_a[n]) + a[n] * k_a[n]) + gkr[n] * k_k[n];
    ga[o + n] = ((kAll || gkka) ? gkka[o + n] * kk : 0.f) + gkn * k0[n] * k_a[n];
  }
  if (gk_k) {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) gk_k[q + n] += gkr[n] * k0[n];
  }
  if (gk_a) {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) gk_a[q + n] += ((kAll || gk) ? gk[o + n] : 0.f) * k0[n] * (a[n] - 1.f);
  }
}

// scratch: [2 N]
WKV_CLONES void key_backward_rows(const Key& p, const float* gk, const float* gnkk, const float* gkka, int64_t r0,
                                  int64_t r1, float* gk0, float* ga, float* gk_k, float* gk_a, float* scratch) {
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

// ---- wkv_output --------------------------------------------------------------------------------------

struct Out {
  int64_t H, N;
  float eps;
  const float *y, *r, *k, *v, *g, *gn_w, *gn_b, *r_k;
};

// stats per (row, head): mean, rstd and the bonus scale sum_n r k r_k.
WKV_CLONES void out_forward_rows(const Out& p, int64_t r0, int64_t r1, float* o, float* stats) {
  const int64_t N = p.N, C = p.H * p.N;
  const float inv_n = 1.f / float(N);
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t i = row * C + h * N, q = h * N;
      const float *y = p.y + i, *r = p.r + i, *k = p.k + i, *v = p.v + i, *g = p.g + i;
      // the parameters through local pointers: read through `p` inside a loop that stores floats, GCC
      // reloads the pointer every iteration (the store might change it) and does not vectorise on AVX2
      const float *gn_w = p.gn_w + q, *gn_b = p.gn_b + q, *r_k = p.r_k + q;
      float sum = 0.f, bs = 0.f;
#pragma omp simd reduction(+ : sum, bs)
      for (int64_t n = 0; n < N; ++n) {
        sum += y[n];
        bs += r[n] * k[n] * r_k[n];
      }
      const float mean = sum * inv_n;
      float var = 0.f;
#pragma omp simd reduction(+ : var)
      for (int64_t n = 0; n < N; ++n) var += (y[n] - mean) * (y[n] - mean);
      const float rstd = 1.f / std::sqrt(var * inv_n + p.eps);
#pragma omp simd
      for (int64_t n = 0; n < N; ++n)
        o[i + n] = (((y[n] - mean) * rstd) * gn_w[n] + gn_b[n] + bs * v[n]) * g[n];
      float* st = stats + (row * p.H + h) * 3;
      st[0] = mean;
      st[1] = rstd;
      st[2] = bs;
    }
  }
}

// gz = go g; gg = go (z + bs v); gv = gz bs; gbs = sum gz v; gr = gbs k r_k; gk = gbs r r_k;
// gy = rstd (gyn - mean(gyn) - yn mean(gyn yn)) with gyn = gz gn_w;
// partials: ggn_w += gz yn, ggn_b += gz, gr_k += gbs r k.
WKV_CLONES void out_backward_rows(const Out& p, const float* go, const float* stats, int64_t r0, int64_t r1,
                                  const std::vector<float*>& gin, float* part) {
  const int64_t N = p.N, C = p.H * p.N;
  const float inv_n = 1.f / float(N);
  float *gy = gin[0], *gr = gin[1], *gk = gin[2], *gv = gin[3], *gg = gin[4];
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t i = row * C + h * N, q = h * N;
      const float *y = p.y + i, *r = p.r + i, *k = p.k + i, *v = p.v + i, *g = p.g + i, *d = go + i;
      const float* st = stats + (row * p.H + h) * 3;
      const float mean = st[0], rstd = st[1], bs = st[2];
      const float *gn_w = p.gn_w + q, *gn_b = p.gn_b + q, *r_k = p.r_k + q;
      float gbs = 0.f, m1 = 0.f, m2 = 0.f;
#pragma omp simd reduction(+ : gbs, m1, m2)
      for (int64_t n = 0; n < N; ++n) {
        const float gz = d[n] * g[n];
        const float yn = (y[n] - mean) * rstd;
        gbs += gz * v[n];
        m1 += gz * gn_w[n];
        m2 += gz * gn_w[n] * yn;
      }
      m1 *= inv_n;
      m2 *= inv_n;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        const float gz = d[n] * g[n];
        const float yn = (y[n] - mean) * rstd;
        gy[i + n] = rstd * (gz * gn_w[n] - m1 - yn * m2);
        gg[i + n] = d[n] * ((yn * gn_w[n] + gn_b[n]) + bs * v[n]);
        gv[i + n] = gz * bs;
        gr[i + n] = gbs * k[n] * r_k[n];
        gk[i + n] = gbs * r[n] * r_k[n];
      }
      if (part) {  // a loop of its own: a test on a pointer inside the loop above keeps it scalar on AVX2
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          const float gz = d[n] * g[n];
          const float yn = (y[n] - mean) * rstd;
          part[q + n] += gz * yn;
          part[C + q + n] += gz;
          part[2 * C + q + n] += gbs * r[n] * k[n];
        }
      }
    }
  }
}

}  // namespace

Key make_key(const at::Tensor& k0, const at::Tensor& a, const at::Tensor& k_k, const at::Tensor& k_a,
             int64_t H) {
  TORCH_CHECK(k0.dim() == 2 && H > 0 && k0.size(1) % H == 0, "key_prep: k0 must be [rows, H * N]");
  check_f32(k0, "key_prep", "k0", k0.sizes());
  check_f32(a, "key_prep", "a", k0.sizes());
  check_f32(k_k, "key_prep", "k_k", {k0.size(1)});
  check_f32(k_a, "key_prep", "k_a", {k0.size(1)});
  return Key{H, k0.size(1) / H, k0.data_ptr<float>(), a.data_ptr<float>(), k_k.data_ptr<float>(),
             k_a.data_ptr<float>()};
}

// k0, a [rows, C]; k_k, k_a [C] -> [k, -kk, kk a], each [rows, C].
std::vector<at::Tensor> key_prep_forward(const at::Tensor& k0, const at::Tensor& a, const at::Tensor& k_k,
                                            const at::Tensor& k_a, int64_t H) {
  const Key p = make_key(k0, a, k_k, k_a, H);
  auto k = at::empty_like(k0), nkk = at::empty_like(k0), kka = at::empty_like(k0);
  const int64_t rows = k0.size(0);
  at::parallel_for(0, n_blocks(rows), 1, [&](int64_t b0, int64_t b1) {
    key_forward_rows(p, b0 * kBlock, std::min(b1 * kBlock, rows), k.data_ptr<float>(), nkk.data_ptr<float>(),
                     kka.data_ptr<float>());
  });
  return {k, nkk, kka};
}

// gk, gnkk, gkka [rows, C] or empty (zero) -> [gk0, ga, [2, C] (the gradients of k_k, k_a) or empty].
std::vector<at::Tensor> key_prep_backward(const at::Tensor& gk, const at::Tensor& gnkk,
                                             const at::Tensor& gkka, const at::Tensor& k0, const at::Tensor& a,
                                             const at::Tensor& k_k, const at::Tensor& k_a, int64_t H,
                                             bool want_params) {
  const Key p = make_key(k0, a, k_k, k_a, H);
  for (const auto* t : {&gk, &gnkk, &gkka})
    if (t->numel()) check_f32(*t, "key_prep", "gradient", k0.sizes());
  const int64_t rows = k0.size(0), C = k0.size(1), nb = n_blocks(rows);
  auto gk0 = at::empty_like(k0), ga = at::empty_like(k0);
  auto part = want_params ? at::zeros({nb, 2, C}, k0.options()) : at::empty({0}, k0.options());
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(2 * p.N);
    for (int64_t b = b0; b < b1; ++b) {
      float* pb = want_params ? part.data_ptr<float>() + b * 2 * C : nullptr;
      key_backward_rows(p, ptr_or_null(gk), ptr_or_null(gnkk), ptr_or_null(gkka), b * kBlock,
                        std::min((b + 1) * kBlock, rows), gk0.data_ptr<float>(), ga.data_ptr<float>(), pb,
                        pb ? pb + C : nullptr, scratch.data());
    }
  });
  return {gk0, ga, sum_blocks(part)};
}

Out make_out(const std::vector<at::Tensor>& yrkvg, const at::Tensor& gn_w, const at::Tensor& gn_b,
             const at::Tensor& r_k, int64_t H, double eps) {
  TORCH_CHECK(yrkvg.size() == 5, "wkv_output: expected y, r, k, v, g");
  const auto& y = yrkvg[0];
  TORCH_CHECK(y.dim() == 2 && H > 0 && y.size(1) % H == 0, "wkv_output: y must be [rows, H * N]");
  const char* names[5] = {"y", "r", "k", "v", "g"};
  for (int i = 0; i < 5; ++i) check_f32(yrkvg[i], "wkv_output", names[i], y.sizes());
  for (const auto* t : {&gn_w, &gn_b, &r_k}) check_f32(*t, "wkv_output", "parameter", {y.size(1)});
  return Out{H,
             y.size(1) / H,
             float(eps),
             y.data_ptr<float>(),
             yrkvg[1].data_ptr<float>(),
             yrkvg[2].data_ptr<float>(),
             yrkvg[3].data_ptr<float>(),
             yrkvg[4].data_ptr<float>(),
             gn_w.data_ptr<float>(),
             gn_b.data_ptr<float>(),
             r_k.data_ptr<float>()};
}

// yrkvg: [y, r, k, v, g], each [rows, C]; gn_w, gn_b, r_k [C] -> [o [rows, C], stats [rows, H, 3]].
std::vector<at::Tensor> wkv_output_forward(const std::vector<at::Tensor>& yrkvg, const at::Tensor& gn_w,
                                              const at::Tensor& gn_b, const at::Tensor& r_k, int64_t H,
                                              double eps) {
  const Out p = make_out(yrkvg, gn_w, gn_b, r_k, H, eps);
  const int64_t rows = yrkvg[0].size(0);
  auto o = at::empty_like(yrkvg[0]);
  auto stats = at::empty({rows, H, 3}, o.options());
  at::parallel_for(0, n_blocks(rows), 1, [&](int64_t b0, int64_t b1) {
    out_forward_rows(p, b0 * kBlock, std::min(b1 * kBlock, rows), o.data_ptr<float>(), stats.data_ptr<float>());
  });
  return {o, stats};
}

// -> [gy, gr, gk, gv, gg, [3, C] (the gradients of gn_w, gn_b, r_k) or empty].
std::vector<at::Tensor> wkv_output_backward(const at::Tensor& go, const std::vector<at::Tensor>& yrkvg,
                                               const at::Tensor& stats, const at::Tensor& gn_w,
                                               const at::Tensor& gn_b, const at::Tensor& r_k, int64_t H,
                                               double eps, bool want_params) {
  const Out p = make_out(yrkvg, gn_w, gn_b, r_k, H, eps);
  const int64_t rows = yrkvg[0].size(0), C = yrkvg[0].size(1), nb = n_blocks(rows);
  check_f32(go, "wkv_output", "gradient", {rows, C});
  check_f32(stats, "wkv_output", "stats", {rows, H, 3});
  std::vector<at::Tensor> out;
  for (int i = 0; i < 5; ++i) out.push_back(at::empty_like(go));
  out.push_back(want_params ? at::zeros({nb, 3, C}, go.options()) : at::empty({0}, go.options()));
  std::vector<float*> gin;
  for (int i = 0; i < 5; ++i) gin.push_back(out[i].data_ptr<float>());
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      out_backward_rows(p, go.data_ptr<float>(), stats.data_ptr<float>(), b * kBlock,
                        std::min((b + 1) * kBlock, rows), gin,
                        want_params ? out[5].data_ptr<float>() + b * 3 * C : nullptr);
  });
  out[5] = sum_blocks(out[5]);
  return out;
}
