// internal::FdMailbox: where fds the daemon delivers on fd.sock wait for the
// call that asked for them. Private to the client library.
//
// Every delivery carries a transfer id (an RPC's response names it); Take
// waits for that id's fd. fd.sock is read by the threads that wait, one at a
// time (leader/follower): the daemon queues an RPC's fd before it answers
// the RPC, so the reader usually finds it at once. An fd whose caller gave
// up (Take timed out) is closed when it arrives; one nobody takes (its call
// failed after the daemon sent it) is closed once no call could still want
// it. Buffer fds today, fence fds next: the kind does not matter here.
//
// Thread-safe.
#ifndef BUFFERD_CLIENT_FD_MAILBOX_H_
#define BUFFERD_CLIENT_FD_MAILBOX_H_

#include <cstdint>
#include <map>
#include <set>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"

namespace bufferd::internal {

class FdMailbox {
 public:
  // Reads `socket` (which must outlive this object); Take waits up to
  // `timeout`, and a call lasts at most `call_timeout`.
  FdMailbox(const UnixSocket* socket, absl::Duration timeout, absl::Duration call_timeout)
      : socket_(socket), timeout_(timeout), call_timeout_(call_timeout) {}

  // Waits for the fd delivered under `transfer_id`. DEADLINE_EXCEEDED after
  // the timeout; UNAVAILABLE once fd.sock is closed.
  absl::StatusOr<UniqueFd> Take(uint64_t transfer_id);

 private:
  // Reads one record from fd.sock, waiting until `deadline`, and files it.
  // Called with mu_ held and reading_ set; drops mu_ while blocked.
  void ReadOneLocked(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const UnixSocket* const socket_;
  const absl::Duration timeout_;
  const absl::Duration call_timeout_;

  absl::Mutex mu_;
  absl::CondVar changed_;
  struct Arrival {
    UniqueFd fd;
    absl::Time at;
  };
  // Delivered fds not yet taken.
  std::map<uint64_t, Arrival> arrived_ ABSL_GUARDED_BY(mu_);
  // Transfers whose Take timed out: their fds are closed on arrival.
  std::set<uint64_t> abandoned_ ABSL_GUARDED_BY(mu_);
  // A thread is reading fd.sock.
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  // Why fd.sock is done (daemon gone, session ended); OK while usable.
  absl::Status closed_ ABSL_GUARDED_BY(mu_);
};

// poll()'s timeout for `left`: rounded up to whole ms (so the last partial ms
// is waited, not spun), never negative, clamped to int.
int PollTimeoutMs(absl::Duration left);

}  // namespace bufferd::internal

#endif  // BUFFERD_CLIENT_FD_MAILBOX_H_
