// Helpers shared by the row-wise CPU ops (token_mix_cpu.cpp, timemix_cpu.cpp): dtype checks and the fixed
// row blocks that parameter-gradient partial sums follow (so results never depend on the thread count).
#pragma once

#include "cpu_aten.h"

namespace {

constexpr int64_t kBlock = 32;  // rows per work item and per parameter-gradient partial sum

int64_t n_blocks(int64_t rows) { return (rows + kBlock - 1) / kBlock; }

// A contiguous CPU tensor of `dtype` (fp32, or bf16 for the rows of cpu_bf16.h's ops) and `shape`.
void check_rows(const at::Tensor& x, at::ScalarType dtype, const char* op, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype && x.is_contiguous(), op, ": ", name,
              " must be a contiguous ", dtype == at::kFloat ? "fp32" : "bf16", " CPU tensor");
  TORCH_CHECK(x.sizes() == shape, op, ": ", name, " has shape ", x.sizes(), ", expected ", shape);
}

void check_f32(const at::Tensor& x, const char* op, const char* name, at::IntArrayRef shape) {
  check_rows(x, at::kFloat, op, name, shape);
}

const float* ptr_or_null(const at::Tensor& x) { return x.defined() && x.numel() ? x.data_ptr<float>() : nullptr; }
float* out_or_null(at::Tensor& x) { return x.defined() && x.numel() ? x.data_ptr<float>() : nullptr; }

// Per-block partial sums [blocks, ...] added in block order, serially: the parameter gradients (empty stays empty).
at::Tensor sum_blocks(const at::Tensor& part) {
  if (!part.numel()) return part;
  auto out = part[0].clone();
  const int64_t n = out.numel();
  float* o = out.data_ptr<float>();
  const float* p = part.data_ptr<float>();
  for (int64_t b = 1; b < part.size(0); ++b)
    for (int64_t i = 0; i < n; ++i) o[i] += p[b * n + i];
  return out;
}

}  // namespace
