// Just enough of CUDA for the host compiler to run a kernel's own source on the CPU (tests only).
//
// A block's threads are OS threads, but only one of them runs at a time: a token passes from
// thread to thread in a fixed order, and a thread hands it on when it reaches __syncthreads()
// or returns. So every interleaving is deterministic, and a missing barrier shows up as a wrong
// result every run, not now and then: with the barrier gone, the first thread in the order reads
// shared slots its peers have not written yet (forward order) or the last one's early writes
// clobber values the others still have to read (reverse order). Blocks run one after another,
// so `__shared__` can be plain static storage (shared memory is per block and uninitialised in
// CUDA, so a kernel must not rely on it either way).
//
// bf16 conversions are bit-exact with CUDA's: __bfloat162float widens the 16 bits, and
// __float2bfloat16_rn rounds to nearest even, giving inf on overflow, keeping subnormals (no
// flush), and turning every NaN into the canonical 0x7FFF as cvt.rn.bf16.f32 does.
//
// Supported: __global__/__device__/__host__/__forceinline__/__launch_bounds__ (dropped),
// __shared__, threadIdx/blockIdx/blockDim/gridDim, __syncthreads, expf, min/max, float4,
// __nv_bfloat16. Needs C++20 (std::binary_semaphore).

#pragma once

#include <math.h>  // expf, as a device function: in the global namespace

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <semaphore>
#include <thread>
#include <vector>

#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // #pragma unroll

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static  // one block at a time: static storage is the block's shared memory

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    unsigned size() const { return x * y * z; }
};

inline thread_local uint3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0};
inline thread_local dim3 blockDim, gridDim;

struct alignas(16) float4 {
    float x, y, z, w;
};

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }

struct __nv_bfloat16 {
    unsigned short __x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = uint32_t(h.__x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fff};  // NaN: CUDA's canonical bf16 NaN
    // Round to nearest even on the 16 dropped bits: add 0x7fff, plus 1 when the kept part is odd.
    // A carry into the exponent is the correct result (next binade, or inf past the largest finite).
    u += 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<unsigned short>(u >> 16)};
}

namespace cuda_emu {

// Order in which a block's threads take turns between two barriers.
enum class Order : int { kForward = 0, kReverse = 1, kShuffled = 2 };

inline std::mutex launch_mutex;  // one launch at a time: __shared__ is process-wide static storage

class Scheduler {
  public:
    Scheduler(int n_threads, int n_blocks, Order order)
        : n_(n_threads), n_blocks_(n_blocks), order_(order), sem_(new Sem[n_threads]) {}

    // Runs `kernel` as n_blocks blocks of n_threads; returns when all are done.
    template <class Kernel>
    void run(const dim3& grid, const dim3& block, Kernel& kernel) {
        std::vector<std::thread> threads;
        threads.reserve(n_);
        try {
            for (int t = 0; t < n_; ++t) threads.emplace_back([&, t] { worker(t, grid, block, kernel); });
        } catch (...) {  // out of threads: let the started ones see done_ and leave, then report
            done_ = true;
            for (size_t t = 0; t < threads.size(); ++t) sem_[t].release();
            for (auto& th : threads) th.join();
            throw;
        }
        start_phase(all_threads());
        sem_[phase_[0]].release();
        finished_.acquire();
        for (auto& th : threads) th.join();
    }

    // Called by the token holder at __syncthreads (exited = false) or when its kernel returns.
    // Hands the token on; the caller then waits on its own semaphore.
    void arrive(int tid, bool exited) {
        if (!exited) waiting_.push_back(tid);
        int next;
        if (++pos_ < phase_.size()) {
            next = phase_[pos_];
        } else if (!waiting_.empty()) {  // everyone still running is at the barrier: release it
            std::vector<int> w;
            w.swap(waiting_);
            start_phase(std::move(w));
            next = phase_[0];
        } else if (++block_ < n_blocks_) {  // every thread returned: next block
            start_phase(all_threads());
            next = phase_[0];
        } else {
            done_ = true;
            for (int t = 0; t < n_; ++t) sem_[t].release();
            finished_.release();
            return;
        }
        sem_[next].release();  // last touch of shared state: `next` runs from here on
    }

    void wait(int tid) { sem_[tid].acquire(); }

  private:
    template <class Kernel>
    void worker(int tid, const dim3& grid, const dim3& block, Kernel& kernel) {
        current() = this;
        thread_id() = tid;
        threadIdx = {tid % block.x, tid / block.x % block.y, tid / (block.x * block.y)};
        blockDim = block;
        gridDim = grid;
        wait(tid);
        while (!done_) {
            const unsigned bid = static_cast<unsigned>(block_);
            blockIdx = {bid % grid.x, bid / grid.x % grid.y, bid / (grid.x * grid.y)};
            kernel();
            arrive(tid, true);
            wait(tid);
        }
        current() = nullptr;
    }

    std::vector<int> all_threads() const {
        std::vector<int> ids(n_);
        for (int t = 0; t < n_; ++t) ids[t] = t;
        return ids;
    }

    void start_phase(std::vector<int> ids) {
        if (order_ == Order::kReverse) {
            std::sort(ids.rbegin(), ids.rend());
        } else {
            std::sort(ids.begin(), ids.end());
            if (order_ == Order::kShuffled) {  // fixed-seed Fisher-Yates, a new permutation per phase
                for (size_t m = ids.size(); m > 1; --m) {
                    rng_ ^= rng_ << 13, rng_ ^= rng_ >> 7, rng_ ^= rng_ << 17;
                    std::swap(ids[m - 1], ids[rng_ % m]);
                }
            }
        }
        phase_ = std::move(ids);
        pos_ = 0;
    }

  public:
    static Scheduler*& current() {
        static thread_local Scheduler* s = nullptr;
        return s;
    }
    static int& thread_id() {
        static thread_local int t = -1;
        return t;
    }

  private:
    const int n_, n_blocks_;
    const Order order_;
    struct Sem {
        std::binary_semaphore s{0};
        void release() { s.release(); }
        void acquire() { s.acquire(); }
    };
    std::unique_ptr<Sem[]> sem_;  // one per thread: a handoff wakes exactly one thread, no notify_all
    std::binary_semaphore finished_{0};
    // Touched only by the token holder (or before the first handoff); the semaphores order the accesses.
    std::vector<int> phase_, waiting_;
    size_t pos_ = 0;
    int block_ = 0;
    bool done_ = false;
    uint64_t rng_ = 0x9e3779b97f4a7c15ull;
};

// kernel: a callable with no arguments (a lambda calling the __global__ function).
template <class Kernel>
void launch(dim3 grid, dim3 block, Kernel&& kernel, Order order = Order::kForward) {
    const int n_blocks = static_cast<int>(grid.size()), n_threads = static_cast<int>(block.size());
    if (n_blocks == 0 || n_threads == 0) return;
    std::lock_guard<std::mutex> lock(launch_mutex);
    Scheduler sched(n_threads, n_blocks, order);
    sched.run(grid, block, kernel);
}

}  // namespace cuda_emu

inline void __syncthreads() {
    cuda_emu::Scheduler* s = cuda_emu::Scheduler::current();
    const int tid = cuda_emu::Scheduler::thread_id();
    s->arrive(tid, false);
    s->wait(tid);
}
