#include "base/unique_fd.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "base/errno_status.h"

namespace bufferd {

void UniqueFd::Reset(int fd) {
  if (fd_ >= 0 && fd_ != fd) {
    // Never retry close on EINTR: on Linux the fd is released regardless.
    ::close(fd_);
  }
  fd_ = fd;
}

absl::StatusOr<UniqueFd> UniqueFd::Duplicate() const { return DuplicateFd(fd_); }

absl::StatusOr<UniqueFd> DuplicateFd(int fd) {
  int dup = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return ErrnoError("fcntl(F_DUPFD_CLOEXEC)", errno);
  return UniqueFd(dup);
}

absl::StatusOr<std::pair<dev_t, ino_t>> FileIdentity(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return ErrnoError("fstat", errno);
  return std::make_pair(st.st_dev, st.st_ino);
}

}  // namespace bufferd
