// SystemHeap: one memfd per buffer, 4 KiB pages allocated on first touch.
// Thread-safe.
#ifndef BUFFERD_HEAPS_SYSTEM_HEAP_H_
#define BUFFERD_HEAPS_SYSTEM_HEAP_H_

#include <string>

#include "heaps/heap.h"

namespace bufferd {

class SystemHeap final : public AccountedHeap {
 public:
  // `capacity` caps the bytes in live buffers (0 = unbounded).
  explicit SystemHeap(std::string name, uint64_t capacity = 0);
  HeapKind kind() const override { return HeapKind::kSystem; }
  bool allocation_may_block() const override { return false; }

 private:
  absl::StatusOr<Backed> AllocateBacking(uint64_t size, uint64_t requested,
                                         const std::string& memfd_name) override;
};

}  // namespace bufferd

#endif  // BUFFERD_HEAPS_SYSTEM_HEAP_H_
