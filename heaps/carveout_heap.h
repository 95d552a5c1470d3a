// CarveoutHeap: a fixed capacity reserved when the daemon starts.
//
// The reservation is one "balloon" memfd of `capacity` bytes (hugetlb where the
// pool allows, else base pages), fully allocated, mapped and mlocked (if the
// lock limit forbids it the heap still works and Stats says so). Allocating a
// buffer punches a hole of the buffer's size in the balloon, which hands those
// pages back, and immediately prefaults a new memfd of that size, so each
// buffer has its own fd (a client can map only its own buffer). Freeing a
// buffer re-fills the hole. Bytes in use never exceed the capacity.
//
// A retired buffer's bytes are free in the accounting at once (HeapBuffer::
// Retire) but its part of the reservation comes back only when the refill is
// done; an allocation that needs those bytes waits for the refill (at most
// kRefillWait, then RESOURCE_EXHAUSTED), so it must not run on the thread that
// would do the refill.
//
// Honest limit: the daemon's reservation is re-filled when the daemon drops a
// buffer, even if a client still holds the old buffer's fd or mapping, so the
// system can briefly hold more than `capacity` for this heap.
//
// Thread-safe.
#ifndef BUFFERD_HEAPS_CARVEOUT_HEAP_H_
#define BUFFERD_HEAPS_CARVEOUT_HEAP_H_

#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/mapping.h"
#include "heaps/heap.h"

namespace bufferd {

class CarveoutHeap final : public AccountedHeap {
 public:
  struct Options {
    std::string name = "carveout";
    uint64_t capacity = 0;
    // Try a hugetlb reservation of this page size first (0 = base pages only).
    uint64_t hugepage_size = kHugePage2M;
    // Fail Create when the reservation cannot be mlocked.
    bool require_mlock = false;
  };

  // Reserves the capacity now. RESOURCE_EXHAUSTED if the memory can't be had.
  static absl::StatusOr<std::unique_ptr<CarveoutHeap>> Create(Options options);
  ~CarveoutHeap() override;

  HeapKind kind() const override { return HeapKind::kCarveout; }
  // Prefaults, and may wait for a refill of the bytes it needs.
  bool allocation_may_block() const override { return true; }

  // How long an allocation waits for retired buffers' refills.
  static constexpr absl::Duration kRefillWait = absl::Seconds(10);

 private:
  using Extents = std::vector<std::pair<uint64_t, uint64_t>>;  // (offset, length)

  CarveoutHeap(Options options, uint64_t page_size, Backing backing, UniqueFd balloon,
               Mapping balloon_map, bool locked, std::string note);

  absl::StatusOr<Backed> AllocateBacking(uint64_t size, uint64_t requested,
                                         const std::string& memfd_name) override;
  void FillStats(HeapStats& stats) const override;
  // Its reservation is its own: capacity - used is all there is.
  uint64_t MachineRoom(const HeapStats&) const override {
    return std::numeric_limits<uint64_t>::max();
  }

  // Takes `size` bytes of free extents, waiting up to kRefillWait for
  // refills in flight; empty if they never came.
  Extents TakeExtents(uint64_t size) ABSL_LOCKS_EXCLUDED(mu_);
  void ReturnExtents(const Extents& extents) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status PunchHoles(const Extents& extents);
  // Re-allocates (and, when locked, re-faults into the locked mapping) `extents`.
  void Refill(const Extents& extents);

  const Options options_;
  const Backing backing_;
  UniqueFd balloon_;
  Mapping balloon_map_;
  const bool locked_;
  const std::string note_;

  mutable absl::Mutex mu_;
  // Free parts of the balloon: offset -> length, coalesced.
  std::map<uint64_t, uint64_t> free_ ABSL_GUARDED_BY(mu_);
  // Sum of free_.
  uint64_t free_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace bufferd

#endif  // BUFFERD_HEAPS_CARVEOUT_HEAP_H_
