// exp for x <= 0 written so that `omp simd` vectorises it in every target clone (decay_cpu.cpp, loss_cpu.cpp):
// Cephes' single-precision exp (range reduction by ln 2 in two parts, a degree-6 polynomial, 2^n from the
// exponent bits; about 2 ulp). GCC 12 (-ftrapping-math) does not vectorise a loop with a float compare
// feeding a select before the exp, so the clamp below -87 is an integer select on the bits.
#pragma once

#include <cstdint>

#include "wkv7_cpu_simd.h"

namespace {

constexpr int32_t kBits87 = 0x42ae0000;   // 87.f
constexpr int32_t kAbsMask = 0x7fffffff;  // clears the sign bit: the bits of |x|
constexpr int32_t kInfBits = 0x7f800000;  // +inf; |x|'s bits above it are a NaN's
constexpr int32_t kNaNBits = 0x7fc00000;  // a quiet NaN

// The bits of |x|.
WKV_INLINE int32_t abs_bits(float x) { return __builtin_bit_cast(int32_t, x) & kAbsMask; }

// exp(x) for x in [-87, 0.5]; the callers clamp below (exp_nonpositive).
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

// exp(-m) for m = |m| given as its bits (sign cleared): m <= 87 exactly, else exp(-87) ~ 2^-125.5 (infinity
// and NaN bits included: the callers handle those).
WKV_INLINE float exp_neg_abs_bits(int32_t abs_bits) {
  return exp_small(-__builtin_bit_cast(float, abs_bits < kBits87 ? abs_bits : kBits87));
}

// NaN where the bits of |x| (abs_bits) are a NaN's, else +0: added to a result, it makes that result NaN for a NaN x.
WKV_INLINE float nan_or_zero(int32_t abs_bits) { return __builtin_bit_cast(float, abs_bits > kInfBits ? kNaNBits : 0); }

// {sigmoid(x), sigmoid(-x)} for x with |x|'s bits `ax`, both from e = exp(-|x|) <= 1: q = 1 / (1 + e) is the larger of
// the two and e q the smaller, so neither tail overflows or loses its relative precision (where sigmoid(x) rounds to
// 1, sigmoid(-x) is not 1 - that). Beyond |x| = 87, e is exp(-87) ~ 2^-125.5, so both tails are exact in fp32. The
// values for a NaN x are not NaN: callers add nan_or_zero(ax).
struct SigmoidPair {
  float s, s_neg;
};

WKV_INLINE SigmoidPair sigmoid_pair(float x, int32_t ax) {
  const float e = exp_neg_abs_bits(ax);
  const float q = 1.f / (1.f + e), eq = e * q;
  const bool pos = x >= 0.f;
  return {pos ? q : eq, pos ? eq : q};
}

// exp(x) in double for x in [-708, 0] (the caller clamps below: exp(-708) ~ 3e-308 added to a sum >= 1 leaves it
// unchanged, as any smaller term would): range reduction by ln 2 in fdlibm's two parts (n * kHi exact for |n| <
// 2^11), then e^r for |r| <= ln 2 / 2 by its Taylor series to r^13 (the first term left out is below 4e-18 of
// it), and 2^n from the exponent bits. For the fp64 log-sum-exp of evaluation (loss_cpu.cpp).
WKV_INLINE double exp_f64(double x) {
  constexpr double kLog2e = 1.4426950408889634, kMagic = 6755399441055744.0;  // 1.5 * 2^52: rounds to an integer
  constexpr double kHi = 6.93147180369123816490e-01, kLo = 1.90821492927058770002e-10;  // ln 2 = kHi + kLo
  const double big = x * kLog2e + kMagic;
  const double n = big - kMagic;  // round(x / ln 2)
  const double r = (x - n * kHi) - n * kLo;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  const double y = p * (r * r) + r + 1.0;
  const int64_t n_int = __builtin_bit_cast(int64_t, big) - __builtin_bit_cast(int64_t, kMagic);
  return y * __builtin_bit_cast(double, uint64_t(n_int + 1023) << 52);  // 2^n, n in [-1022, 0]
}

}  // namespace
