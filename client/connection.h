// internal::Connection: one session's sockets, stubs and fd mailbox. Private to
// the client library.
#ifndef BUFFERD_CLIENT_CONNECTION_H_
#define BUFFERD_CLIENT_CONNECTION_H_

#include <map>
#include <memory>
#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "bufferd/v1/buffer.grpc.pb.h"
#include "bufferd/v1/debug.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/status.h"

namespace bufferd::internal {

// grpc::Status -> absl::Status, the client's one conversion point.
absl::Status FromGrpcStatus(const grpc::Status& status);

// Thread-safe. There is no background thread: fd.sock is read by the threads
// that wait for fds, one at a time (leader/follower). The daemon queues an
// RPC's fd before it answers the RPC, so the reader usually finds it at once.
class Connection {
 public:
  static absl::StatusOr<std::shared_ptr<Connection>> Open(const std::string& socket_dir,
                                                          absl::Duration timeout);
  ~Connection();

  // A context carrying the session metadata.
  std::unique_ptr<grpc::ClientContext> NewContext() const;

  // Waits for the fd delivered under `transfer_id`.
  absl::StatusOr<UniqueFd> TakeFd(uint64_t transfer_id);

  // One-way release of a handle (no answer; see ReleaseHandle in
  // fd_channel.proto).
  absl::Status SendRelease(uint64_t handle);

  // Shuts fd.sock down: the daemon ends the session.
  void Close();

  uint64_t session_id() const { return session_id_; }
  v1::Allocator::Stub& allocator() const { return *allocator_; }
  v1::Debug::Stub& debug() const { return *debug_; }

 private:
  Connection() = default;
  // Reads one record from fd.sock, waiting until `deadline`, and files it.
  // Called with mu_ held and reading_ set; drops mu_ while blocked.
  void ReadOneLocked(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  UnixSocket fd_socket_;
  uint64_t session_id_ = 0;
  std::string metadata_;
  absl::Duration timeout_;
  std::unique_ptr<v1::Allocator::Stub> allocator_;
  std::unique_ptr<v1::Debug::Stub> debug_;

  absl::Mutex mu_;
  absl::CondVar changed_;
  std::map<uint64_t, UniqueFd> arrived_ ABSL_GUARDED_BY(mu_);
  // Transfers whose TakeFd timed out: their fds are closed on arrival.
  std::set<uint64_t> abandoned_ ABSL_GUARDED_BY(mu_);
  // A thread is reading fd.sock.
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  // Why fd.sock is done (daemon gone, session ended); OK while usable.
  absl::Status closed_ ABSL_GUARDED_BY(mu_);
};

}  // namespace bufferd::internal

#endif  // BUFFERD_CLIENT_CONNECTION_H_
