#include "daemon/fd_channel.h"

#include <fcntl.h>
#include <linux/sockios.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/client_text.h"
#include "base/errno_status.h"
#include "base/protocol.h"
#include "daemon/log.h"
#include "spdlog/spdlog.h"

namespace bufferd {
namespace {

constexpr absl::Duration kChurnSummaryPeriod = absl::Minutes(1);

// Sessions that end badly and connections refused: one line per kind,
// whichever client causes them.
LogLimiter& BadEndLog() {
  static LogLimiter limiter;
  return limiter;
}
LogLimiter& RefusalLog() {
  static LogLimiter limiter;
  return limiter;
}

std::string ReadComm(pid_t pid) {
  // The kernel ends comm with one '\n'; the name itself may hold any byte
  // but NUL (PR_SET_NAME), so it is escaped here, once, for every table,
  // log line and proto (whose string fields must be UTF-8) that shows it.
  std::ifstream in(absl::StrCat("/proc/", pid, "/comm"));
  char buf[64] = {};
  in.read(buf, sizeof(buf) - 1);
  absl::string_view comm(buf, static_cast<size_t>(in.gcount()));
  if (absl::EndsWith(comm, "\n")) comm.remove_suffix(1);
  return EscapeClientText(comm);
}

}  // namespace

FdChannel::FdChannel(DaemonState* state, Options options) : state_(state), options_(options) {}

FdChannel::~FdChannel() { Stop(); }

absl::Status FdChannel::Listen(UnixSocket listener) {
  listener_ = std::move(listener);
  // AcceptAll drains the backlog until EAGAIN.
  int flags = ::fcntl(listener_.fd(), F_GETFL);
  if (flags < 0 || ::fcntl(listener_.fd(), F_SETFL, flags | O_NONBLOCK) != 0) {
    return ErrnoError("fcntl(O_NONBLOCK) on fd.sock", errno);
  }
  epoll_.Reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) return ErrnoError("epoll_create1", errno);
  RETURN_IF_ERROR(loop_.Init());
  for (int fd : {listener_.fd(), loop_.wake_fd()}) {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = fd;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
      return ErrnoError("epoll_ctl(ADD)", errno);
    }
  }
  return absl::OkStatus();
}

void FdChannel::Serve() {
  loop_.Run([this] { Loop(); });
}

void FdChannel::Stop() {
  if (!loop_.Stop()) return;
  std::vector<uint64_t> sessions;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [fd, connection] : connections_) sessions.push_back(connection.session_id);
    connections_.clear();
    total_queued_ = 0;
    by_session_.clear();
  }
  for (uint64_t id : sessions) state_->CloseSession(id);
}

void FdChannel::Loop() {
  epoll_event events[64];
  while (true) {
    int n = ::epoll_wait(epoll_.get(), events, 64,
                         accept_paused_until_ == absl::InfinitePast() ? 500 : 20);
    if (loop_.stopping()) return;
    if (n < 0 && errno != EINTR) {
      spdlog::error("epoll_wait: {}", ErrnoError("epoll_wait", errno).ToString());
      return;
    }
    for (int i = 0; i < n; ++i) {
      const int fd = events[i].data.fd;
      if (fd == listener_.fd()) {
        AcceptAll();
      } else if (fd == loop_.wake_fd()) {
        continue;  // Stop(): seen at the top of the loop
      } else {
        if (events[i].events & EPOLLOUT) OnWritable(fd);
        if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP | EPOLLERR)) OnReadable(fd);
      }
    }
    if (accept_paused_until_ != absl::InfinitePast() && absl::Now() >= accept_paused_until_) {
      accept_paused_until_ = absl::InfinitePast();
      epoll_event event{};
      event.events = EPOLLIN;
      event.data.fd = listener_.fd();
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, listener_.fd(), &event);
    }
    CheckStalled();
    SummarizeChurn();
    state_->Housekeeping(absl::Now());
  }
}

void FdChannel::AcceptAll() {
  while (true) {
    absl::StatusOr<UnixSocket> socket = listener_.Accept(/*nonblocking=*/true);
    if (!socket.ok()) {
      if (IsWouldBlock(socket.status())) return;
      LogLimited(RefusalLog(), spdlog::level::warn,
                 "fd.sock accept failed: {}; pausing accepts for 100 ms",
                 socket.status().ToString());
      // Out of fds (EMFILE/ENFILE): the listener stays readable, so stop
      // watching it for a while instead of spinning.
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, listener_.fd(), nullptr);
      accept_paused_until_ = absl::Now() + absl::Milliseconds(100);
      return;
    }
    Admit(*std::move(socket));
  }
}

void FdChannel::Admit(UnixSocket socket) {
  absl::StatusOr<PeerCredentials> peer = socket.GetPeerCredentials();
  if (!peer.ok()) {
    LogLimited(RefusalLog(), spdlog::level::warn, "dropping fd.sock connection: {}",
               peer.status().ToString());
    return;
  }
  // The connection's place in the budget first, then the session caps.
  absl::StatusOr<FdBudget::Lease> lease =
      state_->fd_budget().Acquire(FdUse::kSession, peer->uid);
  const std::string comm = ReadComm(peer->pid);
  absl::StatusOr<DaemonState::NewSession> session =
      lease.ok() ? state_->OpenSession(*peer, comm) : lease.status();
  if (!session.ok()) {
    // Say why before closing: the client library reports it as the error.
    v1::FdChannelMessage message;
    message.mutable_refused()->set_code(static_cast<int32_t>(session.status().code()));
    message.mutable_refused()->set_message(std::string(session.status().message()));
    (void)socket.Send(message.SerializeAsString(), {}, /*dont_wait=*/true);
    ++refused_;
    LogLimited(RefusalLog(), spdlog::level::warn, "fd.sock: refused pid {} uid {} comm '{}': {}",
               peer->pid, peer->uid, comm, std::string(session.status().message()));
    return;
  }
  const int fd = socket.fd();
  epoll_event event{};
  event.events = EPOLLIN | EPOLLRDHUP;
  event.data.fd = fd;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
    LogLimited(RefusalLog(), spdlog::level::warn, "session {}: {}", session->id,
               ErrnoError("epoll_ctl", errno).ToString());
    state_->CloseSession(session->id);
    return;
  }
  v1::FdChannelMessage message;
  v1::Hello* hello = message.mutable_hello();
  hello->set_protocol_version(kProtocolVersion);
  hello->set_session_id(session->id);
  hello->set_secret(session->secret);
  hello->set_daemon_pid(static_cast<uint32_t>(::getpid()));
  const std::string hello_bytes = message.SerializeAsString();
  bool hello_failed = false;
  {
    // Registered before the Hello goes out: a client may call the moment
    // it has it, and its fds must find this connection.
    absl::MutexLock lock(&mu_);
    Connection& connection = connections_[fd];
    connection.session_id = session->id;
    connection.socket = std::move(socket);
    connection.lease = *std::move(lease);
    by_session_[session->id] = fd;
    // A fresh socket's buffer is empty, so this cannot block.
    hello_failed = !connection.socket.Send(hello_bytes, {}, /*dont_wait=*/true).ok();
  }
  ++opened_;
  spdlog::debug("session {} opened: pid {} uid {} comm '{}'", session->id, peer->pid, peer->uid,
                comm);
  // Usually a client that connected and left at once: churn, not a fault.
  if (hello_failed) EndConnection(fd, "the hello could not be sent");
}

void FdChannel::SummarizeChurn() {
  const absl::Time now = absl::Now();
  if (now - churn_since_ < kChurnSummaryPeriod) return;
  if (opened_ != 0 || ended_ != 0 || refused_ != 0) {
    size_t live;
    {
      absl::MutexLock lock(&mu_);
      live = connections_.size();
    }
    spdlog::info("sessions in the last {}: {} opened, {} ended, {} refused; {} open now",
                 absl::FormatDuration(absl::Trunc(now - churn_since_, absl::Seconds(1))), opened_,
                 ended_, refused_, live);
  }
  opened_ = ended_ = refused_ = 0;
  churn_since_ = now;
}

void FdChannel::OnReadable(int fd) {
  UnixSocket* socket;
  uint64_t session_id;
  {
    absl::MutexLock lock(&mu_);
    auto it = connections_.find(fd);
    if (it == connections_.end()) return;
    socket = &it->second.socket;
    session_id = it->second.session_id;
  }
  // Only this thread removes connections, so `socket` stays valid here.
  while (true) {
    absl::StatusOr<UnixSocket::Received> received = socket->RecvWithFds(kMaxRecordBytes, /*dont_wait=*/true);
    if (!received.ok()) {
      if (IsWouldBlock(received.status())) return;  // drained
      // ECONNRESET: the client exited with records unread (a delivery it
      // never took): an ordinary end.
      EndConnection(fd, received.status().ToString(),
                    /*badly=*/ErrnoOf(received.status()) != ECONNRESET);
      return;
    }
    if (received->eof) {
      EndConnection(fd, "client closed fd.sock");
      return;
    }
    v1::FdChannelMessage message;
    if (!message.ParseFromString(received->bytes)) {
      EndConnection(fd, "client sent a malformed record on fd.sock", /*badly=*/true);
      return;
    }
    if (message.has_release()) {
      absl::StatusOr<bool> released = state_->Release(session_id, message.release().handle());
      if (!released.ok()) {
        spdlog::debug("session {}: one-way release of handle {}: {}", session_id,
                      message.release().handle(), released.status().ToString());
      }
    }
    // FdUpload is reserved for Fence.ImportSyncFd; uploaded fds are closed
    // when `received` goes out of scope.
  }
}

void FdChannel::OnWritable(int fd) {
  bool failed = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = connections_.find(fd);
    if (it == connections_.end()) return;
    failed = !FlushLocked(it->second);
    if (!failed && it->second.queue.empty()) WatchWritable(fd, false);
  }
  if (failed) EndConnection(fd, "fd delivery failed", /*badly=*/true);
}

bool FdChannel::FlushLocked(Connection& connection) {
  while (!connection.queue.empty()) {
    Pending& next = connection.queue.front();
    int fds[] = {next.fd.fd.get()};
    absl::Status sent = connection.socket.Send(next.bytes, fds, /*dont_wait=*/true);
    if (!sent.ok()) {
      return IsWouldBlock(sent);
    }
    connection.in_flight.push_back(std::move(next.fd.lease));
    connection.queue.pop_front();
    --total_queued_;
    connection.stalled_since = absl::Now();
  }
  return true;
}

void FdChannel::WatchWritable(int fd, bool writable) {
  epoll_event event{};
  event.events = EPOLLIN | EPOLLRDHUP | (writable ? uint32_t{EPOLLOUT} : 0u);
  event.data.fd = fd;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &event);
}

absl::Status FdChannel::Deliver(uint64_t session_id, uint64_t transfer_id, v1::FdKind kind,
                                uint64_t object_id, LeasedFd fd) {
  v1::FdChannelMessage message;
  v1::FdDelivery* delivery = message.mutable_delivery();
  delivery->set_transfer_id(transfer_id);
  delivery->set_kind(kind);
  delivery->set_object_id(object_id);
  std::string bytes = message.SerializeAsString();

  absl::MutexLock lock(&mu_);
  auto s = by_session_.find(session_id);
  if (s == by_session_.end()) {
    return absl::AbortedError(absl::StrCat("session ", session_id, " has no fd.sock connection"));
  }
  Connection& connection = connections_.at(s->second);
  ReapDeliveredLocked(connection);
  if (connection.queue.empty()) {
    int fds[] = {fd.fd.get()};
    absl::Status sent = connection.socket.Send(bytes, fds, /*dont_wait=*/true);
    if (sent.ok()) {
      connection.in_flight.push_back(std::move(fd.lease));
      return absl::OkStatus();
    }
    if (!IsWouldBlock(sent)) {
      return absl::AbortedError(
          absl::StrCat("session ", session_id, ": fd delivery failed: ", sent.message()));
    }
  }
  if (total_queued_ >= options_.max_total_queued_deliveries) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "daemon has ", total_queued_, " fd deliveries queued for clients not reading fd.sock"));
  }
  if (connection.queue.size() >= options_.max_queued_deliveries) {
    return absl::ResourceExhaustedError(
        absl::StrCat("session ", session_id, " has ", connection.queue.size(),
                     " fd deliveries queued (client is not reading fd.sock)"));
  }
  if (connection.queue.empty()) {
    connection.stalled_since = absl::Now();
    WatchWritable(s->second, true);
  }
  connection.queue.push_back(Pending{std::move(bytes), std::move(fd)});
  ++total_queued_;
  return absl::OkStatus();
}

size_t FdChannel::QueuedDeliveries(uint64_t session_id) const {
  absl::MutexLock lock(&mu_);
  auto s = by_session_.find(session_id);
  return s == by_session_.end() ? 0 : connections_.at(s->second).queue.size();
}

void FdChannel::ReapDeliveredLocked(Connection& connection) {
  if (connection.in_flight.empty()) return;
  // Bytes of records sent on this socket that the client has not read yet
  // (for AF_UNIX, what the peer's receive queue still holds of ours).
  int unread = 0;
  if (::ioctl(connection.socket.fd(), SIOCOUTQ, &unread) == 0 && unread == 0) {
    connection.in_flight.clear();
  }
}

void FdChannel::ReapDelivered() {
  absl::MutexLock lock(&mu_);
  for (auto& [fd, connection] : connections_) ReapDeliveredLocked(connection);
}

void FdChannel::CheckStalled() {
  std::vector<int> stalled;
  std::vector<uint64_t> drained;
  const absl::Time now = absl::Now();
  {
    absl::MutexLock lock(&mu_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      Connection& connection = it->second;
      ReapDeliveredLocked(connection);
      if (connection.lingering && connection.in_flight.empty()) {
        // Read (or thrown away with the client's socket): the session ends now.
        drained.push_back(connection.session_id);
        it = connections_.erase(it);
        continue;
      }
      if (!connection.queue.empty() &&
          now - connection.stalled_since > options_.stalled_session_timeout) {
        stalled.push_back(it->first);
      }
      ++it;
    }
  }
  for (uint64_t session_id : drained) {
    state_->CloseSession(session_id);
    spdlog::debug("session {} ended: its client read or dropped the fds it was sent",
                  session_id);
  }
  for (int fd : stalled) EndConnection(fd, "client stopped reading fd.sock", /*badly=*/true);
}

void FdChannel::EndConnection(int fd, absl::string_view why, bool badly) {
  uint64_t session_id;
  size_t lingering = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = connections_.find(fd);
    if (it == connections_.end()) return;
    Connection& connection = it->second;
    session_id = connection.session_id;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
    by_session_.erase(session_id);
    total_queued_ -= connection.queue.size();
    connection.queue.clear();  // closes the fds never sent
    ReapDeliveredLocked(connection);
    if (!connection.in_flight.empty()) {
      // fds we sent still sit unread in the client's socket, where the
      // kernel charges them to the daemon's uid. The session, with all its
      // accounting, lingers until the client reads them or closes its
      // socket (CheckStalled sees which); nothing more is read or delivered.
      connection.lingering = true;
      lingering = connection.in_flight.size();
    } else {
      connections_.erase(it);  // closes the socket
    }
  }
  ++ended_;
  if (lingering != 0) {
    state_->DetachSession(session_id);
    LogLimited(BadEndLog(), badly ? spdlog::level::warn : spdlog::level::debug,
               "session {} ending: {}; it lingers until its client reads or drops the {} fds "
               "it was sent",
               session_id, std::string(why), lingering);
    return;
  }
  state_->CloseSession(session_id);
  if (badly) {
    LogLimited(BadEndLog(), spdlog::level::warn, "session {} ended: {}", session_id, std::string(why));
  } else {
    spdlog::debug("session {} ended: {}", session_id, std::string(why));
  }
}

}  // namespace bufferd
