// The single-token RNN step on CPU (batch-1 generation): the products of one row by a weight, and
// the WKV update of one token. Compiled into the same extension as wkv7_cpu.cpp, which binds them,
// with the same AVX2+FMA / baseline target clones.
//
// matvec: y = W x with W row-major [out, in] (nn.Linear's own layout). At batch 1 every weight is read
// once per token, so the step is memory-bound and what matters is streaming W at the machine's
// bandwidth. The BLAS gemv torch calls for a single row reaches 11-17 GB/s on our 2-core build
// machine; this loop reaches 25-32 GB/s: each thread takes a band of 8 rows and walks them together,
// so x is loaded once per 8 rows and there are 8 independent accumulator chains per SIMD lane.
// fp32 and bf16 weights; the sums are fp32 either way.
//
// vecmat: y = x W with W row-major [in, out] (RWKV-7's low-rank w1/w2, a1/a2, ... parameters): rows of
// W scaled by x[i] and summed, split across threads by rows (partial sums) or by columns.
//
// wkv7_step: per (batch, head), with S value-major (S[i][j]: i = value index, j = key index),
//   S = S diag(d) + (S a) b^T + v k^T,   y = S r,   d = exp(-exp(w)) (computed by the caller)
// one row i at a time over contiguous j. torch's batched products spend ~150 us per layer on this.

#include "cpu_aten.h"


#include <atomic>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MV_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MV_CLONES
#endif

constexpr int64_t kRows = 8;  // rows walked together (8 streams 5-15% faster than 4 here)

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
    const T *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K, *w4 = w3 + K, *w5 = w4 + K, *w6 = w5 + K, *w7 = w6 + K;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t i = 0; i < K; ++i) {
      const float xi = x[i];
      s0 += as_float(w0[i]) * xi;
      s1 += as_float(w1[i]) * xi;
      s2 += as_float(w2[i]) * xi;
      s3 += as_float(w3[i]) * xi;
      s4 += as_float(w4[i]) * xi;
      s5 += as_float(w5[i]) * xi;
      s6 += as_float(w6[i]) * xi;
      s7 += as_float(w7[i]) * xi;
    }
    const float s[kRows] = {s0, s1, s2, s3, s4, s5, s6, s7};
    for (int64_t r = 0; r < kRows; ++r) y[o + r] = s[r];
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
  // grain 8 bands = 64 rows: small matrices are not split across threads
  at::parallel_for(0, (O + kRows - 1) / kRows, 8, [&](int64_t b, int64_t e) {
    rows<T>(W, x, y, K, b * kRows, std::min(O, e * kRows));
  });
}

MV_CLONES void vecmat_rows(const float* x, const float* W, float* y, int64_t O, int64_t i0, int64_t i1,
                           int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) y[c] = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const float xi = x[i];
    const float* w = W + i * O;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) y[c] += xi * w[c];
  }
}

MV_CLONES void wkv_head(const float* r, const float* d, const float* k, const float* v, const float* a,
                        const float* b, const float* s_in, float* s_out, float* y, int64_t N) {
  for (int64_t i = 0; i < N; ++i) {
    const float* si = s_in + i * N;
    float* so = s_out + i * N;
    float sa = 0;
#pragma omp simd reduction(+ : sa)
    for (int64_t j = 0; j < N; ++j) sa += si[j] * a[j];
    const float vi = v[i];
    float yi = 0;
#pragma omp simd reduction(+ : yi)
    for (int64_t j = 0; j < N; ++j) {
      const float sij = si[j] * d[j] + sa * b[j] + vi * k[j];
      so[j] = sij;
      yi += sij * r[j];
    }
    y[i] = yi;
  }
}

}  // namespace

// x: K elements; weight: contiguous [K, O] fp32. Returns x @ weight, [O] fp32.
at::Tensor vecmat(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat,
              "vecmat: weight must be a contiguous 2-D fp32 tensor");
  TORCH_CHECK(x.numel() == weight.size(0), "vecmat: x has ", x.numel(), " elements, weight expects ", weight.size(0));
  const int64_t K = weight.size(0), O = weight.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  const float* Wp = weight.data_ptr<float>();
  if (O >= K) {  // wide: each thread owns a band of columns (bands of 64, whole cache lines)
    at::Tensor y = at::empty({O}, xf.options());
    float* yp = y.data_ptr<float>();
    const int64_t bands = (O + 63) / 64;
    at::parallel_for(0, bands, 4, [&](int64_t b0, int64_t b1) {
      vecmat_rows(xp, Wp, yp, O, 0, K, b0 * 64, std::min(O, b1 * 64));
    });
    return y;
  }
  // tall: each thread sums a band of rows into its own partial, then the partials add up
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), K / 128));
  at::Tensor partial = at::empty({parts, O}, xf.options());
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      vecmat_rows(xp, Wp, pp + p * O, O, K * p / parts, K * (p + 1) / parts, 0, O);
  });
  return partial.sum(0);
}

// r, d, k, v, a, b: contiguous fp32 [B, H, N]; state: contiguous fp32 [B, H, N, N] (read only).
// Returns y [B, H, N] and the new state [B, H, N, N].
std::vector<at::Tensor> wkv7_step(const std::vector<at::Tensor>& rdkvab, const at::Tensor& state) {
  TORCH_CHECK(rdkvab.size() == 6, "wkv7_step: expected r, d, k, v, a, b");
  for (const auto& t : rdkvab)
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat && t.sizes() == rdkvab[0].sizes(),
                "wkv7_step: inputs must be contiguous fp32 tensors of one shape");
  TORCH_CHECK(state.is_contiguous() && state.scalar_type() == at::kFloat, "wkv7_step: state must be contiguous fp32");
  const int64_t N = rdkvab[0].size(-1), BH = rdkvab[0].numel() / N;
  TORCH_CHECK(state.numel() == BH * N * N, "wkv7_step: state does not match the inputs");
  at::Tensor y = at::empty_like(rdkvab[0]);
  at::Tensor s_out = at::empty_like(state);
  const float* p[6];
  for (int i = 0; i < 6; ++i) p[i] = rdkvab[i].data_ptr<float>();
  const float* s_in = state.data_ptr<float>();
  float* so = s_out.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, BH, 4, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t o = h * N;
      wkv_head(p[0] + o, p[1] + o, p[2] + o, p[3] + o, p[4] + o, p[5] + o, s_in + o * N, so + o * N, yp + o, N);
    }
  });
  return {y, s_out};
}

// weight: contiguous [O, K] fp32 or bf16; x: K elements of the same dtype. Returns [O] in x's dtype.
at::Tensor matvec(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "matvec: weight must be a contiguous 2-D tensor");
  TORCH_CHECK(x.numel() == weight.size(1), "matvec: x has ", x.numel(), " elements, weight expects ", weight.size(1));
  const int64_t O = weight.size(0), K = weight.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous().view({K});
  at::Tensor y = at::empty({O}, xf.options());
  if (weight.scalar_type() == at::kBFloat16) {
    run(reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), xf.data_ptr<float>(),
        y.data_ptr<float>(), O, K);
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kFloat, "matvec: weight must be fp32 or bf16");
    run(weight.data_ptr<float>(), xf.data_ptr<float>(), y.data_ptr<float>(), O, K);
  }
  return y.to(x.scalar_type());
}

// How many threads at::parallel_for gives `n` items in this library. ATen's parallel_for is a header
// template: with torch's OpenMP backend it is a `#pragma omp parallel` compiled into the caller, so a
// library built without -fopenmp runs it as a serial loop (1 here, whatever torch.get_num_threads()).
int64_t parallel_threads(int64_t n) {
  std::atomic<int> most{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num() + 1;
    int seen = most.load();
    while (id > seen && !most.compare_exchange_weak(seen, id)) {
    }
  });
  return most.load();
}
