#include "daemon/control_listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "daemon/log.h"
#include "grpcpp/server_posix.h"

namespace bufferd {
namespace {

// Sweeps that a refusal (or the budget's reclaimer) triggers come at most
// this often, so a flood of refusals costs little.
constexpr absl::Duration kMinSweepGap = absl::Milliseconds(10);

}  // namespace

ControlListener::ControlListener(FdBudget* budget, Options options)
    : budget_(budget), options_(options) {}

ControlListener::~ControlListener() { Stop(); }

absl::Status ControlListener::Listen(UnixSocket listener, grpc::Server* server) {
  listener_ = std::move(listener);
  server_ = server;
  int flags = ::fcntl(listener_.fd(), F_GETFL);
  if (flags < 0 || ::fcntl(listener_.fd(), F_SETFL, flags | O_NONBLOCK) != 0) {
    return ErrnoError("fcntl(O_NONBLOCK) on control.sock", errno);
  }
  return loop_.Init();
}

void ControlListener::Serve() {
  loop_.Run([this] { Loop(); });
}

void ControlListener::Stop() {
  if (loop_.Stop()) listener_ = UnixSocket();
}

void ControlListener::Loop() {
  while (true) {
    const bool paused = paused_until_ != absl::InfinitePast();
    pollfd fds[2] = {{loop_.wake_fd(), POLLIN, 0}, {listener_.fd(), POLLIN, 0}};
    bool idle;
    {
      absl::MutexLock lock(&mu_);
      idle = connections_.empty();
    }
    // Nothing to sweep for while no connection is open: sleep until one comes.
    const int timeout_ms =
        paused ? 20
        : idle ? -1
               : static_cast<int>(absl::ToInt64Milliseconds(options_.sweep_interval));
    const int n = ::poll(fds, paused ? 1 : 2, timeout_ms);
    if (loop_.stopping()) return;
    {
      absl::MutexLock lock(&mu_);
      if (absl::Now() - last_sweep_ >= options_.sweep_interval) Sweep();
    }
    if (paused && absl::Now() >= paused_until_) paused_until_ = absl::InfinitePast();
    if (n > 0 && !paused && (fds[1].revents & POLLIN)) AcceptAll();
  }
}

void ControlListener::AcceptAll() {
  static LogLimiter refusals;
  while (true) {
    // The budget's reserve always has room for this one fd, admitted or not.
    absl::StatusOr<UnixSocket> socket = listener_.Accept(/*nonblocking=*/true);
    if (!socket.ok()) {
      if (IsWouldBlock(socket.status())) return;
      static LogLimiter failures;
      LogLimited(failures, spdlog::level::warn,
                 "control.sock accept failed: {}; pausing accepts for 100 ms",
                 StatusText(socket.status()));
      paused_until_ = absl::Now() + absl::Milliseconds(100);
      return;
    }
    // A client that connected and left already (a connect/close flood) costs
    // nothing more: gRPC never sees it.
    char byte;
    if (::recv(socket->fd(), &byte, 1, MSG_PEEK | MSG_DONTWAIT) == 0) continue;
    absl::StatusOr<PeerCredentials> peer = socket->GetPeerCredentials();
    absl::Status admitted = peer.ok() ? Admit(*socket, *peer) : peer.status();
    if (!admitted.ok()) {
      // Closed before gRPC ever sees it: the client gets EOF.
      LogLimited(refusals, spdlog::level::warn, "control.sock: refused a connection from pid {}: {}",
                 peer.ok() ? peer->pid : 0, std::string(admitted.message()));
    }
  }
}

absl::Status ControlListener::CheckCapsLocked(uid_t uid) const {
  if (connections_.size() >= options_.max_connections) {
    return absl::ResourceExhaustedError(
        absl::StrCat("bufferd has ", connections_.size(),
                     " control connections (limits.max_control_connections)"));
  }
  if (auto it = per_uid_.find(uid);
      it != per_uid_.end() && it->second >= options_.max_connections_per_uid) {
    return absl::ResourceExhaustedError(
        absl::StrCat("uid ", uid, " has ", it->second,
                     " control connections (limits.max_control_connections_per_uid)"));
  }
  return absl::OkStatus();
}

absl::Status ControlListener::Admit(UnixSocket& socket, const PeerCredentials& peer) {
  struct stat st {};
  if (::fstat(socket.fd(), &st) != 0) return ErrnoError("fstat", errno);
  const int fd = socket.fd();
  {
    absl::MutexLock lock(&mu_);
    // An fd number gRPC closed may be ours again now: whatever was there is gone.
    if (auto old = connections_.find(fd); old != connections_.end()) Forget(old);
    absl::Status caps = CheckCapsLocked(peer.uid);
    // Before refusing anyone, look for connections gRPC has closed.
    if (!caps.ok() && ReclaimLocked()) caps = CheckCapsLocked(peer.uid);
    RETURN_IF_ERROR(caps);
  }
  // Not under mu_: a full budget runs its reclaimers, Reclaim() among them.
  ASSIGN_OR_RETURN(FdBudget::Lease lease, budget_->Acquire(FdUse::kControlConnection, peer.uid));
  {
    absl::MutexLock lock(&mu_);
    connections_[fd] = Connection{st.st_dev, st.st_ino, peer.uid, std::move(lease)};
    ++per_uid_[peer.uid];
  }
  // gRPC owns the fd from here and closes it when the connection ends. A
  // sweep meanwhile finds it open, so the entry outlives the hand-over.
  (void)socket.unique_fd().Release();
  grpc::AddInsecureChannelFromFd(server_, fd);
  return absl::OkStatus();
}

void ControlListener::Reclaim() {
  absl::MutexLock lock(&mu_);
  ReclaimLocked();
}

bool ControlListener::ReclaimLocked() {
  if (absl::Now() - last_sweep_ < kMinSweepGap) return false;
  Sweep();
  return true;
}

void ControlListener::Forget(std::map<int, Connection>::iterator it) {
  if (--per_uid_[it->second.uid] == 0) per_uid_.erase(it->second.uid);
  connections_.erase(it);
}

void ControlListener::Sweep() {
  last_sweep_ = absl::Now();
  for (auto it = connections_.begin(); it != connections_.end();) {
    struct stat st {};
    const bool open = ::fstat(it->first, &st) == 0 && st.st_dev == it->second.dev &&
                      st.st_ino == it->second.ino;
    if (open) {
      ++it;
    } else {
      Forget(it++);
    }
  }
}

}  // namespace bufferd
