// The fused loss's online softmax on the CPU (peft_rwkv7/ops/linear_ce.py, _online): one block of the
// vocabulary folded into each row's running max m and sum s in two passes over the block's logits z
// [rows, cols], where torch takes a call or a pass for each of amax, maximum, the finite checks, sub, exp,
// sum, and the rescale's exp and mul:
//   pass 1: each row's block max, and whether any logit or running max is not finite (+-inf, NaN; m = -inf
//           before the first block is fine);
//   pass 2, only where everything is finite: picked = z[label - a] for labels in this block,
//           m' = max(m, block max), scale = exp(m - m') (1 where the max did not grow, 0 from m = -inf),
//           z <- exp(z - m'), s <- s scale + the row's sum of the new z, m <- m'.
// Returns -1 having written nothing where something is not finite (the caller folds that block with torch's
// ops, which keep its rules for infinities), else whether some row's max grew (the caller then rescales its
// partial dnll/dh rows by `scale`). Rows are split over torch's threads; each row's sums are its own, so no
// result depends on the thread count.
//
// softmax_grad_bf16: the chunked path's rows under bf16 (ops/linear_ce.py, _chunk_q_bf16). A chunk's bf16
// logits z [rows, V] become, in place, q = softmax(z) - onehot(label) in bf16 (the input of the bf16 GEMMs of
// dnll/dh and dW), with each row's log-sum-exp and the label's logit in fp32; per row, in fp32, where torch
// widened the chunk into an fp32 copy (128 MiB at V = 65536), took five passes over it and rounded q back:
//   pass 1: the row's max and whether any logit is not finite (such a row is left untouched, ok = 0);
//   pass 2: e = exp(z - max) into an fp32 row (in cache) and its sum s;
//   pass 3 (want_q): z <- bf16(e / s), then the label's entry bf16(e / s - 1).
//
// logsumexp_f64: evaluation's fp64 log-sum-exp of fp32 or bf16 logits [rows, V] (infer/longctx.py,
// exact_logprobs), per row: the max in the logits' own precision (exact), then sum exp(z - max) in double with
// exp_f64 (cpu_exp.h), in one pass over the row where torch widened the rows into a double copy and took five
// passes over it. A row with a non-finite logit is left to the caller (ok = 0), whose torch ops keep their rules.

#include "cpu_aten.h"
#include "cpu_bf16.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_exp.h"
#include "cpu_rows.h"
#include "wkv7_cpu_simd.h"

namespace {

// The row's max and whether any entry is +-inf or NaN (the compare on the bits, so the loop vectorises).
WKV_CLONES void row_max(const float* z, int64_t n, float* out_max, bool* out_bad) {
  float m = -INFINITY;
  int32_t bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    m = std::max(m, z[i]);
    bad |= int32_t(abs_bits(z[i]) >= kInfBits);
  }
  *out_max = m;
  *out_bad = bad != 0;
}

// z <- exp(z - shift) for z <= shift (shift the row's max), and the row's sum of the new z.
WKV_CLONES float row_exp_sum(float* z, int64_t n, float shift) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_neg_abs_bits(abs_bits(z[i] - shift));  // exp of a value <= 0
    z[i] = e;
    s += e;
  }
  return s;
}

// The row's max and whether any entry is +-inf or NaN, from bf16 logits.
WKV_CLONES void row_max_bf16(const bf16* z, int64_t n, float* out_max, bool* out_bad) {
  float m = -INFINITY;
  int32_t bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const float x = ld(z[i]);
    m = std::max(m, x);
    bad |= int32_t(abs_bits(x) >= kInfBits);
  }
  *out_max = m;
  *out_bad = bad != 0;
}

// e <- exp(z - shift) for z <= shift, and the sum of e.
WKV_CLONES float row_exp_sum_bf16(const bf16* z, float* e, int64_t n, float shift) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float x = exp_neg_abs_bits(abs_bits(ld(z[i]) - shift));
    e[i] = x;
    s += x;
  }
  return s;
}

// z <- bf16(e / s).
WKV_CLONES void row_div_bf16(const float* e, bf16* z, int64_t n, float s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) st(&z[i], e[i] / s);
}

// The sum of exp(z - shift) in double, for z <= shift (shift the row's max); z fp32 or bf16.
template <typename T>
WKV_INLINE double row_exp_sum_f64(const T* z, int64_t n, double shift) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_f64(std::max(double(ld(z[i])) - shift, -708.0));
  return s;
}
WKV_CLONES double row_exp_sum_f64_f32(const float* z, int64_t n, double shift) { return row_exp_sum_f64(z, n, shift); }
WKV_CLONES double row_exp_sum_f64_bf16(const bf16* z, int64_t n, double shift) { return row_exp_sum_f64(z, n, shift); }

}  // namespace

// z [rows, V] bf16 (in place: q where ok), labels [rows] int64 in [0, V) -> lse, picked (fp32) and ok (uint8)
// written per row.
void softmax_grad_bf16(at::Tensor z, const at::Tensor& labels, at::Tensor lse, at::Tensor picked, at::Tensor ok,
                       bool want_q) {
  TORCH_CHECK(z.dim() == 2, "softmax_grad_bf16: z must be [rows, V]");
  const int64_t rows = z.size(0), cols = z.size(1);
  check_rows(z, at::kBFloat16, "softmax_grad_bf16", "z", {rows, cols});
  for (const auto* t : {&lse, &picked}) check_f32(*t, "softmax_grad_bf16", "a row vector", {rows});
  TORCH_CHECK(ok.device().is_cpu() && ok.scalar_type() == at::kByte && ok.is_contiguous() && ok.numel() == rows,
              "softmax_grad_bf16: ok must be a contiguous uint8 CPU tensor of [rows]");
  TORCH_CHECK(labels.device().is_cpu() && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.sizes() == at::IntArrayRef({rows}),
              "softmax_grad_bf16: labels must be a contiguous int64 CPU tensor of [rows]");
  bf16* zp = reinterpret_cast<bf16*>(z.data_ptr());
  const int64_t* lab = labels.data_ptr<int64_t>();
  float *lp = lse.data_ptr<float>(), *pp = picked.data_ptr<float>();
  uint8_t* okp = ok.data_ptr<uint8_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(lab[r] >= 0 && lab[r] < cols, "softmax_grad_bf16: label ", lab[r], " outside [0, ", cols, ")");
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> e(cols);
    for (int64_t r = lo; r < hi; ++r) {
      bf16* zr = zp + r * cols;
      float m;
      bool bad;
      row_max_bf16(zr, cols, &m, &bad);
      okp[r] = !bad;
      if (bad) continue;
      pp[r] = ld(zr[lab[r]]);
      const float s = row_exp_sum_bf16(zr, e.data(), cols, m);
      lp[r] = std::log(s) + m;
      if (!want_q) continue;
      row_div_bf16(e.data(), zr, cols, s);
      st(&zr[lab[r]], e[lab[r]] / s - 1.f);
    }
  });
}

int64_t online_softmax_block(at::Tensor z, const at::Tensor& labels, int64_t a, at::Tensor m, at::Tensor s,
                             at::Tensor picked, at::Tensor scale) {
  TORCH_CHECK(z.dim() == 2, "online_softmax_block: z must be [rows, cols]");
  const int64_t rows = z.size(0), cols = z.size(1);
  check_f32(z, "online_softmax_block", "z", {rows, cols});
  for (const auto* t : {&m, &s, &picked, &scale}) check_f32(*t, "online_softmax_block", "a row vector", {rows});
  TORCH_CHECK(labels.device().is_cpu() && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.sizes() == at::IntArrayRef({rows}),
              "online_softmax_block: labels must be a contiguous int64 CPU tensor of [rows]");
  float* zp = z.data_ptr<float>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  float *mp = m.data_ptr<float>(), *sp = s.data_ptr<float>(), *pp = picked.data_ptr<float>();
  float* scp = scale.data_ptr<float>();
  std::vector<float> block_max(rows);
  std::atomic<bool> bad{false};
  at::parallel_for(0, rows, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      bool row_bad = false;
      row_max(zp + r * cols, cols, &block_max[r], &row_bad);
      const bool m_ok = std::isfinite(mp[r]) || mp[r] == -INFINITY;
      if (row_bad || !m_ok) bad.store(true, std::memory_order_relaxed);
    }
  });
  if (bad.load()) return -1;
  std::atomic<bool> grew{false};
  at::parallel_for(0, rows, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* zr = zp + r * cols;
      if (lab[r] >= a && lab[r] < a + cols) pp[r] = zr[lab[r] - a];
      const float m_old = mp[r], m_new = std::max(m_old, block_max[r]);
      const bool up = m_new > m_old;
      const float sc = up ? std::exp(m_old - m_new) : 1.f;  // exp(-inf) = 0 before the first block
      const float sum = row_exp_sum(zr, cols, m_new);
      sp[r] = sp[r] * sc + sum;
      mp[r] = m_new;
      scp[r] = sc;
      if (up) grew.store(true, std::memory_order_relaxed);
    }
  });
  return grew.load() ? 1 : 0;
}

// z [rows, V] fp32 or bf16 -> out [rows] fp64 log-sum-exp and ok [rows] (0: a non-finite logit, out not written).
void logsumexp_f64(const at::Tensor& z, at::Tensor out, at::Tensor ok) {
  TORCH_CHECK(z.dim() == 2, "logsumexp_f64: z must be [rows, V]");
  const int64_t rows = z.size(0), cols = z.size(1);
  const bool half = z.scalar_type() == at::kBFloat16;
  check_rows(z, half ? at::kBFloat16 : at::kFloat, "logsumexp_f64", "z", {rows, cols});
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kDouble && out.is_contiguous() && out.numel() == rows,
              "logsumexp_f64: out must be a contiguous fp64 CPU tensor of [rows]");
  TORCH_CHECK(ok.device().is_cpu() && ok.scalar_type() == at::kByte && ok.is_contiguous() && ok.numel() == rows,
              "logsumexp_f64: ok must be a contiguous uint8 CPU tensor of [rows]");
  double* op = out.data_ptr<double>();
  uint8_t* okp = ok.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float m;
      bool bad;
      double s;
      if (half) {
        const bf16* zr = reinterpret_cast<const bf16*>(z.data_ptr()) + r * cols;
        row_max_bf16(zr, cols, &m, &bad);
        s = bad ? 0.0 : row_exp_sum_f64_bf16(zr, cols, m);
      } else {
        const float* zr = z.data_ptr<float>() + r * cols;
        row_max(zr, cols, &m, &bad);
        s = bad ? 0.0 : row_exp_sum_f64_f32(zr, cols, m);
      }
      okp[r] = !bad;
      if (!bad) op[r] = double(m) + std::log(s);
    }
  });
}
