#include "base/errno_status.h"

#include <cstring>
#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace bufferd {

namespace {
constexpr char kErrnoPayload[] = "bufferd.errno";

absl::Status WithErrno(absl::Status status, int err) {
  status.SetPayload(kErrnoPayload, absl::Cord(absl::StrCat(err)));
  return status;
}

absl::Status ErrnoStatus(absl::string_view what, int err) {
  std::string message = absl::StrCat(what, ": ", std::strerror(err), " (errno ", err, ")");
  switch (err) {
    case ENOMEM:
    case ENOSPC:
    case EMFILE:
    case ENFILE:
    case EDQUOT:
    case ENOBUFS:
      return absl::ResourceExhaustedError(message);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(message);
    case ENOENT:
      return absl::NotFoundError(message);
    case EINVAL:
    case EBADF:
    case ENAMETOOLONG:
      return absl::InvalidArgumentError(message);
    case EAGAIN:
    case ECONNREFUSED:
    case EPIPE:
    case ECONNRESET:
      return absl::UnavailableError(message);
    case EEXIST:
    case EADDRINUSE:
      return absl::AlreadyExistsError(message);
    case ENOSYS:
    case EOPNOTSUPP:
      return absl::UnimplementedError(message);
    case ETIMEDOUT:
      return absl::DeadlineExceededError(message);
    default:
      return absl::InternalError(message);
  }
}
}  // namespace

absl::Status ErrnoError(absl::string_view what, int err) {
  return WithErrno(ErrnoStatus(what, err), err);
}

int ErrnoOf(const absl::Status& status) {
  absl::optional<absl::Cord> payload = status.GetPayload(kErrnoPayload);
  int err = 0;
  if (!payload || !absl::SimpleAtoi(std::string(*payload), &err)) return 0;
  return err;
}

std::string StatusText(const absl::Status& status) {
  if (status.ok()) return "OK";
  return absl::StrCat(absl::StatusCodeToString(status.code()), ": ", status.message());
}

std::string FormatBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int unit = 0;
  uint64_t whole = bytes;
  while (whole >= 1024 && unit < 6) {
    whole /= 1024;
    ++unit;
  }
  if (unit == 0) return absl::StrCat(bytes, " B");
  uint64_t divisor = uint64_t{1} << (10 * unit);
  if (bytes % divisor == 0) return absl::StrCat(bytes / divisor, " ", kUnits[unit]);
  std::string text = absl::StrFormat("%.1f %s", static_cast<double>(bytes) / divisor, kUnits[unit]);
  // "64.0 MiB" for 64 MiB + 4 KiB would read as exact: say the bytes too.
  if (absl::StrContains(text, ".0 ")) absl::StrAppend(&text, " (", bytes, " bytes)");
  return text;
}

}  // namespace bufferd
