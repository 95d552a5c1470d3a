// FdChannel: the daemon's side of fd.sock.
//
// One thread runs an epoll loop that accepts connections, opens a session for
// each (SO_PEERCRED + /proc/<pid>/comm), sends the Hello, and ends the session
// when the connection closes for any reason (exit, crash, kill -9). Each
// connection holds a place in the fd budget; one that finds no place, or whose
// uid is at its session cap, gets a Refused record naming why and is closed.
// Session churn is logged at debug level, with a summary at info once a
// minute; a session that ends badly (garbage record, stalled) logs one line,
// rate-limited across sessions. RPC
// threads call Deliver() to hand a client an fd tagged with a transfer id; it
// never blocks: if the client's socket buffer is full the delivery is queued
// (bounded), flushed when the socket drains, and a session that stays stalled
// past the timeout is ended.
//
// Thread-safe. Stop() must be called before destruction.
#ifndef BUFFERD_DAEMON_FD_CHANNEL_H_
#define BUFFERD_DAEMON_FD_CHANNEL_H_

#include <cstdint>
#include <deque>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/loop_thread.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "daemon/state.h"

namespace bufferd {

class FdChannel {
 public:
  struct Options {
    size_t max_queued_deliveries = 1024;
    // Across all sessions: queued fds are open fds of the daemon.
    size_t max_total_queued_deliveries = 4096;
    absl::Duration stalled_session_timeout = absl::Seconds(10);
  };

  // Connections are counted in `state`'s fd budget.
  FdChannel(DaemonState* state, Options options);
  ~FdChannel();

  // Takes `listener` (a listening SEQPACKET socket) and opens what the loop
  // needs; Serve() then runs the loop on a new thread. Two steps, so the
  // daemon can count its own fds once all are open, before any client is
  // served.
  absl::Status Listen(UnixSocket listener);
  void Serve();
  // Stops the thread and ends every session.
  void Stop();

  // Sends `fd` to the session's client tagged with `transfer_id`. ABORTED if
  // the session's connection is gone; RESOURCE_EXHAUSTED if its queue is full.
  absl::Status Deliver(uint64_t session_id, uint64_t transfer_id, v1::FdKind kind,
                       uint64_t object_id, LeasedFd fd);

  // Deliveries waiting for the client to read (for ListClients).
  size_t QueuedDeliveries(uint64_t session_id) const;

  // Returns the budget places of sent fds that their clients have read
  // since the last look (the budget's reclaimer; also done every tick).
  void ReapDelivered();

 private:
  struct Pending {
    std::string bytes;
    LeasedFd fd;
  };
  struct Connection {
    uint64_t session_id = 0;
    UnixSocket socket;
    FdBudget::Lease lease;
    // Places of fds sent but maybe not read yet: until the client reads
    // them they sit in its socket's receive queue, and the kernel counts
    // them against the daemon's uid (unix_inflight, limited by
    // RLIMIT_NOFILE unless root). Returned once nothing we sent is unread.
    std::vector<FdBudget::Lease> in_flight;
    // The session ended but in_flight is not empty: kept (and its session
    // open) until it is; no longer watched or delivered to.
    bool lingering = false;
    std::deque<Pending> queue;
    // When the queue last became non-empty.
    absl::Time stalled_since;
  };

  void Loop();
  void AcceptAll();
  // Opens a session for a new connection, or refuses it (Refused record).
  void Admit(UnixSocket socket);
  // Logs the last minute's session churn at info, if there was any.
  void SummarizeChurn();
  // Handles what the client sent (one-way releases); ends the session on
  // EOF, error or a malformed record.
  void OnReadable(int fd);
  void OnWritable(int fd);
  void CheckStalled();
  // Ends the session of the connection on `fd`; `badly` logs a warning
  // (rate-limited), otherwise a debug line.
  void EndConnection(int fd, absl::string_view why, bool badly = false);
  // Flushes as much of the queue as the socket takes. Returns false if the
  // connection failed.
  bool FlushLocked(Connection& connection) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReapDeliveredLocked(Connection& connection) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WatchWritable(int fd, bool writable);

  DaemonState* const state_;
  const Options options_;
  UnixSocket listener_;
  UniqueFd epoll_;
  LoopThread loop_;

  mutable absl::Mutex mu_;
  // By socket fd.
  std::map<int, Connection> connections_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, int> by_session_ ABSL_GUARDED_BY(mu_);
  size_t total_queued_ ABSL_GUARDED_BY(mu_) = 0;
  // Loop thread only: accepts paused after EMFILE until then.
  absl::Time accept_paused_until_ = absl::InfinitePast();
  // Loop thread only: sessions opened, ended and refused since the last
  // churn summary.
  uint64_t opened_ = 0;
  uint64_t ended_ = 0;
  uint64_t refused_ = 0;
  absl::Time churn_since_ = absl::Now();
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_FD_CHANNEL_H_
