// UniqueFd: a move-only owner of one file descriptor.
//
// Ownership is in the type: a UniqueFd closes its fd when destroyed or reset.
// There is no implicit conversion to int; borrow with get(), give away with
// Release(). Not thread-safe: one owner at a time, like std::unique_ptr.
#ifndef BUFFERD_BASE_UNIQUE_FD_H_
#define BUFFERD_BASE_UNIQUE_FD_H_

#include <sys/types.h>

#include <utility>

#include "absl/status/statusor.h"

namespace bufferd {

class UniqueFd {
 public:
  UniqueFd() = default;
  // Adopts `fd` (which may be -1).
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }

  UniqueFd(UniqueFd&& other) noexcept : fd_(other.Release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) Reset(other.Release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  // Borrows the fd; -1 when empty.
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }

  // Gives the fd away; this object becomes empty.
  [[nodiscard]] int Release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

  // Closes the current fd (close errors are ignored: the fd is gone either
  // way, and EINTR must not be retried) and adopts `fd`.
  void Reset(int fd = -1);

  // A new close-on-exec fd for the same open file description.
  absl::StatusOr<UniqueFd> Duplicate() const;

 private:
  int fd_ = -1;
};

// A new close-on-exec fd for the same open file description as the borrowed
// `fd`.
absl::StatusOr<UniqueFd> DuplicateFd(int fd);

// The file the borrowed `fd` is open on, as (device, inode): the same for
// every fd of that file, in any process.
absl::StatusOr<std::pair<dev_t, ino_t>> FileIdentity(int fd);

}  // namespace bufferd

#endif  // BUFFERD_BASE_UNIQUE_FD_H_
