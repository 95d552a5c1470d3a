#include "daemon/control_listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "daemon/log.h"
#include "grpcpp/server_posix.h"

namespace bufferd {

ControlListener::ControlListener(FdBudget* budget, Options options)
    : budget_(budget), options_(options) {}

ControlListener::~ControlListener() { Stop(); }

absl::Status ControlListener::Start(UnixSocket listener, grpc::Server* server) {
  listener_ = std::move(listener);
  server_ = server;
  int flags = ::fcntl(listener_.fd(), F_GETFL);
  if (flags < 0 || ::fcntl(listener_.fd(), F_SETFL, flags | O_NONBLOCK) != 0) {
    return ErrnoError("fcntl(O_NONBLOCK) on control.sock", errno);
  }
  return loop_.Start([this] { Loop(); });
}

void ControlListener::Stop() {
  if (loop_.Stop()) listener_ = UnixSocket();
}

size_t ControlListener::connections() const {
  absl::MutexLock lock(&mu_);
  return connections_.size();
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
                 socket.status().ToString());
      paused_until_ = absl::Now() + absl::Milliseconds(100);
      return;
    }
    absl::StatusOr<PeerCredentials> peer = socket->GetPeerCredentials();
    absl::Status admitted = peer.ok() ? Admit(*socket, *peer) : peer.status();
    if (!admitted.ok()) {
      // Closed before gRPC ever sees it: the client gets EOF.
      LogLimited(refusals, spdlog::level::warn, "control.sock: refused a connection from pid {}: {}",
                 peer.ok() ? peer->pid : 0, std::string(admitted.message()));
    }
  }
}

absl::Status ControlListener::Admit(UnixSocket& socket, const PeerCredentials& peer) {
  struct stat st {};
  if (::fstat(socket.fd(), &st) != 0) return ErrnoError("fstat", errno);
  mu_.Lock();
  // An fd number gRPC closed may be ours again now: whatever was there is gone.
  if (auto old = connections_.find(socket.fd()); old != connections_.end()) {
    if (--per_uid_[old->second.uid] == 0) per_uid_.erase(old->second.uid);
    connections_.erase(old);
  }
  auto refused = [&]() -> absl::Status {
    if (connections_.size() >= options_.max_connections) {
      return absl::ResourceExhaustedError(
          absl::StrCat("bufferd has ", connections_.size(),
                       " control connections (limits.max_control_connections)"));
    }
    if (auto it = per_uid_.find(peer.uid);
        it != per_uid_.end() && it->second >= options_.max_connections_per_uid) {
      return absl::ResourceExhaustedError(
          absl::StrCat("uid ", peer.uid, " has ", it->second,
                       " control connections (limits.max_control_connections_per_uid)"));
    }
    return absl::OkStatus();
  };
  absl::Status status = refused();
  absl::StatusOr<FdBudget::Lease> lease =
      status.ok() ? budget_->Acquire(FdUse::kControlConnection, peer.uid) : status;
  if (!lease.ok() && absl::Now() - last_sweep_ >= absl::Milliseconds(10)) {
    // Before refusing anyone, look for places gRPC has freed since the last
    // sweep (at most every 10 ms, so a flood of refusals costs little).
    Sweep();
    status = refused();
    lease = status.ok() ? budget_->Acquire(FdUse::kControlConnection, peer.uid) : status;
  }
  if (!lease.ok()) {
    mu_.Unlock();
    return lease.status();
  }
  const int fd = socket.fd();
  connections_[fd] = Connection{st.st_dev, st.st_ino, peer.uid, *std::move(lease)};
  ++per_uid_[peer.uid];
  mu_.Unlock();
  // gRPC owns the fd from here and closes it when the connection ends. Only
  // this thread sweeps, so the entry cannot be forgotten before gRPC has it.
  (void)socket.unique_fd().Release();
  grpc::AddInsecureChannelFromFd(server_, fd);
  return absl::OkStatus();
}

void ControlListener::Sweep() {
  last_sweep_ = absl::Now();
  for (auto it = connections_.begin(); it != connections_.end();) {
    struct stat st {};
    const bool open = ::fstat(it->first, &st) == 0 && st.st_dev == it->second.dev &&
                      st.st_ino == it->second.ino;
    if (open) {
      ++it;
      continue;
    }
    if (--per_uid_[it->second.uid] == 0) per_uid_.erase(it->second.uid);
    it = connections_.erase(it);
  }
}

}  // namespace bufferd
