#include "daemon/systemd.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"

namespace bufferd {
namespace {

// The path a listening Unix socket is bound to ("" for an unnamed or
// abstract one).
std::string BoundPath(int fd) {
  sockaddr_un address{};
  socklen_t length = sizeof(address);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0 ||
      address.sun_family != AF_UNIX || length <= offsetof(sockaddr_un, sun_path) ||
      address.sun_path[0] == '\0') {
    return "";
  }
  return std::string(address.sun_path,
                     strnlen(address.sun_path, length - offsetof(sockaddr_un, sun_path)));
}

}  // namespace

absl::StatusOr<std::optional<ActivatedSockets>> TakeActivatedSockets() {
  char** names = nullptr;
  // unset_environment=1: the variables name fds of this pid only.
  const int count = sd_listen_fds_with_names(1, &names);
  if (count < 0) return ErrnoError("sd_listen_fds", -count);
  std::vector<std::string> fd_names;
  for (int i = 0; names != nullptr && names[i] != nullptr; ++i) {
    fd_names.emplace_back(names[i]);
    std::free(names[i]);
  }
  std::free(names);
  if (count == 0) return std::nullopt;

  ActivatedSockets sockets;
  // Every passed fd is ours to close, taken first so none leaks on an error.
  std::vector<UniqueFd> fds;
  for (int i = 0; i < count; ++i) fds.emplace_back(SD_LISTEN_FDS_START + i);
  for (int i = 0; i < count; ++i) {
    const int fd = fds[i].get();
    const std::string name = i < static_cast<int>(fd_names.size()) ? fd_names[i] : "";
    const std::string what = absl::StrCat("socket activation: fd ", fd, " ('", name, "')");
    if (sd_is_socket_unix(fd, 0, /*listening=*/1, nullptr, 0) <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what,
                       " is not a listening Unix socket; bufferd.socket must hold only "
                       "ListenStream=<dir>/control.sock and "
                       "ListenSequentialPacket=<dir>/fd.sock"));
    }
    int type = 0;
    socklen_t length = sizeof(type);
    if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) != 0) {
      return ErrnoError(absl::StrCat(what, ": getsockopt(SO_TYPE)"), errno);
    }
    const bool is_control = name == "control" || (name != "fd" && type == SOCK_STREAM);
    const bool is_fd = name == "fd" || (name != "control" && type == SOCK_SEQPACKET);
    if ((is_control && type != SOCK_STREAM) || (is_fd && type != SOCK_SEQPACKET) ||
        (!is_control && !is_fd)) {
      return absl::InvalidArgumentError(absl::StrCat(
          what,
          " has the wrong type: control.sock is a stream socket (ListenStream=), fd.sock "
          "a sequential-packet one (ListenSequentialPacket=)"));
    }
    UnixSocket& slot = is_control ? sockets.control : sockets.fd;
    if (slot.valid()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": a second ", is_control ? "control.sock" : "fd.sock", " socket was passed"));
    }
    if (::fcntl(fd, F_SETFD, FD_CLOEXEC) != 0) {
      return ErrnoError(absl::StrCat(what, ": fcntl(FD_CLOEXEC)"), errno);
    }
    slot = UnixSocket(std::move(fds[i]));
  }
  if (!sockets.control.valid() || !sockets.fd.valid()) {
    return absl::InvalidArgumentError(
        absl::StrCat("socket activation passed only ", sockets.control.valid() ? "control" : "fd",
                     ".sock; bufferd needs both (ListenStream=<dir>/control.sock and "
                     "ListenSequentialPacket=<dir>/fd.sock in bufferd.socket)"));
  }
  const std::filesystem::path control_path = BoundPath(sockets.control.fd());
  const std::filesystem::path fd_path = BoundPath(sockets.fd.fd());
  if (control_path.filename() != "control.sock" || fd_path.filename() != "fd.sock" ||
      control_path.parent_path() != fd_path.parent_path() || control_path.is_relative()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "socket activation passed '", control_path.string(), "' and '", fd_path.string(),
        "'; clients look for DIR/control.sock and DIR/fd.sock of one absolute DIR"));
  }
  sockets.dir = control_path.parent_path().string();
  return sockets;
}

bool ServiceManagerListens() {
  const char* socket = std::getenv("NOTIFY_SOCKET");
  return socket != nullptr && *socket != '\0';
}

void NotifyServiceManager(const std::string& state) {
  (void)sd_notify(/*unset_environment=*/0, state.c_str());
}

std::optional<absl::Duration> WatchdogPeriod() {
  uint64_t usec = 0;
  if (sd_watchdog_enabled(/*unset_environment=*/0, &usec) <= 0 || usec == 0) return std::nullopt;
  return absl::Microseconds(usec) / 2;
}

}  // namespace bufferd
