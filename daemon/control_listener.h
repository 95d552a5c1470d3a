// ControlListener: accepts control.sock connections itself and hands each to
// gRPC (grpc::AddInsecureChannelFromFd).
//
// gRPC core never recovers from an EMFILE on its own accept (grpc/grpc#20418):
// it stops accepting for good. So the daemon owns the accepts: every
// connection takes a place in the FdBudget (charged to the peer's uid, from
// SO_PEERCRED) before gRPC sees it, and the per-uid and total connection caps
// apply; a connection that finds no place is closed at once, with one
// rate-limited log line, and gRPC never meets it. Everything recovers as soon
// as connections close.
//
// gRPC closes a connection's fd without telling us, so the listener keeps each
// handed-over fd's (device, inode) and, once a second and before it refuses
// anyone, forgets those whose fd no longer refers to that socket: a place is
// returned at most a second after gRPC closed it, never before.
//
// Thread-safe. Serve() runs one thread; Stop() joins it.
#ifndef BUFFERD_DAEMON_CONTROL_LISTENER_H_
#define BUFFERD_DAEMON_CONTROL_LISTENER_H_

#include <sys/types.h>

#include <cstdint>
#include <map>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/fd_budget.h"
#include "base/loop_thread.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "grpcpp/server.h"

namespace bufferd {

class ControlListener {
 public:
  struct Options {
    // Connections open at once, in total and per uid.
    uint32_t max_connections = 4096;
    uint32_t max_connections_per_uid = 1024;
    // How often connections gRPC has closed are looked for.
    absl::Duration sweep_interval = absl::Seconds(1);
  };

  // `budget` must outlive this object.
  ControlListener(FdBudget* budget, Options options);
  ~ControlListener();

  // Takes `listener` (a listening SOCK_STREAM socket) and opens what the
  // loop needs; Serve() then accepts on a new thread and hands every
  // admitted connection to `server`, which must outlive Stop().
  absl::Status Listen(UnixSocket listener, grpc::Server* server);
  void Serve();
  // Stops accepting (connections already handed over stay with gRPC).
  void Stop();

  // Forgets connections gRPC has closed now (at most every 10 ms), so their
  // places in the budget come back: the budget's reclaimer.
  void Reclaim();

 private:
  struct Connection {
    dev_t dev = 0;
    ino_t ino = 0;
    uid_t uid = 0;
    FdBudget::Lease lease;
  };

  void Loop();
  void AcceptAll();
  // Admits one accepted connection or says why not.
  absl::Status Admit(UnixSocket& socket, const PeerCredentials& peer);
  // RESOURCE_EXHAUSTED naming the cap `uid` is at, if any.
  absl::Status CheckCapsLocked(uid_t uid) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Forgets connections whose fd gRPC has closed.
  void Sweep() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sweeps unless the last sweep was under kMinSweepGap ago; true if it did.
  bool ReclaimLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Forget(std::map<int, Connection>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  FdBudget* const budget_;
  const Options options_;
  UnixSocket listener_;
  grpc::Server* server_ = nullptr;
  LoopThread loop_;
  // Loop thread only: accepts paused after an EMFILE until then.
  absl::Time paused_until_ = absl::InfinitePast();

  mutable absl::Mutex mu_;
  // By the fd gRPC owns now.
  std::map<int, Connection> connections_ ABSL_GUARDED_BY(mu_);
  std::map<uid_t, uint32_t> per_uid_ ABSL_GUARDED_BY(mu_);
  absl::Time last_sweep_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_CONTROL_LISTENER_H_
