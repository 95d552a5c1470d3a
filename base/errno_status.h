// Errors as absl::Status: one helper turns errno into a Status, plus the
// RETURN_IF_ERROR / ASSIGN_OR_RETURN macros Debian's abseil lacks.
#ifndef BUFFERD_BASE_ERRNO_STATUS_H_
#define BUFFERD_BASE_ERRNO_STATUS_H_

#include <cerrno>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace bufferd {

// A Status for a failed system call: "<what>: <strerror> (errno N)", with a
// code that matches the errno (ENOMEM/ENOSPC/EMFILE -> RESOURCE_EXHAUSTED,
// EACCES/EPERM -> PERMISSION_DENIED, ENOENT -> NOT_FOUND, EINVAL ->
// INVALID_ARGUMENT, EAGAIN -> UNAVAILABLE, EEXIST -> ALREADY_EXISTS, ...).
// The errno is also attached as a payload, for ErrnoOf().
absl::Status ErrnoError(absl::string_view what, int err);

// The errno an ErrnoError carries, or 0.
int ErrnoOf(const absl::Status& status);

// True for EAGAIN/EWOULDBLOCK from a non-blocking call.
inline bool IsWouldBlock(const absl::Status& status) { return ErrnoOf(status) == EAGAIN; }

// Retries `call` while it fails with EINTR. Not for close().
template <typename F>
auto RetryOnEintr(F call) -> decltype(call()) {
  decltype(call()) result;
  do {
    result = call();
  } while (result == -1 && errno == EINTR);
  return result;
}

// "CODE: message", as Status::ToString() without the payloads (the errno an
// ErrnoError carries is for ErrnoOf, not for people): for logs and stderr.
std::string StatusText(const absl::Status& status);

// Formats a byte count for messages: "4 KiB", "2 MiB", "1.5 GiB", "123 B".
std::string FormatBytes(uint64_t bytes);

}  // namespace bufferd

#define BUFFERD_CONCAT_INNER_(a, b) a##b
#define BUFFERD_CONCAT_(a, b) BUFFERD_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function if `expr` is not OK.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status bufferd_status_ = (expr);           \
    if (!bufferd_status_.ok()) return bufferd_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, Foo());` assigns the value or returns the status.
#define ASSIGN_OR_RETURN(lhs, expr) \
  BUFFERD_ASSIGN_OR_RETURN_IMPL_(BUFFERD_CONCAT_(bufferd_statusor_, __LINE__), lhs, expr)
#define BUFFERD_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return std::move(tmp).status();       \
  lhs = std::move(tmp).value()

#endif  // BUFFERD_BASE_ERRNO_STATUS_H_
