// TimeMix's two sigmoid gates on CPU, fused: one pass over [tokens, C] forward and one backward, where torch
// takes an add, a sigmoid and (for the value residual) a lerp forward, and five to seven passes backward (the
// lerp's three products, the sigmoid's and the bias's sum). Formulas, gradients and the torch reference they
// must equal are in peft_rwkv7/ops/timemix.py.
//
//   bias_sigmoid    s = sigmoid(p + bias)                          (the in-context learning rate a)
//   value_residual  o = v + (v_first - v) sigmoid(p + bias)       (layers >= 1: v mixed toward layer 0's)
//
// sigmoid(x) and sigmoid(-x) = 1 - sigmoid(x) both come from e = exp(-|x|) <= 1 (cpu_exp.h, as the decay), so the
// value residual's gradient s (1 - s) keeps its relative precision where s rounds to 1. bias_sigmoid's backward
// takes its output s, as torch's sigmoid does (the model keeps s anyway: key_prep reads a). NaN stays NaN.
//
// Rows are split over torch's threads in blocks of kBlock rows; the bias gradient is a sum over rows, one partial
// per block added in block order (cpu_rows.h), so no result depends on the thread count. The rows are fp32 or
// bf16 (cpu_bf16.h: read and written in place, computed in fp32, each result rounded once), the bias and its
// gradient fp32. The per-row functions are compiled for AVX-512, AVX2 and baseline x86-64 (WKV_CLONES).

#include "cpu_aten.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_bf16.h"
#include "cpu_exp.h"
#include "cpu_rows.h"
#include "wkv7_cpu_simd.h"

namespace {

// {sigmoid(x), sigmoid(-x)} (cpu_exp.h), NaN for both where x is NaN.
WKV_INLINE SigmoidPair gate_sigmoid(float x) {
  const int32_t ax = abs_bits(x);
  const SigmoidPair sg = sigmoid_pair(x, ax);
  const float bad = nan_or_zero(ax);
  return {sg.s + bad, sg.s_neg + bad};
}

// T: the rows' element type (p, v, v_first, the outputs and their gradients); the bias and its partials fp32.
template <typename T>
struct Gate {
  int64_t C;
  const T *p, *v, *vf;  // v, vf: the value residual's only
  const float* bias;
};

template <typename T>
WKV_INLINE void sig_forward(const Gate<T>& g, int64_t r0, int64_t r1, T* s) {
  const float* bias = g.bias;
  for (int64_t row = r0; row < r1; ++row) {
    const T* p = g.p + row * g.C;
    T* o = s + row * g.C;
#pragma omp simd
    for (int64_t c = 0; c < g.C; ++c) st(&o[c], gate_sigmoid(ld(p[c]) + bias[c]).s);
  }
}

// The bias's gradient: part (this block's partial sum) += the row gradient gp just written (rounded to T where the
// rows are bf16, as the sum torch's reference makes of its bf16 gradient). Its own loop: a test on a pointer inside
// the row loop keeps that loop scalar on AVX2.
template <typename T>
WKV_INLINE void add_row(const T* gp, int64_t C, float* part) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) part[c] += ld(gp[c]);
}

// gp = go s (1 - s) from the output s, as torch's sigmoid_backward; part (this block's) += gp.
template <typename T>
WKV_INLINE void sig_backward(const T* go, const T* s, int64_t C, int64_t r0, int64_t r1, T* gp, float* part) {
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) st(&gp[o + c], ld(go[o + c]) * ((1.f - ld(s[o + c])) * ld(s[o + c])));
    if (part) add_row(gp + o, C, part);
  }
}

template <typename T>
WKV_INLINE void res_forward(const Gate<T>& g, int64_t r0, int64_t r1, T* out) {
  const float* bias = g.bias;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row * g.C;
    const T *p = g.p + o, *v = g.v + o, *vf = g.vf + o;
#pragma omp simd
    for (int64_t c = 0; c < g.C; ++c) {
      const float s = gate_sigmoid(ld(p[c]) + bias[c]).s;
      st(&out[o + c], ld(v[c]) + (ld(vf[c]) - ld(v[c])) * s);
    }
  }
}

// gv = go (1 - s), gvf = go s, gp = go (vf - v) s (1 - s); part (this block's) += gp. kV, kVF: gv, gvf wanted
// (template flags, not pointer tests: those would keep the loop scalar on AVX2).
template <bool kV, bool kVF, typename T>
WKV_INLINE void res_backward(const Gate<T>& g, const T* go, int64_t r0, int64_t r1, T* gv, T* gvf, T* gp,
                             float* part) {
  const float* bias = g.bias;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t o = row * g.C;
    const T *p = g.p + o, *v = g.v + o, *vf = g.vf + o, *d = go + o;
#pragma omp simd
    for (int64_t c = 0; c < g.C; ++c) {
      const SigmoidPair sg = gate_sigmoid(ld(p[c]) + bias[c]);
      const float dc = ld(d[c]);
      if constexpr (kV) st(&gv[o + c], dc * sg.s_neg);
      if constexpr (kVF) st(&gvf[o + c], dc * sg.s);
      st(&gp[o + c], (dc * (ld(vf[c]) - ld(v[c]))) * (sg.s * sg.s_neg));
    }
    if (part) add_row(gp + o, g.C, part);
  }
}

#define WKV_GATE_CLONES(T)                                                                                     \
  WKV_CLONES void sig_forward_rows(const Gate<T>& g, int64_t r0, int64_t r1, T* s) { sig_forward(g, r0, r1, s); } \
  WKV_CLONES void sig_backward_rows(const T* go, const T* s, int64_t C, int64_t r0, int64_t r1, T* gp,          \
                                    float* part) {                                                             \
    sig_backward(go, s, C, r0, r1, gp, part);                                                                  \
  }                                                                                                            \
  WKV_CLONES void res_forward_rows(const Gate<T>& g, int64_t r0, int64_t r1, T* out) {                          \
    res_forward(g, r0, r1, out);                                                                               \
  }                                                                                                            \
  WKV_CLONES void res_backward_rows(const Gate<T>& g, const T* go, int64_t r0, int64_t r1, T* gv, T* gvf,      \
                                    T* gp, float* part) {                                                      \
    if (gv && gvf)                                                                                             \
      res_backward<true, true>(g, go, r0, r1, gv, gvf, gp, part);                                              \
    else if (gv)                                                                                               \
      res_backward<true, false>(g, go, r0, r1, gv, gvf, gp, part);                                             \
    else if (gvf)                                                                                              \
      res_backward<false, true>(g, go, r0, r1, gv, gvf, gp, part);                                             \
    else                                                                                                       \
      res_backward<false, false>(g, go, r0, r1, gv, gvf, gp, part);                                            \
  }
WKV_GATE_CLONES(float)
WKV_GATE_CLONES(bf16)
#undef WKV_GATE_CLONES

// Checks the rows (one dtype T, [rows, C]) and the bias (fp32 [C]).
template <typename T>
Gate<T> make_gate(const char* op, const at::Tensor& p, const at::Tensor& bias, const at::Tensor* v,
                  const at::Tensor* vf) {
  TORCH_CHECK(p.dim() == 2, op, ": rows must be [rows, C]");
  check_rows(p, scalar_type_of<T>(), op, "p", p.sizes());
  if (v) check_rows(*v, scalar_type_of<T>(), op, "v", p.sizes());
  if (vf) check_rows(*vf, scalar_type_of<T>(), op, "v_first", p.sizes());
  check_f32(bias, op, "bias", {p.size(1)});
  return Gate<T>{p.size(1), rows_in<T>(p), v ? rows_in<T>(*v) : nullptr, vf ? rows_in<T>(*vf) : nullptr,
                 bias.data_ptr<float>()};
}

// The per-block partial sums of the bias gradient ([blocks, C] zeros), or an empty tensor without `want`.
at::Tensor partials(const at::Tensor& like, int64_t nb, int64_t C, bool want) {
  const auto f32 = like.options().dtype(at::kFloat);
  return want ? at::zeros({nb, C}, f32) : at::empty({0}, f32);
}

// bias_sigmoid's forward, or the value residual's where v and v_first are given.
template <typename T>
at::Tensor gate_forward_op(const char* op, const at::Tensor& p, const at::Tensor& bias, const at::Tensor* v,
                           const at::Tensor* vf) {
  const Gate<T> g = make_gate<T>(op, p, bias, v, vf);
  auto out = at::empty_like(p);
  const int64_t rows = p.size(0);
  at::parallel_for(0, n_blocks(rows), 1, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * kBlock, r1 = std::min(b1 * kBlock, rows);
    if (v)
      res_forward_rows(g, r0, r1, rows_out<T>(out));
    else
      sig_forward_rows(g, r0, r1, rows_out<T>(out));
  });
  return out;
}

template <typename T>
std::vector<at::Tensor> sig_backward_op(const at::Tensor& go, const at::Tensor& s, bool want_bias) {
  TORCH_CHECK(s.dim() == 2, "bias_sigmoid: rows must be [rows, C]");
  check_rows(s, scalar_type_of<T>(), "bias_sigmoid", "s", s.sizes());
  check_rows(go, scalar_type_of<T>(), "bias_sigmoid", "gradient", s.sizes());
  const int64_t rows = s.size(0), C = s.size(1), nb = n_blocks(rows);
  auto gp = at::empty_like(s);
  auto part = partials(s, nb, C, want_bias);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      sig_backward_rows(rows_in<T>(go), rows_in<T>(s), C, b * kBlock, std::min((b + 1) * kBlock, rows),
                        rows_out<T>(gp), want_bias ? part.data_ptr<float>() + b * C : nullptr);
  });
  return {gp, sum_blocks(part)};
}

template <typename T>
std::vector<at::Tensor> res_backward_op(const at::Tensor& go, const at::Tensor& v, const at::Tensor& vf,
                                        const at::Tensor& p, const at::Tensor& bias, bool want_v, bool want_vf,
                                        bool want_bias) {
  const Gate<T> g = make_gate<T>("value_residual", p, bias, &v, &vf);
  check_rows(go, scalar_type_of<T>(), "value_residual", "gradient", p.sizes());
  const int64_t rows = p.size(0), C = p.size(1), nb = n_blocks(rows);
  auto none = at::empty({0}, p.options());
  auto gv = want_v ? at::empty_like(p) : none, gvf = want_vf ? at::empty_like(p) : none, gp = at::empty_like(p);
  auto part = partials(p, nb, C, want_bias);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      res_backward_rows(g, rows_in<T>(go), b * kBlock, std::min((b + 1) * kBlock, rows), rows_out<T>(gv),
                        rows_out<T>(gvf), rows_out<T>(gp), want_bias ? part.data_ptr<float>() + b * C : nullptr);
  });
  return {gv, gvf, gp, sum_blocks(part)};
}

}  // namespace

// p [rows, C] (fp32 or bf16), bias [C] fp32 -> sigmoid(p + bias) in p's dtype.
at::Tensor bias_sigmoid_forward(const at::Tensor& p, const at::Tensor& bias) {
  if (rows_dtype(p, "bias_sigmoid") == at::kBFloat16)
    return gate_forward_op<bf16>("bias_sigmoid", p, bias, nullptr, nullptr);
  return gate_forward_op<float>("bias_sigmoid", p, bias, nullptr, nullptr);
}

// go, s (the forward's output) [rows, C] in one dtype -> [gp (s's dtype), gbias [C] fp32 (empty without want_bias)].
std::vector<at::Tensor> bias_sigmoid_backward(const at::Tensor& go, const at::Tensor& s, bool want_bias) {
  if (rows_dtype(s, "bias_sigmoid") == at::kBFloat16) return sig_backward_op<bf16>(go, s, want_bias);
  return sig_backward_op<float>(go, s, want_bias);
}

// v, v_first, p [rows, C] in one dtype (fp32 or bf16), bias [C] fp32 -> v + (v_first - v) sigmoid(p + bias).
at::Tensor value_residual_forward(const at::Tensor& v, const at::Tensor& vf, const at::Tensor& p,
                                  const at::Tensor& bias) {
  if (rows_dtype(p, "value_residual") == at::kBFloat16)
    return gate_forward_op<bf16>("value_residual", p, bias, &v, &vf);
  return gate_forward_op<float>("value_residual", p, bias, &v, &vf);
}

// -> [gv, gv_first, gp (the rows' dtype), gbias [C] fp32]; gv, gv_first and gbias empty where not wanted.
std::vector<at::Tensor> value_residual_backward(const at::Tensor& go, const at::Tensor& v, const at::Tensor& vf,
                                                const at::Tensor& p, const at::Tensor& bias, bool want_v,
                                                bool want_vf, bool want_bias) {
  if (rows_dtype(p, "value_residual") == at::kBFloat16)
    return res_backward_op<bf16>(go, v, vf, p, bias, want_v, want_vf, want_bias);
  return res_backward_op<float>(go, v, vf, p, bias, want_v, want_vf, want_bias);
}
