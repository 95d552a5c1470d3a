// What the kernel says about memory: the hugetlb pools, the host's RAM, and
// this process's own mappings (smaps), for verifying what a syscall's return
// value only claims. Plus the one lock this process's heaps take around the
// hugetlb pool.
//
// Readers return zeros (or -1) when the kernel has no such file; thread-safe.
#ifndef BUFFERD_HEAPS_KERNEL_INFO_H_
#define BUFFERD_HEAPS_KERNEL_INFO_H_

#include <cstdint>
#include <initializer_list>

#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace bufferd {

// State of the kernel's hugetlb pool for one page size.
struct HugepagePoolState {
  uint64_t page_size = 0;
  uint64_t total = 0;
  uint64_t free = 0;
  uint64_t reserved = 0;
  // Pages an allocation can take now: free but not reserved by a mapping.
  uint64_t available() const { return free > reserved ? free - reserved : 0; }
};

// Reads /sys/kernel/mm/hugepages/hugepages-<N>kB; all zero if absent.
HugepagePoolState ReadHugepagePool(uint64_t page_size);

// This host's RAM (MemTotal of /proc/meminfo), or 0 if unreadable.
uint64_t HostMemoryBytes();
// Memory the kernel could give now without swapping (MemAvailable), or 0.
uint64_t AvailableMemoryBytes();

// Sum of the named kB fields (e.g. "Locked", "ShmemPmdMapped") of this
// process's mapping that starts at `vma_start`, from /proc/self/smaps; -1 if
// there is no such mapping. What the kernel says, for verifying what a
// syscall's return value only claims.
int64_t SmapsKb(const void* vma_start, std::initializer_list<absl::string_view> fields);

// Held by this process's heaps while they move pages out of and back into
// the kernel's hugetlb pool in two steps (a carveout's punch + new buffer, or
// close + refill; a contiguous heap's hugetlb prefault), so that no heap of
// the daemon takes another's pages in between. Other processes still can.
absl::Mutex& HugetlbPoolMutex();

}  // namespace bufferd

#endif  // BUFFERD_HEAPS_KERNEL_INFO_H_
