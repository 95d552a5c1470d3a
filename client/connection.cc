#include "client/connection.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

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
  return absl::PermissionDeniedError(
      absl::StrCat("the process behind ", path, " runs as uid ", daemon.uid,
                   ", neither the socket dir's owner (uid ", owner, ") nor root; not trusted"));
}

// A control.sock connection made here rather than by gRPC: a blocking
// connect waits while a flood has the listener's backlog full (gRPC's
// non-blocking connect fails at once, and then backs off for seconds), and a
// connection the daemon refuses at a cap is told apart from a missing daemon.
// The channel never reconnects: it lives while a session uses it.
absl::StatusOr<std::shared_ptr<ControlChannel>> OpenControlChannel(const std::string& socket_dir,
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
    return absl::PermissionDeniedError(
        absl::StrCat("the process behind ", path, " (pid ", peer.pid, ", uid ", peer.uid,
                     ") is not the one behind fd.sock (pid ", daemon.pid, ", uid ", daemon.uid,
                     "); not trusted"));
  }
  // gRPC's server speaks first (its SETTINGS frame); the daemon closes a
  // connection it refuses before gRPC ever sees it.
  pollfd ready{socket->fd(), POLLIN, 0};
  if (RetryOnEintr([&] { return ::poll(&ready, 1, PollTimeoutMs(timeout)); }) <= 0) {
    return absl::DeadlineExceededError(absl::StrCat("bufferd did not answer on ", path, " within ",
                                                    absl::FormatDuration(timeout)));
  }
  char first;
  if (RetryOnEintr([&] { return ::recv(socket->fd(), &first, 1, MSG_PEEK); }) <= 0) {
    return absl::ResourceExhaustedError(
        "bufferd refused the control connection: this uid is at "
        "limits.max_control_connections_per_uid, the daemon at limits.max_control_connections, "
        "or the fd budget is full (the daemon's log says which)");
  }
  auto control = std::make_shared<ControlChannel>();
  control->probe = UniqueFd(::fcntl(socket->fd(), F_DUPFD_CLOEXEC, 0));
  if (!control->probe.valid()) return ErrnoError("dup the control connection", errno);
  control->channel = grpc::CreateInsecureChannelFromFd(path, socket->unique_fd().Release());
  return control;
}

// The control channels this process's sessions share, by daemon (its pid
// and uid, and the socket dir): one gRPC connection per process and daemon,
// not per session (gRPC's state for a connection is ~22 KB of the daemon's
// memory). A forked child never uses its parent's.
class SharedControlChannels {
 public:
  static SharedControlChannels& Get() {
    static auto* const channels = [] {
      auto* made = new SharedControlChannels();
      // A fork while another thread holds the lock would leave it held in
      // the child for good: the lock is taken around fork(), and the child
      // starts with none of its parent's channels (gRPC's do not work
      // after a fork).
      ::pthread_atfork([] { Get().mu_.lock(); }, [] { Get().mu_.unlock(); },
                       [] {
                         SharedControlChannels& self = Get();
                         self.by_daemon_.clear();
                         self.mu_.unlock();
                       });
      return made;
    }();
    return *channels;
  }

  // `hello_pid`: the daemon's pid as its hello gives it (its own pid
  // namespace's), which tells instances apart where the peer's pid cannot
  // (a socket-activated daemon's sockets say pid 1).
  absl::StatusOr<std::shared_ptr<ControlChannel>> For(const std::string& socket_dir,
                                                      absl::Duration timeout,
                                                      const PeerCredentials& daemon,
                                                      uint32_t hello_pid) {
    // This process's euid too: a connection is charged to the uid that made
    // it.
    const std::string key = absl::StrCat(daemon.pid, ":", daemon.uid, ":", hello_pid, ":",
                                         ::geteuid(), ":", socket_dir);
    {
      std::lock_guard lock(mu_);
      auto it = by_daemon_.find(key);
      if (it != by_daemon_.end()) {
        std::shared_ptr<ControlChannel> control = it->second.lock();
        if (control != nullptr && control->Usable()) return control;
        by_daemon_.erase(it);
      }
    }
    // Two sessions opening at once may both connect; the later is kept.
    ASSIGN_OR_RETURN(std::shared_ptr<ControlChannel> control,
                     OpenControlChannel(socket_dir, timeout, daemon));
    std::lock_guard lock(mu_);
    std::erase_if(by_daemon_, [](const auto& entry) { return entry.second.expired(); });
    by_daemon_[key] = control;
    return control;
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::weak_ptr<ControlChannel>> by_daemon_;
};

}  // namespace

bool ControlChannel::Usable() const {
  pollfd hangup{probe.get(), POLLRDHUP, 0};
  return ::poll(&hangup, 1, 0) == 0;
}

absl::StatusOr<std::shared_ptr<Connection>> Connection::Open(const std::string& socket_dir,
                                                             absl::Duration timeout,
                                                             bool share_control) {
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
                                               " (is it running?): ", socket.status().message(),
                                               NotTheDefaultHint(socket_dir)));
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
    return absl::FailedPreconditionError(absl::StrCat("bufferd speaks protocol ",
                                                      message.hello().protocol_version(),
                                                      "; this library speaks ", kProtocolVersion));
  }
  // A socket-activated daemon's sockets were made by the service manager, so
  // they carry its credentials: systemd's are pid 1 and root, who is trusted
  // anyway (and started the daemon with them).
  const bool service_manager = daemon.pid == 1 && daemon.uid == 0;
  if (!service_manager && !SameProcess(daemon.pid, message.hello().daemon_pid())) {
    return absl::PermissionDeniedError(
        absl::StrCat("the process behind ", FdSocketPath(socket_dir), " (pid ", daemon.pid,
                     ") is not the daemon its hello names (pid ", message.hello().daemon_pid(),
                     "): a relay may sit between you and bufferd; not trusted"));
  }
  connection->session_id_ = message.hello().session_id();
  connection->socket_dir_ = socket_dir;
  connection->daemon_pid_ = service_manager ? 0 : daemon.pid;
  connection->metadata_ =
      FormatSessionCredential(connection->session_id_, message.hello().secret());
  connection->fd_socket_ = *std::move(socket);
  ASSIGN_OR_RETURN(connection->control_,
                   share_control ? SharedControlChannels::Get().For(socket_dir, timeout, daemon,
                                                                    message.hello().daemon_pid())
                                 : OpenControlChannel(socket_dir, timeout, daemon));
  const std::shared_ptr<grpc::Channel>& channel = connection->control_->channel;
  connection->allocator_ = v1::Allocator::NewStub(channel);
  connection->debug_ = v1::Debug::NewStub(channel);
  connection->fence_ = v1::Fence::NewStub(channel);
  connection->records_ = std::make_unique<RecordSender>(&connection->fd_socket_);
  connection->mailbox_ =
      std::make_unique<FdMailbox>(&connection->fd_socket_, timeout, timeout + kCallSlack);
  connection->one_way_ = std::make_unique<OneWayQueue>(connection->records_.get());
  return connection;
}

Connection::~Connection() {
  Close();
  // Before anything they use goes (their session is over: what they tell
  // the daemon is lost, and need not arrive).
  std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<const Timeline>> kept;
  {
    std::lock_guard lock(kept_mu_);
    kept.swap(kept_timelines_);
  }
}

std::shared_ptr<const Timeline> Connection::KeptTimeline(uint64_t handle, uint64_t id) {
  std::lock_guard lock(kept_mu_);
  auto it = kept_timelines_.find({handle, id});
  return it == kept_timelines_.end() ? nullptr : it->second;
}

void Connection::ForgetTimeline(uint64_t handle, uint64_t id) {
  std::shared_ptr<const Timeline> dropped;  // outside the lock
  std::lock_guard lock(kept_mu_);
  if (auto it = kept_timelines_.find({handle, id}); it != kept_timelines_.end()) {
    dropped = std::move(it->second);
    kept_timelines_.erase(it);
  }
}

void Connection::ForgetTimelinesOf(uint64_t handle) {
  std::vector<std::shared_ptr<const Timeline>> dropped;  // outside the lock
  std::lock_guard lock(kept_mu_);
  for (auto it = kept_timelines_.lower_bound({handle, 0});
       it != kept_timelines_.end() && it->first.first == handle;) {
    dropped.push_back(std::move(it->second));
    it = kept_timelines_.erase(it);
  }
}

bool Connection::KeepTimeline(uint64_t handle, uint64_t id,
                              std::shared_ptr<const Timeline> timeline) {
  std::shared_ptr<const Timeline> dropped;  // outside the lock
  std::lock_guard lock(kept_mu_);
  if (kept_timelines_.size() >= kKeptTimelines) {
    // One nobody is waiting on makes room.
    for (auto it = kept_timelines_.begin(); it != kept_timelines_.end(); ++it) {
      if (it->second.use_count() == 1) {
        dropped = std::move(it->second);
        kept_timelines_.erase(it);
        break;
      }
    }
    if (kept_timelines_.size() >= kKeptTimelines) return false;
  }
  kept_timelines_.emplace(std::make_pair(handle, id), std::move(timeline));
  return true;
}

void Connection::Close() {
  closed_.store(true);
  if (one_way_) one_way_->Close();
  fd_socket_.Shutdown();
}

Call Connection::NewCall() {
  Call call;
  call.context = std::make_unique<grpc::ClientContext>();
  call.context->AddMetadata(kSessionMetadataKey, metadata_);
  call.context->set_deadline(std::chrono::system_clock::now() +
                             absl::ToChronoMilliseconds(timeout_ + kCallSlack));
  // Every record sent so far is applied before this call runs.
  if (const uint64_t sent = records_->sent(); sent != 0) {
    call.context->AddMetadata(kRecordsMetadataKey, absl::StrCat(sent));
  }
  call.carried = one_way_->TakeForCall();
  if (!call.carried.empty()) {
    call.context->AddMetadata(kReleaseMetadataKey, FormatIdList(call.carried));
  }
  if (rung_count_.load(std::memory_order_acquire) != 0) {
    {
      std::lock_guard lock(rung_mu_);
      call.rung = rung_;
    }
    if (!call.rung.empty()) call.context->AddMetadata(kRungMetadataKey, FormatIdList(call.rung));
  }
  return call;
}

bool Connection::NoteRung(uint64_t fence_id) {
  std::lock_guard lock(rung_mu_);
  if (rung_.size() >= kMaxCarriedRung) return false;
  rung_.push_back(fence_id);
  rung_count_.store(rung_.size(), std::memory_order_release);
  return true;
}

absl::Status Connection::Finish(Call& call, const grpc::Status& status) {
  one_way_->FinishCall(call.carried, status.ok());
  call.carried.clear();
  if (status.ok() && !call.rung.empty()) {
    // Applied: the daemon read their words before this call ran.
    std::lock_guard lock(rung_mu_);
    std::erase_if(rung_, [&](uint64_t id) {
      return std::find(call.rung.begin(), call.rung.end(), id) != call.rung.end();
    });
    rung_count_.store(rung_.size(), std::memory_order_release);
    call.rung.clear();
  }
  absl::Status result = FromGrpcStatus(status);
  // A call that failed because the session is gone says so, and what to do,
  // instead of gRPC's "Broken pipe" or "failed to connect to all addresses".
  if ((result.code() == absl::StatusCode::kUnavailable ||
       result.code() == absl::StatusCode::kCancelled) &&
      EndedByDaemon()) {
    return SessionGone(result.message());
  }
  return result;
}

absl::Status Connection::SessionGone(absl::string_view cause) const {
  const bool daemon_gone = daemon_pid_ > 0 && ::kill(daemon_pid_, 0) != 0 && errno == ESRCH;
  return absl::UnavailableError(absl::StrCat(
      daemon_gone ? absl::StrCat("bufferd (pid ", daemon_pid_, ") in ", socket_dir_,
                                 " stopped or restarted, so session ", session_id_, " is gone")
                  : absl::StrCat("bufferd in ", socket_dir_, " ended session ", session_id_,
                                 " (its log says why)"),
      ": mappings this process holds stay valid, but the session's handles, share tokens "
      "and fences are gone; connect a new Client to go on (",
      cause, ")"));
}

absl::StatusOr<UniqueFd> Connection::TakeFd(uint64_t transfer_id) {
  return mailbox_->Take(transfer_id);
}

bool Connection::EndedByDaemon() const { return !closed_.load() && Ended(); }

bool Connection::Ended() const {
  pollfd hangup{fd_socket_.fd(), POLLRDHUP, 0};
  return ::poll(&hangup, 1, 0) == 1 && (hangup.revents & (POLLHUP | POLLRDHUP | POLLERR)) != 0;
}

absl::StatusOr<Mapping> MapDeliveredPage(const UniqueFd& fd, size_t size, int seals,
                                         absl::string_view what) {
  struct stat st {};
  const int flags = ::fcntl(fd.get(), F_GETFL);
  const int has = seals == 0 ? 0 : ::fcntl(fd.get(), F_GET_SEALS);
  if (flags < 0 || (flags & O_ACCMODE) != O_RDONLY || ::fstat(fd.get(), &st) != 0 ||
      !S_ISREG(st.st_mode) || st.st_size != static_cast<off_t>(size) || has < 0 ||
      (has & seals) != seals) {
    return absl::InternalError(
        absl::StrCat(what, " is not a ", seals == 0 ? "" : "sealed ", "read-only page of ", size,
                     " bytes"));
  }
  return Mapping::Create(fd.get(), size, Mapping::Protection::kReadOnly);
}

absl::StatusOr<std::pair<UniqueFd, Mapping>> NewSealedPage(const char* name, size_t size,
                                                           int seals) {
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return ErrnoError("memfd_create", errno);
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return ErrnoError("ftruncate", errno);
  ASSIGN_OR_RETURN(Mapping map, Mapping::Create(fd.get(), size, Mapping::Protection::kReadWrite));
  if (::fcntl(fd.get(), F_ADD_SEALS, seals) != 0) return ErrnoError("sealing a page", errno);
  return std::make_pair(std::move(fd), std::move(map));
}

std::shared_ptr<const Mapping> Connection::PeerFencePage(uint64_t owner) {
  std::lock_guard lock(peer_pages_mu_);
  for (auto it = peer_pages_.begin(); it != peer_pages_.end(); ++it) {
    if (it->owner != owner) continue;
    PeerPage used = std::move(*it);
    peer_pages_.erase(it);
    used.used = absl::Now();
    peer_pages_.push_back(std::move(used));
    return peer_pages_.back().page;
  }
  return nullptr;
}

bool Connection::RoomForPeerFencePage() {
  std::lock_guard lock(peer_pages_mu_);
  return peer_pages_.size() < kPeerFencePages ||
         absl::Now() - peer_pages_.front().used >= kPeerPageIdle;
}

void Connection::KeepPeerFencePage(uint64_t owner, std::shared_ptr<const Mapping> page) {
  std::lock_guard lock(peer_pages_mu_);
  for (const PeerPage& kept : peer_pages_) {
    if (kept.owner == owner) return;
  }
  if (peer_pages_.size() >= kPeerFencePages) peer_pages_.pop_front();
  peer_pages_.push_back(PeerPage{owner, std::move(page), absl::Now()});
}

absl::Status Connection::SetReservationPage(UniqueFd fd) {
  // What the daemon promised: a memfd of one page that nobody can write,
  // grow or shrink (it alone maps it writable).
  ASSIGN_OR_RETURN(Mapping map,
                   MapDeliveredPage(fd, reservation::kPageSize,
                                    F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL,
                                    "the delivered reservation status page"));
  const auto& header = *reinterpret_cast<const reservation::Header*>(map.data());
  if (reservation::LoadRelaxed(header.magic) != reservation::kMagic ||
      header.version != reservation::kVersion || header.slots != reservation::kSlots) {
    return absl::InternalError("the delivered reservation status page has another layout");
  }
  std::lock_guard lock(reservation_mu_);
  reservation_slots_.store(reinterpret_cast<const reservation::Slot*>(map.data()),
                           std::memory_order_release);
  reservation_maps_.push_back(std::move(map));
  return absl::OkStatus();
}

void Connection::ForgetReservationPage(const reservation::Slot* slots) {
  std::lock_guard lock(reservation_mu_);
  const reservation::Slot* expected = slots;
  reservation_slots_.compare_exchange_strong(expected, nullptr, std::memory_order_acq_rel);
}

void Connection::QueueRelease(uint64_t handle) { one_way_->QueueRelease(handle); }

absl::StatusOr<uint64_t> Connection::Upload(int fd) {
  const uint64_t upload_id = next_upload_id_.fetch_add(1);
  v1::FdChannelMessage record;
  record.mutable_upload()->set_upload_id(upload_id);
  const int fds[] = {fd};
  RETURN_IF_ERROR(SendRecord(record, fds));
  return upload_id;
}

Connection::UploadPlaces Connection::ReserveUploads(size_t n) {
  struct Room {
    const size_t* in_flight;
    size_t n;
    bool Fits() const { return *in_flight + n <= kMaxUnclaimedUploads; }
  };
  absl::MutexLock lock(&uploads_mu_);
  const Room room{&uploads_in_flight_, n};
  uploads_mu_.Await(absl::Condition(&room, &Room::Fits));
  uploads_in_flight_ += n;
  return UploadPlaces(this, n);
}

Connection::UploadPlaces::~UploadPlaces() {
  if (connection_ == nullptr) return;
  absl::MutexLock lock(&connection_->uploads_mu_);
  connection_->uploads_in_flight_ -= n_;
}

absl::Status Connection::SendRecord(const v1::FdChannelMessage& message,
                                    std::span<const int> fds) {
  absl::Status sent = records_->Send(message, fds);
  const int err = ErrnoOf(sent);
  if (err != EPIPE && err != ECONNRESET && err != ENOTCONN) return sent;
  return absl::UnauthenticatedError(
      absl::StrCat("the session has ended (fd.sock: ", sent.message(), ")"));
}

}  // namespace bufferd::internal
