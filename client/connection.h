// internal::Connection: one session's sockets, stubs and fd mailbox. Private to
// the client library.
#ifndef BUFFERD_CLIENT_CONNECTION_H_
#define BUFFERD_CLIENT_CONNECTION_H_

#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/protocol.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "bufferd/v1/buffer.grpc.pb.h"
#include "bufferd/v1/debug.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/status.h"

namespace bufferd::internal {

// grpc::Status -> absl::Status, the client's one conversion point.
absl::Status FromGrpcStatus(const grpc::Status& status);

// One RPC's context: the session metadata and the releases it carries.
struct Call {
  std::unique_ptr<grpc::ClientContext> context;
  std::vector<uint64_t> carried;
};

// Thread-safe. fd.sock is read by the threads that wait for fds, one at a time
// (leader/follower): the daemon queues an RPC's fd before it answers the RPC,
// so the reader usually finds it at once.
//
// Dropped Buffers' handles are released lazily: the next RPC carries them in
// its metadata, and a flusher thread sends whatever no RPC took within
// kReleaseDelay as one-way ReleaseHandle records on fd.sock. Every RPC also
// carries the drops already sent but not yet confirmed by a successful call,
// so the daemon has applied every drop made before an RPC started when that
// RPC runs, whichever copy it reads first (up to kMaxCarried). The flusher
// sleeps until a drop and then wakes at most once per kReleaseDelay, so a
// steady stream of allocations wakes neither it nor the daemon per buffer.
class Connection {
 public:
  static absl::StatusOr<std::shared_ptr<Connection>> Open(const std::string& socket_dir,
                                                          absl::Duration timeout);
  ~Connection();

  // Handles one call carries at most (the daemon refuses more): keeps the
  // header far below gRPC's 8 KiB metadata limit. Beyond that many drops
  // between two calls, the oldest reach the daemon one-way, unordered.
  static constexpr size_t kMaxCarried = kMaxCarriedReleases;
  // An RPC's deadline is the connection's timeout plus this.
  static constexpr absl::Duration kCallSlack = absl::Seconds(50);
  // How long a dropped Buffer's release waits for an RPC to carry it.
  static constexpr absl::Duration kReleaseDelay = absl::Milliseconds(2);

  // A context carrying the session metadata and the pending releases.
  Call NewCall();
  // Converts the call's status; if it failed, its releases are queued again
  // (the daemon may not have seen them; releasing twice is harmless because
  // handle ids are never reused).
  absl::Status Finish(Call& call, const grpc::Status& status);

  // Waits for the fd delivered under `transfer_id`.
  absl::StatusOr<UniqueFd> TakeFd(uint64_t transfer_id);

  // Releases `handle` without a round trip (see the class comment).
  void QueueRelease(uint64_t handle);

  // Shuts fd.sock down: the daemon ends the session (and releases every
  // handle, pending ones included).
  void Close();

  uint64_t session_id() const { return session_id_; }
  v1::Allocator::Stub& allocator() const { return *allocator_; }
  v1::Debug::Stub& debug() const { return *debug_; }

 private:
  Connection() = default;
  // Reads one record from fd.sock, waiting until `deadline`, and files it.
  // Called with mu_ held and reading_ set; drops mu_ while blocked.
  void ReadOneLocked(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FlushLoop();
  void TrimUnconfirmedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(release_mu_);

  UnixSocket fd_socket_;
  uint64_t session_id_ = 0;
  std::string metadata_;
  absl::Duration timeout_;
  std::unique_ptr<v1::Allocator::Stub> allocator_;
  std::unique_ptr<v1::Debug::Stub> debug_;

  absl::Mutex mu_;
  absl::CondVar changed_;
  struct Arrival {
    UniqueFd fd;
    absl::Time at;
  };
  // Delivered fds not yet taken. One that waited longer than any call can
  // last (its call failed after the daemon sent it) is closed.
  std::map<uint64_t, Arrival> arrived_ ABSL_GUARDED_BY(mu_);
  // Transfers whose TakeFd timed out: their fds are closed on arrival.
  std::set<uint64_t> abandoned_ ABSL_GUARDED_BY(mu_);
  // A thread is reading fd.sock.
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  // Why fd.sock is done (daemon gone, session ended); OK while usable.
  absl::Status closed_ ABSL_GUARDED_BY(mu_);

  absl::Mutex release_mu_;
  absl::CondVar release_changed_;
  std::vector<uint64_t> pending_releases_ ABSL_GUARDED_BY(release_mu_);
  // Releases sent (carried by a call, or one-way by the flusher) that no
  // successful call has confirmed yet -> calls carrying them now. Every new
  // call carries them again, so a call that starts after a drop always has
  // it applied first. Bounded by TrimUnconfirmedLocked.
  std::map<uint64_t, int> unconfirmed_ ABSL_GUARDED_BY(release_mu_);
  // Counts QueueRelease calls: the flusher stays on its timer while it moves.
  uint64_t releases_queued_ ABSL_GUARDED_BY(release_mu_) = 0;
  // The flusher waits without a timeout: a drop must wake it.
  bool flusher_idle_ ABSL_GUARDED_BY(release_mu_) = false;
  bool release_closed_ ABSL_GUARDED_BY(release_mu_) = false;
  std::thread flusher_;
};

}  // namespace bufferd::internal

#endif  // BUFFERD_CLIENT_CONNECTION_H_
