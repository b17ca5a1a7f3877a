// bf16 rows for the fused element-wise CPU ops (token_mix_cpu.cpp, timemix_cpu.cpp). Their per-row
// functions are templates on the rows' element type: fp32, or bf16 read and written in place, where the
// Python side used to widen every bf16 input into an fp32 copy and round every fp32 output into a bf16 one
// (issue 23, round 14: ~1000 copies, 0.07 s of a 0.53 s bf16 step on a CPU with AMX). Every value is
// computed in fp32 as before: a bf16 load is exact, and a bf16 store rounds once to nearest even, which is
// what torch's fp32 -> bf16 cast does, so results are the same bits as widen -> fp32 op -> round.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_aten.h"
#include "cpu_rows.h"
#include "wkv7_cpu_simd.h"

namespace {

// A bf16 value by its bits (the layout of c10::BFloat16, without its constructors: plain loads and stores
// that GCC vectorises).
struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 is 16 bits");

WKV_INLINE float ld(float v) { return v; }

WKV_INLINE float ld(bf16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

WKV_INLINE void st(float* p, float v) { *p = v; }

// Round to nearest, ties to even (c10's round_to_nearest_even), a NaN to a quiet NaN of the same sign. The
// choice is an integer select on the bits, so the loop vectorises without AVX-512's masks (as cpu_exp.h's).
WKV_INLINE void st(bf16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  p->bits = uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// The element type of a tensor's data: at::kFloat -> float, at::kBFloat16 -> bf16.
template <typename T>
constexpr at::ScalarType scalar_type_of() {
  return sizeof(T) == 4 ? at::kFloat : at::kBFloat16;
}

template <typename T>
const T* rows_in(const at::Tensor& x) {
  return x.defined() && x.numel() ? reinterpret_cast<const T*>(x.data_ptr()) : nullptr;
}

template <typename T>
T* rows_out(at::Tensor& x) {
  return x.defined() && x.numel() ? reinterpret_cast<T*>(x.data_ptr()) : nullptr;
}

// The rows' dtype of an op, from its first row tensor: fp32 or bf16.
at::ScalarType rows_dtype(const at::Tensor& x, const char* op) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, op, ": rows must be fp32 or bf16, got ", dt);
  return dt;
}

}  // namespace
