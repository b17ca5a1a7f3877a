// The WKV7 CUDA kernels (wkv7_cuda.cuh) compiled by the host compiler and run on CPU tensors
// through cuda_emu.h: a test harness for the kernel source itself, not a backend. It checks the
// indexing, the barriers and the numerics of the code nvcc compiles, without a GPU.
//
// `forward` and `backward` take the same arguments as wkv7_cuda_op.cpp's, so the same Python
// autograd glue (peft_rwkv7/ops/cuda.py) drives either. Every output buffer is filled with NaN
// before the launch, so an element the kernel fails to write shows up in the comparison.
//
// Build with -std=c++20 (std::binary_semaphore) and -fno-strict-aliasing (the kernel reads float
// arrays through float4, as CUDA code does).

#include <torch/extension.h>

#include <limits>

#include "cuda_emu.h"
#include "wkv7_cuda.cuh"

static_assert(sizeof(__nv_bfloat16) == sizeof(at::BFloat16), "bf16 storage must match torch's");

namespace {

cuda_emu::Order g_order = cuda_emu::Order::kForward;

void check_input(const torch::Tensor& x, const torch::Tensor& like, const char* name) {
    TORCH_CHECK(x.device().is_cpu(), "wkv7_cuda_emu: ", name, " must be a CPU tensor");
    TORCH_CHECK(x.is_contiguous(), "wkv7_cuda_emu: ", name, " must be contiguous");
    TORCH_CHECK(x.scalar_type() == like.scalar_type(), "wkv7_cuda_emu: ", name, " has dtype ", x.scalar_type(),
                ", expected ", like.scalar_type());
    TORCH_CHECK(x.sizes() == like.sizes(), "wkv7_cuda_emu: ", name, " has shape ", x.sizes(), ", expected ",
                like.sizes());
}

// Optional fp32 tensor: empty means "absent" (null pointer to the kernel).
float* optional_f32(const torch::Tensor& x, at::IntArrayRef shape, const char* name) {
    if (x.numel() == 0) return nullptr;
    TORCH_CHECK(x.device().is_cpu(), "wkv7_cuda_emu: ", name, " must be a CPU tensor");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "wkv7_cuda_emu: ", name, " must be float32");
    TORCH_CHECK(x.is_contiguous() && x.sizes() == shape, "wkv7_cuda_emu: ", name,
                " must be contiguous of shape ", shape, ", got ", x.sizes());
    return x.data_ptr<float>();
}

bool is_bf16(const torch::Tensor& r) {
    TORCH_CHECK(r.scalar_type() == torch::kFloat32 || r.scalar_type() == torch::kBFloat16,
                "wkv7_cuda_emu: inputs must be float32 or bfloat16, got ", r.scalar_type());
    return r.scalar_type() == torch::kBFloat16;
}

void poison(const torch::Tensor& x) {
    if (x.numel() > 0) x.fill_(std::numeric_limits<float>::quiet_NaN());
}

template <typename T>
const T* in(const torch::Tensor& x) {
    return static_cast<const T*>(x.data_ptr());
}
template <typename T>
T* out(const torch::Tensor& x) {
    return static_cast<T*>(x.data_ptr());
}

// Calls fn.template operator()<N, T>() for the tensor's head size and dtype, as the .cu's switch does.
template <typename Fn>
void dispatch(int64_t N, bool bf16, Fn&& fn) {
    switch (N) {
#define WKV7_EMU_CASE(NN)                               \
    case NN:                                            \
        if (bf16)                                       \
            fn.template operator()<NN, __nv_bfloat16>(); \
        else                                            \
            fn.template operator()<NN, float>();         \
        return;
        WKV7_EMU_CASE(16) WKV7_EMU_CASE(32) WKV7_EMU_CASE(64) WKV7_EMU_CASE(128)
#undef WKV7_EMU_CASE
        default:
            TORCH_CHECK(false, "wkv7_cuda_emu: head size ", N, " is not compiled in (16, 32, 64, 128)");
    }
}

int64_t n_chunks(int64_t T) { return (T + wkv7::kChunk - 1) / wkv7::kChunk; }

void forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
             torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor s_out, torch::Tensor ckpt) {
    TORCH_CHECK(r.dim() == 4, "wkv7_cuda_emu: inputs must be [B, T, H, N]");
    const bool bf16 = is_bf16(r);
    const char* names[] = {"r", "w", "k", "v", "a", "b", "y"};
    const torch::Tensor* tensors[] = {&r, &w, &k, &v, &a, &b, &y};
    for (int n = 0; n < 7; ++n) check_input(*tensors[n], r, names[n]);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const float* s0_p = optional_f32(s0, {B, H, N, N}, "initial state");
    float* s_out_p = optional_f32(s_out, {B, H, N, N}, "final state");
    TORCH_CHECK(s_out_p != nullptr, "wkv7_cuda_emu: final state buffer is required");
    float* ckpt_p = optional_f32(ckpt, {B, H, n_chunks(T), N, N}, "checkpoints");
    for (const auto* x : {&y, &s_out, &ckpt}) poison(*x);
    const int Ti = static_cast<int>(T), Hi = static_cast<int>(H);
    dispatch(N, bf16, [&]<int NN, typename E>() {
        cuda_emu::launch(
            dim3(static_cast<unsigned>(B * H)), dim3(NN),
            [&] {
                wkv7::forward_kernel<NN, E>(Ti, Hi, in<E>(r), in<E>(w), in<E>(k), in<E>(v), in<E>(a), in<E>(b),
                                            s0_p, out<E>(y), s_out_p, ckpt_p);
            },
            g_order);
    });
}

void backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
              torch::Tensor b, torch::Tensor dy, torch::Tensor ds_out, torch::Tensor ckpt, torch::Tensor scratch,
              torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da,
              torch::Tensor db, torch::Tensor ds0) {
    TORCH_CHECK(r.dim() == 4, "wkv7_cuda_emu: inputs must be [B, T, H, N]");
    const bool bf16 = is_bf16(r);
    const char* names[] = {"r", "w", "k", "v", "a", "b", "dy", "dr", "dw", "dk", "dv", "da", "db"};
    const torch::Tensor* tensors[] = {&r, &w, &k, &v, &a, &b, &dy, &dr, &dw, &dk, &dv, &da, &db};
    for (int n = 0; n < 13; ++n) check_input(*tensors[n], r, names[n]);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const float* ds_out_p = optional_f32(ds_out, {B, H, N, N}, "final-state gradient");
    const float* ckpt_p = optional_f32(ckpt, {B, H, n_chunks(T), N, N}, "checkpoints");
    float* scratch_p = optional_f32(scratch, {B, H, wkv7::kChunk, N, N}, "scratch");
    TORCH_CHECK(ckpt_p != nullptr && scratch_p != nullptr,
                "wkv7_cuda_emu: checkpoints and scratch are required");
    float* ds0_p = optional_f32(ds0, {B, H, N, N}, "initial-state gradient");
    for (const auto* x : {&scratch, &dr, &dw, &dk, &dv, &da, &db, &ds0}) poison(*x);
    const int Ti = static_cast<int>(T), Hi = static_cast<int>(H);
    dispatch(N, bf16, [&]<int NN, typename E>() {
        cuda_emu::launch(
            dim3(static_cast<unsigned>(B * H)), dim3(NN),
            [&] {
                wkv7::backward_kernel<NN, E>(Ti, Hi, in<E>(r), in<E>(w), in<E>(k), in<E>(v), in<E>(a), in<E>(b),
                                             in<E>(dy), ds_out_p, ckpt_p, scratch_p, out<E>(dr), out<E>(dw),
                                             out<E>(dk), out<E>(dv), out<E>(da), out<E>(db), ds0_p);
            },
            g_order);
    });
}

// 0: threads take turns in index order between barriers, 1: reverse order, 2: a fixed-seed shuffle.
void set_thread_order(int64_t order) {
    TORCH_CHECK(order >= 0 && order <= 2, "wkv7_cuda_emu: thread order must be 0, 1 or 2");
    g_order = static_cast<cuda_emu::Order>(order);
}

// The kernel's own bf16 conversions, elementwise, for the bit-exactness test.
torch::Tensor float_to_bf16(const torch::Tensor& x) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "float_to_bf16: CPU float32 only");
    const torch::Tensor src = x.contiguous();
    torch::Tensor dst = torch::empty_like(src, src.options().dtype(torch::kBFloat16));
    const float* s = src.data_ptr<float>();
    __nv_bfloat16* d = out<__nv_bfloat16>(dst);
    for (int64_t n = 0; n < src.numel(); ++n) d[n] = wkv7::from_float<__nv_bfloat16>(s[n]);
    return dst;
}

torch::Tensor bf16_to_float(const torch::Tensor& x) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kBFloat16, "bf16_to_float: CPU bfloat16 only");
    const torch::Tensor src = x.contiguous();
    torch::Tensor dst = torch::empty_like(src, src.options().dtype(torch::kFloat32));
    const __nv_bfloat16* s = in<__nv_bfloat16>(src);
    float* d = dst.data_ptr<float>();
    for (int64_t n = 0; n < src.numel(); ++n) d[n] = wkv7::to_float(s[n]);
    return dst;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV7 forward (CUDA kernel source, emulated on the CPU)");
    m.def("backward", &backward, "WKV7 backward (CUDA kernel source, emulated on the CPU)");
    m.def("chunk_len", [] { return wkv7::kChunk; }, "steps between forward state checkpoints");
    m.def("set_thread_order", &set_thread_order, "0: forward, 1: reverse, 2: shuffled thread turns");
    m.def("thread_order", [] { return static_cast<int>(g_order); });
    m.def("float_to_bf16", &float_to_bf16, "__float2bfloat16_rn as the kernel uses it");
    m.def("bf16_to_float", &bf16_to_float, "__bfloat162float as the kernel uses it");
}
