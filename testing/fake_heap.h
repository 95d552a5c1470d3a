// FakeHeap: a heap for unit tests of what sits above the heaps (DaemonState
// and its units). Buffers are plain memfds of the asked size, sealed like
// real ones but never prefaulted, so a "carveout" of 16 MiB costs nothing;
// the heap reports whatever kind and backing it is told to, and whether its
// allocations may block and its buffers are cheap to free.
//
// Thread-safe, like every Heap.
#ifndef BUFFERD_TESTING_FAKE_HEAP_H_
#define BUFFERD_TESTING_FAKE_HEAP_H_

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "heaps/heap.h"

namespace bufferd::testing {

class FakeHeap final : public AccountedHeap {
 public:
  struct Options {
    std::string name = "fake";
    HeapKind kind = HeapKind::kSystem;
    Backing backing = Backing::kBasePages;
    uint64_t page_size = 4096;
    // 0 = unbounded.
    uint64_t capacity = 0;
    bool may_block = false;
    // Freeing does page work (like a carveout refill): never cheap.
    bool expensive_to_free = false;
    // Buffers a pool behind the heap can back at once (-1: no pool); past
    // it, Allocate is refused kPoolEmpty, as a hugetlb pool runs out.
    int64_t pool_buffers = -1;
  };

  explicit FakeHeap(Options options)
      : AccountedHeap(options.name, options.page_size, options.capacity),
        options_(std::move(options)),
        pool_left_(options_.pool_buffers) {}

  HeapKind kind() const override { return options_.kind; }
  bool allocation_may_block() const override { return options_.may_block; }
  // Buffers destroyed so far.
  uint64_t frees() const { return frees_.load(); }

 private:
  absl::StatusOr<Backed> AllocateBacking(uint64_t size, uint64_t /*requested*/,
                                         const std::string& memfd_name) override {
    const bool pooled = options_.pool_buffers >= 0;
    if (pooled && pool_left_.fetch_sub(1) <= 0) {
      ++pool_left_;
      return HeapRefused(HeapRefusal::kPoolEmpty,
                         absl::StrCat("heap '", name(), "': its pool of ",
                                      options_.pool_buffers, " buffers is empty"));
    }
    absl::StatusOr<UniqueFd> fd = memfd::Create(memfd_name, size, 0);
    absl::Status sealed = fd.ok() ? memfd::Seal(fd->get()) : fd.status();
    if (!sealed.ok()) {
      if (pooled) ++pool_left_;
      return sealed;
    }
    Backed backed{*std::move(fd), options_.backing, nullptr};
    if (options_.expensive_to_free) {
      backed.on_free = [this, pooled](UniqueFd fd) {
        fd.Reset();
        ++frees_;
        if (pooled) ++pool_left_;
      };
    } else {
      backed.on_retire = [this, pooled] {
        ++frees_;
        if (pooled) ++pool_left_;
      };
    }
    return backed;
  }
  void FillStats(HeapStats& stats) const override { stats.backing = options_.backing; }

  const Options options_;
  std::atomic<uint64_t> frees_{0};
  std::atomic<int64_t> pool_left_;
};

}  // namespace bufferd::testing

#endif  // BUFFERD_TESTING_FAKE_HEAP_H_
