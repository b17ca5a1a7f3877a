// The token shift's lerps on CPU, fused (TimeMix's six and ChannelMix's one), and ChannelMix's relu^2:
// one pass forward and one backward each. Formulas, gradients and the torch reference they must equal are
// in peft_rwkv7/ops/timemix.py and peft_rwkv7/ops/pointwise.py.
//
//   token_mix     out[m] = x + (x_prev - x) * mix[m]      (x_prev: the token before, prev[b] or 0 at t = 0)
//   relu_square   y = relu(x)^2, and its gradient g * sqrt(y) * 2 (torch's relu(x) ** 2 bit for bit where y is
//                 a normal float or x <= 0); bf16: y rounded once, the gradient (g relu(x)) 2 from x
//
// Rows (tokens) are split over torch's threads in blocks of kBlock rows (cpu_rows.h); the per-row
// functions are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (WKV_CLONES).
// The rows (x, the outputs and their gradients) are fp32 or bf16 (cpu_bf16.h).

#include "cpu_aten.h"


#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_bf16.h"
#include "cpu_rows.h"
#include "wkv7_cpu_simd.h"

namespace {

// ---- token_mix ---------------------------------------------------------------------------------------

// T: the rows' element type (x, prev, the outputs, their gradients and gx); mix and the sums are fp32.
template <typename T>
struct Mix {
  int64_t T_, C, M, rows;
  const T *x, *prev, *zeros;
  const float* mix;
};

// The previous token's row of `row` (prev[b] or zeros at t = 0).
template <typename T>
WKV_INLINE const T* prev_row(const Mix<T>& p, int64_t row) {
  if (row % p.T_) return p.x + (row - 1) * p.C;
  return p.prev ? p.prev + (row / p.T_) * p.C : p.zeros;
}

template <typename T>
WKV_INLINE void mix_forward(const Mix<T>& p, int64_t r0, int64_t r1, const std::vector<T*>& out) {
  const int64_t C = p.C;
  for (int64_t row = r0; row < r1; ++row) {
    const T* x = p.x + row * C;
    const T* xp = prev_row(p, row);
    for (int64_t m = 0; m < p.M; ++m) {
      const float* mx = p.mix + m * C;
      T* o = out[m] + row * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) st(&o[c], ld(x[c]) + (ld(xp[c]) - ld(x[c])) * mx[c]);
    }
  }
}

WKV_CLONES void mix_forward_rows(const Mix<float>& p, int64_t r0, int64_t r1, const std::vector<float*>& out) {
  mix_forward(p, r0, r1, out);
}
WKV_CLONES void mix_forward_rows(const Mix<bf16>& p, int64_t r0, int64_t r1, const std::vector<bf16*>& out) {
  mix_forward(p, r0, r1, out);
}

// s_row = sum_m g_m mix_m (the gradient of x_prev - x at `row`), written to s.
template <typename T>
WKV_INLINE void mix_s(const Mix<T>& p, const std::vector<const T*>& g, int64_t row, float* s) {
  const int64_t C = p.C;
  std::fill(s, s + C, 0.f);
  for (int64_t m = 0; m < p.M; ++m) {
    if (!g[m]) continue;
    const T* gm = g[m] + row * C;
    const float* mx = p.mix + m * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) s[c] += ld(gm[c]) * mx[c];
  }
}

// gx[t] = sum_m g_m[t] - s[t] + s[t + 1] (the next token's shift reads this one), gprev[b] = s[b, 0],
// gmix[m] (this block's partial) = sum_t g_m[t] (x_prev - x)[t]. Rows walk backwards keeping s[t + 1].
// gx is summed in fp32 (scratch row `acc`) and stored once. scratch: [3 C].
template <typename T>
WKV_INLINE void mix_backward(const Mix<T>& p, const std::vector<const T*>& g, int64_t r0, int64_t r1, T* gx,
                             float* gprev, float* gmix, float* scratch) {
  const int64_t C = p.C;
  float* s = scratch;
  float* s_next = scratch + C;
  float* acc = scratch + 2 * C;
  bool have_next = r1 % p.T_ != 0 && r1 < p.rows;
  if (have_next) mix_s(p, g, r1, s_next);
  for (int64_t row = r1 - 1; row >= r0; --row) {
    mix_s(p, g, row, s);
    if (gx) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) acc[c] = have_next ? s_next[c] - s[c] : -s[c];
      for (int64_t m = 0; m < p.M; ++m) {
        if (!g[m]) continue;
        const T* gm = g[m] + row * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) acc[c] += ld(gm[c]);
      }
      T* o = gx + row * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) st(&o[c], acc[c]);
    }
    if (gprev && row % p.T_ == 0) std::copy(s, s + C, gprev + (row / p.T_) * C);
    if (gmix) {
      const T* x = p.x + row * C;
      const T* xp = prev_row(p, row);
      for (int64_t m = 0; m < p.M; ++m) {
        if (!g[m]) continue;
        const T* gm = g[m] + row * C;
        float* a = gmix + m * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) a[c] += ld(gm[c]) * (ld(xp[c]) - ld(x[c]));
      }
    }
    std::swap(s, s_next);
    have_next = row % p.T_ != 0;  // the row before is in the same sequence
  }
}

WKV_CLONES void mix_backward_rows(const Mix<float>& p, const std::vector<const float*>& g, int64_t r0, int64_t r1,
                                  float* gx, float* gprev, float* gmix, float* scratch) {
  mix_backward(p, g, r0, r1, gx, gprev, gmix, scratch);
}
WKV_CLONES void mix_backward_rows(const Mix<bf16>& p, const std::vector<const bf16*>& g, int64_t r0, int64_t r1,
                                  bf16* gx, float* gprev, float* gmix, float* scratch) {
  mix_backward(p, g, r0, r1, gx, gprev, gmix, scratch);
}

// `zeros` [C] (x's dtype): the row before each sequence's first token where there is no `prev`.
template <typename T>
Mix<T> make_mix(const at::Tensor& x, const at::Tensor& prev, const at::Tensor& mix, const at::Tensor& zeros) {
  TORCH_CHECK(x.dim() == 3 && mix.dim() == 2, "token_mix: x must be [B, T, C] and mix [M, C]");
  const int64_t B = x.size(0), T_ = x.size(1), C = x.size(2), M = mix.size(0);
  const auto dt = scalar_type_of<T>();
  check_rows(x, dt, "token_mix", "x", {B, T_, C});
  check_f32(mix, "token_mix", "mix", {M, C});
  if (rows_in<T>(prev)) check_rows(prev, dt, "token_mix", "prev", {B, C});
  return Mix<T>{T_, C, M, B * T_, rows_in<T>(x), rows_in<T>(prev), rows_in<T>(zeros), mix.data_ptr<float>()};
}

template <typename T>
std::vector<at::Tensor> mix_forward_op(const at::Tensor& x, const at::Tensor& prev, const at::Tensor& mix) {
  const auto zeros = at::zeros({x.size(-1)}, x.options());
  const Mix<T> p = make_mix<T>(x, prev, mix, zeros);
  std::vector<at::Tensor> out;
  std::vector<T*> ptrs;
  for (int64_t m = 0; m < p.M; ++m) {
    out.push_back(at::empty_like(x));
    ptrs.push_back(rows_out<T>(out.back()));
  }
  at::parallel_for(0, n_blocks(p.rows), 1, [&](int64_t b0, int64_t b1) {
    mix_forward_rows(p, b0 * kBlock, std::min(b1 * kBlock, p.rows), ptrs);
  });
  return out;
}

template <typename T>
std::vector<at::Tensor> mix_backward_op(const std::vector<at::Tensor>& grads, const at::Tensor& x_in,
                                        const at::Tensor& prev, const at::Tensor& mix, const at::Tensor& x,
                                        bool want_x, bool want_prev, bool want_mix) {
  const auto zeros = at::zeros({x.size(-1)}, x.options());
  Mix<T> p = make_mix<T>(x, prev, mix, zeros);
  if (!x_in.numel()) p.x = nullptr;  // never read without want_mix
  std::vector<const T*> g(p.M);
  for (int64_t m = 0; m < p.M; ++m) {
    if (grads[m].numel()) check_rows(grads[m], scalar_type_of<T>(), "token_mix", "gradient", x.sizes());
    g[m] = rows_in<T>(grads[m]);
  }
  const int64_t B = x.size(0), rows = B * x.size(1), nb = n_blocks(rows);
  const auto f32 = x.options().dtype(at::kFloat);
  auto gx = want_x ? at::empty_like(x) : at::empty({0}, x.options());
  auto gprev = want_prev ? at::zeros({B, p.C}, f32) : at::empty({0}, f32);
  auto gmix = want_mix ? at::zeros({nb, p.M, p.C}, f32) : at::empty({0}, f32);
  T* pgx = rows_out<T>(gx);
  float *pgprev = out_or_null(gprev), *pgmix = out_or_null(gmix);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(3 * p.C);
    for (int64_t b = b0; b < b1; ++b)
      mix_backward_rows(p, g, b * kBlock, std::min((b + 1) * kBlock, rows), pgx, pgprev,
                        pgmix ? pgmix + b * p.M * p.C : nullptr, scratch.data());
  });
  return {gx, gprev, sum_blocks(gmix)};
}

}  // namespace

// x [B, T, C] (fp32 or bf16), prev [B, C] (x's dtype) or empty (zeros), mix [M, C] fp32 -> M tensors
// [B, T, C] in x's dtype.
std::vector<at::Tensor> token_mix_forward(const at::Tensor& x, const at::Tensor& prev, const at::Tensor& mix) {
  if (rows_dtype(x, "token_mix") == at::kBFloat16) return mix_forward_op<bf16>(x, prev, mix);
  return mix_forward_op<float>(x, prev, mix);
}

// grads: M tensors [B, T, C] in x's dtype (empty = zero). Returns [gx (x's dtype), gprev [B, C] fp32, gmix [M, C]
// fp32], each empty where its flag is off. x and prev are read only for gmix: without want_mix x may be empty
// (the caller then need not keep it), and the shape and dtype come from a gradient.
std::vector<at::Tensor> token_mix_backward(const std::vector<at::Tensor>& grads, const at::Tensor& x_in,
                                              const at::Tensor& prev, const at::Tensor& mix,
                                              bool want_x, bool want_prev, bool want_mix) {
  TORCH_CHECK(int64_t(grads.size()) == mix.size(0), "token_mix: expected one gradient per mix row");
  TORCH_CHECK(x_in.numel() || !want_mix, "token_mix: the mix gradient needs x");
  const at::Tensor* like = &x_in;
  for (const auto& gm : grads)
    if (!like->numel() && gm.numel()) like = &gm;
  const at::Tensor& x = *like;
  TORCH_CHECK(x.numel(), "token_mix: neither x nor any gradient given");
  if (rows_dtype(x, "token_mix") == at::kBFloat16)
    return mix_backward_op<bf16>(grads, x_in, prev, mix, x, want_x, want_prev, want_mix);
  return mix_backward_op<float>(grads, x_in, prev, mix, x, want_x, want_prev, want_mix);
}

// ---- relu_square -------------------------------------------------------------------------------------
// relu keeps NaN as torch's does; the square and the gradient (g r) 2 are the same roundings as torch's
// relu(x) ** 2 and its backward (doubling is exact), and the same bits, signed zeros and NaN included.
// The fp32 backward reads the forward's output y, not x: r = sqrt(y) is relu(x) exactly wherever y is a normal
// float (a correctly rounded square root of a correctly rounded square returns the number squared in binary
// floating point; checked over every such fp32 in tests/ops/test_pointwise.py), so the caller keeps y, which
// LoRA's ffn.value keeps anyway as its input, instead of a second [tokens, 4C] buffer. Where x > 0 squares
// below FLT_MIN (x < 1.08e-19) r is off or 0: the gradient differs from torch's by less than 2.2e-19 |g|.

namespace {

// relu as a bit mask (x where x >= 0 or NaN, +0 where x < 0). Written as `r = x < 0 ? 0 : x; r * r`, GCC
// sinks the multiply into a branch (a multiply may trap under -ftrapping-math, so it is not run where its
// result is unused), and without AVX-512's masked multiply the loop stays scalar with a branch per element:
// mispredicted on random signs, 12x slower on an AVX2 CPU. Integer bits and an unconditional multiply
// vectorise everywhere; same values (-0 stays -0, as torch's relu keeps it).
WKV_INLINE float relu_bits(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits &= x < 0.f ? 0 : -1;
  float r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

// T: fp32, or bf16 read and written in place (the square in fp32, rounded once: torch's bf16 r * r).
template <typename T>
WKV_CLONES void relu_square_rows(const T* x, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float r = relu_bits(ld(x[i]));
    st(out + i, r * r);
  }
}

WKV_CLONES void relu_square_grad_rows(const float* g, const float* y, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    // (g r) 2 with r = sqrt(y) where y > 0 or NaN, +0 where y = +0 (x <= 0): torch's threshold_backward
    // gives +0 there whatever g's sign (the same bit mask as above, so the same bits as torch). The square
    // root is the CPU's correctly rounded instruction (built with -fno-math-errno, so it vectorises).
    const float d = (g[i] * std::sqrt(y[i])) * 2.f;
    int32_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    bits &= y[i] <= 0.f ? 0 : -1;
    std::memcpy(&out[i], &bits, sizeof bits);
  }
}

// bf16: the gradient from x, as torch's ops on bf16 give it (ops/pointwise.py _ReluSquare): g r rounded to
// bf16, then doubled and rounded again (exact but where it overflows). A bf16 y cannot give relu(x) back (r^2
// was rounded), so the bf16 op keeps x, which takes as much memory as the r that torch's path keeps.
WKV_CLONES void relu_square_grad_x_rows(const bf16* g, const bf16* x, bf16* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    bf16 gr;
    st(&gr, ld(g[i]) * relu_bits(ld(x[i])));
    st(out + i, ld(gr) * 2.f);
  }
}

constexpr int64_t kGrain = 1 << 14;  // elements per work item

}  // namespace

template <typename T>
at::Tensor relu_square_forward_op(const at::Tensor& x) {
  check_rows(x, scalar_type_of<T>(), "relu_square", "x", x.sizes());
  auto out = at::empty_like(x);
  const T* px = rows_in<T>(x);
  T* po = rows_out<T>(out);
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) { relu_square_rows(px + b, po + b, e - b); });
  return out;
}

at::Tensor relu_square_forward(const at::Tensor& x) {
  if (rows_dtype(x, "relu_square") == at::kBFloat16) return relu_square_forward_op<bf16>(x);
  return relu_square_forward_op<float>(x);
}

at::Tensor relu_square_backward(const at::Tensor& g, const at::Tensor& y) {
  check_f32(y, "relu_square", "y", y.sizes());
  check_f32(g, "relu_square", "gradient", y.sizes());
  auto out = at::empty_like(y);
  const float *pg = g.data_ptr<float>(), *py = y.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, y.numel(), kGrain,
                   [&](int64_t b, int64_t e) { relu_square_grad_rows(pg + b, py + b, po + b, e - b); });
  return out;
}

at::Tensor relu_square_backward_x(const at::Tensor& g, const at::Tensor& x) {
  check_rows(x, at::kBFloat16, "relu_square", "x", x.sizes());
  check_rows(g, at::kBFloat16, "relu_square", "gradient", x.sizes());
  auto out = at::empty_like(x);
  const bf16 *pg = rows_in<bf16>(g), *px = rows_in<bf16>(x);
  bf16* po = rows_out<bf16>(out);
  at::parallel_for(0, x.numel(), kGrain,
                   [&](int64_t b, int64_t e) { relu_square_grad_x_rows(pg + b, px + b, po + b, e - b); });
  return out;
}
