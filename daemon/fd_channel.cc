#include "daemon/fd_channel.h"

#include <fcntl.h>
#include <linux/sockios.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "base/protocol.h"
#include "daemon/log.h"
#include "spdlog/spdlog.h"

namespace bufferd {
namespace {

constexpr absl::Duration kTick = absl::Milliseconds(500);
constexpr absl::Duration kChurnSummaryPeriod = absl::Minutes(1);
constexpr absl::Duration kAcceptPause = absl::Milliseconds(100);
constexpr uint32_t kReadEvents = EPOLLIN | EPOLLRDHUP;
// A client's record carries at most one fd (an FdUpload); a record with
// more ends its session. The receive buffer has room for two, so the
// kernel installs up to two here (and drops the rest); each is closed.
constexpr int kMaxClientFdsPerRecord = 1;
constexpr int kRecordsPerWake = 64;
// Records one call applies before it runs (see DrainSession).
constexpr int kMaxDrained = 4096;

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

}  // namespace

FdChannel::FdChannel(EventLoop* loop, FdBudget* budget, Delegate* delegate, Options options)
    : loop_(loop), budget_(budget), delegate_(delegate), options_(options) {}

FdChannel::~FdChannel() { Stop(); }

absl::Status FdChannel::Listen(UnixSocket listener) {
  listener_ = std::move(listener);
  // AcceptAll drains the backlog until EAGAIN.
  int flags = ::fcntl(listener_.fd(), F_GETFL);
  if (flags < 0 || ::fcntl(listener_.fd(), F_SETFL, flags | O_NONBLOCK) != 0) {
    return ErrnoError("fcntl(O_NONBLOCK) on fd.sock", errno);
  }
  RETURN_IF_ERROR(loop_->Watch(listener_.fd(), EPOLLIN, [this](uint32_t) { AcceptAll(); }));
  timers_.push_back(loop_->RunEvery(kTick, [this] { Tick(); }));
  timers_.push_back(loop_->RunEvery(kChurnSummaryPeriod, [this] { SummarizeChurn(); }));
  return absl::OkStatus();
}

void FdChannel::Stop() {
  for (EventLoop::TimerId timer : timers_) loop_->Cancel(timer);
  timers_.clear();
  loop_->Cancel(accept_resume_);  // a no-op once it has run
  if (listener_.valid()) {
    loop_->Unwatch(listener_.fd());
    listener_ = UnixSocket();
  }
  std::vector<uint64_t> sessions;
  std::vector<std::shared_ptr<Reader>> readers;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, connection] : connections_) readers.push_back(connection.reader);
  }
  for (const auto& reader : readers) CloseReader(reader);
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, connection] : connections_) {
      loop_->Unwatch(connection.socket.fd());
      sessions.push_back(id);
    }
    connections_.clear();
    busy_.clear();
    total_queued_ = 0;
  }
  for (uint64_t id : sessions) delegate_->OnDisconnect(id);
}

void FdChannel::AcceptAll() {
  while (true) {
    absl::StatusOr<UnixSocket> socket = listener_.Accept(/*nonblocking=*/true);
    if (!socket.ok()) {
      if (IsWouldBlock(socket.status())) return;
      LogLimited(RefusalLog(), spdlog::level::warn,
                 "fd.sock accept failed: {}; pausing accepts for 100 ms",
                 StatusText(socket.status()));
      // Out of fds (EMFILE/ENFILE): the listener stays readable, so stop
      // watching it for a while instead of spinning.
      (void)loop_->Modify(listener_.fd(), 0);
      accept_resume_ =
          loop_->RunAfter(kAcceptPause, [this] { (void)loop_->Modify(listener_.fd(), EPOLLIN); });
      return;
    }
    Admit(*std::move(socket));
  }
}

void FdChannel::Admit(UnixSocket socket) {
  absl::StatusOr<PeerCredentials> peer = socket.GetPeerCredentials();
  if (!peer.ok()) {
    LogLimited(RefusalLog(), spdlog::level::warn, "dropping fd.sock connection: {}",
               StatusText(peer.status()));
    return;
  }
  // For Debug access by group (DEBUG_ACCESS_OPERATORS): the groups the
  // process had when it connected, not what the group database says now.
  if (absl::StatusOr<std::vector<gid_t>> groups = socket.GetPeerGroups(); groups.ok()) {
    peer->groups = *std::move(groups);
  }
  // The connection's place in the budget first, then the session.
  absl::StatusOr<FdBudget::Lease> lease = budget_->Acquire(FdUse::kSession, peer->uid);
  absl::StatusOr<Admission> admission = lease.ok() ? delegate_->OnConnect(*peer) : lease.status();
  if (!admission.ok()) {
    // Say why before closing: the client library reports it as the error.
    v1::FdChannelMessage message;
    message.mutable_refused()->set_code(static_cast<int32_t>(admission.status().code()));
    message.mutable_refused()->set_message(std::string(admission.status().message()));
    (void)socket.Send(message.SerializeAsString(), {}, /*dont_wait=*/true);
    ++refused_;
    LogLimited(RefusalLog(), spdlog::level::warn, "fd.sock: refused pid {} uid {}: {}", peer->pid,
               peer->uid, std::string(admission.status().message()));
    return;
  }
  const int fd = socket.fd();
  const uint64_t session_id = admission->session_id;
  auto reader = std::make_shared<Reader>();
  reader->session_id = session_id;
  {
    absl::MutexLock reader_lock(&reader->mu);
    reader->fd = fd;
  }
  // Watched before anything can be queued for it (a Deliver that finds the
  // socket full arms EPOLLOUT on this watch). Callbacks run on this thread,
  // so none runs before the connection is registered below.
  absl::Status watched = loop_->Watch(
      fd, kReadEvents, [this, session_id](uint32_t events) { OnEvents(session_id, events); });
  if (!watched.ok()) {
    LogLimited(RefusalLog(), spdlog::level::warn, "session {}: {}", session_id,
               StatusText(watched));
    delegate_->OnDisconnect(session_id);
    return;
  }
  v1::FdChannelMessage message;
  v1::Hello* hello = message.mutable_hello();
  hello->set_protocol_version(kProtocolVersion);
  hello->set_session_id(session_id);
  hello->set_secret(admission->secret);
  hello->set_daemon_pid(static_cast<uint32_t>(::getpid()));
  const std::string hello_bytes = message.SerializeAsString();
  bool hello_failed = false;
  {
    // Registered before the Hello goes out: a client may call the moment
    // it has it, and its fds must find this connection.
    absl::MutexLock lock(&mu_);
    Connection& connection = connections_[session_id];
    connection.socket = std::move(socket);
    connection.reader = std::move(reader);
    connection.lease = *std::move(lease);
    // A fresh socket's buffer is empty, so this cannot block.
    hello_failed = !connection.socket.Send(hello_bytes, {}, /*dont_wait=*/true).ok();
  }
  ++opened_;
  // Usually a client that connected and left at once: churn, not a fault.
  if (hello_failed) EndConnection(session_id, "the hello could not be sent");
}

void FdChannel::SummarizeChurn() {
  const absl::Time now = absl::Now();
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

FdChannel::Connection* FdChannel::LiveLocked(uint64_t session_id) const {
  auto it = connections_.find(session_id);
  return it == connections_.end() || it->second.lingering ? nullptr
                                                          : const_cast<Connection*>(&it->second);
}

void FdChannel::OnEvents(uint64_t session_id, uint32_t events) {
  // A client that hung up is read to its end, not written to: its
  // deliveries would only fail (an ordinary exit, not a fault to warn of).
  if ((events & EPOLLOUT) && !(events & (EPOLLHUP | EPOLLERR))) OnWritable(session_id);
  if (events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP | EPOLLERR)) OnReadable(session_id);
}

void FdChannel::OnReadable(uint64_t session_id) {
  std::shared_ptr<Reader> reader;
  {
    absl::MutexLock lock(&mu_);
    Connection* connection = LiveLocked(session_id);
    if (connection == nullptr) return;
    reader = connection->reader;
  }
  // At most kRecordsPerWake records per wake: the rest wait for the next
  // round (epoll reports the socket again), so one flooding client cannot
  // hold up accepts, Hellos and the tick for everyone else.
  if (!reader->mu.TryLock()) {
    // An RPC thread is draining this session: the loop neither waits for it
    // nor spins on the socket; it stops watching for input, and the drain
    // resumes the watch when it is done (or this does, if it already is).
    reader->loop_paused.store(true);
    SetReading(session_id, false);
    if (!reader->mu.TryLock()) return;
    if (reader->loop_paused.exchange(false)) SetReading(session_id, true);
  }
  std::optional<ReadEnd> end = ReadRecordsLocked(*reader, kRecordsPerWake, UINT64_MAX);
  reader->mu.Unlock();
  if (end) EndConnection(session_id, end->why, end->badly);
}

void FdChannel::SetReading(uint64_t session_id, bool reading) {
  absl::MutexLock lock(&mu_);
  Connection* connection = LiveLocked(session_id);
  if (connection == nullptr) return;
  connection->reading_paused = !reading;
  UpdateWatchLocked(*connection);
}

void FdChannel::UpdateWatchLocked(const Connection& connection) {
  (void)loop_->Modify(connection.socket.fd(),
                      (connection.reading_paused ? uint32_t{EPOLLRDHUP} : kReadEvents) |
                          (connection.Queued() ? uint32_t{EPOLLOUT} : 0u));
}

std::optional<FdChannel::ReadEnd> FdChannel::ReadRecordsLocked(Reader& reader, int max,
                                                               uint64_t until) {
  std::optional<ReadEnd> end = ReadSomeLocked(reader, max, until);
  // Ending: nothing reads the socket again, and a call that must see its
  // records finds the session over (DrainSession), never half-applied.
  if (end) reader.fd = -1;
  return end;
}

std::optional<FdChannel::ReadEnd> FdChannel::ReadSomeLocked(Reader& reader, int max,
                                                            uint64_t until) {
  for (int n = 0; n < max && reader.fd >= 0 && reader.records < until; ++n) {
    absl::StatusOr<UnixSocket::Received> received =
        UnixSocket::RecvWithFdsOn(reader.fd, kMaxRecordBytes, /*dont_wait=*/true,
                                  kMaxClientFdsPerRecord);
    if (!received.ok()) {
      // ECONNRESET: the client exited with fds it was sent unread, an
      // ordinary end. The kernel reports it before the records still
      // queued, so those are read first (reported once, it is cleared).
      if (ErrnoOf(received.status()) == ECONNRESET) {
        reader.reset = true;
        continue;
      }
      if (IsWouldBlock(received.status())) {
        if (reader.reset) return ReadEnd{"client left with fds it was sent unread", false};
        return std::nullopt;  // drained
      }
      return ReadEnd{StatusText(received.status()), true};
    }
    if (received->eof) return ReadEnd{"client closed fd.sock", false};
    ++reader.records;
    v1::FdChannelMessage message;
    if (!message.ParseFromString(received->bytes)) {
      return ReadEnd{"client sent a malformed record on fd.sock", true};
    }
    absl::Status applied = delegate_->OnRecord(reader.session_id, message, std::move(received->fds));
    if (!applied.ok()) {
      return ReadEnd{absl::StrCat("bad record on fd.sock: ", applied.message()), true};
    }
  }
  return std::nullopt;
}

FdChannel::Drained FdChannel::DrainSession(uint64_t session_id, uint64_t sent) {
  std::shared_ptr<Reader> reader;
  {
    absl::MutexLock lock(&mu_);
    Connection* connection = LiveLocked(session_id);
    if (connection == nullptr) return Drained::kEnded;
    reader = connection->reader;
  }
  // In chunks, the lock let go between them (so the end of a connection
  // never waits for more than one chunk); bounded in all, so a client that
  // keeps sending only holds up its own call.
  Drained result = Drained::kApplied;
  std::optional<ReadEnd> end;
  int read = 0;
  while (true) {
    absl::MutexLock lock(&reader->mu);
    if (reader->fd < 0) {
      result = Drained::kEnded;  // ending: its last record was read
      break;
    }
    if (reader->records >= sent) break;
    const uint64_t before = reader->records;
    end = ReadRecordsLocked(*reader, kRecordsPerWake, sent);
    if (end) {
      result = Drained::kEnded;
      break;
    }
    const int got = static_cast<int>(reader->records - before);
    read += got;
    if (got < kRecordsPerWake || reader->records >= sent) break;  // drained, or done
    if (read >= kMaxDrained) {
      result = Drained::kBehind;
      break;
    }
  }
  if (reader->loop_paused.exchange(false)) {
    loop_->RunAfter(absl::ZeroDuration(), [this, session_id] { SetReading(session_id, true); });
  }
  if (end) {
    // Only the loop ends connections; it would find EOF again by itself,
    // but a bad record is gone from the socket, so tell it.
    loop_->RunAfter(absl::ZeroDuration(), [this, session_id, end = *std::move(end)] {
      EndConnection(session_id, end.why, end.badly);
    });
  }
  return result;
}

void FdChannel::EndSessionSoon(uint64_t session_id, std::string why,
                               std::function<void(Ended)> done) {
  loop_->RunAfter(absl::ZeroDuration(),
                  [this, session_id, why = std::move(why), done = std::move(done)] {
                    Ended outcome = Ended::kNotFound;
                    {
                      absl::MutexLock lock(&mu_);
                      if (auto it = connections_.find(session_id); it != connections_.end()) {
                        outcome = it->second.lingering ? Ended::kLingering : Ended::kEnded;
                      }
                    }
                    if (outcome == Ended::kEnded &&
                        EndConnection(session_id, why, /*badly=*/false)) {
                      outcome = Ended::kEndedLingering;
                    }
                    done(outcome);
                  });
}

void FdChannel::CloseReader(const std::shared_ptr<Reader>& reader) {
  absl::MutexLock lock(&reader->mu);
  reader->fd = -1;
}

void FdChannel::OnWritable(uint64_t session_id) {
  absl::Status flushed;
  {
    absl::MutexLock lock(&mu_);
    Connection* connection = LiveLocked(session_id);
    if (connection == nullptr) return;
    flushed = FlushLocked(*connection);
    if (flushed.ok() && !connection->Queued()) UpdateWatchLocked(*connection);
    UpdateBusyLocked(session_id, *connection);
  }
  if (!flushed.ok()) {
    // The client went away (EPIPE, ECONNRESET): an ordinary end.
    const int error = ErrnoOf(flushed);
    EndConnection(session_id, absl::StrCat("fd delivery failed: ", flushed.message()),
                  /*badly=*/error != EPIPE && error != ECONNRESET);
  }
}

absl::Status FdChannel::SendRecordLocked(Connection& connection, Pending& record) {
  std::vector<int> fds;
  for (const LeasedFd& fd : record.fds) fds.push_back(fd.fd.get());
  RETURN_IF_ERROR(connection.socket.Send(record.bytes, fds, /*dont_wait=*/true));
  if (record.fds.empty()) return absl::OkStatus();
  if (connection.backlog == nullptr) connection.backlog = std::make_unique<Backlog>();
  for (LeasedFd& fd : record.fds) connection.backlog->in_flight.push_back(std::move(fd.lease));
  return absl::OkStatus();
}

absl::Status FdChannel::FlushLocked(Connection& connection) {
  while (connection.Queued()) {
    Backlog& backlog = *connection.backlog;
    absl::Status sent = SendRecordLocked(connection, backlog.queue.front());
    if (!sent.ok()) return IsWouldBlock(sent) ? absl::OkStatus() : sent;
    backlog.queue.pop_front();
    --total_queued_;
    backlog.stalled_since = absl::Now();
  }
  return absl::OkStatus();
}

bool FdChannel::StillBusy(Connection& connection) {
  if (connection.Queued() || connection.InFlight() || connection.lingering) return true;
  connection.backlog.reset();
  return false;
}

void FdChannel::UpdateBusyLocked(uint64_t session_id, Connection& connection) {
  if (StillBusy(connection)) {
    busy_.insert(session_id);
  } else {
    busy_.erase(session_id);
  }
}

absl::Status FdChannel::Deliver(uint64_t session_id, uint64_t transfer_id, v1::FdKind kind,
                                uint64_t object_id, LeasedFd fd) {
  v1::FdChannelMessage message;
  v1::FdDelivery* delivery = message.mutable_delivery();
  delivery->set_transfer_id(transfer_id);
  delivery->set_kind(kind);
  delivery->set_object_id(object_id);
  std::vector<Pending> records(1);
  records[0].bytes = message.SerializeAsString();
  records[0].fds.push_back(std::move(fd));
  return SendOrQueue(session_id, std::move(records));
}

absl::Status FdChannel::DeliverAll(uint64_t session_id, std::vector<Delivery> deliveries) {
  std::vector<Pending> records;
  for (size_t first = 0; first < deliveries.size(); first += UnixSocket::kMaxFdsPerRecord) {
    const size_t end =
        std::min(deliveries.size(), first + static_cast<size_t>(UnixSocket::kMaxFdsPerRecord));
    v1::FdChannelMessage message;
    Pending& record = records.emplace_back();
    for (size_t i = first; i < end; ++i) {
      v1::FdDelivery* delivery = message.mutable_deliveries()->add_deliveries();
      delivery->set_transfer_id(deliveries[i].transfer_id);
      delivery->set_kind(deliveries[i].kind);
      delivery->set_object_id(deliveries[i].object_id);
      record.fds.push_back(std::move(deliveries[i].fd));
    }
    record.bytes = message.SerializeAsString();
  }
  return SendOrQueue(session_id, std::move(records));
}

absl::Status FdChannel::SendOrQueue(uint64_t session_id, std::vector<Pending> records) {
  absl::MutexLock lock(&mu_);
  Connection* live = LiveLocked(session_id);
  if (live == nullptr) {
    return absl::AbortedError(absl::StrCat("session ", session_id, " has no fd.sock connection"));
  }
  Connection& connection = *live;
  ReapDeliveredLocked(connection);
  size_t sent_records = 0;
  if (!connection.Queued()) {
    for (; sent_records < records.size(); ++sent_records) {
      absl::Status sent = SendRecordLocked(connection, records[sent_records]);
      if (!sent.ok()) {
        if (IsWouldBlock(sent)) break;
        return absl::AbortedError(
            absl::StrCat("session ", session_id, ": fd delivery failed: ", sent.message()));
      }
      busy_.insert(session_id);
    }
    if (sent_records == records.size()) return absl::OkStatus();
  }
  // What the socket did not take waits in the queue. Records already sent
  // stay sent: the client closes fds it was sent for a call that failed.
  const size_t left = records.size() - sent_records;
  if (total_queued_ + left > options_.max_total_queued_deliveries) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "daemon has ", total_queued_, " fd deliveries queued for clients not reading fd.sock"));
  }
  const size_t queued = connection.QueuedCount();
  if (queued + left > options_.max_queued_deliveries) {
    return absl::ResourceExhaustedError(
        absl::StrCat("session ", session_id, " has ", queued,
                     " fd deliveries queued (client is not reading fd.sock)"));
  }
  if (connection.backlog == nullptr) connection.backlog = std::make_unique<Backlog>();
  Backlog& backlog = *connection.backlog;
  const bool was_empty = backlog.queue.empty();
  for (size_t i = sent_records; i < records.size(); ++i) {
    backlog.queue.push_back(std::move(records[i]));
  }
  if (was_empty) {
    backlog.stalled_since = absl::Now();
    UpdateWatchLocked(connection);
  }
  total_queued_ += left;
  busy_.insert(session_id);
  return absl::OkStatus();
}

size_t FdChannel::QueuedDeliveries(uint64_t session_id) const {
  absl::MutexLock lock(&mu_);
  const Connection* connection = LiveLocked(session_id);
  return connection == nullptr ? 0 : connection->QueuedCount();
}

void FdChannel::ReapDeliveredLocked(Connection& connection) {
  if (!connection.InFlight()) return;
  // Bytes of records sent on this socket that the client has not read yet
  // (for AF_UNIX, what the peer's receive queue still holds of ours).
  int unread = 0;
  if (::ioctl(connection.socket.fd(), SIOCOUTQ, &unread) == 0 && unread == 0) {
    connection.backlog->in_flight.clear();
  }
}

void FdChannel::ReapDelivered() {
  absl::MutexLock lock(&mu_);
  for (uint64_t session_id : busy_) ReapDeliveredLocked(connections_.at(session_id));
}

void FdChannel::Tick() {
  std::vector<uint64_t> stalled;
  std::vector<uint64_t> drained;
  const absl::Time now = absl::Now();
  {
    absl::MutexLock lock(&mu_);
    for (auto it = busy_.begin(); it != busy_.end();) {
      const uint64_t session_id = *it;
      Connection& connection = connections_.at(session_id);
      ReapDeliveredLocked(connection);
      if (connection.lingering && !connection.InFlight()) {
        // Read (or thrown away with the client's socket): the session ends now.
        drained.push_back(session_id);
        connections_.erase(session_id);
        it = busy_.erase(it);
        continue;
      }
      if (connection.Queued() &&
          now - connection.backlog->stalled_since > options_.stalled_session_timeout) {
        stalled.push_back(session_id);
      }
      it = StillBusy(connection) ? std::next(it) : busy_.erase(it);
    }
  }
  for (uint64_t session_id : drained) {
    delegate_->OnDisconnect(session_id);
    spdlog::debug("session {} ended: its client read or dropped the fds it was sent", session_id);
  }
  for (uint64_t session_id : stalled) {
    EndConnection(session_id, "client stopped reading fd.sock", /*badly=*/true);
  }
}

bool FdChannel::EndConnection(uint64_t session_id, absl::string_view why, bool badly) {
  size_t lingering = 0;
  // The socket (and its budget place) of a session that ends for good:
  // closed only once the session is closed everywhere, so a client that
  // sees EOF and calls again is told its session has ended, never answered
  // as if it were live.
  UnixSocket closing;
  FdBudget::Lease closing_lease;
  {
    // Nobody reads the socket again (an RPC thread draining it finishes
    // first).
    std::shared_ptr<Reader> reader;
    {
      absl::MutexLock lock(&mu_);
      Connection* connection = LiveLocked(session_id);
      if (connection == nullptr) return false;
      reader = connection->reader;
    }
    CloseReader(reader);
  }
  {
    absl::MutexLock lock(&mu_);
    Connection* live = LiveLocked(session_id);
    if (live == nullptr) return false;
    Connection& connection = *live;
    loop_->Unwatch(connection.socket.fd());
    if (connection.Queued()) {
      total_queued_ -= connection.QueuedCount();
      connection.backlog->queue.clear();  // closes the fds never sent
    }
    ReapDeliveredLocked(connection);
    if (connection.InFlight()) {
      // fds we sent still sit unread in the client's socket, where the
      // kernel charges them to the daemon's uid. The session, with all its
      // accounting, lingers until the client reads them or closes its
      // socket (the tick sees which); nothing more is read or delivered.
      connection.lingering = true;
      lingering = connection.backlog->in_flight.size();
      busy_.insert(session_id);
    } else {
      busy_.erase(session_id);
      closing = std::move(connection.socket);
      closing_lease = std::move(connection.lease);
      connections_.erase(session_id);
    }
  }
  ++ended_;
  if (lingering != 0) {
    delegate_->OnDetach(session_id);
    LogLimited(BadEndLog(), badly ? spdlog::level::warn : spdlog::level::debug,
               "session {} ending: {}; it lingers until its client reads or drops the {} fds "
               "it was sent",
               session_id, std::string(why), lingering);
    return true;
  }
  delegate_->OnDisconnect(session_id);
  closing = UnixSocket();  // the client sees EOF now
  closing_lease.Reset();
  if (badly) {
    LogLimited(BadEndLog(), spdlog::level::warn, "session {} ended: {}", session_id,
               std::string(why));
  } else {
    spdlog::debug("session {} ended: {}", session_id, std::string(why));
  }
  return false;
}

}  // namespace bufferd
