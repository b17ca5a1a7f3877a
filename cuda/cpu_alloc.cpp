// A caching allocator for torch's large CPU tensors, by size class (peft_rwkv7/train/memory.py installs it
// for training on the CPU).
//
// A training step allocates the same activations every step and frees them all in the backward. Served by
// glibc's heap, blocks freed between larger requests leave holes that the next step's requests (in another
// order, of other sizes) do not fill: at 0.1B ctx 4096 the heap grew to ~7 GB for at most 4.4 GB in use.
// Here every request of at least kMinBytes is rounded up to a size class (8 per power of two, so at most
// 1/8 more than asked), served from that class's free list, else by a fresh mmap, and on free put back on
// its class's list: the next step gets the same blocks back, no page faults and no holes. Smaller requests
// go to the allocator that was installed before (they are not where the memory goes).
//
// What it keeps is bounded twice. The trainer calls cpu_cache_trim() after each step: free blocks of a class
// that no request asked for since the previous call go back to the OS (munmap). With shapes that change
// from step to step (padded batches cut at their last scored token) the classes change too, and stale
// ones are dropped instead of piling up; with fixed shapes every class is asked for every step and nothing
// is dropped. And free blocks never exceed the most bytes ever live in large blocks: past that, freeing
// unmaps free blocks, largest class first.
//
// The state lives on the heap and is never destroyed: tensors may be freed by other static destructors at
// exit, after this library's own. A fork (data loader workers) gets a consistent lock: pthread_atfork takes
// it around the fork.

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <unordered_map>
#include <mutex>
#include <vector>

namespace {

struct Cache {
  std::mutex mu;
  std::map<size_t, std::vector<void*>> free_lists;  // class size -> free blocks (base addresses)
  std::map<size_t, bool> asked;                     // class size -> requested since the last trim
  std::unordered_map<void*, size_t> size_of;        // live block -> its class size
  size_t min_bytes = 1 << 20;
  size_t live = 0, cached = 0, peak_live = 0, mapped = 0;
  int64_t hits = 0, misses = 0, returned = 0;
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

// Unmaps free blocks, largest class first, until the free bytes plus `need` are within the bound. Lock held.
void trim_locked(Cache& c, size_t need) {
  const size_t bound = c.peak_live;
  for (auto it = c.free_lists.rbegin(); it != c.free_lists.rend() && c.cached + need > bound;) {
    auto& list = it->second;
    while (!list.empty() && c.cached + need > bound) {
      munmap(list.back(), it->first);
      list.pop_back();
      c.cached -= it->first;
      c.mapped -= it->first;
      ++c.returned;
    }
    ++it;
  }
}

void release(void* base) {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  const auto it = c.size_of.find(base);
  const size_t size = it->second;
  c.size_of.erase(it);
  c.live -= size;
  trim_locked(c, size);
  c.free_lists[size].push_back(base);
  c.cached += size;
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    Cache& c = cache();
    if (n < c.min_bytes) return c.fallback->allocate(n);
    const size_t size = size_class(n);
    void* base = nullptr;
    {
      std::lock_guard<std::mutex> g(c.mu);
      c.asked[size] = true;
      auto it = c.free_lists.find(size);
      if (it != c.free_lists.end() && !it->second.empty()) {
        base = it->second.back();
        it->second.pop_back();
        c.cached -= size;
        ++c.hits;
      } else {
        ++c.misses;
      }
      c.live += size;
      if (c.live > c.peak_live) c.peak_live = c.live;
    }
    if (!base) {
      base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED) {
        std::lock_guard<std::mutex> g(c.mu);
        c.live -= size;
        TORCH_CHECK(false, "peft_rwkv7 CPU allocator: out of memory allocating ", n, " bytes");
      }
      std::lock_guard<std::mutex> g(c.mu);
      c.mapped += size;
    }
    {
      std::lock_guard<std::mutex> g(c.mu);
      c.size_of[base] = size;
    }
    return {base, base, &release, c10::Device(c10::DeviceType::CPU)};  // page-aligned (c10 wants 64 bytes)
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

CachingAllocator* the_allocator() {
  static CachingAllocator* a = new CachingAllocator;  // never destroyed: c10 keeps pointing at it
  return a;
}

void lock_for_fork() { cache().mu.lock(); }
void unlock_after_fork() { cache().mu.unlock(); }

}  // namespace

// Makes it torch's CPU allocator for requests of at least min_bytes; later calls only return false.
bool cpu_cache_install(int64_t min_bytes) {
  static bool installed = false;
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  if (installed) return false;
  TORCH_CHECK(min_bytes >= 4096, "cpu_cache_install: min_bytes must be at least one page, got ", min_bytes);
  c.min_bytes = size_t(min_bytes);
  c.fallback = c10::GetCPUAllocator();
  pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
  c10::SetCPUAllocator(the_allocator(), /*priority=*/100);
  installed = true;
  return true;
}

// Returns the free blocks of every class not asked for since the last call to the OS; their bytes.
int64_t cpu_cache_trim() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  size_t freed = 0;
  for (auto& [size, list] : c.free_lists) {
    if (c.asked[size]) continue;
    for (void* base : list) munmap(base, size);
    freed += size * list.size();
    c.returned += int64_t(list.size());
    list.clear();
  }
  c.cached -= freed;
  c.mapped -= freed;
  for (auto& [size, flag] : c.asked) flag = false;
  return int64_t(freed);
}

// [bytes live, bytes free in the cache, bytes mapped, most bytes ever live, hits, misses, blocks returned]
std::vector<int64_t> cpu_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  return {int64_t(c.live), int64_t(c.cached), int64_t(c.mapped), int64_t(c.peak_live), c.hits, c.misses,
          c.returned};
}
