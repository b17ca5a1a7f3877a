// WKV7 recurrence on CPU: fused forward and backward, the C++ twin of the CUDA kernel.
//
// Per (batch, head), with the state S value-major (S[i][j]: i = value index, j = key index):
//
//   S_t = S_{t-1} (diag(d_t) + a_t b_t^T) + v_t k_t^T,   y_t = S_t r_t,   d_t = exp(-exp(w_t))
//
// Backward, with G_t = dL/dS_t (starting from dL/dS_T) and walking t = T-1 .. 0:
//   G_t += dy_t r_t^T
//   dv_t = G_t k_t           gb = G_t b_t           dk_t = G_t^T v_t
//   dd_t = sum_i S_{t-1} * G_t (per key j)          da_t = S_{t-1}^T gb
//   db_t = G_t^T (S_{t-1} a_t)                      dr_t = S_t^T dy_t
//   G_{t-1} = G_t diag(d_t) + gb a_t^T              (dw_t = -dd_t d_t exp(w_t) is left to the caller)
// and dL/dS_0 = G_0. The forward stores S every kChunk steps; the backward recomputes the states
// of one chunk at a time from its checkpoint (they stay in L2), then walks the chunk backwards.
//
// Inside the kernel S and G are kept key-major (ST[j][i] = S[i][j]): then S a, S r, G k, G b and
// the updates are sums of contiguous rows scaled by scalars (vectorised over i without horizontal
// sums), and only the five per-key sums of the backward (dk, dd, da, db, dr) reduce along a row;
// those are kept as 8-lane partial sums and reduced 8 rows at a time by a shuffle tree. The caller
// pads N to a multiple of 8 with zeros (exact: padded rows and columns of S stay zero).
//
// Everything is fp32: bf16 r, k, v, a, b (and y, dy and their gradients) are staged in fp32 one chunk of
// kChunk steps at a time (ChunkStage, wkv7_cpu_stage.h); the caller makes d = exp(-exp(w)) in fp32. The
// per-step functions (wkv7_cpu_step.h) are `omp simd` loops over compile-time widths so GCC vectorises them;
// on x86-64 every per-head function is compiled three times (AVX-512, AVX2+FMA and baseline) and picked at
// load time from the CPU's features (GCC target_clones), so the build never depends on the build machine (no
// -march=native). On AVX-512 CPUs the column tiles
// are whole rows (up to 64 values: 4 of its 32 registers per tile vector) and pass B of the backward runs
// on 16 lanes: 0.1B ctx 512 forward 2x, backward 1.3-1.5x the AVX2 tiles' speed on one Xeon.

#include "cpu_aten.h"


#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "wkv7_cpu_simd.h"
#include "wkv7_cpu_stage.h"
#include "wkv7_cpu_step.h"

namespace {

constexpr int kChunk = 32;  // steps between stored states (ops/cpu.py CHUNK); 16 before: twice the memory, same speed
constexpr int kAhead = 4;  // the forward asks for step t + kAhead's rows at step t (prefetch_rows)
constexpr int kLanes = 8;   // lanes of the 8-wide vectors below; the kernel requires N % 8 == 0

// bf16 rows are staged in fp32 one chunk of kChunk steps at a time (wkv7_cpu_stage.h): the kernel asks for a
// chunk's input rows before it and hands its output rows back after it.
struct Stager {
  virtual void before(int t0, int rows) = 0;  // input rows t0 .. t0 + rows - 1
  virtual void after(int t0, int rows) = 0;   // output rows t0 .. t0 + rows - 1

 protected:
  ~Stager() = default;
};

// One (batch, head) sequence. Inputs and per-step outputs: element (t, n) at ptr[t * stride + n], or with `stage`
// at ptr[(t - t0) * stride + n] for the rows of the chunk that starts at step t0.
struct Head {
  const float *r, *d, *k, *v, *a, *b;  // d = exp(-exp(w)), the per-step decay
  int64_t stride;
  int T, N;
  const float* s0;  // [N, N] initial state (value-major), or nullptr for zeros
  float* ckpt;      // [n_chunks + 1, N, N] key-major: S before steps 0, kChunk, ...; last is S_T
  // forward
  float* y;
  float* s_final;  // [N, N] value-major
  // backward
  const float* dy;
  const float* ds_final;  // [N, N] dL/dS_T, value-major
  float *dr, *dd, *dk, *dv, *da, *db;  // dd = dL/dd; the caller chains it to dL/dw
  float* ds0;  // [N, N] value-major
  Stager* stage;  // bf16 rows, staged per chunk; nullptr: the pointers are the tensors' own fp32 rows
};

template <int NT, int W>
WKV_INLINE void forward_head_n(const Head& h) {
  const int N = NT > 0 ? NT : h.N;
  const size_t NN = size_t(N) * N;
  std::vector<float> st(NN, 0.f), sa(N), sa_next(N);  // key-major state
  if (h.s0) transpose(N, h.s0, st.data());
  const int n_chunks = (h.T + kChunk - 1) / kChunk;
  for (int c = 0; c < n_chunks; ++c) {
    const int t0 = c * kChunk, len = std::min(kChunk, h.T - t0);
    if (h.stage) h.stage->before(t0, std::min(len + 1, h.T - t0));  // and the next chunk's first a
    const int64_t base = h.stage ? t0 : 0;
    if (c == 0) state_dot_a<NT, W>(N, st.data(), h.a, sa.data());
    if (h.ckpt) std::memcpy(h.ckpt + c * NN, st.data(), NN * sizeof(float));
    for (int t = t0; t < t0 + len; ++t) {
      const int64_t o = (t - base) * h.stride;
      float* s = st.data();
      if (!h.stage && t + kAhead < h.T) {
        const int64_t f = o + kAhead * h.stride;
        prefetch_rows({h.r + f, h.d + f, h.k + f, h.v + f, h.a + f, h.b + f}, N);
      }
      if (t + 1 < h.T)
        step_forward<NT, W, true, true>(N, s, s, sa.data(), h.d + o, h.b + o, h.k + o, h.v + o, h.r + o, h.y + o,
                                     h.a + o + h.stride, sa_next.data());
      else
        step_forward<NT, W, true, false>(N, s, s, sa.data(), h.d + o, h.b + o, h.k + o, h.v + o, h.r + o, h.y + o,
                                      nullptr, nullptr);
      sa.swap(sa_next);
    }
    if (h.stage) h.stage->after(t0, len);
  }
  if (h.ckpt) std::memcpy(h.ckpt + n_chunks * NN, st.data(), NN * sizeof(float));
  transpose(N, st.data(), h.s_final);
}

template <int NT, int W>
WKV_INLINE void backward_head_n(const Head& h) {
  const int N = NT > 0 ? NT : h.N;
  const size_t NN = size_t(N) * N;
  // states[m] = S_{t0 + m + 1} of the current chunk; S_{t0} is read from its checkpoint in place.
  std::vector<float> gt(NN), states((kChunk - 1) * NN), part(5 * size_t(N) * kLanes);
  std::vector<float> sa(kChunk * N), gb(N);
  transpose(N, h.ds_final, gt.data());
  const int n_chunks = (h.T + kChunk - 1) / kChunk;
  for (int c = n_chunks - 1; c >= 0; --c) {
    const int t0 = c * kChunk, len = std::min(kChunk, h.T - t0);
    if (h.stage) h.stage->before(t0, len);
    const int64_t base = h.stage ? t0 : 0;
    const float* s_first = h.ckpt + c * NN;
    auto s_at = [&](int m) { return m == 0 ? s_first : states.data() + (m - 1) * NN; };
    // Recompute the chunk: the backward of step m needs S_{t0+m} and sa_m = S_{t0+m}^T a.
    state_dot_a<NT, W>(N, s_first, h.a + (t0 - base) * h.stride, sa.data());
    for (int m = 0; m + 1 < len; ++m) {
      const int64_t o = (t0 + m - base) * h.stride;
      step_forward<NT, W, false, true>(N, s_at(m), states.data() + m * NN, sa.data() + m * N, h.d + o, h.b + o,
                                    h.k + o, h.v + o, nullptr, nullptr, h.a + o + h.stride,
                                    sa.data() + (m + 1) * N);
    }
    for (int m = len - 1; m >= 0; --m) {
      const int64_t o = (t0 + m - base) * h.stride;
      step_backward<NT, W>(N, gt.data(), s_at(m), sa.data() + m * N, h.d + o, h.r + o, h.k + o, h.v + o, h.a + o,
                        h.b + o, h.dy + o, h.dr + o, h.dd + o, h.dk + o, h.dv + o, h.da + o, h.db + o, gb.data(),
                        part.data());
      if (!h.stage && c > 0) {  // the next chunk's rows (the one before this), one step's worth per step
        const int64_t f = o - int64_t(kChunk) * h.stride;
        prefetch_rows({h.r + f, h.d + f, h.k + f, h.v + f, h.a + f, h.b + f, h.dy + f}, N);
        prefetch_rows<true>({h.dr + f, h.dd + f, h.dk + f, h.dv + f, h.da + f, h.db + f}, N);
      }
    }
    if (h.stage) h.stage->after(t0, len);
  }
  transpose(N, gt.data(), h.ds0);
}

// dL/dS_0 alone (wkv7_backward_state): the backward's recurrence on G without recomputing a state.
template <int NT, int W>
WKV_INLINE void backward_state_head_n(const Head& h) {
  const int N = NT > 0 ? NT : h.N;
  std::vector<float> gt(size_t(N) * N), gb(N);
  transpose(N, h.ds_final, gt.data());
  for (int c = (h.T + kChunk - 1) / kChunk - 1; c >= 0; --c) {
    const int t0 = c * kChunk, len = std::min(kChunk, h.T - t0);
    if (h.stage) h.stage->before(t0, len);
    const int64_t base = h.stage ? t0 : 0;
    for (int m = len - 1; m >= 0; --m) {
      const int64_t o = (t0 + m - base) * h.stride;
      step_backward_state<NT, W>(N, gt.data(), h.d + o, h.r + o, h.a + o, h.b + o, h.dy + o, gb.data());
    }
  }
  transpose(N, gt.data(), h.ds0);
}

// Compile-time head sizes for the common cases; any other N runs the same code with runtime bounds.
// W: the widest column tile. 16 values fit the AVX2 registers; with AVX-512 (32 registers of 16 floats)
// a whole row of up to 64 values is one tile: 4x the independent FMA chains, one pass over the state.
// The tile width changes no result: every sum runs over the keys in the same order.
template <int NT, int W>
struct HeadShape {
  static constexpr int n = NT, w = W;  // head size (0: runtime bounds), widest column tile
};

// Runs fn(HeadShape<NT, W>{}) with NT the compile-time head size where h.N is a common one, else 0, and W 64
// (`wide`) or 16: one dispatch for the forward and both backwards.
template <typename Fn>
WKV_INLINE void by_head_shape(const Head& h, bool wide, Fn&& fn) {
  auto sizes = [&](auto w) WKV_LAMBDA_INLINE {
    constexpr int W = decltype(w)::value;
    switch (h.N) {
      case 16: return fn(HeadShape<16, W>{});
      case 32: return fn(HeadShape<32, W>{});
      case 64: return fn(HeadShape<64, W>{});
      case 128: return fn(HeadShape<128, W>{});
      default: return fn(HeadShape<0, W>{});
    }
  };
  if (wide) return sizes(std::integral_constant<int, 64>{});
  return sizes(std::integral_constant<int, 16>{});
}

// tiles: 0 = by the CPU (64 where it has AVX-512F, else 16), or 16 / 64 (tests run both anywhere).
bool wide_tiles(int64_t tiles) {
  TORCH_CHECK(tiles == 0 || tiles == 16 || tiles == 64, "wkv7_cpu: tiles must be 0, 16 or 64, got ", tiles);
#if defined(__GNUC__) && defined(__x86_64__) && !defined(PEFT_RWKV7_NO_AVX512)  // see wkv7_cpu_simd.h
  if (tiles == 0) return __builtin_cpu_supports("avx512f");
#else
  if (tiles == 0) return false;
#endif
  return tiles == 64;
}

WKV_CLONES void forward_head(const Head& h, bool wide) {
  by_head_shape(h, wide, [&](auto s) WKV_LAMBDA_INLINE { forward_head_n<decltype(s)::n, decltype(s)::w>(h); });
}

WKV_CLONES void backward_head(const Head& h, bool wide) {
  by_head_shape(h, wide, [&](auto s) WKV_LAMBDA_INLINE { backward_head_n<decltype(s)::n, decltype(s)::w>(h); });
}

WKV_CLONES void backward_state_head(const Head& h, bool wide) {
  by_head_shape(h, wide, [&](auto s) WKV_LAMBDA_INLINE { backward_state_head_n<decltype(s)::n, decltype(s)::w>(h); });
}

void check(const at::Tensor& x, const char* name, at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  check_rows(x, dtype, "wkv7_cpu", name, shape);
}

// Checks the six inputs; returns their rows' dtype: fp32, or bf16 for r, k, v, a, b (d is fp32 either way),
// which y, dy and the gradients other than dd share.
at::ScalarType check_inputs(const std::vector<at::Tensor>& rdkvab, at::IntArrayRef shape) {
  const auto dt = rows_dtype(rdkvab[0], "wkv7_cpu");
  for (size_t i = 0; i < rdkvab.size(); ++i) check(rdkvab[i], "input", shape, i == 1 ? at::kFloat : dt);
  return dt;
}

// A sequence's bf16 rows staged in fp32 one chunk at a time: the inputs' rows gathered before each chunk, the
// outputs' scattered (rounded once where bf16) after it. Buffers: (kChunk + 1) rows per tensor, ~120 KiB at N 64
// for the backward's 13; staged a whole sequence at a time (round 14) they were 1.7 MiB at T 512 (13.6 MiB at
// T 4096), and with the inputs in cache the gathers and scatters took ~1/6 of a bf16 backward.
class ChunkStage final : public Stager {
 public:
  ChunkStage(std::vector<const at::Tensor*> in, std::vector<at::Tensor*> out, int64_t N, int64_t stride)
      : in_(std::move(in)), out_(std::move(out)), N_(N), stride_(stride),
        buf_((in_.size() + out_.size()) * (kChunk + 1) * N) {}
  float* rows(size_t i) { return buf_.data() + i * (kChunk + 1) * N_; }  // inputs first, then outputs
  void at(int64_t seq) { seq_ = seq; }  // the sequence: element (t, n) at seq + t * stride + n
  void before(int t0, int n) override {
    for (size_t i = 0; i < in_.size(); ++i) gather_head(*in_[i], seq_ + t0 * stride_, stride_, n, N_, rows(i));
  }
  void after(int t0, int n) override {
    for (size_t i = 0; i < out_.size(); ++i)
      scatter_head(rows(in_.size() + i), n, N_, *out_[i], seq_ + t0 * stride_, stride_);
  }

 private:
  std::vector<const at::Tensor*> in_;
  std::vector<at::Tensor*> out_;
  int64_t N_, stride_, seq_ = 0;
  std::vector<float> buf_;
};

// Pointers for sequence (b, h) of [B, T, H, N] tensors and of [B, H, ..., N, N] tensors. With `stage` (bf16 rows)
// the six inputs' pointers are its first six chunk buffers (stride N).
Head head_at(const std::vector<at::Tensor>& rdkvab, int64_t bi, int64_t hi, int64_t T, int64_t H,
             int64_t N, int64_t n_ckpt, const at::Tensor& ckpt, ChunkStage* stage) {
  Head h{};
  const int64_t seq = bi * T * H * N + hi * N;
  if (stage) stage->at(seq);
  const float** in[6] = {&h.r, &h.d, &h.k, &h.v, &h.a, &h.b};
  for (int i = 0; i < 6; ++i) *in[i] = stage ? stage->rows(i) : rdkvab[i].data_ptr<float>() + seq;
  h.stride = stage ? N : H * N;
  h.T = int(T);
  h.N = int(N);
  h.ckpt = ckpt.defined() && ckpt.numel() ? ckpt.data_ptr<float>() + (bi * H + hi) * n_ckpt * N * N : nullptr;
  h.stage = stage;
  return h;
}

std::vector<const at::Tensor*> inputs(const std::vector<at::Tensor>& rdkvab) {
  std::vector<const at::Tensor*> in;
  for (const auto& x : rdkvab) in.push_back(&x);
  return in;
}

}  // namespace

// rdkvab: [r, d, k, v, a, b], each [B, T, H, N] with d = exp(-exp(w)) (fp32; the others fp32 or bf16, one
// dtype); s0: [B, H, N, N] or empty (zeros). Writes y [B, T, H, N] (r's dtype), ckpt [B, H, ceil(T / kChunk) + 1,
// N, N] (unless empty) and s_final [B, H, N, N].
void wkv7_forward(const std::vector<at::Tensor>& rdkvab, const at::Tensor& s0, at::Tensor y,
                  at::Tensor ckpt, at::Tensor s_final, int64_t tiles) {
  const bool wide = wide_tiles(tiles);
  TORCH_CHECK(rdkvab.size() == 6, "wkv7_cpu: expected 6 inputs r, d, k, v, a, b");
  const auto shape = rdkvab[0].sizes().vec();
  TORCH_CHECK(shape.size() == 4 && shape[3] % kLanes == 0, "wkv7_cpu: inputs must be [B, T, H, N], N % 8 == 0");
  const int64_t B = shape[0], T = shape[1], H = shape[2], N = shape[3];
  const int64_t n_ckpt = (T + kChunk - 1) / kChunk + 1;
  const auto dt = check_inputs(rdkvab, shape);
  const bool staged = dt == at::kBFloat16;
  check(y, "y", shape, dt);
  if (ckpt.numel()) check(ckpt, "ckpt", {B, H, n_ckpt, N, N});  // empty: no backward will read them
  check(s_final, "s_final", {B, H, N, N});
  const bool has_s0 = s0.defined() && s0.numel() > 0;
  if (has_s0) check(s0, "state", {B, H, N, N});
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::optional<ChunkStage> stage;  // r d k v a b in, y out
    if (staged) stage.emplace(inputs(rdkvab), std::vector<at::Tensor*>{&y}, N, H * N);
    for (int64_t bh = begin; bh < end; ++bh) {
      Head h = head_at(rdkvab, bh / H, bh % H, T, H, N, n_ckpt, ckpt, stage ? &*stage : nullptr);
      const int64_t seq = (bh / H) * T * H * N + (bh % H) * N;
      h.s0 = has_s0 ? s0.data_ptr<float>() + bh * N * N : nullptr;
      h.y = stage ? stage->rows(6) : y.data_ptr<float>() + seq;
      h.s_final = s_final.data_ptr<float>() + bh * N * N;
      forward_head(h, wide);
    }
  });
}

// grads: [dr, dd, dk, dv, da, db] (dd = dL/dd, fp32; the others and dy in r's dtype), each [B, T, H, N] and
// written in full; ds0 [B, H, N, N].
void wkv7_backward(const std::vector<at::Tensor>& rdkvab, const at::Tensor& ckpt, const at::Tensor& dy,
                   const at::Tensor& ds_final, std::vector<at::Tensor> grads, at::Tensor ds0, int64_t tiles) {
  const bool wide = wide_tiles(tiles);
  TORCH_CHECK(rdkvab.size() == 6 && grads.size() == 6, "wkv7_cpu: expected 6 inputs and 6 gradients");
  const auto shape = rdkvab[0].sizes().vec();
  TORCH_CHECK(shape.size() == 4 && shape[3] % kLanes == 0, "wkv7_cpu: inputs must be [B, T, H, N], N % 8 == 0");
  const int64_t B = shape[0], T = shape[1], H = shape[2], N = shape[3];
  const int64_t n_ckpt = (T + kChunk - 1) / kChunk + 1;
  const auto dt = check_inputs(rdkvab, shape);
  const bool staged = dt == at::kBFloat16;
  for (size_t i = 0; i < grads.size(); ++i) check(grads[i], "gradient", shape, i == 1 ? at::kFloat : dt);
  check(dy, "dy", shape, dt);
  check(ckpt, "ckpt", {B, H, n_ckpt, N, N});
  check(ds_final, "ds_final", {B, H, N, N});
  check(ds0, "ds0", {B, H, N, N});
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::optional<ChunkStage> stage;  // r d k v a b dy in, dr dd dk dv da db out
    if (staged) {
      auto in = inputs(rdkvab);
      in.push_back(&dy);
      std::vector<at::Tensor*> out;
      for (auto& g : grads) out.push_back(&g);
      stage.emplace(std::move(in), std::move(out), N, H * N);
    }
    for (int64_t bh = begin; bh < end; ++bh) {
      Head h = head_at(rdkvab, bh / H, bh % H, T, H, N, n_ckpt, ckpt, stage ? &*stage : nullptr);
      const int64_t seq = (bh / H) * T * H * N + (bh % H) * N;
      h.dy = stage ? stage->rows(6) : dy.data_ptr<float>() + seq;
      h.ds_final = ds_final.data_ptr<float>() + bh * N * N;
      float** out[6] = {&h.dr, &h.dd, &h.dk, &h.dv, &h.da, &h.db};
      for (int i = 0; i < 6; ++i) *out[i] = stage ? stage->rows(7 + i) : grads[i].data_ptr<float>() + seq;
      h.ds0 = ds0.data_ptr<float>() + bh * N * N;
      backward_head(h, wide);
    }
  });
}

// dL/dS_0 alone, where none of r, w, k, v, a, b asks for a gradient: ds0 [B, H, N, N], the same bits as
// wkv7_backward's, from r, d, a, b and dy (rdkvab and dy as there; k and v are not read, no checkpoint is).
void wkv7_backward_state(const std::vector<at::Tensor>& rdkvab, const at::Tensor& dy, const at::Tensor& ds_final,
                         at::Tensor ds0, int64_t tiles) {
  const bool wide = wide_tiles(tiles);
  TORCH_CHECK(rdkvab.size() == 6, "wkv7_cpu: expected 6 inputs r, d, k, v, a, b");
  const auto shape = rdkvab[0].sizes().vec();
  TORCH_CHECK(shape.size() == 4 && shape[3] % kLanes == 0, "wkv7_cpu: inputs must be [B, T, H, N], N % 8 == 0");
  const int64_t B = shape[0], T = shape[1], H = shape[2], N = shape[3];
  const auto dt = check_inputs(rdkvab, shape);
  check(dy, "dy", shape, dt);
  check(ds_final, "ds_final", {B, H, N, N});
  check(ds0, "ds0", {B, H, N, N});
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::optional<ChunkStage> stage;  // r d k v a b dy in (k and v unread), nothing out
    if (dt == at::kBFloat16) {
      auto in = inputs(rdkvab);
      in.push_back(&dy);
      stage.emplace(std::move(in), std::vector<at::Tensor*>{}, N, H * N);
    }
    for (int64_t bh = begin; bh < end; ++bh) {
      Head h = head_at(rdkvab, bh / H, bh % H, T, H, N, 0, at::Tensor(), stage ? &*stage : nullptr);
      h.dy = stage ? stage->rows(6) : dy.data_ptr<float>() + (bh / H) * T * H * N + (bh % H) * N;
      h.ds_final = ds_final.data_ptr<float>() + bh * N * N;
      h.ds0 = ds0.data_ptr<float>() + bh * N * N;
      backward_state_head(h, wide);
    }
  });
}
