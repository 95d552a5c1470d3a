#include "heaps/memfd.h"

#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"

namespace bufferd {

namespace memfd {
namespace {
#ifdef MFD_NOEXEC_SEAL
constexpr unsigned kNoexecSeal = MFD_NOEXEC_SEAL;
#else
constexpr unsigned kNoexecSeal = 0x0008U;
#endif
// Linux 5.14; Debian bookworm's glibc headers predate it.
#ifdef MADV_POPULATE_WRITE
constexpr int kPopulateWrite = MADV_POPULATE_WRITE;
#else
constexpr int kPopulateWrite = 23;
#endif
}  // namespace

std::string BufferName(absl::string_view heap, absl::string_view name) {
  // The kernel allows 249 bytes after its "memfd:" prefix.
  std::string full = absl::StrCat(kBufferNamePrefix, heap, ":", name);
  if (full.size() > 240) full.resize(240);
  return full;
}

bool NoexecSealSupported() {
  // Debian bookworm's headers predate the flag (Linux 6.3).
  static const bool supported = [] {
    int fd = ::memfd_create("bufferd-probe", MFD_CLOEXEC | kNoexecSeal);
    if (fd < 0) return false;  // EINVAL: an older kernel
    ::close(fd);
    return true;
  }();
  return supported;
}

absl::StatusOr<UniqueFd> Create(const std::string& name, uint64_t size, unsigned extra_flags) {
  const unsigned noexec = NoexecSealSupported() ? kNoexecSeal : 0;
  UniqueFd fd(
      ::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING | noexec | extra_flags));
  if (!fd.valid()) return ErrnoError("memfd_create", errno);
  if (RetryOnEintr([&] { return ::ftruncate(fd.get(), static_cast<off_t>(size)); }) != 0) {
    return ErrnoError(absl::StrCat("ftruncate(memfd, ", FormatBytes(size), ")"), errno);
  }
  return fd;
}

unsigned HugetlbFlags(uint64_t hugepage_size) {
  return MFD_HUGETLB | (hugepage_size == kHugePage1G ? MFD_HUGE_1GB : MFD_HUGE_2MB);
}

absl::Status Prefault(int fd, uint64_t offset, uint64_t length) {
  if (RetryOnEintr([&] {
        return ::fallocate(fd, 0, static_cast<off_t>(offset), static_cast<off_t>(length));
      }) != 0) {
    return ErrnoError(absl::StrCat("fallocate(", FormatBytes(length), ")"), errno);
  }
  return absl::OkStatus();
}

absl::Status PopulateWrite(void* address, uint64_t length) {
  if (::madvise(address, length, kPopulateWrite) != 0) {
    return ErrnoError("madvise(MADV_POPULATE_WRITE)", errno);
  }
  return absl::OkStatus();
}

absl::Status Seal(int fd) {
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) {
    return ErrnoError("fcntl(F_ADD_SEALS)", errno);
  }
  if (::fchmod(fd, 0400) != 0) return ErrnoError("fchmod(memfd, 0400)", errno);
  return absl::OkStatus();
}

}  // namespace memfd
}  // namespace bufferd
