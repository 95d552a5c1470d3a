#include "client/connection.h"

#include <poll.h>
#include <unistd.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <system_error>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/errno_status.h"
#include "base/private_dir.h"
#include "base/protocol.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/create_channel_posix.h"
#include "grpcpp/security/credentials.h"

namespace bufferd::internal {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

namespace {
// poll()'s timeout for `left`: rounded up to whole ms (so the last partial ms
// is waited, not spun), never negative, clamped to int.
int PollTimeoutMs(absl::Duration left) {
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(
      std::min<int64_t>(absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))),
                        std::numeric_limits<int>::max()));
}

// Whether the peer `pid` (as this process sees it) is the process a hello
// names as `hello_pid` (as the daemon sees itself): the same number, or for
// a daemon in a pid namespace below ours (a container), the innermost entry
// of the peer's NSpid. A peer whose pid we cannot see (0: a namespace above
// ours) cannot be checked; the uid rule still holds for it.
bool SameProcess(pid_t pid, uint32_t hello_pid) {
  if (pid == 0 || static_cast<uint32_t>(pid) == hello_pid) return true;
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (!absl::StartsWith(line, "NSpid:")) continue;
    const size_t last = line.find_last_of(" \t");
    uint32_t innermost = 0;
    return last != std::string::npos && absl::SimpleAtoi(line.substr(last + 1), &innermost) &&
           innermost == hello_pid;
  }
  return false;
}

// The daemon behind `path` must run as the socket dir's owner or as root.
absl::Status CheckDaemon(const PeerCredentials& daemon, uid_t owner, const std::string& path) {
  if (daemon.uid == owner || daemon.uid == 0) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      "the process behind ", path, " runs as uid ", daemon.uid, ", neither the socket dir's owner (uid ",
      owner, ") nor root; not trusted"));
}

// The session's gRPC channel, on a control.sock connection made here rather
// than by gRPC: a blocking connect waits while a flood has the listener's
// backlog full (gRPC's non-blocking connect fails at once, and then backs off
// for seconds), and a connection the daemon refuses at a cap is told apart
// from a missing daemon. The channel never reconnects: it lives and dies with
// the session, whose fd.sock connection is already open.
absl::StatusOr<std::shared_ptr<grpc::Channel>> OpenControlChannel(const std::string& socket_dir,
                                                                  absl::Duration timeout,
                                                                  const PeerCredentials& daemon) {
  const std::string path = ControlSocketPath(socket_dir);
  absl::StatusOr<UnixSocket> socket = UnixSocket::ConnectStream(path, timeout);
  if (!socket.ok()) {
    return absl::UnavailableError(
        absl::StrCat("cannot connect to bufferd's ", path, ": ", socket.status().message()));
  }
  // The same process as behind fd.sock.
  ASSIGN_OR_RETURN(const PeerCredentials peer, socket->GetPeerCredentials());
  if (peer.pid != daemon.pid || peer.uid != daemon.uid) {
    return absl::PermissionDeniedError(absl::StrCat(
        "the process behind ", path, " (pid ", peer.pid, ", uid ", peer.uid,
        ") is not the one behind fd.sock (pid ", daemon.pid, ", uid ", daemon.uid,
        "); not trusted"));
  }
  // gRPC's server speaks first (its SETTINGS frame); the daemon closes a
  // connection it refuses before gRPC ever sees it.
  pollfd ready{socket->fd(), POLLIN, 0};
  if (RetryOnEintr([&] { return ::poll(&ready, 1, PollTimeoutMs(timeout)); }) <= 0) {
    return absl::DeadlineExceededError(
        absl::StrCat("bufferd did not answer on ", path, " within ", absl::FormatDuration(timeout)));
  }
  char first;
  if (RetryOnEintr([&] { return ::recv(socket->fd(), &first, 1, MSG_PEEK); }) <= 0) {
    return absl::ResourceExhaustedError(
        "bufferd refused the control connection: this uid is at "
        "limits.max_control_connections_per_uid, the daemon at limits.max_control_connections, "
        "or the fd budget is full (the daemon's log says which)");
  }
  return grpc::CreateInsecureChannelFromFd(path, socket->unique_fd().Release());
}

}  // namespace

absl::StatusOr<std::shared_ptr<Connection>> Connection::Open(const std::string& socket_dir,
                                                             absl::Duration timeout) {
  std::shared_ptr<Connection> connection(new Connection());
  connection->timeout_ = timeout;
  // Only a dir that nobody but its owner (us or root) can write holds the
  // real daemon's sockets; and only a daemon of that uid (or root) may
  // answer on them.
  ASSIGN_OR_RETURN(const uid_t owner, CheckTrustedDir(socket_dir, ::geteuid()));
  absl::StatusOr<UnixSocket> socket = UnixSocket::ConnectSeqPacket(FdSocketPath(socket_dir));
  if (!socket.ok() && ErrnoOf(socket.status()) == EACCES) {
    return absl::PermissionDeniedError(absl::StrCat(
        "bufferd in ", socket_dir, " does not let uid ", ::geteuid(),
        " connect: only its own uid, root and members of its configured group may (ask for the "
        "group, or for `group:` in its config)"));
  }
  if (!socket.ok()) {
    return absl::UnavailableError(absl::StrCat("cannot connect to bufferd in ", socket_dir,
                                               " (is it running?): ", socket.status().message()));
  }
  ASSIGN_OR_RETURN(const PeerCredentials daemon, socket->GetPeerCredentials());
  RETURN_IF_ERROR(CheckDaemon(daemon, owner, FdSocketPath(socket_dir)));
  pollfd ready{socket->fd(), POLLIN, 0};
  int n = RetryOnEintr([&] { return ::poll(&ready, 1, PollTimeoutMs(timeout)); });
  if (n <= 0) return absl::DeadlineExceededError("bufferd sent no hello on fd.sock");
  ASSIGN_OR_RETURN(UnixSocket::Received received, socket->RecvWithFds(kMaxRecordBytes));
  v1::FdChannelMessage message;
  const bool parsed = !received.eof && message.ParseFromString(received.bytes);
  if (parsed && message.has_refused()) {
    // A cap or the daemon's fd budget: the daemon says which.
    const v1::Refused& refused = message.refused();
    const absl::StatusCode code = refused.code() > 0 && refused.code() <= 16
                                      ? static_cast<absl::StatusCode>(refused.code())
                                      : absl::StatusCode::kUnavailable;
    return absl::Status(code, absl::StrCat("bufferd refused the session: ", refused.message()));
  }
  if (!parsed || !message.has_hello()) {
    return absl::UnavailableError("bufferd closed fd.sock or sent no hello");
  }
  if (message.hello().protocol_version() != kProtocolVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("bufferd speaks protocol ", message.hello().protocol_version(),
                     "; this library speaks ", kProtocolVersion));
  }
  if (!SameProcess(daemon.pid, message.hello().daemon_pid())) {
    return absl::PermissionDeniedError(absl::StrCat(
        "the process behind ", FdSocketPath(socket_dir), " (pid ", daemon.pid,
        ") is not the daemon its hello names (pid ", message.hello().daemon_pid(),
        "): a relay may sit between you and bufferd; not trusted"));
  }
  connection->session_id_ = message.hello().session_id();
  connection->metadata_ =
      FormatSessionCredential(connection->session_id_, message.hello().secret());
  connection->fd_socket_ = *std::move(socket);
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel,
                   OpenControlChannel(socket_dir, timeout, daemon));
  connection->allocator_ = v1::Allocator::NewStub(channel);
  connection->debug_ = v1::Debug::NewStub(channel);
  return connection;
}

Connection::~Connection() {
  Close();
  if (flusher_.joinable()) flusher_.join();
}

void Connection::Close() {
  {
    absl::MutexLock lock(&release_mu_);
    release_closed_ = true;
    pending_releases_.clear();  // the session's end releases them all
    unconfirmed_.clear();
    release_changed_.Signal();
  }
  fd_socket_.Shutdown();
}

Call Connection::NewCall() {
  Call call;
  call.context = std::make_unique<grpc::ClientContext>();
  call.context->AddMetadata(kSessionMetadataKey, metadata_);
  call.context->set_deadline(std::chrono::system_clock::now() +
                             absl::ToChronoMilliseconds(timeout_ + kCallSlack));
  {
    absl::MutexLock lock(&release_mu_);
    // Never-sent drops first, then those sent but not yet confirmed (carried
    // by a call still in flight, or sent one-way by the flusher): the daemon
    // may not have applied them when this call arrives, so it carries them
    // too. Whichever copy the daemon reads second is skipped.
    const size_t n = std::min(pending_releases_.size(), kMaxCarried);
    std::set<uint64_t> taken(pending_releases_.end() - n, pending_releases_.end());
    pending_releases_.resize(pending_releases_.size() - n);
    call.carried.assign(taken.begin(), taken.end());
    for (uint64_t handle : taken) ++unconfirmed_[handle];
    for (auto it = unconfirmed_.rbegin();
         it != unconfirmed_.rend() && call.carried.size() < kMaxCarried; ++it) {
      if (taken.count(it->first) != 0) continue;
      call.carried.push_back(it->first);
      ++it->second;
    }
  }
  if (!call.carried.empty()) {
    call.context->AddMetadata(kReleaseMetadataKey, FormatReleaseList(call.carried));
  }
  return call;
}

absl::Status Connection::Finish(Call& call, const grpc::Status& status) {
  if (!call.carried.empty()) {
    absl::MutexLock lock(&release_mu_);
    for (uint64_t handle : call.carried) {
      auto it = unconfirmed_.find(handle);
      if (it == unconfirmed_.end()) continue;
      --it->second;
      // The daemon applied every carried release before an OK call ran.
      if (status.ok()) unconfirmed_.erase(it);
    }
    if (!status.ok() && !release_closed_) {
      // It may not have seen them: send them again (one-way, or on the next
      // call). Releasing twice is harmless; handle ids are never reused.
      pending_releases_.insert(pending_releases_.end(), call.carried.begin(), call.carried.end());
      ++releases_queued_;
      if (flusher_idle_) release_changed_.Signal();
    }
    TrimUnconfirmedLocked();
  }
  call.carried.clear();
  return FromGrpcStatus(status);
}

void Connection::TrimUnconfirmedLocked() {
  // Oldest first (handle ids grow): only those no call is carrying now, all
  // of them sent one-way long ago.
  for (auto it = unconfirmed_.begin();
       unconfirmed_.size() > kMaxCarried && it != unconfirmed_.end();) {
    it = it->second == 0 ? unconfirmed_.erase(it) : std::next(it);
  }
}

void Connection::QueueRelease(uint64_t handle) {
  absl::MutexLock lock(&release_mu_);
  if (release_closed_) return;
  pending_releases_.push_back(handle);
  ++releases_queued_;
  if (!flusher_.joinable()) {
    try {
      flusher_ = std::thread([this] { FlushLoop(); });  // first drop: start it
    } catch (const std::system_error&) {
      // No thread to be had: the next RPC, or the session's end, releases it.
    }
  } else if (flusher_idle_) {
    release_changed_.Signal();
  }
}

void Connection::FlushLoop() {
  absl::MutexLock lock(&release_mu_);
  uint64_t seen = releases_queued_;
  while (!release_closed_) {
    if (pending_releases_.empty() && seen == releases_queued_) {
      // Nothing dropped since the last look: sleep until a drop.
      flusher_idle_ = true;
      release_changed_.Wait(&release_mu_);
      flusher_idle_ = false;
      continue;
    }
    // Drops are happening: give RPCs kReleaseDelay to carry them, then send
    // what is left one-way.
    seen = releases_queued_;
    release_changed_.WaitWithTimeout(&release_mu_, kReleaseDelay);
    if (release_closed_) break;
    std::vector<uint64_t> handles;
    handles.swap(pending_releases_);
    if (handles.empty()) continue;
    // Unconfirmed until a call that carries them again succeeds; see NewCall.
    for (uint64_t handle : handles) unconfirmed_.emplace(handle, 0);
    TrimUnconfirmedLocked();
    release_mu_.Unlock();
    for (uint64_t handle : handles) {
      v1::FdChannelMessage message;
      message.mutable_release()->set_handle(handle);
      // Fails only when the session is over, which releases them anyway.
      (void)fd_socket_.Send(message.SerializeAsString());
    }
    release_mu_.Lock();
  }
}

void Connection::ReadOneLocked(absl::Time deadline) {
  mu_.Unlock();
  absl::Status failure;
  std::optional<UnixSocket::Received> received;
  // The daemon queues an RPC's fd before answering it, so the record is
  // usually there already: try first, poll only if it is not.
  absl::StatusOr<UnixSocket::Received> got =
      fd_socket_.RecvWithFds(kMaxRecordBytes, /*dont_wait=*/true);
  if (!got.ok() && IsWouldBlock(got.status())) {
    pollfd ready{fd_socket_.fd(), POLLIN, 0};
    int n = RetryOnEintr([&] { return ::poll(&ready, 1, PollTimeoutMs(deadline - absl::Now())); });
    if (n < 0) {
      got = ErrnoError("poll(fd.sock)", errno);
    } else if (n > 0) {
      got = fd_socket_.RecvWithFds(kMaxRecordBytes, /*dont_wait=*/true);
    }
  }
  if (got.ok()) {
    received = *std::move(got);
  } else if (!IsWouldBlock(got.status())) {
    failure = absl::UnavailableError(absl::StrCat("fd.sock failed: ", got.status().message()));
  }
  mu_.Lock();
  if (!failure.ok()) {
    closed_ = failure;
  } else if (received && received->eof) {
    closed_ = absl::UnavailableError("bufferd closed fd.sock (the session ended)");
  } else if (received) {
    v1::FdChannelMessage message;
    // Anything but a one-fd delivery is not for us; its fds close here.
    if (message.ParseFromString(received->bytes) && message.has_delivery() &&
        received->fds.size() == 1) {
      const uint64_t id = message.delivery().transfer_id();
      // An fd whose caller gave up is closed here, not kept forever.
      if (abandoned_.erase(id) == 0) arrived_[id] = {std::move(received->fds[0]), absl::Now()};
    }
    // Fds whose call failed after the daemon sent them (cancelled, deadline)
    // are never taken: close them once no call could still want them.
    const absl::Time stale = absl::Now() - (2 * timeout_ + kCallSlack);
    for (auto it = arrived_.begin(); it != arrived_.end();) {
      it = it->second.at < stale ? arrived_.erase(it) : std::next(it);
    }
  }
}

absl::StatusOr<UniqueFd> Connection::TakeFd(uint64_t transfer_id) {
  const absl::Time deadline = absl::Now() + timeout_;
  absl::MutexLock lock(&mu_);
  while (true) {
    if (auto it = arrived_.find(transfer_id); it != arrived_.end()) {
      UniqueFd fd = std::move(it->second.fd);
      arrived_.erase(it);
      return fd;
    }
    if (!closed_.ok()) return closed_;
    if (absl::Now() >= deadline) {
      abandoned_.insert(transfer_id);
      return absl::DeadlineExceededError(absl::StrCat("fd for transfer ", transfer_id,
                                                      " did not arrive on fd.sock within ",
                                                      absl::FormatDuration(timeout_)));
    }
    if (!reading_) {
      reading_ = true;
      ReadOneLocked(deadline);
      reading_ = false;
      changed_.SignalAll();
    } else {
      changed_.WaitWithDeadline(&mu_, deadline);
    }
  }
}

}  // namespace bufferd::internal
