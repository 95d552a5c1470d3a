#include "heaps/system_heap.h"

#include <unistd.h>

#include "base/errno_status.h"

namespace bufferd {

SystemHeap::SystemHeap(std::string name, uint64_t capacity)
    : AccountedHeap(std::move(name), static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)), capacity) {}

absl::StatusOr<AccountedHeap::Backed> SystemHeap::AllocateBacking(uint64_t size,
                                                                  uint64_t /*requested*/,
                                                                  const std::string& memfd_name) {
  ASSIGN_OR_RETURN(UniqueFd fd, memfd::Create(memfd_name, size, 0));
  RETURN_IF_ERROR(memfd::Seal(fd.get()));
  return Backed{std::move(fd), Backing::kBasePages, nullptr};
}

}  // namespace bufferd
