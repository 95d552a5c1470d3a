// memfd helpers shared by the heaps: creating, prefaulting and sealing the
// memfds that back every buffer, and the flags for hugetlb ones.
//
// Pure functions of their arguments and the kernel; thread-safe.
#ifndef BUFFERD_HEAPS_MEMFD_H_
#define BUFFERD_HEAPS_MEMFD_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "base/unique_fd.h"

namespace bufferd {

constexpr uint64_t kHugePage2M = uint64_t{2} << 20;
constexpr uint64_t kHugePage1G = uint64_t{1} << 30;

namespace memfd {

// Every buffer's memfd is named "bufferd:<heap>:<name>" (cut to the
// kernel's limit), and nothing else the daemon makes starts with
// kBufferNamePrefix (a carveout's reservation is "bufferd-reservation:<heap>").
// Processes show it as "/memfd:bufferd:<heap>:<name> (deleted)" in
// /proc/<pid>/maps and their fd links: `bufctl holders` looks for that. A
// client can name a memfd of its own alike; only the inode (ListBuffers'
// memfd_dev and memfd_inode) says a memfd is really the daemon's.
inline constexpr char kBufferNamePrefix[] = "bufferd:";
std::string BufferName(absl::string_view heap, absl::string_view name);

// memfd_create(MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL if the
// kernel has it | extra_flags) + ftruncate(size). Never executable: no
// holder can chmod a buffer +x and execve what another process wrote, and
// hosts with vm.memfd_noexec=2 (which refuse executable memfds) work.
absl::StatusOr<UniqueFd> Create(const std::string& name, uint64_t size, unsigned extra_flags);

// Whether this kernel seals memfds non-executable (MFD_NOEXEC_SEAL, Linux
// 6.3+); without it buffers are still created without exec bits (0400).
bool NoexecSealSupported();

// MFD_HUGETLB flags for a huge page size.
unsigned HugetlbFlags(uint64_t hugepage_size);

// Allocates (prefaults) [offset, offset+length) with fallocate.
absl::Status Prefault(int fd, uint64_t offset, uint64_t length);

// MADV_POPULATE_WRITE: faults [address, address+length) of a shared
// mapping in writable, as a write would, without touching the bytes.
absl::Status PopulateWrite(void* address, uint64_t length);

// Seals against shrink and grow, and chmods 0400. Sealing against further
// seals (F_SEAL_SEAL) is the daemon's call: a freezable buffer gets it only
// when frozen.
absl::Status Seal(int fd);

}  // namespace memfd

}  // namespace bufferd

#endif  // BUFFERD_HEAPS_MEMFD_H_
