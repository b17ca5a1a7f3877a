// Vector helpers of the CPU WKV7 kernel (wkv7_cpu.cpp): the target_clones marker, 8- and 16-lane float
// vectors (GCC vector extensions) and the shuffle tree that finishes 8 rows of 8-lane partial sums.
#pragma once

#include <cstring>

namespace {

// PEFT_RWKV7_NO_AVX512: a build without the AVX-512 clones, so that an AVX-512 CPU runs the AVX2 code an AVX2-only
// CPU runs (scripts/bench_train.py --isa avx2 times it; the library never sets it).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(PEFT_RWKV7_NO_AVX512)
#define WKV_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define WKV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WKV_CLONES
#endif
#define WKV_INLINE inline __attribute__((always_inline))
#define WKV_LAMBDA_INLINE __attribute__((always_inline))  // after a lambda's parameter list

#if defined(__clang__) || __GNUC__ >= 12
#define WKV_SHUFFLE(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
typedef int wkv_v8i __attribute__((vector_size(32)));
#define WKV_SHUFFLE(x, y, ...) __builtin_shuffle(x, y, wkv_v8i{__VA_ARGS__})
#endif
typedef float wkv_v8f __attribute__((vector_size(32)));
// One level of the tree: add lane pairs of (x, y) so that each output lane sums twice as much.
#define WKV_PAIRSUM(x, y, e0, e1, e2, e3, e4, e5, e6, e7, o0, o1, o2, o3, o4, o5, o6, o7) \
  (WKV_SHUFFLE(x, y, e0, e1, e2, e3, e4, e5, e6, e7) + WKV_SHUFFLE(x, y, o0, o1, o2, o3, o4, o5, o6, o7))
#define WKV_L1(x, y) WKV_PAIRSUM(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15)
#define WKV_L2(x, y) WKV_PAIRSUM(x, y, 0, 1, 8, 9, 4, 5, 12, 13, 2, 3, 10, 11, 6, 7, 14, 15)
#define WKV_L3(x, y) WKV_PAIRSUM(x, y, 0, 8, 2, 10, 4, 12, 6, 14, 1, 9, 3, 11, 5, 13, 7, 15)

WKV_INLINE wkv_v8f load8(const float* p) {
  wkv_v8f x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

WKV_INLINE void store8(float* p, wkv_v8f x) { std::memcpy(p, &x, sizeof x); }

// L-lane vectors for pass B of the backward: 8 (AVX2) or 16 (one AVX-512 register).
typedef float wkv_v16f __attribute__((vector_size(64)));
template <int L>
struct Lanes {
  typedef wkv_v8f V;
};
template <>
struct Lanes<16> {
  typedef wkv_v16f V;
};
template <int L>
WKV_INLINE typename Lanes<L>::V loadv(const float* p) {
  typename Lanes<L>::V x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
template <int L>
WKV_INLINE void storev(float* p, typename Lanes<L>::V x) {
  std::memcpy(p, &x, sizeof x);
}
// The 8-lane partial sums of an L-lane accumulator (lane l and l + 8 added for L = 16).
template <int L>
WKV_INLINE wkv_v8f fold8(typename Lanes<L>::V x) {
  if constexpr (L == 8) {
    return x;
  } else {
    float t[16];
    std::memcpy(t, &x, sizeof t);
    return load8(t) + load8(t + 8);
  }
}

// out[r] = sum of the 8 lanes of row r of part [8, 8], r = 0..7. Rows enter in the order
// 0 4 2 6 1 5 3 7 so that after the three pair-sum levels row r sits in lane r.
WKV_INLINE void reduce_rows8(const float* part, float* out) {
  const wkv_v8f x0 = load8(part), x1 = load8(part + 8), x2 = load8(part + 16), x3 = load8(part + 24);
  const wkv_v8f x4 = load8(part + 32), x5 = load8(part + 40), x6 = load8(part + 48), x7 = load8(part + 56);
  const wkv_v8f lo = WKV_L2(WKV_L1(x0, x4), WKV_L1(x2, x6));
  const wkv_v8f hi = WKV_L2(WKV_L1(x1, x5), WKV_L1(x3, x7));
  store8(out, WKV_L3(lo, hi));
}

}  // namespace
