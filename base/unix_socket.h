// UnixSocket: an AF_UNIX socket, and the only code in bufferd that touches
// SCM_RIGHTS.
//
// Received fds are owned (UniqueFd) the moment they arrive and are always
// close-on-exec (MSG_CMSG_CLOEXEC). A truncated record or truncated ancillary
// data (MSG_TRUNC / MSG_CTRUNC) is an error; any fds that did arrive are closed.
// Sends never raise SIGPIPE (MSG_NOSIGNAL). A UnixSocket is move-only; one
// thread may send while another receives.
#ifndef BUFFERD_BASE_UNIX_SOCKET_H_
#define BUFFERD_BASE_UNIX_SOCKET_H_

#include <sys/types.h>

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "base/unique_fd.h"

namespace bufferd {

// The peer's credentials as the kernel saw them at connect time (SO_PEERCRED).
struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  // Supplementary groups at connect time (SO_PEERGROUPS); filled only where
  // asked for (GetPeerGroups).
  std::vector<gid_t> groups;
};

class UnixSocket {
 public:
  // Most fds one record may carry (an AllocateSet's delivery carries up to
  // this many; what a client sends the daemon, far fewer).
  static constexpr int kMaxFdsPerRecord = 64;

  struct Received {
    std::string bytes;
    std::vector<UniqueFd> fds;
    // The peer closed the connection (no bytes, no fds).
    bool eof = false;
  };

  // A SOCK_SEQPACKET socket listening on `path` (unlinks nothing: callers
  // decide whether a stale socket may be removed).
  static absl::StatusOr<UnixSocket> ListenSeqPacket(absl::string_view path, int backlog = 128);
  // A SOCK_STREAM socket listening on `path` (control.sock, whose connections
  // the daemon accepts itself and hands to gRPC).
  static absl::StatusOr<UnixSocket> ListenStream(absl::string_view path, int backlog = 128);
  // Connects a blocking SOCK_SEQPACKET socket to `path`.
  static absl::StatusOr<UnixSocket> ConnectSeqPacket(absl::string_view path);
  // Connects a SOCK_STREAM socket to `path`, waiting up to `timeout` while
  // the listener's backlog is full (a non-blocking connect would fail at
  // once); the socket is blocking, its send timeout left at `timeout`.
  static absl::StatusOr<UnixSocket> ConnectStream(absl::string_view path, absl::Duration timeout);
  // Whether something listens on the SOCK_SEQPACKET socket at `path`: a
  // non-blocking connect that is not refused (a full backlog counts as
  // listening). The connection is closed at once. Never blocks.
  static bool SeqPacketListening(absl::string_view path);
  // A connected SOCK_SEQPACKET pair (for tests and in-process plumbing).
  static absl::StatusOr<std::pair<UnixSocket, UnixSocket>> SeqPacketPair();

  UnixSocket() = default;
  explicit UnixSocket(UniqueFd fd) : fd_(std::move(fd)) {}

  // Accepts one connection; the new socket is close-on-exec and, when
  // `nonblocking`, O_NONBLOCK. UNAVAILABLE when none is pending on a
  // non-blocking listener.
  absl::StatusOr<UnixSocket> Accept(bool nonblocking) const;

  // Sends one record with `fds` attached. `dont_wait` makes this call
  // non-blocking: UNAVAILABLE means the socket buffer is full (EAGAIN).
  absl::Status SendWithFds(std::span<const uint8_t> bytes, std::span<const int> fds,
                           bool dont_wait = false) const;
  absl::Status Send(absl::string_view bytes, std::span<const int> fds = {},
                    bool dont_wait = false) const {
    return SendWithFds({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, fds,
                       dont_wait);
  }

  // Receives one record of at most `max_bytes` and `max_fds` fds (at most
  // kMaxFdsPerRecord); a record with more is DATA_LOSS, its extra fds never
  // installed. UNAVAILABLE on EAGAIN for a non-blocking socket.
  absl::StatusOr<Received> RecvWithFds(size_t max_bytes = 4096, bool dont_wait = false,
                                       int max_fds = kMaxFdsPerRecord) const {
    return RecvWithFdsOn(fd_.get(), max_bytes, dont_wait, max_fds);
  }
  // The same on a socket fd someone else owns.
  static absl::StatusOr<Received> RecvWithFdsOn(int fd, size_t max_bytes = 4096,
                                                bool dont_wait = false,
                                                int max_fds = kMaxFdsPerRecord);

  absl::StatusOr<PeerCredentials> GetPeerCredentials() const;
  // The peer's supplementary groups as the kernel recorded them at connect
  // (SO_PEERGROUPS, Linux 4.13).
  absl::StatusOr<std::vector<gid_t>> GetPeerGroups() const;

  // Shuts down both directions: wakes a thread blocked in RecvWithFds.
  void Shutdown() const;

  int fd() const { return fd_.get(); }
  bool valid() const { return fd_.valid(); }
  UniqueFd& unique_fd() { return fd_; }

 private:
  UniqueFd fd_;
};

}  // namespace bufferd

#endif  // BUFFERD_BASE_UNIX_SOCKET_H_
