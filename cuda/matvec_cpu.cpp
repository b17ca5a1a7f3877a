// One row times a weight matrix on CPU: y = W x with W row-major [out, in] (nn.Linear's own layout).
//
// At batch 1 (RNN generation) every weight is read once per token, so the step is memory-bound and
// what matters is streaming W at the machine's bandwidth. The BLAS gemv torch calls for a single
// row reaches 11-17 GB/s on our 2-core build machine; this loop reaches 25-32 GB/s: each thread takes
// a band of 4 rows and walks them together, so x is loaded once per 4 rows and there are 4
// independent accumulator chains per SIMD lane. fp32 and bf16 weights; the sums are fp32 either way.
// Compiled into the same extension as wkv7_cpu.cpp (which binds `matvec`), with the same AVX2+FMA /
// baseline target clones.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MV_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MV_CLONES
#endif

constexpr int64_t kRows = 4;  // rows walked together

inline float as_float(float v) { return v; }
inline float as_float(uint16_t bf16) {  // bf16 is the top half of an fp32
  uint32_t bits = uint32_t(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
MV_CLONES void rows(const T* W, const float* x, float* y, int64_t K, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + kRows <= o1; o += kRows) {
    const T* w0 = W + o * K;
    const T* w1 = w0 + K;
    const T* w2 = w1 + K;
    const T* w3 = w2 + K;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < K; ++i) {
      const float xi = x[i];
      s0 += as_float(w0[i]) * xi;
      s1 += as_float(w1[i]) * xi;
      s2 += as_float(w2[i]) * xi;
      s3 += as_float(w3[i]) * xi;
    }
    y[o] = s0;
    y[o + 1] = s1;
    y[o + 2] = s2;
    y[o + 3] = s3;
  }
  for (; o < o1; ++o) {
    const T* w = W + o * K;
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < K; ++i) s += as_float(w[i]) * x[i];
    y[o] = s;
  }
}

template <typename T>
void run(const T* W, const float* x, float* y, int64_t O, int64_t K) {
  // grain 16 bands = 64 rows: small matrices are not split across threads
  at::parallel_for(0, (O + kRows - 1) / kRows, 16, [&](int64_t b, int64_t e) {
    rows<T>(W, x, y, K, b * kRows, std::min(O, e * kRows));
  });
}

}  // namespace

// weight: contiguous [O, K] fp32 or bf16; x: K elements of the same dtype. Returns [O] in x's dtype.
torch::Tensor matvec(const torch::Tensor& weight, const torch::Tensor& x) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "matvec: weight must be a contiguous 2-D tensor");
  TORCH_CHECK(x.numel() == weight.size(1), "matvec: x has ", x.numel(), " elements, weight expects ", weight.size(1));
  const int64_t O = weight.size(0), K = weight.size(1);
  const torch::Tensor xf = x.to(torch::kFloat32).contiguous().view({K});
  torch::Tensor y = torch::empty({O}, xf.options());
  if (weight.scalar_type() == torch::kBFloat16) {
    run(reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), xf.data_ptr<float>(),
        y.data_ptr<float>(), O, K);
  } else {
    TORCH_CHECK(weight.scalar_type() == torch::kFloat32, "matvec: weight must be fp32 or bf16");
    run(weight.data_ptr<float>(), xf.data_ptr<float>(), y.data_ptr<float>(), O, K);
  }
  return y.to(x.scalar_type());
}
