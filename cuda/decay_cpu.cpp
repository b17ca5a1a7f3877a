// RWKV-7's per-step decay straight from its pre-activation z, for the CPU WKV kernel: one pass over [rows, N]
// where torch takes six (logsigmoid with its buffer, the offset, exp, neg, exp, mul) and logsigmoid's
// backward one more. With w = logsigmoid(z) - offset the log-log decay (peft_rwkv7/ops/cpu.py):
//
//   d = exp(-exp(w)) = exp(u),  u = -e^-offset sigmoid(z)
//   dd/dz = d u sigmoid(-z)
//
// sigmoid(z) and sigmoid(-z) both come from e = exp(-|z|) <= 1 (q = 1 / (1 + e) is the larger of the two and
// e q the smaller), so neither tail overflows or loses its relative precision. exp is Cephes' single-precision
// exp (range reduction by ln 2 in two parts, a degree-6 polynomial, 2^n from the exponent bits; about 2 ulp
// here), written branch-free so that `omp simd` vectorises it in every target clone: two exps per element
// instead of logsigmoid's exp and log1p and then two more. NaN stays NaN.

#include "cpu_aten.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_rows.h"
#include "wkv7_cpu_simd.h"

namespace {

// exp(x) for x in [-87, 0.5] (the callers': -min(|z|, 87) and u in [-e^-offset, 0]).
WKV_INLINE float exp_small(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kMagic = 12582912.f;  // 1.5 * 2^23: rounds to an integer
  constexpr float kC1 = 0.693359375f, kC2 = -2.12194440e-4f;          // ln 2 = kC1 + kC2, kC1 exact in 9 bits
  const float big = x * kLog2e + kMagic;
  const float n = big - kMagic;  // round(x / ln 2)
  const float r = (x - n * kC1) - n * kC2;  // |r| <= ln 2 / 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.f;
  const int32_t n_int = __builtin_bit_cast(int32_t, big) - __builtin_bit_cast(int32_t, kMagic);
  return y * __builtin_bit_cast(float, uint32_t(n_int + 127) << 23);  // 2^n, n in [-126, 1]
}

// The clamps and the NaN below are integer selects on the bits: GCC (12, -ftrapping-math) does not
// vectorise the loop with a float compare feeding a select before the exp, nor with a float select after it.
template <bool kGrad>
WKV_INLINE void decay_body(const float* z, float* d, float* dd, int64_t n, float c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    constexpr int32_t k87 = 0x42ae0000, kInf = 0x7f800000, kNaN = 0x7fc00000;  // bits of 87.f, inf, a NaN
    const int32_t az = __builtin_bit_cast(int32_t, z[i]) & 0x7fffffff;         // bits of |z|
    // exp(-|z|) for |z| <= 87, else exp(-87) ~ 2^-125.5 (the tails of sigmoid are then exact in fp32, and the
    // gradient term it scales is below 1e-37)
    const float e = exp_small(-__builtin_bit_cast(float, az < k87 ? az : k87));
    const float q = 1.f / (1.f + e), eq = e * q;
    const bool pos = z[i] >= 0.f;
    const float s = pos ? q : eq, s_neg = pos ? eq : q;  // sigmoid(z), sigmoid(-z)
    const float u = -c * s;
    const float di = exp_small(u);
    const float bad = __builtin_bit_cast(float, az > kInf ? kNaN : 0);  // NaN where z is NaN, else +0
    d[i] = di + bad;
    if constexpr (kGrad) dd[i] = di * u * s_neg + bad;
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
