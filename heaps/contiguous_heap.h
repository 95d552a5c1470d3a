// ContiguousHeap: hugepage-backed buffers, prefaulted so the pages are really
// reserved when Allocate returns.
//
// Tries a hugetlb memfd first (2 MiB or 1 GiB pages, sizes rounded up to the
// huge page). When the hugetlb pool can't serve, tries the configured
// fallbacks in order: kThp (memfd + MADV_HUGEPAGE, accepted only if smaps shows
// huge PMD mappings) and kBasePages. With no fallback left the allocation fails
// with RESOURCE_EXHAUSTED naming the pool state. Each buffer reports the backing
// it really got.
//
// A retired hugetlb buffer's pages go back to the pool only when it is
// destroyed (the daemon does that later, off its RPC threads): before falling
// back, an allocation the pool can't serve waits for this heap's own retired
// buffers to be freed (each wait at most kFreeWait), so a drop followed at once
// by an allocation still gets huge pages. It must not run on the thread that
// destroys buffers. Thread-safe.
#ifndef BUFFERD_HEAPS_CONTIGUOUS_HEAP_H_
#define BUFFERD_HEAPS_CONTIGUOUS_HEAP_H_

#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "heaps/heap.h"

namespace bufferd {

class ContiguousHeap final : public AccountedHeap {
 public:
  struct Options {
    std::string name = "contiguous";
    // kHugePage2M or kHugePage1G.
    uint64_t hugepage_size = kHugePage2M;
    // kThp and/or kBasePages, in the order to try them.
    std::vector<Backing> fallbacks = {Backing::kThp, Backing::kBasePages};
    // Cap on bytes in live buffers (0 = unbounded).
    uint64_t capacity = 0;
  };

  explicit ContiguousHeap(Options options);
  HeapKind kind() const override { return HeapKind::kContiguous; }
  bool allocation_may_block() const override { return true; }

  // Longest wait for one retired buffer's free before falling back.
  static constexpr absl::Duration kFreeWait = absl::Seconds(1);

 private:
  // A hugetlb memfd of `size`, prefaulted and sealed.
  absl::StatusOr<UniqueFd> AllocateHugetlb(uint64_t size, const std::string& memfd_name);

  absl::StatusOr<Backed> AllocateBacking(uint64_t size, uint64_t requested,
                                         const std::string& memfd_name) override;
  void FillStats(HeapStats& stats) const override;
  // The pool's free pages, plus MemAvailable if a fallback may serve.
  uint64_t MachineRoom(const HeapStats& stats) const override;
  absl::Status CheckBacking(uint64_t rounded, uint64_t count) const override;

  const Options options_;

  absl::Mutex mu_;
  // Hugetlb buffers retired and not yet destroyed, and destroyed so far.
  uint64_t retired_hugetlb_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t freed_hugetlb_ ABSL_GUARDED_BY(mu_) = 0;
};

// Allocates a THP-advised memfd of `size` and reports whether huge PMD mappings
// were really obtained (kThp) or not (kBasePages). Shared with tests.
absl::StatusOr<std::pair<UniqueFd, Backing>> AllocateThpMemfd(const std::string& name,
                                                              uint64_t size);

}  // namespace bufferd

#endif  // BUFFERD_HEAPS_CONTIGUOUS_HEAP_H_
