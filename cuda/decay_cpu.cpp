// RWKV-7's per-step decay straight from its pre-activation z, for the CPU WKV kernel: one pass over [rows, N]
// where torch takes six (logsigmoid with its buffer, the offset, exp, neg, exp, mul) and logsigmoid's
// backward one more. With w = logsigmoid(z) - offset the log-log decay (peft_rwkv7/ops/cpu.py):
//
//   d = exp(-exp(w)) = exp(u),  u = -e^-offset sigmoid(z)
//   dd/dz = d u sigmoid(-z)
//
// sigmoid(z) and sigmoid(-z) both come from e = exp(-|z|) <= 1 (cpu_exp.h's sigmoid_pair), so neither tail
// overflows or loses its relative precision. exp is cpu_exp.h's, which
// `omp simd` vectorises in every target clone: two exps per element instead of logsigmoid's exp and log1p
// and then two more. NaN stays NaN.

#include "cpu_aten.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_exp.h"
#include "cpu_rows.h"
#include "wkv7_cpu_simd.h"

namespace {

// The clamp (in exp_neg_abs_bits) and the NaN below are integer selects on the bits: GCC (12, -ftrapping-math)
// does not vectorise the loop with a float compare feeding a select before the exp, nor a float select after it.
template <bool kGrad>
WKV_INLINE void decay_body(const float* z, float* d, float* dd, int64_t n, float c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const int32_t az = abs_bits(z[i]);  // bits of |z|
    // sigmoid(z), sigmoid(-z); beyond |z| = 87 the gradient term they scale is below 1e-37
    const SigmoidPair sg = sigmoid_pair(z[i], az);
    const float u = -c * sg.s;
    const float di = exp_small(u);
    const float bad = nan_or_zero(az);  // NaN where z is NaN, else +0
    d[i] = di + bad;
    if constexpr (kGrad) dd[i] = di * u * sg.s_neg + bad;
  }
}

WKV_CLONES void decay_rows(const float* z, float* d, int64_t n, float c) { decay_body<false>(z, d, nullptr, n, c); }

WKV_CLONES void decay_grad_rows(const float* z, float* d, float* dd, int64_t n, float c) {
  decay_body<true>(z, d, dd, n, c);
}

}  // namespace

// z: contiguous fp32 (any shape) -> {d, dd/dz} of the same shape (dd/dz empty unless want_grad).
std::vector<at::Tensor> decay_forward(const at::Tensor& z, double offset, bool want_grad) {
  check_f32(z, "decay", "z", z.sizes());
  auto d = at::empty_like(z);
  auto dd = want_grad ? at::empty_like(z) : at::empty({0}, z.options());
  const int64_t n = z.numel();
  const float c = float(std::exp(-offset));
  const float* zp = z.data_ptr<float>();
  float* dp = d.data_ptr<float>();
  float* ddp = want_grad ? dd.data_ptr<float>() : nullptr;
  constexpr int64_t kGrain = 1 << 14;  // elements per work item
  at::parallel_for(0, (n + kGrain - 1) / kGrain, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = b * kGrain, len = std::min(kGrain, n - lo);
      if (ddp)
        decay_grad_rows(zp + lo, dp + lo, ddp + lo, len, c);
      else
        decay_rows(zp + lo, dp + lo, len, c);
    }
  });
  return {d, dd};
}
