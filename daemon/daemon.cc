#include "daemon/daemon.h"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/errno_status.h"
#include "base/fd_count.h"
#include "base/private_dir.h"
#include "base/protocol.h"
#include "daemon/config.h"
#include "daemon/log.h"
#include "daemon/requests.h"
#include "google/protobuf/util/message_differencer.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "heaps/memfd.h"
#include "spdlog/spdlog.h"

namespace bufferd {
namespace {

// fds kept free below RLIMIT_NOFILE beyond the daemon's own at startup: for
// short-lived opens (/proc reads, sysfs, an accept about to be refused).
constexpr uint64_t kSpareFds = 64;
// listen() backlog of both sockets (the kernel caps it at net.core.somaxconn).
constexpr int kListenBacklog = 4096;

uint32_t OrDefault(uint32_t value, uint32_t fallback) { return value != 0 ? value : fallback; }

// The gid of the config's `group`; -1 (no change) when it is empty.
absl::StatusOr<gid_t> SocketGroup(const std::string& group) {
  if (group.empty()) return static_cast<gid_t>(-1);
  return ConfigGroup("group", group);
}

// Who the daemon runs as once it serves: the config's `user`, or itself.
struct RunAs {
  uid_t uid = ::geteuid();
  gid_t gid = ::getegid();
  std::string name;  // empty: no change
};

absl::StatusOr<RunAs> ResolveUser(const std::string& user) {
  RunAs run_as;
  if (user.empty()) return run_as;
  struct passwd* entry = ::getpwnam(user.c_str());
  if (entry == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("user '", user, "' does not exist"));
  }
  if (::geteuid() != 0 && entry->pw_uid != ::geteuid()) {
    return absl::FailedPreconditionError(
        absl::StrCat("running as user '", user, "' needs the daemon to start as root"));
  }
  run_as = {entry->pw_uid, entry->pw_gid, user};
  return run_as;
}

// Gives up root for `run_as` (all threads: glibc's setuid covers them).
absl::Status DropPrivileges(const RunAs& run_as) {
  if (run_as.name.empty() || run_as.uid == ::geteuid()) return absl::OkStatus();
  if (::setgroups(0, nullptr) != 0) return ErrnoError("setgroups", errno);
  if (::setgid(run_as.gid) != 0) return ErrnoError("setgid", errno);
  if (::setuid(run_as.uid) != 0) return ErrnoError("setuid", errno);
  if (::setuid(0) == 0) return absl::InternalError("could regain root after dropping it");
  spdlog::info("running as user '{}' (uid {}, gid {})", run_as.name, run_as.uid, run_as.gid);
  return absl::OkStatus();
}

// Gives the socket `path` (in the daemon's private dir, so nobody else can
// have put anything there) to `uid` and `gid` (either -1: unchanged) and
// sets its mode.
absl::Status SetAccess(const std::string& path, uid_t uid, gid_t gid, mode_t mode) {
  if ((uid != ::geteuid() || gid != static_cast<gid_t>(-1)) &&
      ::chown(path.c_str(), uid, gid) != 0) {
    return ErrnoError(absl::StrCat("chown ", path, " to uid ", uid, " gid ", gid), errno);
  }
  if (::chmod(path.c_str(), mode) != 0) return ErrnoError(absl::StrCat("chmod ", path), errno);
  return absl::OkStatus();
}

// "another bufferd (pid N) is serving DIR", N read from its lock file.
absl::Status AnotherDaemon(int lock_fd, const std::string& dir) {
  char buf[32] = {};
  (void)!::pread(lock_fd, buf, sizeof(buf) - 1, 0);
  int pid = 0;
  (void)absl::SimpleAtoi(absl::StripAsciiWhitespace(buf), &pid);
  return absl::FailedPreconditionError(
      absl::StrCat("another bufferd (pid ", pid, ") is serving ", dir));
}

// FAILED_PRECONDITION if a daemon serves `dir` already: its fd.sock answers
// (a socket-activated daemon may hold no lock we could see: its dir may be
// the service manager's). Looks only: creates, locks and changes nothing, so
// a refused daemon leaves a live one's dir exactly as it was. `holding_lock`:
// the caller holds bufferd.lock itself (so the lock names no other daemon).
absl::Status RefuseLiveDaemon(int dir_fd, const std::string& dir, bool holding_lock) {
  const std::string fd_path = FdSocketPath(dir);
  if (!UnixSocket::SeqPacketListening(fd_path)) return absl::OkStatus();
  UniqueFd lock(::openat(dir_fd, "bufferd.lock", O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  struct stat st {};
  if (!holding_lock && lock.valid() && ::fstat(lock.get(), &st) == 0 && S_ISREG(st.st_mode) &&
      ::flock(lock.get(), LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
    return AnotherDaemon(lock.get(), dir);
  }
  return absl::FailedPreconditionError(
      absl::StrCat("a bufferd already serves ", fd_path,
                   " (socket-activated? see systemctl status bufferd.socket); not taking it over"));
}

// Takes the exclusive lock on <dir>/bufferd.lock (opened without following a
// link, and checked) and writes our pid into it. A daemon that holds it but
// no longer listens is shutting down (it unlinks its sockets first): wait
// up to kLockWait for it to let go, so that a restart started meanwhile
// works rather than fails.
absl::StatusOr<UniqueFd> LockSocketDir(int dir_fd, const std::string& dir, uid_t owner) {
  constexpr absl::Duration kLockWait = absl::Seconds(5);
  ASSIGN_OR_RETURN(UniqueFd fd, OpenPrivateFile(dir_fd, dir, "bufferd.lock", owner));
  const std::string path = absl::StrCat(dir, "/bufferd.lock");
  const absl::Time give_up = absl::Now() + kLockWait;
  bool said = false;
  while (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) return ErrnoError(absl::StrCat("flock ", path), errno);
    if (absl::Now() >= give_up || UnixSocket::SeqPacketListening(FdSocketPath(dir))) {
      return AnotherDaemon(fd.get(), dir);
    }
    if (!said) {
      said = true;
      spdlog::info("{} (it no longer listens); waiting up to {} for it to finish shutting down",
                   std::string(AnotherDaemon(fd.get(), dir).message()),
                   absl::FormatDuration(kLockWait));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  std::string pid = absl::StrCat(::getpid(), "\n");
  if (::ftruncate(fd.get(), 0) != 0 ||
      ::pwrite(fd.get(), pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    return ErrnoError(absl::StrCat("write ", path), errno);
  }
  return fd;
}

// What gRPC would answer with an empty UNIMPLEMENTED: a method no service
// here has (a client newer than this daemon, or a typo), named, and logged
// (limited: any peer can call it) with the method as the daemon read it.
class UnknownMethods final : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    // The client's text: escaped and cut, in the answer and the log alike.
    std::string method = absl::CHexEscape(context->method().substr(0, kMaxShown));
    if (context->method().size() > kMaxShown) method += "...";
    static LogLimiter limiter;
    LogLimited(limiter, spdlog::level::warn, "a call of {}, which bufferd does not serve (peer {})",
               method, absl::CHexEscape(context->peer()));
    class Reactor final : public grpc::ServerGenericBidiReactor {
     public:
      explicit Reactor(const std::string& method) {
        Finish(grpc::Status(
            grpc::StatusCode::UNIMPLEMENTED,
            absl::StrCat(VersionText("bufferd"), " does not serve method '", method,
                         "': it serves bufferd.v1.Allocator, bufferd.v1.Fence, bufferd.v1.Debug, "
                         "grpc.health.v1.Health and server reflection (a client newer than this "
                         "daemon?)")));
      }
      void OnDone() override { delete this; }
    };
    return new Reactor(method);
  }

 private:
  static constexpr size_t kMaxShown = 128;
};

}  // namespace

uint64_t RaiseFdLimit() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_MEMLOCK, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    ::setrlimit(RLIMIT_MEMLOCK, &limit);
  }
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return 1024;
  if (limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) ::getrlimit(RLIMIT_NOFILE, &limit);
  }
  return limit.rlim_cur;
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const v1::Config& config,
                                                      std::string socket_dir,
                                                      std::optional<ActivatedSockets> activated) {
  std::unique_ptr<Daemon> daemon(new Daemon());
  if (activated.has_value()) {
    if (!socket_dir.empty() && socket_dir != activated->dir) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--socket-dir ", socket_dir, " but the service manager passed the sockets of ",
          activated->dir, "; give one or the other"));
    }
    if (!config.socket_dir().empty() && config.socket_dir() != activated->dir) {
      spdlog::warn("config socket_dir {} ignored: serving the activated sockets in {}",
                   config.socket_dir(), activated->dir);
    }
    socket_dir = activated->dir;
    daemon->activated_ = std::move(activated);
  }
  daemon->socket_dir_ = !socket_dir.empty()            ? std::move(socket_dir)
                        : !config.socket_dir().empty() ? config.socket_dir()
                                                       : DefaultSocketDir();
  absl::Status status = daemon->Init(config);
  if (!status.ok()) {
    daemon->Shutdown();
    return status;
  }
  return daemon;
}

absl::Status Daemon::Init(const v1::Config& config) {
  config_ = config;
  ASSIGN_OR_RETURN(const gid_t group, SocketGroup(config.group()));
  const mode_t socket_mode = config.group().empty() ? 0600 : 0660;
  ASSIGN_OR_RETURN(const RunAs run_as, ResolveUser(config.user()));
  ASSIGN_OR_RETURN(DebugAccess debug_access, DebugAccess::FromConfig(config, run_as.uid));
  const int64_t dir_group = group == static_cast<gid_t>(-1) ? int64_t{-1} : int64_t{group};
  const std::string control_path = ControlSocketPath(socket_dir_);
  const std::string fd_path = FdSocketPath(socket_dir_);
  UniqueFd dir;
  if (activated_.has_value()) {
    RETURN_IF_ERROR(TakeActivatedDir(run_as.uid));
  } else {
    ASSIGN_OR_RETURN(PrivateDir found, OpenPrivateDir(socket_dir_, run_as.uid));
    RETURN_IF_ERROR(RefuseLiveDaemon(found.fd.get(), socket_dir_, /*holding_lock=*/false));
    RETURN_IF_ERROR(CheckFoundDir(found, socket_dir_, run_as.uid, dir_group));
    dir = std::move(found.fd);
    ASSIGN_OR_RETURN(lock_file_, LockSocketDir(dir.get(), socket_dir_, run_as.uid));
    // We hold the lock, so the dir is ours to change. It stays ours (our
    // euid, private) while we set it up: nothing can be planted in it, and
    // the chown/chmod of the sockets below cannot be turned onto another
    // file. It goes to `user` only at the end.
    RETURN_IF_ERROR(SecurePrivateDir(dir.get(), socket_dir_, dir_group, ::geteuid()));
    // Once more under the lock: one may have started since we looked.
    RETURN_IF_ERROR(RefuseLiveDaemon(dir.get(), socket_dir_, /*holding_lock=*/true));
    // We hold the lock, so anything at the sockets' names was left by a
    // daemon that died (or planted while the dir was not yet private): the
    // entry itself goes, never what a link points at.
    for (const char* name : {"control.sock", "fd.sock"}) {
      if (::unlinkat(dir.get(), name, 0) == 0) {
        spdlog::warn("removed stale {}/{}", socket_dir_, name);
      } else if (errno == EISDIR) {
        return absl::FailedPreconditionError(absl::StrCat(
            socket_dir_, "/", name, " is a directory; remove it (someone may have planted it)"));
      }
    }
  }

  const uint64_t nofile = RaiseFdLimit();
  if (memfd::NoexecSealSupported()) {
    spdlog::info("buffers are memfds sealed non-executable (MFD_NOEXEC_SEAL)");
  } else {
    spdlog::warn(
        "this kernel has no MFD_NOEXEC_SEAL (Linux < 6.3): buffers are created without exec "
        "bits, but a holder of their own uid could chmod one +x");
  }
  ASSIGN_OR_RETURN(heaps_, BuildHeaps(config));
  const v1::LimitsConfig& limits = config.limits();
  reaper_ = std::make_unique<Reaper>();
  DaemonState::Options options;
  const AllocationRules rules = RulesFromConfig(config);
  options.quotas = rules.quotas;
  options.usages = rules.usages;
  options.max_buffers_per_call = rules.max_buffers_per_call;
  options.max_frame_dimension = rules.max_frame_dimension;
  options.fd_budget = &budget_;
  options.reaper = reaper_.get();
  if (config.default_token_ttl_ms() != 0) {
    options.default_token_ttl = absl::Milliseconds(config.default_token_ttl_ms());
  }
  state_ = std::make_unique<DaemonState>(heaps_.get(), options);
  for (const v1::HeapConfig& heap : config.heaps()) {
    state_->SetHeapQuotas(heap.name(), heap.max_bytes_per_session(), heap.max_bytes_per_uid());
  }
  SessionTable::Options session_options;
  session_options.max_sessions = OrDefault(limits.max_sessions(), session_options.max_sessions);
  session_options.max_sessions_per_uid =
      OrDefault(limits.max_sessions_per_uid(), session_options.max_sessions_per_uid);
  sessions_ = std::make_unique<SessionTable>(session_options);
  // fd.sock, fence deadlines and imported fds, and the daemon's timers.
  loop_ = std::make_unique<EventLoop>();
  RETURN_IF_ERROR(loop_->Init());
  FenceLimits fence_limits;
  fence_limits.default_deadline =
      absl::Milliseconds(OrDefault(config.default_fence_deadline_ms(), 10000u));
  fence_limits.max_deadline = absl::Milliseconds(OrDefault(config.max_fence_deadline_ms(), 300000u));
  fence_limits.max_pending_per_session = config.quotas().max_fences_per_session();
  fence_limits.max_fences = OrDefault(limits.max_fences(), fence_limits.max_fences);
  fence_limits.max_fences_per_uid =
      OrDefault(limits.max_fences_per_uid(), fence_limits.max_fences_per_uid);
  fence_limits.max_held_per_session =
      OrDefault(limits.max_held_fences_per_session(), fence_limits.max_held_per_session);
  fence_limits.max_waits_per_session =
      OrDefault(limits.max_fence_waits_per_session(), fence_limits.max_waits_per_session);
  fence_limits.max_waits_per_uid =
      OrDefault(limits.max_fence_waits_per_uid(), fence_limits.max_waits_per_uid);
  fence_limits.max_waits = OrDefault(limits.max_fence_waits(), fence_limits.max_waits);
  // Big batches of answered waits run on the work queue, not on the loop
  // or the signalling call's thread.
  fences_ = std::make_unique<FenceTable>(loop_.get(), &budget_, fence_limits,
                                         [this](std::function<void()> batch) {
                                           if (work_ != nullptr) {
                                             work_->Post(std::move(batch));
                                           } else {
                                             batch();
                                           }
                                         });
  TimelineLimits timeline_limits;
  timeline_limits.default_deadline = fence_limits.default_deadline;
  timeline_limits.max_deadline = fence_limits.max_deadline;
  timeline_limits.scan_interval = absl::Milliseconds(OrDefault(config.timeline_scan_ms(), 100u));
  timeline_limits.max_per_session =
      OrDefault(limits.max_timelines_per_session(), timeline_limits.max_per_session);
  timeline_limits.max_per_uid =
      OrDefault(limits.max_timelines_per_uid(), timeline_limits.max_per_uid);
  timeline_limits.max_timelines = OrDefault(limits.max_timelines(), timeline_limits.max_timelines);
  timeline_limits.max_points_behind_fences =
      OrDefault(limits.max_points_behind_fences(), timeline_limits.max_points_behind_fences);
  timelines_ = std::make_unique<TimelineTable>(loop_.get(), &budget_, timeline_limits);
  ReservationLimits reservation_limits;
  reservation_limits.max_fences_per_buffer =
      OrDefault(limits.max_fences_per_buffer(), reservation_limits.max_fences_per_buffer);
  // GetBufferFences merges both sides' fences into one fence for an fd.
  if (2 * reservation_limits.max_fences_per_buffer > fence_limits.max_merge_ids) {
    return absl::InvalidArgumentError(absl::StrCat(
        "limits.max_fences_per_buffer ", reservation_limits.max_fences_per_buffer,
        " is above ", fence_limits.max_merge_ids / 2,
        ": both sides of a buffer merge into one fence of at most ",
        fence_limits.max_merge_ids));
  }
  reservations_ = std::make_unique<ReservationTable>(fences_.get(), reservation_limits);
  reaper_->SetOnDead([reservations = reservations_.get()](uint64_t buffer) {
    reservations->DropBuffer(buffer);
  });
  hub_ = std::make_unique<SessionHub>(sessions_.get(), state_.get(), reaper_.get(), fences_.get(),
                                      timelines_.get(), reservations_.get(), &budget_);
  for (const auto& heap : heaps_->heaps()) {
    HeapStats stats = heap->Stats();
    spdlog::info("heap '{}': {} {}, page {}, capacity {}{}{}", heap->name(),
                 std::string(HeapKindName(heap->kind())), std::string(BackingName(stats.backing)),
                 FormatBytes(stats.page_size),
                 stats.capacity == 0 ? "unbounded" : FormatBytes(stats.capacity),
                 stats.note.empty() ? "" : "; ", stats.note);
  }

  FdChannel::Options channel_options;
  if (config.max_queued_deliveries() != 0) {
    channel_options.max_queued_deliveries = config.max_queued_deliveries();
  }
  if (config.stalled_session_timeout_ms() != 0) {
    channel_options.stalled_session_timeout =
        absl::Milliseconds(config.stalled_session_timeout_ms());
  }
  // Mostly waiting (prefaults, carveout refills), so more threads than CPUs:
  // a few carveout allocations waiting for refills never stall the rest.
  work_ = std::make_unique<WorkQueue>(4);
  channel_ = std::make_unique<FdChannel>(loop_.get(), &budget_, hub_.get(), channel_options);
  hub_->set_channel(channel_.get());
  // Deep backlogs: a flood of connects must not make the kernel refuse a
  // client's connect before the daemon has even seen it.
  UnixSocket listener;
  UnixSocket control_listener;
  if (activated_.has_value()) {
    // The service manager made them, with their owner and mode.
    if (!config.group().empty()) {
      spdlog::warn(
          "config group '{}' not applied: with socket activation the sockets' group "
          "is bufferd.socket's SocketGroup=",
          config.group());
    }
    listener = std::move(activated_->fd);
    control_listener = std::move(activated_->control);
  } else {
    // Ours from here on: Shutdown removes them.
    bound_sockets_ = true;
    ASSIGN_OR_RETURN(listener, UnixSocket::ListenSeqPacket(fd_path, kListenBacklog));
    RETURN_IF_ERROR(SetAccess(fd_path, run_as.uid, group, socket_mode));
    ASSIGN_OR_RETURN(control_listener, UnixSocket::ListenStream(control_path, kListenBacklog));
    RETURN_IF_ERROR(SetAccess(control_path, run_as.uid, group, socket_mode));
  }
  // Everything that needed root is done (heaps reserved and locked, the dir,
  // the lock and the sockets made): hand them over and serve as the user.
  if (run_as.uid != ::geteuid() && dir.valid()) {
    if (::fchown(lock_file_.get(), run_as.uid, static_cast<gid_t>(-1)) != 0) {
      return ErrnoError("chown bufferd.lock", errno);
    }
    RETURN_IF_ERROR(SecurePrivateDir(dir.get(), socket_dir_, dir_group, run_as.uid));
  }
  // The client library refuses a dir it cannot trust (base/private_dir.h);
  // say so now rather than let every client of another uid fail.
  const uid_t other_uid = run_as.uid == 0 ? 65534 : 0;
  if (absl::StatusOr<uid_t> trusted = CheckTrustedDir(socket_dir_, other_uid); !trusted.ok()) {
    spdlog::warn("clients of any uid but {} will refuse {}: {}", run_as.uid, socket_dir_,
                 std::string(trusted.status().message()));
  }
  RETURN_IF_ERROR(DropPrivileges(run_as));

  allocator_ = std::make_unique<AllocatorService>(AllocatorService::Deps{
      sessions_.get(), hub_.get(), state_.get(), channel_.get(), work_.get(), reaper_.get()});
  debug_ = std::make_unique<DebugService>(DebugService::Deps{
      sessions_.get(), hub_.get(), state_.get(), channel_.get(), fences_.get(), timelines_.get(),
      reservations_.get(), work_.get(), std::move(debug_access)});
  fence_ = std::make_unique<FenceService>(
      FenceService::Deps{sessions_.get(), hub_.get(), fences_.get(), timelines_.get(),
                         channel_.get(), state_.get(), reservations_.get(),
                         options.default_token_ttl});
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // No listening port: the ControlListener accepts and hands connections over.
  builder.RegisterService(allocator_.get());
  builder.RegisterService(debug_.get());
  builder.RegisterService(fence_.get());
  unknown_methods_ = std::make_unique<UnknownMethods>();
  builder.RegisterCallbackGenericService(unknown_methods_.get());
  server_ = builder.BuildAndStart();
  if (server_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot serve gRPC on ", control_path));
  }
  ControlListener::Options control_options;
  control_options.max_connections =
      OrDefault(limits.max_control_connections(), control_options.max_connections);
  control_options.max_connections_per_uid =
      OrDefault(limits.max_control_connections_per_uid(), control_options.max_connections_per_uid);
  control_ = std::make_unique<ControlListener>(&budget_, control_options);
  RETURN_IF_ERROR(control_->Listen(std::move(control_listener), server_.get()));
  RETURN_IF_ERROR(channel_->Listen(std::move(listener)));
  // Share tokens are forgotten 10 minutes after they expire.
  loop_->RunEvery(absl::Seconds(1), [state = state_.get()] { state->ExpireTokens(absl::Now()); });
  // Before refusing a place, the budget asks both for places whose fds are
  // gone without their holder knowing yet.
  budget_.AddReclaimer([control = control_.get()] { control->Reclaim(); });
  budget_.AddReclaimer([channel = channel_.get()] { channel->ReapDelivered(); });
  // Everything of the daemon's own is open now: what is left is the budget.
  RETURN_IF_ERROR(SetFdBudget(config, nofile));
  control_->Serve();
  // fd.sock goes live last: a client that can connect to it can also call.
  loop_->Start();
  spdlog::info("bufferd serving in {} (pid {}){}", socket_dir_, ::getpid(),
               activated_.has_value() ? ", on sockets from the service manager" : "");
  // Both sockets serve: a client the manager started us for gets answers.
  if (ServiceManagerListens()) {
    NotifyServiceManager(absl::StrCat("READY=1\nSTATUS=", StatusLine()));
    loop_->RunEvery(absl::Seconds(5),
                    [this] { NotifyServiceManager(absl::StrCat("STATUS=", StatusLine())); });
  }
  if (std::optional<absl::Duration> period = WatchdogPeriod(); period.has_value()) {
    // From the loop that serves fd.sock: a wedged loop stops the pings.
    spdlog::info("watchdog: WATCHDOG=1 every {}", absl::FormatDuration(*period));
    loop_->RunEvery(*period, [] { NotifyServiceManager("WATCHDOG=1"); });
  }
  return absl::OkStatus();
}

std::string Daemon::StatusLine() const {
  const DaemonState::Totals totals = state_->totals();
  return absl::StrCat("serving ", socket_dir_, ": ", sessions_->size(), " sessions, ",
                      totals.buffers, " buffers, ", totals.handles, " handles, ",
                      heaps_->heaps().size(), " heaps");
}

absl::Status Daemon::TakeActivatedDir(uid_t owner) {
  UniqueFd dir(::open(socket_dir_.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!dir.valid()) return ErrnoError(absl::StrCat("open socket dir ", socket_dir_), errno);
  struct stat st {};
  if (::fstat(dir.get(), &st) != 0) return ErrnoError(absl::StrCat("stat ", socket_dir_), errno);
  if ((st.st_mode & 022) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "socket dir ", socket_dir_, " is writable by group or others (mode ",
        absl::StrFormat("%04o", st.st_mode & 07777),
        "): anyone could replace the sockets; set DirectoryMode=0755 in bufferd.socket"));
  }
  if (st.st_uid != ::geteuid() && st.st_uid != owner) {
    // The manager's (root's) dir: only it can change the entries, and it
    // starts one instance; a bufferd started by hand finds fd.sock live.
    spdlog::info("socket dir {} belongs to uid {}: not locking it", socket_dir_, st.st_uid);
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(lock_file_, LockSocketDir(dir.get(), socket_dir_, owner));
  return absl::OkStatus();
}

absl::Status Daemon::SetFdBudget(const v1::Config& config, uint64_t nofile) {
  // Less the directory fd CountOpenFds itself has open while counting.
  const int open = CountOpenFds() - 1;
  const uint64_t own = open > 0 ? static_cast<uint64_t>(open) : 64;
  FdBudget::Limits limits;
  limits.rlimit_nofile = nofile;
  limits.reserve = own + kSpareFds;
  if (nofile < limits.reserve + kMinFdBudget) {
    return absl::FailedPreconditionError(absl::StrCat(
        "RLIMIT_NOFILE is ", nofile, ": the daemon keeps ", limits.reserve, " fds for itself (",
        own, " open now + ", kSpareFds, " spare) and needs at least ", kMinFdBudget,
        " more for clients; raise the limit (ulimit -n, or LimitNOFILE= in its unit)"));
  }
  limits.total = nofile - limits.reserve;
  if (config.fd_budget() != 0 && config.fd_budget() <= limits.total) {
    limits.total = config.fd_budget();
  } else if (config.fd_budget() != 0) {
    spdlog::warn(
        "fd_budget {} is above what RLIMIT_NOFILE {} allows with a reserve of {}; using {}",
        config.fd_budget(), nofile, limits.reserve, limits.total);
  }
  const uint64_t per_uid = config.limits().max_fds_per_uid();
  if (per_uid > limits.total) {
    spdlog::warn(
        "limits.max_fds_per_uid {} is above the fd budget {}: one uid may take the whole budget",
        per_uid, limits.total);
  }
  limits.per_uid = per_uid != 0 ? std::min<uint64_t>(per_uid, limits.total) : limits.total / 2;
  budget_.SetLimits(limits);
  spdlog::info("fd budget {} of RLIMIT_NOFILE {} (reserve {}: {} own + {} spare), {} per uid",
               limits.total, nofile, limits.reserve, own, kSpareFds, limits.per_uid);
  return absl::OkStatus();
}

void Daemon::Reload(const v1::Config& next, bool keep_log_level) {
  using google::protobuf::util::MessageDifferencer;
  std::vector<std::string> applied;
  if (!MessageDifferencer::Equals(next.quotas(), config_.quotas())) {
    state_->SetQuotas(next.quotas());
    fences_->SetMaxPendingPerSession(next.quotas().max_fences_per_session());
    applied.push_back(absl::StrCat("quotas {", next.quotas().ShortDebugString(), "}"));
    *config_.mutable_quotas() = next.quotas();
  }
  // Heaps: only their quota overrides apply live.
  auto without_quotas = [](v1::HeapConfig heap) {
    heap.clear_max_bytes_per_session();
    heap.clear_max_bytes_per_uid();
    return heap;
  };
  bool heaps_changed = next.heaps_size() != config_.heaps_size();
  for (int i = 0; !heaps_changed && i < next.heaps_size(); ++i) {
    heaps_changed = !MessageDifferencer::Equals(without_quotas(next.heaps(i)),
                                                without_quotas(config_.heaps(i)));
  }
  if (!heaps_changed) {
    for (int i = 0; i < next.heaps_size(); ++i) {
      const v1::HeapConfig& heap = next.heaps(i);
      if (heap.max_bytes_per_session() == config_.heaps(i).max_bytes_per_session() &&
          heap.max_bytes_per_uid() == config_.heaps(i).max_bytes_per_uid()) {
        continue;
      }
      state_->SetHeapQuotas(heap.name(), heap.max_bytes_per_session(), heap.max_bytes_per_uid());
      applied.push_back(absl::StrCat("heap '", heap.name(), "' quotas (max_bytes_per_session ",
                                     heap.max_bytes_per_session(), ", max_bytes_per_uid ",
                                     heap.max_bytes_per_uid(), ")"));
      *config_.mutable_heaps(i) = heap;
    }
  }
  if (next.log_level() != config_.log_level()) {
    if (keep_log_level) {
      spdlog::info("config log_level '{}' not applied: the --log-level flag sets it",
                   next.log_level());
    } else {
      spdlog::set_level(
          spdlog::level::from_str(next.log_level().empty() ? "info" : next.log_level()));
      applied.push_back(absl::StrCat("log_level '", next.log_level(), "'"));
      config_.set_log_level(next.log_level());
    }
  }
  // Everything else needs a restart: name it.
  std::vector<std::string> restart;
  if (heaps_changed) restart.push_back("heaps");
  const google::protobuf::Descriptor* descriptor = v1::Config::descriptor();
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* field = descriptor->field(i);
    if (field->name() == "quotas" || field->name() == "heaps" || field->name() == "log_level") {
      continue;
    }
    MessageDifferencer differ;
    std::vector<const google::protobuf::FieldDescriptor*> only = {field};
    if (!differ.CompareWithFields(next, config_, only, only)) restart.push_back(field->name());
  }
  spdlog::info("config reloaded: {}{}", applied.empty() ? "nothing to apply live" : "applied ",
               absl::StrJoin(applied, ", "));
  if (!restart.empty()) {
    spdlog::warn(
        "config fields changed that only a restart applies (still serving the old values): {}",
        absl::StrJoin(restart, ", "));
  }
}

void Daemon::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  NotifyServiceManager("STOPPING=1");
  // No new connection reaches gRPC once it shuts down.
  if (control_) control_->Stop();
  // Only sockets this daemon bound: never a live daemon's it refused to take
  // over, never the service manager's. They go first, so that new clients
  // see no daemon at once and a daemon started now waits for our lock
  // rather than finding us live.
  if (lock_file_.valid() && bound_sockets_) {
    ::unlink(ControlSocketPath(socket_dir_).c_str());
    ::unlink(FdSocketPath(socket_dir_).c_str());
  }
  // In-flight calls may be finishing on the work queue: it outlives Shutdown.
  // Idle connections would hold gRPC to the whole deadline; calls still
  // running by then (a fence wait) are cancelled, as they would be anyway.
  if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  if (loop_) loop_->Stop();
  // Every session ends (its fences fail, waking their waiters), then the
  // fence table lets go of what is left.
  if (channel_) channel_->Stop();
  if (fences_) fences_->Stop();
  if (timelines_) timelines_->Stop();
  work_.reset();
  if (lock_file_.valid()) {
    // The lock file stays: unlinking it would let two later daemons lock
    // different files of the same name.
    lock_file_.Reset();
  }
}

Daemon::~Daemon() {
  Shutdown();
  budget_.ClearReclaimers();
  control_.reset();
  server_.reset();
  channel_.reset();
  hub_.reset();
  if (reaper_ != nullptr) reaper_->SetOnDead(nullptr);
  reservations_.reset();
  fences_.reset();
  timelines_.reset();
  loop_.reset();
  reaper_.reset();  // runs the frees queued so far; nothing frees after this
  state_.reset();   // frees every buffer before the heaps go
  heaps_.reset();
}

}  // namespace bufferd
