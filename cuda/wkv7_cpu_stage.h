// bf16 inputs of the CPU WKV7 kernel (wkv7_cpu.cpp): a (batch, head) sequence's rows gathered into fp32
// [rows, N] arrays before the kernel runs on them, and its outputs scattered back after, rounded where the
// tensor is bf16. The kernel itself stays fp32. Before (issue 23, round 14), ops/cpu.py widened the six
// [B, T, H, N] inputs into fp32 copies, widened them again in backward and rounded y and five gradients: ~20 ms
// of a 0.48 s bf16 step at 0.1B ctx 512. The kernel stages one chunk of 32 steps at a time (ChunkStage in
// wkv7_cpu.cpp, round 15); round 14 staged a whole sequence (1.8-3.3 MiB at T 512). On the kernel alone with
// its inputs in cache, the bf16 backward was then 15-20% slower than on the same values in fp32, and is now as
// fast (the gap did not grow with T, so it is not L2 capacity alone); with the caches evicted, as in training,
// the two are within the measurements' spread.
#pragma once

#include <cstdint>

#include "cpu_bf16.h"
#include "wkv7_cpu_simd.h"

namespace {

template <typename T>
WKV_INLINE void gather_rows(const T* src, int64_t stride, int64_t rows, int64_t N, float* dst) {
  for (int64_t t = 0; t < rows; ++t) {
    const T* s = src + t * stride;
    float* d = dst + t * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) d[n] = ld(s[n]);
  }
}

template <typename T>
WKV_INLINE void scatter_rows(const float* src, int64_t rows, int64_t N, T* dst, int64_t stride) {
  for (int64_t t = 0; t < rows; ++t) {
    const float* s = src + t * N;
    T* d = dst + t * stride;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) st(&d[n], s[n]);
  }
}

WKV_CLONES void gather_head(const bf16* src, int64_t stride, int64_t rows, int64_t N, float* dst) {
  gather_rows(src, stride, rows, N, dst);
}
WKV_CLONES void gather_head(const float* src, int64_t stride, int64_t rows, int64_t N, float* dst) {
  gather_rows(src, stride, rows, N, dst);
}
WKV_CLONES void scatter_head(const float* src, int64_t rows, int64_t N, bf16* dst, int64_t stride) {
  scatter_rows(src, rows, N, dst, stride);
}
WKV_CLONES void scatter_head(const float* src, int64_t rows, int64_t N, float* dst, int64_t stride) {
  scatter_rows(src, rows, N, dst, stride);
}

// Sequence `seq`'s rows of x ([B, T, H, N], fp32 or bf16; element (t, n) at seq + t * stride + n) into dst.
void gather_head(const at::Tensor& x, int64_t seq, int64_t stride, int64_t rows, int64_t N, float* dst) {
  if (x.scalar_type() == at::kBFloat16)
    gather_head(reinterpret_cast<const bf16*>(x.data_ptr()) + seq, stride, rows, N, dst);
  else
    gather_head(x.data_ptr<float>() + seq, stride, rows, N, dst);
}

// src [rows, N] into sequence `seq`'s rows of x ([B, T, H, N], fp32 or bf16: rounded once).
void scatter_head(const float* src, int64_t rows, int64_t N, at::Tensor& x, int64_t seq, int64_t stride) {
  if (x.scalar_type() == at::kBFloat16)
    scatter_head(src, rows, N, reinterpret_cast<bf16*>(x.data_ptr()) + seq, stride);
  else
    scatter_head(src, rows, N, x.data_ptr<float>() + seq, stride);
}

}  // namespace
