// WKV7 recurrence on CUDA: launchers and host entry points for the kernels in wkv7_cuda.cuh
// (the math and the algorithm are described there).
//
// Only CUDA runtime headers: this file compiles standalone with nvcc (see the compile test);
// the torch-facing glue lives in wkv7_cuda_op.cpp. The kernel bodies are kept in the header so
// that tests can also compile them with the host compiler (cuda_emu.h, wkv7_cuda_emu_op.cpp).

#include <cuda_runtime.h>

#include "wkv7_cuda.cuh"

namespace wkv7 {

template <int N, typename T>
int launch_forward(int B, int T_len, int H, const void* r, const void* w, const void* k, const void* v,
                   const void* a, const void* b, const float* s0, void* y, float* s_out, float* ckpt,
                   cudaStream_t stream) {
    forward_kernel<N, T><<<B * H, N, 0, stream>>>(
        T_len, H, static_cast<const T*>(r), static_cast<const T*>(w), static_cast<const T*>(k),
        static_cast<const T*>(v), static_cast<const T*>(a), static_cast<const T*>(b), s0, static_cast<T*>(y),
        s_out, ckpt);
    return static_cast<int>(cudaGetLastError());
}

template <int N, typename T>
int launch_backward(int B, int T_len, int H, const void* r, const void* w, const void* k, const void* v,
                    const void* a, const void* b, const void* dy, const float* ds_out, const float* ckpt,
                    float* scratch, void* dr, void* dw, void* dk, void* dv, void* da, void* db, float* ds0,
                    cudaStream_t stream) {
    backward_kernel<N, T><<<B * H, N, 0, stream>>>(
        T_len, H, static_cast<const T*>(r), static_cast<const T*>(w), static_cast<const T*>(k),
        static_cast<const T*>(v), static_cast<const T*>(a), static_cast<const T*>(b),
        static_cast<const T*>(dy), ds_out, ckpt, scratch, static_cast<T*>(dr), static_cast<T*>(dw),
        static_cast<T*>(dk), static_cast<T*>(dv), static_cast<T*>(da), static_cast<T*>(db), ds0);
    return static_cast<int>(cudaGetLastError());
}

}  // namespace wkv7

// Head sizes compiled in; the binding rejects others before launching.
#define WKV7_FOR_EACH_HEAD_SIZE(X) X(16) X(32) X(64) X(128)

// Host entry points used by wkv7_cuda_op.cpp. Pointers may be null where noted (s0: zero initial
// state; ckpt: inference, no checkpoints; ds_out: no gradient on the final state; ds0: not needed).
// Return 0 on success, -1 for an unsupported head size, else a cudaError_t from the launch.
int wkv7_cuda_forward(int head_size, bool bf16, int B, int T_len, int H, const void* r, const void* w,
                      const void* k, const void* v, const void* a, const void* b, const float* s0, void* y,
                      float* s_out, float* ckpt, cudaStream_t stream) {
#define WKV7_FWD_CASE(NN)                                                                              \
    case NN:                                                                                           \
        return bf16 ? wkv7::launch_forward<NN, __nv_bfloat16>(B, T_len, H, r, w, k, v, a, b, s0, y,   \
                                                              s_out, ckpt, stream)                     \
                    : wkv7::launch_forward<NN, float>(B, T_len, H, r, w, k, v, a, b, s0, y, s_out, ckpt, \
                                                      stream);
    switch (head_size) {
        WKV7_FOR_EACH_HEAD_SIZE(WKV7_FWD_CASE)
        default:
            return -1;
    }
#undef WKV7_FWD_CASE
}

int wkv7_cuda_backward(int head_size, bool bf16, int B, int T_len, int H, const void* r, const void* w,
                       const void* k, const void* v, const void* a, const void* b, const void* dy,
                       const float* ds_out, const float* ckpt, float* scratch, void* dr, void* dw, void* dk,
                       void* dv, void* da, void* db, float* ds0, cudaStream_t stream) {
#define WKV7_BWD_CASE(NN)                                                                              \
    case NN:                                                                                           \
        return bf16 ? wkv7::launch_backward<NN, __nv_bfloat16>(B, T_len, H, r, w, k, v, a, b, dy, ds_out, \
                                                               ckpt, scratch, dr, dw, dk, dv, da, db, ds0, \
                                                               stream)                                 \
                    : wkv7::launch_backward<NN, float>(B, T_len, H, r, w, k, v, a, b, dy, ds_out, ckpt,  \
                                                       scratch, dr, dw, dk, dv, da, db, ds0, stream);
    switch (head_size) {
        WKV7_FOR_EACH_HEAD_SIZE(WKV7_BWD_CASE)
        default:
            return -1;
    }
#undef WKV7_BWD_CASE
}

int wkv7_cuda_chunk_len() { return wkv7::kChunk; }
