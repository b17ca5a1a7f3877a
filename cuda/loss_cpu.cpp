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

#include "cpu_aten.h"

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

}  // namespace

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
