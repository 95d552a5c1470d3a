// Daemon: wires config, heaps, state, fd.sock and the gRPC server together.
//
// Start() prepares the socket dir (0700, or 0750 with a configured group),
// takes an exclusive flock on <dir>/bufferd.lock (FAILED_PRECONDITION naming
// the live daemon's pid if another holds it; a crashed daemon's lock is gone
// with it, so its stale sockets are removed and taken over), reserves the
// heaps, and starts serving. Shutdown() stops serving, ends every session and
// removes the sockets (the lock file stays).
//
// Socket-activated (daemon/systemd.h), it serves the sockets it was given:
// the service manager made them and their dir (SocketUser=, SocketGroup=,
// SocketMode=), so it neither binds, chmods nor removes them; it takes the
// dir's lock only if the dir is its own. Under a service manager it says
// READY=1 once both sockets serve, STATUS= every few seconds, STOPPING=1 at
// Shutdown, and WATCHDOG=1 when asked to.
//
// Every fd it holds for clients is counted in one FdBudget: RLIMIT_NOFILE
// (raised to its hard limit) minus a reserve for the daemon's own fds, measured
// once everything but the clients is open. control.sock's connections are
// accepted by a ControlListener, not by gRPC, so gRPC never meets EMFILE.
#ifndef BUFFERD_DAEMON_DAEMON_H_
#define BUFFERD_DAEMON_DAEMON_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "base/event_loop.h"
#include "base/fd_budget.h"
#include "bufferd/v1/config.pb.h"
#include "daemon/allocator_service.h"
#include "daemon/control_listener.h"
#include "daemon/debug_service.h"
#include "daemon/fd_channel.h"
#include "daemon/fence_service.h"
#include "daemon/reaper.h"
#include "daemon/session_hub.h"
#include "daemon/sessions.h"
#include "daemon/state.h"
#include "daemon/systemd.h"
#include "daemon/work_queue.h"
#include "fences/fence_table.h"
#include "fences/reservations.h"
#include "fences/timeline_table.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/server.h"
#include "heaps/heap_registry.h"

namespace bufferd {

class Daemon {
 public:
  // `socket_dir` overrides the config's (empty = config, then the default).
  // With `activated` sockets, their dir is the socket dir (a different
  // `socket_dir` is INVALID_ARGUMENT).
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(
      const v1::Config& config, std::string socket_dir,
      std::optional<ActivatedSockets> activated = std::nullopt);
  ~Daemon();

  const std::string& socket_dir() const { return socket_dir_; }
  void Shutdown();
  // Applies what a changed config may change live (SIGHUP): the quotas (a
  // heap's own quota overrides too) and, unless `keep_log_level` (the
  // --log-level flag), the log level. Everything else (heaps, limits, the
  // socket dir, ...) takes a restart: the log names each such field that
  // changed. Logs what it did.
  void Reload(const v1::Config& config, bool keep_log_level);

 private:
  Daemon() = default;
  absl::Status Init(const v1::Config& config);
  // Sets the fd budget's limits from RLIMIT_NOFILE `nofile`, the fds open
  // now and the config.
  absl::Status SetFdBudget(const v1::Config& config, uint64_t nofile);
  // The socket dir as the service manager made it: opened, and locked if
  // it is ours.
  absl::Status TakeActivatedDir(uid_t owner);
  // "serving DIR: N sessions, N buffers, N handles, N heaps": STATUS=.
  std::string StatusLine() const;

  std::string socket_dir_;
  // The config serving now (Reload updates what it applies).
  v1::Config config_;
  std::optional<ActivatedSockets> activated_;
  // First: every lease (buffers, connections) is returned before it goes.
  FdBudget budget_;
  UniqueFd lock_file_;
  std::unique_ptr<HeapRegistry> heaps_;
  std::unique_ptr<DaemonState> state_;
  // Frees what died; outlives everyone who hands it buffers.
  std::unique_ptr<Reaper> reaper_;
  std::unique_ptr<SessionTable> sessions_;
  std::unique_ptr<SessionHub> hub_;
  std::unique_ptr<WorkQueue> work_;
  // fd.sock, the fences' deadlines and imported fds, the daemon's timers
  // (token expiry).
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<FenceTable> fences_;
  std::unique_ptr<TimelineTable> timelines_;
  std::unique_ptr<ReservationTable> reservations_;
  std::unique_ptr<FdChannel> channel_;
  std::unique_ptr<AllocatorService> allocator_;
  std::unique_ptr<DebugService> debug_;
  std::unique_ptr<FenceService> fence_;
  // Calls of methods no service here has: UNIMPLEMENTED naming the method.
  std::unique_ptr<grpc::CallbackGenericService> unknown_methods_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<ControlListener> control_;
  bool shut_down_ = false;
  // It bound control.sock and fd.sock itself (not activated).
  bool bound_sockets_ = false;
};

// Raises RLIMIT_NOFILE (and RLIMIT_MEMLOCK) to their hard limits; returns the
// new RLIMIT_NOFILE.
uint64_t RaiseFdLimit();

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_DAEMON_H_
