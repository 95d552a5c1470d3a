#include "base/unix_socket.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"

namespace bufferd {
namespace {

absl::StatusOr<sockaddr_un> MakeAddress(absl::string_view path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(address.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("unix socket path '", path, "' is ", path.size(),
                                                   " bytes; must be 1..",
                                                   sizeof(address.sun_path) - 1));
  }
  std::memcpy(address.sun_path, path.data(), path.size());
  return address;
}

absl::StatusOr<UniqueFd> NewSocket(int type) {
  int fd = ::socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return ErrnoError(type == SOCK_STREAM ? "socket(AF_UNIX, SOCK_STREAM)"
                                          : "socket(AF_UNIX, SOCK_SEQPACKET)",
                      errno);
  }
  return UniqueFd(fd);
}

absl::StatusOr<UniqueFd> NewSeqPacketSocket() { return NewSocket(SOCK_SEQPACKET); }

absl::StatusOr<UnixSocket> Listen(int type, absl::string_view path, int backlog) {
  ASSIGN_OR_RETURN(sockaddr_un address, MakeAddress(path));
  ASSIGN_OR_RETURN(UniqueFd fd, NewSocket(type));
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
    return ErrnoError(absl::StrCat("bind(", path, ")"), errno);
  }
  if (::listen(fd.get(), backlog) != 0) return ErrnoError("listen", errno);
  return UnixSocket(std::move(fd));
}

}  // namespace

absl::StatusOr<UnixSocket> UnixSocket::ListenSeqPacket(absl::string_view path, int backlog) {
  return Listen(SOCK_SEQPACKET, path, backlog);
}

absl::StatusOr<UnixSocket> UnixSocket::ListenStream(absl::string_view path, int backlog) {
  return Listen(SOCK_STREAM, path, backlog);
}

absl::StatusOr<UnixSocket> UnixSocket::ConnectSeqPacket(absl::string_view path) {
  ASSIGN_OR_RETURN(sockaddr_un address, MakeAddress(path));
  ASSIGN_OR_RETURN(UniqueFd fd, NewSeqPacketSocket());
  int rc = RetryOnEintr([&] {
    return ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address));
  });
  if (rc != 0) return ErrnoError(absl::StrCat("connect(", path, ")"), errno);
  return UnixSocket(std::move(fd));
}

bool UnixSocket::SeqPacketListening(absl::string_view path) {
  absl::StatusOr<sockaddr_un> address = MakeAddress(path);
  if (!address.ok()) return false;
  absl::StatusOr<UniqueFd> fd = NewSocket(SOCK_SEQPACKET | SOCK_NONBLOCK);
  if (!fd.ok()) return false;
  if (::connect(fd->get(), reinterpret_cast<const sockaddr*>(&*address), sizeof(*address)) == 0) {
    return true;
  }
  return errno == EAGAIN || errno == EINPROGRESS;
}

absl::StatusOr<UnixSocket> UnixSocket::ConnectStream(absl::string_view path,
                                                     absl::Duration timeout) {
  ASSIGN_OR_RETURN(sockaddr_un address, MakeAddress(path));
  ASSIGN_OR_RETURN(UniqueFd fd, NewSocket(SOCK_STREAM));
  const timeval limit = absl::ToTimeval(timeout);
  if (::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit)) != 0) {
    return ErrnoError("setsockopt(SO_SNDTIMEO)", errno);
  }
  int rc = RetryOnEintr([&] {
    return ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address));
  });
  if (rc != 0) return ErrnoError(absl::StrCat("connect(", path, ")"), errno);
  return UnixSocket(std::move(fd));
}

absl::StatusOr<std::pair<UnixSocket, UnixSocket>> UnixSocket::SeqPacketPair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0) {
    return ErrnoError("socketpair(AF_UNIX, SOCK_SEQPACKET)", errno);
  }
  return std::make_pair(UnixSocket(UniqueFd(fds[0])), UnixSocket(UniqueFd(fds[1])));
}

absl::StatusOr<UnixSocket> UnixSocket::Accept(bool nonblocking) const {
  int flags = SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0);
  int fd = RetryOnEintr([&] { return ::accept4(fd_.get(), nullptr, nullptr, flags); });
  if (fd < 0) return ErrnoError("accept4", errno);
  return UnixSocket(UniqueFd(fd));
}

absl::Status UnixSocket::SendWithFds(std::span<const uint8_t> bytes, std::span<const int> fds,
                                     bool dont_wait) const {
  if (fds.size() > kMaxFdsPerRecord) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot send ", fds.size(), " fds in one record (max ", kMaxFdsPerRecord, ")"));
  }
  iovec iov{const_cast<uint8_t*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerRecord)];
  if (!fds.empty()) {
    const size_t payload = sizeof(int) * fds.size();
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(payload);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(payload);
    std::memcpy(CMSG_DATA(cmsg), fds.data(), payload);
  }
  int flags = MSG_NOSIGNAL | (dont_wait ? MSG_DONTWAIT : 0);
  ssize_t sent = RetryOnEintr([&] { return ::sendmsg(fd_.get(), &msg, flags); });
  if (sent < 0) return ErrnoError("sendmsg", errno);
  if (static_cast<size_t>(sent) != bytes.size()) {
    return absl::InternalError(
        absl::StrCat("sendmsg sent ", sent, " of ", bytes.size(), " bytes of a record"));
  }
  return absl::OkStatus();
}

absl::StatusOr<UnixSocket::Received> UnixSocket::RecvWithFdsOn(int fd, size_t max_bytes,
                                                               bool dont_wait, int max_fds) {
  Received received;
  // Records are small: read into the stack, never zero-fill a big string.
  char stack[4096];
  std::string heap;
  char* buffer = stack;
  if (max_bytes > sizeof(stack)) {
    heap.resize(max_bytes);
    buffer = heap.data();
  }
  iovec iov{buffer, max_bytes};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerRecord)];
  msg.msg_control = control;
  msg.msg_controllen =
      CMSG_SPACE(sizeof(int) * static_cast<size_t>(std::clamp(max_fds, 1, kMaxFdsPerRecord)));
  int flags = MSG_CMSG_CLOEXEC | (dont_wait ? MSG_DONTWAIT : 0);
  ssize_t n = RetryOnEintr([&] { return ::recvmsg(fd, &msg, flags); });
  if (n < 0) {
    // The common answer of a non-blocking read: built once (a Status copy
    // is a reference count).
    static const absl::Status kWouldBlock = ErrnoError("recvmsg", EAGAIN);
    return errno == EAGAIN ? kWouldBlock : ErrnoError("recvmsg", errno);
  }
  // Take ownership of every fd first, so that every error path closes them.
  for (cmsghdr* cmsg = CMSG_FIRSTHDR(&msg); cmsg != nullptr; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
    if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
      received.fds.emplace_back(fd);
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    return absl::DataLossError("recvmsg: ancillary data truncated (MSG_CTRUNC); fds lost");
  }
  if (msg.msg_flags & MSG_TRUNC) {
    return absl::DataLossError(
        absl::StrCat("recvmsg: record longer than ", max_bytes, " bytes (MSG_TRUNC)"));
  }
  received.bytes.assign(buffer, static_cast<size_t>(n));
  received.eof = n == 0 && received.fds.empty();
  return received;
}

absl::StatusOr<PeerCredentials> UnixSocket::GetPeerCredentials() const {
  ucred cred{};
  socklen_t length = sizeof(cred);
  if (::getsockopt(fd_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &length) != 0) {
    return ErrnoError("getsockopt(SO_PEERCRED)", errno);
  }
  return PeerCredentials{cred.pid, cred.uid, cred.gid};
}

absl::StatusOr<std::vector<gid_t>> UnixSocket::GetPeerGroups() const {
  // NGROUPS_MAX is 65536; start small and grow on ERANGE (the kernel then
  // says how many bytes it needs).
  std::vector<gid_t> groups(64);
  for (int attempt = 0; attempt < 4; ++attempt) {
    socklen_t length = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(fd_.get(), SOL_SOCKET, SO_PEERGROUPS, groups.data(), &length) == 0) {
      groups.resize(length / sizeof(gid_t));
      return groups;
    }
    if (errno != ERANGE) return ErrnoError("getsockopt(SO_PEERGROUPS)", errno);
    groups.resize(std::max<size_t>(length / sizeof(gid_t), groups.size() * 2));
  }
  return absl::InternalError("getsockopt(SO_PEERGROUPS): the group list kept growing");
}

void UnixSocket::Shutdown() const {
  if (fd_.valid()) ::shutdown(fd_.get(), SHUT_RDWR);
}

}  // namespace bufferd
