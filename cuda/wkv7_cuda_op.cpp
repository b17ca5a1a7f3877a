// Torch bindings for the WKV7 CUDA kernels in wkv7_cuda.cu.
//
// The Python side (peft_rwkv7/ops/cuda.py) allocates every output and passes empty tensors for
// the optional ones; here we only check shapes, dtypes and devices and launch on the current stream.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

int wkv7_cuda_forward(int head_size, bool bf16, int B, int T_len, int H, const void* r, const void* w,
                      const void* k, const void* v, const void* a, const void* b, const float* s0, void* y,
                      float* s_out, float* ckpt, cudaStream_t stream);
int wkv7_cuda_backward(int head_size, bool bf16, int B, int T_len, int H, const void* r, const void* w,
                       const void* k, const void* v, const void* a, const void* b, const void* dy,
                       const float* ds_out, const float* ckpt, float* scratch, void* dr, void* dw, void* dk,
                       void* dv, void* da, void* db, float* ds0, cudaStream_t stream);
int wkv7_cuda_chunk_len();

namespace {

void check_input(const torch::Tensor& x, const torch::Tensor& like, const char* name) {
    TORCH_CHECK(x.is_cuda(), "wkv7_cuda: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.is_contiguous(), "wkv7_cuda: ", name, " must be contiguous");
    TORCH_CHECK(x.scalar_type() == like.scalar_type(), "wkv7_cuda: ", name, " has dtype ", x.scalar_type(),
                ", expected ", like.scalar_type());
    TORCH_CHECK(x.sizes() == like.sizes(), "wkv7_cuda: ", name, " has shape ", x.sizes(), ", expected ",
                like.sizes());
    TORCH_CHECK(x.device() == like.device(), "wkv7_cuda: ", name, " is on ", x.device(), ", expected ",
                like.device());
}

// Optional fp32 tensor: empty means "absent" (null pointer to the kernel).
float* optional_f32(const torch::Tensor& x, at::IntArrayRef shape, const torch::Tensor& like, const char* name) {
    if (x.numel() == 0) return nullptr;
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "wkv7_cuda: ", name, " must be float32");
    TORCH_CHECK(x.is_contiguous() && x.sizes() == shape, "wkv7_cuda: ", name, " must be contiguous of shape ",
                shape, ", got ", x.sizes());
    TORCH_CHECK(x.device() == like.device(), "wkv7_cuda: ", name, " is on ", x.device());
    return x.data_ptr<float>();
}

bool is_bf16(const torch::Tensor& r) {
    TORCH_CHECK(r.scalar_type() == torch::kFloat32 || r.scalar_type() == torch::kBFloat16,
                "wkv7_cuda: inputs must be float32 or bfloat16, got ", r.scalar_type());
    return r.scalar_type() == torch::kBFloat16;
}

void check_launch(int status, int64_t head_size) {
    TORCH_CHECK(status != -1, "wkv7_cuda: head size ", head_size, " is not compiled in (16, 32, 64, 128)");
    TORCH_CHECK(status == 0, "wkv7_cuda: kernel launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(status)));
}

// r..b: [B, T, H, N]; s0: [B, H, N, N] or empty; y: like r; s_out: [B, H, N, N];
// ckpt: [B, H, ceil(T / chunk), N, N] or empty (no backward).
void forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
             torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor s_out, torch::Tensor ckpt) {
    TORCH_CHECK(r.dim() == 4, "wkv7_cuda: inputs must be [B, T, H, N]");
    const bool bf16 = is_bf16(r);
    check_input(r, r, "r");
    check_input(w, r, "w");
    check_input(k, r, "k");
    check_input(v, r, "v");
    check_input(a, r, "a");
    check_input(b, r, "b");
    check_input(y, r, "y");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const int64_t chunks = (T + wkv7_cuda_chunk_len() - 1) / wkv7_cuda_chunk_len();
    float* s0_p = optional_f32(s0, {B, H, N, N}, r, "initial state");
    float* s_out_p = optional_f32(s_out, {B, H, N, N}, r, "final state");
    TORCH_CHECK(s_out_p != nullptr, "wkv7_cuda: final state buffer is required");
    float* ckpt_p = optional_f32(ckpt, {B, H, chunks, N, N}, r, "checkpoints");
    const c10::cuda::CUDAGuard guard(r.device());
    check_launch(wkv7_cuda_forward(static_cast<int>(N), bf16, static_cast<int>(B), static_cast<int>(T),
                                   static_cast<int>(H), r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(),
                                   a.data_ptr(), b.data_ptr(), s0_p, y.data_ptr(), s_out_p, ckpt_p,
                                   c10::cuda::getCurrentCUDAStream().stream()),
                 N);
}

// dy: like r; ds_out: [B, H, N, N] or empty; ckpt from forward; scratch: [B, H, chunk, N, N];
// dr..db: like r; ds0: [B, H, N, N] or empty (initial-state gradient not needed).
void backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
              torch::Tensor b, torch::Tensor dy, torch::Tensor ds_out, torch::Tensor ckpt, torch::Tensor scratch,
              torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da,
              torch::Tensor db, torch::Tensor ds0) {
    TORCH_CHECK(r.dim() == 4, "wkv7_cuda: inputs must be [B, T, H, N]");
    const bool bf16 = is_bf16(r);
    const char* names[] = {"r", "w", "k", "v", "a", "b", "dy", "dr", "dw", "dk", "dv", "da", "db"};
    const torch::Tensor* tensors[] = {&r, &w, &k, &v, &a, &b, &dy, &dr, &dw, &dk, &dv, &da, &db};
    for (int n = 0; n < 13; ++n) check_input(*tensors[n], r, names[n]);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    const int64_t chunk = wkv7_cuda_chunk_len();
    const int64_t chunks = (T + chunk - 1) / chunk;
    const float* ds_out_p = optional_f32(ds_out, {B, H, N, N}, r, "final-state gradient");
    const float* ckpt_p = optional_f32(ckpt, {B, H, chunks, N, N}, r, "checkpoints");
    float* scratch_p = optional_f32(scratch, {B, H, chunk, N, N}, r, "scratch");
    TORCH_CHECK(ckpt_p != nullptr && scratch_p != nullptr, "wkv7_cuda: checkpoints and scratch are required");
    float* ds0_p = optional_f32(ds0, {B, H, N, N}, r, "initial-state gradient");
    const c10::cuda::CUDAGuard guard(r.device());
    check_launch(wkv7_cuda_backward(static_cast<int>(N), bf16, static_cast<int>(B), static_cast<int>(T),
                                    static_cast<int>(H), r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(),
                                    a.data_ptr(), b.data_ptr(), dy.data_ptr(), ds_out_p, ckpt_p, scratch_p,
                                    dr.data_ptr(), dw.data_ptr(), dk.data_ptr(), dv.data_ptr(), da.data_ptr(),
                                    db.data_ptr(), ds0_p, c10::cuda::getCurrentCUDAStream().stream()),
                 N);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "WKV7 forward (CUDA)");
    m.def("backward", &backward, "WKV7 backward (CUDA)");
    m.def("chunk_len", &wkv7_cuda_chunk_len, "steps between forward state checkpoints");
}
