// The Python module of the CPU extension (peft_rwkv7/ops/cpu.py builds wkv7_cpu.cpp, rnn_step_cpu.cpp,
// token_mix_cpu.cpp, timemix_cpu.cpp, gate_cpu.cpp, decay_cpu.cpp, loss_cpu.cpp, thin_cpu.cpp, cpu_alloc.cpp and
// this file into one library): every function it exports.

#include <torch/python.h>  // pybind11 and its tensor casters, without the C++ frontend (torch/extension.h)

#include <vector>

// rnn_step_cpu.cpp
int64_t parallel_threads(int64_t n);
torch::Tensor matvec(const torch::Tensor& weight, const torch::Tensor& x);
torch::Tensor vecmat(const torch::Tensor& x, const torch::Tensor& weight);
std::vector<torch::Tensor> wkv7_step(const std::vector<torch::Tensor>& rdkvab, const torch::Tensor& state);
// token_mix_cpu.cpp
std::vector<torch::Tensor> token_mix_forward(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&);
std::vector<torch::Tensor> token_mix_backward(const std::vector<torch::Tensor>&, const torch::Tensor&,
                                              const torch::Tensor&, const torch::Tensor&, bool, bool, bool);
// timemix_cpu.cpp
std::vector<torch::Tensor> key_prep_forward(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                            const torch::Tensor&, int64_t);
std::vector<torch::Tensor> key_prep_backward(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                             const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                             const torch::Tensor&, int64_t, bool);
std::vector<torch::Tensor> wkv_output_forward(const std::vector<torch::Tensor>&, const torch::Tensor&,
                                              const torch::Tensor&, const torch::Tensor&, int64_t, double, bool);
std::vector<torch::Tensor> wkv_output_backward(const torch::Tensor&, const std::vector<torch::Tensor>&,
                                               const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                               const torch::Tensor&, int64_t, double, bool);

// gate_cpu.cpp
at::Tensor bias_sigmoid_forward(const at::Tensor& p, const at::Tensor& bias);
std::vector<at::Tensor> bias_sigmoid_backward(const at::Tensor& go, const at::Tensor& s, bool want_bias);
at::Tensor value_residual_forward(const at::Tensor& v, const at::Tensor& vf, const at::Tensor& p,
                                  const at::Tensor& bias);
std::vector<at::Tensor> value_residual_backward(const at::Tensor& go, const at::Tensor& v, const at::Tensor& vf,
                                                const at::Tensor& p, const at::Tensor& bias, bool want_v,
                                                bool want_vf, bool want_bias);

// wkv7_cpu.cpp
void wkv7_forward(const std::vector<torch::Tensor>& rdkvab, const torch::Tensor& s0, torch::Tensor y,
                  torch::Tensor ckpt, torch::Tensor s_final, int64_t tiles);
void wkv7_backward(const std::vector<torch::Tensor>& rdkvab, const torch::Tensor& ckpt, const torch::Tensor& dy,
                   const torch::Tensor& ds_final, std::vector<torch::Tensor> grads, torch::Tensor ds0, int64_t tiles);
void wkv7_backward_state(const std::vector<torch::Tensor>& rdkvab, const torch::Tensor& dy,
                         const torch::Tensor& ds_final, torch::Tensor ds0, int64_t tiles);
// token_mix_cpu.cpp
torch::Tensor relu_square_forward(const torch::Tensor& x);
std::vector<torch::Tensor> decay_forward(const torch::Tensor& z, double offset, bool want_grad);
int64_t online_softmax_block(torch::Tensor z, const torch::Tensor& labels, int64_t a, torch::Tensor m, torch::Tensor s,
                             torch::Tensor picked, torch::Tensor scale);
void softmax_grad_bf16(torch::Tensor z, const torch::Tensor& labels, torch::Tensor lse, torch::Tensor picked,
                       torch::Tensor ok, bool want_q);
void logsumexp_f64(const torch::Tensor& z, torch::Tensor out, torch::Tensor ok);
torch::Tensor relu_square_backward(const torch::Tensor& g, const torch::Tensor& y);
torch::Tensor relu_square_backward_x(const torch::Tensor& g, const torch::Tensor& x);

// thin_cpu.cpp
at::Tensor thin_nt(const at::Tensor& x, const at::Tensor& w, double alpha, bool w_rk);
at::Tensor thin_tn(const at::Tensor& g, const at::Tensor& x, double alpha, bool out_kr);

// cpu_alloc.cpp
void cpu_cache_install(int64_t min_bytes);
bool cpu_cache_uninstall();
int64_t cpu_cache_trim();
std::vector<int64_t> cpu_cache_stats();
bool cpu_cache_raw_roundtrip(int64_t n);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &wkv7_forward, "WKV7 forward (fp32, writes y, checkpoints and the final state)");
  m.def("backward", &wkv7_backward, "WKV7 backward (fp32, writes every input gradient and dL/dS_0)");
  m.def("backward_state", &wkv7_backward_state, "WKV7 backward of dL/dS_0 alone (no input gradient wanted)");
  m.def("matvec", &matvec, "one row times a contiguous [out, in] fp32/bf16 weight (batch-1 generation)");
  m.def("vecmat", &vecmat, "one row times a contiguous [in, out] fp32 weight (batch-1 generation)");
  m.def("parallel_threads", &parallel_threads, "threads at::parallel_for runs on in this library (a check)");
  m.def("wkv7_step", &wkv7_step, "WKV7 update of one token, no autograd (fp32; returns y and the new state)");
  m.def("token_mix_forward", &token_mix_forward, "TimeMix/ChannelMix token shift and lerps (fp32 or bf16 rows)");
  m.def("token_mix_backward", &token_mix_backward, "its gradients (parameter ones summed in fixed row blocks)");
  m.def("decay_forward", &decay_forward, "RWKV-7's decay exp(-exp(logsigmoid(z) - offset)) and its z-gradient (fp32)");
  m.def("online_softmax_block", &online_softmax_block, "one vocabulary block into the loss's running max and sum (fp32)");
  m.def("softmax_grad_bf16", &softmax_grad_bf16, "a chunk of bf16 logits into q = softmax - onehot, in place");
  m.def("logsumexp_f64", &logsumexp_f64, "fp64 log-sum-exp of each row of fp32 or bf16 logits (evaluation)");
  m.def("relu_square_forward", &relu_square_forward, "ChannelMix's relu(x)^2 (fp32 or bf16)");
  m.def("relu_square_backward", &relu_square_backward, "its gradient g * sqrt(y) * 2 from the output y (fp32)");
  m.def("thin_nt", &thin_nt, "alpha x [T, K] w [K, R] (or w [R, K] transposed) -> [T, R] (fp32; x A^T, g B)");
  m.def("thin_tn", &thin_tn, "alpha g [T, R]^T x [T, K] -> [R, K] or [K, R] (fp32; the factors' gradients)");
  m.def("relu_square_backward_x", &relu_square_backward_x, "its gradient (g * relu(x)) * 2 from x (bf16)");
  m.def("key_prep_forward", &key_prep_forward, "TimeMix's k, -kk and kk a (fp32 or bf16 rows)");
  m.def("key_prep_backward", &key_prep_backward, "their gradients (parameter ones summed in fixed row blocks)");
  m.def("wkv_output_forward", &wkv_output_forward, "TimeMix's ln_x, bonus and gate after the WKV (fp32 or bf16 rows)");
  m.def("wkv_output_backward", &wkv_output_backward, "their gradients (parameter ones summed in fixed row blocks)");
  m.def("bias_sigmoid_forward", &bias_sigmoid_forward, "TimeMix's a = sigmoid(p + a0) (fp32 or bf16 rows)");
  m.def("bias_sigmoid_backward", &bias_sigmoid_backward, "its gradients from the output (bias summed in fixed row blocks)");
  m.def("value_residual_forward", &value_residual_forward, "TimeMix's v + (v_first - v) sigmoid(p + v0) (fp32 or bf16 rows)");
  m.def("value_residual_backward", &value_residual_backward, "its gradients (bias summed in fixed row blocks)");
  m.def("cpu_cache_install", &cpu_cache_install, "torch's CPU allocator caches blocks >= min_bytes by size class (again after uninstalling)");
  m.def("cpu_cache_uninstall", &cpu_cache_uninstall, "gives torch's CPU allocator back to the one before, until installed again");
  m.def("cpu_cache_trim", &cpu_cache_trim, "after a step: unmaps free blocks not handed out for 4 steps");
  m.def("cpu_cache_stats", &cpu_cache_stats, "[live, free, mapped, peak live] bytes, hits, misses, blocks returned");
  m.def("cpu_cache_raw_roundtrip", &cpu_cache_raw_roundtrip, "raw_allocate/raw_deallocate n bytes as oneDNN does (a check); whether the cache served it");
}
