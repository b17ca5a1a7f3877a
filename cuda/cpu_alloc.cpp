// A caching allocator for torch's large CPU tensors, by size class (peft_rwkv7/train/memory.py installs it
// for training on the CPU).
//
// A training step allocates the same activations every step and frees them all in the backward. Served by
// glibc's heap, blocks freed between larger requests leave holes that the next step's requests (in another
// order, of other sizes) do not fill: at 0.1B ctx 4096 the heap grew to ~7 GB for at most 4.4 GB in use.
// Here every request of at least min_bytes is rounded up to a size class (8 per power of two, so at most
// 1/8 more than asked; pages past the request that are never written are never resident) and served by
// the smallest free block of its class or of a class up to twice its size, else by a fresh mmap; on free
// the block goes back on its class's list. With the same shapes every step, the next step gets the same
// blocks back: no page faults and no holes. With shapes that change (padded batches cut at their last
// scored token) a shorter step runs in the longer one's blocks. Smaller requests go to the allocator that
// was installed before (they are not where the memory goes).
//
// The trainer installs it for a run and uninstalls it at the run's end (every free block back to the OS), or
// earlier when a step after the first still misses often: shapes that change with every batch are served
// better by glibc's heap, which splits and joins blocks (variable lengths at 0.1B: the cache gained no memory
// and cost page faults). The next run installs it again.
//
// What it keeps is bounded twice. The trainer calls cpu_cache_trim() after each step: a free block that no
// request was given during the last kIdleTrims steps goes back to the OS (munmap). And the free bytes never
// exceed the most bytes ever live in large blocks: past that, freeing unmaps free blocks, largest first.
//
// The state lives on the heap and is never destroyed: tensors may be freed by other static destructors at
// exit, after this library's own. A fork (data loader workers) gets a consistent lock: pthread_atfork takes
// it around the fork.

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <unordered_map>
#include <mutex>
#include <vector>

namespace {

constexpr int kIdleTrims = 4;  // a free block not handed out for this many steps goes back to the OS

struct Block {
  void* base;
  int idle;  // trims since it was last handed out
};

struct Cache {
  std::mutex mu;
  std::map<size_t, std::vector<Block>> free_lists;  // class size -> free blocks
  std::unordered_map<void*, size_t> size_of;        // live block -> its size (its class's)
  std::atomic<size_t> min_bytes{1 << 20};  // read by allocate without the lock
  size_t live = 0, cached = 0, peak_live = 0, mapped = 0;
  int64_t hits = 0, misses = 0, returned = 0;
  bool enabled = false;  // installed as torch's CPU allocator
  c10::Allocator* fallback = nullptr;
};

Cache& cache() {
  static Cache* c = new Cache;  // never destroyed (see above)
  return *c;
}

size_t size_class(size_t n) {
  size_t p = 1;
  while (p < n) p <<= 1;
  const size_t step = p / 8 < 4096 ? 4096 : p / 8;
  return (n + step - 1) / step * step;
}

// Gives a block back to the OS. Lock held.
void unmap_locked(Cache& c, void* base, size_t size) {
  munmap(base, size);
  c.mapped -= size;
  ++c.returned;
}

// The same for a free block (counted in `cached`). Lock held.
void unmap_free_locked(Cache& c, void* base, size_t size) {
  c.cached -= size;
  unmap_locked(c, base, size);
}

// Unmaps free blocks, largest first, until the free bytes plus `need` are within the bound. Lock held.
void bound_locked(Cache& c, size_t need) {
  for (auto it = c.free_lists.rbegin(); it != c.free_lists.rend() && c.cached + need > c.peak_live; ++it) {
    auto& list = it->second;
    while (!list.empty() && c.cached + need > c.peak_live) {
      unmap_free_locked(c, list.back().base, it->first);
      list.pop_back();
    }
  }
}

void release(void* base) {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  const auto it = c.size_of.find(base);
  const size_t size = it->second;
  c.size_of.erase(it);
  c.live -= size;
  if (!c.enabled) {  // uninstalled: its blocks still in use go back to the OS as they are freed
    unmap_locked(c, base, size);
    return;
  }
  bound_locked(c, size);
  c.free_lists[size].push_back({base, 0});
  c.cached += size;
}

// A block of `size` bytes is handed out. Lock held.
void taken_locked(Cache& c, void* base, size_t size) {
  c.size_of[base] = size;
  c.live += size;
  if (c.live > c.peak_live) c.peak_live = c.live;
}

c10::DataPtr data_ptr(void* base) {  // page-aligned (c10 wants 64 bytes)
  return {base, base, &release, c10::Device(c10::DeviceType::CPU)};
}

// raw_allocate/raw_deallocate (oneDNN's buffers through ideep's engine allocator: bf16 matmuls on CPUs with
// AVX512-BF16 or AMX) free a bare pointer with raw_deleter(): ours if it is one of this cache's blocks, the
// allocator's from before if it served it (requests under min_bytes, or blocks from before the install).
// Whether p is one of this cache's live blocks (p is live and its owner's alone: it cannot change hands while
// the caller asks).
bool owns(void* p) {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  return c.size_of.count(p) != 0;
}

void raw_free(void* p) {
  if (owns(p)) {
    release(p);
    return;
  }
  const c10::DeleterFnPtr other = cache().fallback->raw_deleter();
  TORCH_CHECK(other != nullptr, "peft_rwkv7 CPU allocator: the allocator before it has no raw deleter");
  other(p);
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    Cache& c = cache();
    if (n < c.min_bytes) return c.fallback->allocate(n);
    const size_t want = size_class(n);
    {
      std::lock_guard<std::mutex> g(c.mu);
      // the smallest free block of this class or of one up to twice its size
      for (auto it = c.free_lists.lower_bound(want); it != c.free_lists.end() && it->first <= 2 * want; ++it) {
        if (it->second.empty()) continue;
        void* base = it->second.back().base;
        it->second.pop_back();
        ++c.hits;
        c.cached -= it->first;
        taken_locked(c, base, it->first);
        return data_ptr(base);
      }
      ++c.misses;
    }
    void* base = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "peft_rwkv7 CPU allocator: out of memory allocating ", n, " bytes");
    std::lock_guard<std::mutex> g(c.mu);
    c.mapped += want;
    taken_locked(c, base, want);
    return data_ptr(base);
  }
  c10::DeleterFnPtr raw_deleter() const override { return &raw_free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

CachingAllocator* the_allocator() {
  static CachingAllocator* a = new CachingAllocator;  // never destroyed: c10 keeps pointing at it
  return a;
}

void lock_for_fork() { cache().mu.lock(); }
void unlock_after_fork() { cache().mu.unlock(); }

}  // namespace

// Makes it torch's CPU allocator for requests of at least min_bytes (again, after cpu_cache_uninstall; a
// call while it is installed only sets min_bytes).
void cpu_cache_install(int64_t min_bytes) {
  TORCH_CHECK(min_bytes >= 4096, "cpu_cache_install: min_bytes must be at least one page, got ", min_bytes);
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  c.min_bytes = size_t(min_bytes);
  if (c.enabled) return;
  if (c.fallback == nullptr) {  // the first time: the allocator to give small requests to, and forks
    c.fallback = c10::GetCPUAllocator();
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
  }
  c10::SetCPUAllocator(the_allocator(), /*priority=*/100);
  c.enabled = true;
}

// Gives torch's CPU allocator back to the one installed before and every free block back to the OS; blocks
// still in use are unmapped as they are freed (until it is installed again). False if it was not installed.
bool cpu_cache_uninstall() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  if (!c.enabled) return false;
  c10::SetCPUAllocator(c.fallback, /*priority=*/100);
  c.enabled = false;
  for (auto& [size, list] : c.free_lists) {
    for (const Block& b : list) unmap_free_locked(c, b.base, size);
    list.clear();
  }
  return true;
}

// A step has ended: free blocks not handed out during the last kIdleTrims steps go back to the OS; their bytes.
int64_t cpu_cache_trim() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  const size_t before = c.cached;
  for (auto& [size, list] : c.free_lists) {
    std::vector<Block> kept;
    for (Block& b : list) {
      if (++b.idle >= kIdleTrims)
        unmap_free_locked(c, b.base, size);
      else
        kept.push_back(b);
    }
    list.swap(kept);
  }
  return int64_t(before - c.cached);
}

// [bytes live, bytes free in the cache, bytes mapped, most bytes ever live, hits, misses, blocks returned]
std::vector<int64_t> cpu_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  return {int64_t(c.live), int64_t(c.cached), int64_t(c.mapped), int64_t(c.peak_live), c.hits, c.misses,
          c.returned};
}

// What oneDNN does through ideep's engine allocator: raw_allocate `n` bytes from torch's CPU allocator (this
// one when installed), write them, raw_deallocate them. For tests: c10 asserts (aborts the process) where the
// allocator has no raw deleter. Returns whether the block was one of this cache's.
bool cpu_cache_raw_roundtrip(int64_t n) {
  c10::Allocator* a = c10::GetCPUAllocator();
  void* p = a->raw_allocate(size_t(n));
  std::memset(p, 1, size_t(n));
  const bool ours = owns(p);
  a->raw_deallocate(p);
  return ours;
}
