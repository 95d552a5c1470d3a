// FdChannel: the daemon's side of fd.sock, the transport.
//
// It accepts connections on the daemon's EventLoop, holds one place in the
// fd budget per connection, and asks its Delegate (the daemon's SessionHub)
// to admit each: an admitted client gets the Hello (session id, secret,
// protocol version), a refused one a Refused record naming why, then the
// connection closes. Records a client sends go to the Delegate as they
// come; when a connection ends for any reason (exit, crash, kill -9, a
// malformed record, a stall) the Delegate hears it once (OnDisconnect).
//
// RPC threads call Deliver() to hand a client an fd tagged with a transfer
// id; it never blocks: if the client's socket buffer is full the delivery is
// queued (bounded), flushed when the socket drains, and a session that stays
// stalled past the timeout is ended. An fd sent stays in the budget until
// the client has read it (SIOCOUTQ: the kernel charges unread SCM_RIGHTS
// fds to the daemon); a client that leaves with sent fds unread lingers
// (OnDetach: no more calls) until they are read or its socket closes.
//
// Records are applied in the order the client sent them, one at a time per
// session: by the loop as they come, or by an RPC thread that must see them
// first (DrainSession: a call the client made after sending N records runs
// after those N are applied).
//
// Session churn is logged at debug level, with a summary at info once a
// minute; a session that ends badly logs one line, rate-limited.
//
// Thread-safe. Stop() must be called (after the loop has stopped) before
// destruction.
#ifndef BUFFERD_DAEMON_FD_CHANNEL_H_
#define BUFFERD_DAEMON_FD_CHANNEL_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/event_loop.h"
#include "base/fd_budget.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "bufferd/v1/fd_channel.pb.h"

namespace bufferd {

class FdChannel {
 public:
  struct Options {
    size_t max_queued_deliveries = 1024;
    // Across all sessions: queued fds are open fds of the daemon.
    size_t max_total_queued_deliveries = 4096;
    absl::Duration stalled_session_timeout = absl::Seconds(10);
  };

  // A session the Delegate opened for a connection.
  struct Admission {
    uint64_t session_id = 0;
    std::string secret;
  };

  // What the daemon does with the channel's connections. Called on the
  // loop thread, one call at a time, except OnRecord, which an RPC thread
  // may call too (DrainSession); never two at once for one session.
  class Delegate {
   public:
    virtual ~Delegate() = default;
    // A client connected: its session, or why not (told to the client).
    virtual absl::StatusOr<Admission> OnConnect(const PeerCredentials& peer) = 0;
    // A record the client sent, with the fds that came with it. An error
    // ends the session (a record no honest client sends).
    virtual absl::Status OnRecord(uint64_t session_id, const v1::FdChannelMessage& message,
                                  std::vector<UniqueFd> fds) = 0;
    // The client left with fds it was sent still unread: no more calls;
    // what the session holds stays until OnDisconnect.
    virtual void OnDetach(uint64_t session_id) = 0;
    // The session is over. Also called by Stop() for every session.
    virtual void OnDisconnect(uint64_t session_id) = 0;
  };

  // `loop`, `budget` and `delegate` must outlive this object.
  FdChannel(EventLoop* loop, FdBudget* budget, Delegate* delegate, Options options);
  ~FdChannel();

  // Takes `listener` (a listening SEQPACKET socket) and watches it on the
  // loop; clients are served once the loop runs.
  absl::Status Listen(UnixSocket listener);
  // Ends every session (OnDisconnect each) and closes the listener. Call
  // once the loop has stopped.
  void Stop();

  // Sends `fd` to the session's client tagged with `transfer_id`. ABORTED if
  // the session's connection is gone; RESOURCE_EXHAUSTED if its queue is full.
  absl::Status Deliver(uint64_t session_id, uint64_t transfer_id, v1::FdKind kind,
                       uint64_t object_id, LeasedFd fd);
  // Several fds at once, in as few records as fit (FdDeliveries, up to
  // kMaxFdsPerRecord a record). If the socket takes only some records,
  // the rest are queued, or (over a cap) refused: the client closes fds of
  // a call that failed.
  struct Delivery {
    uint64_t transfer_id = 0;
    v1::FdKind kind = v1::FD_KIND_UNSPECIFIED;
    uint64_t object_id = 0;
    LeasedFd fd;
  };
  absl::Status DeliverAll(uint64_t session_id, std::vector<Delivery> deliveries);

  // Applies the records the session's client has sent, until `sent` records
  // have been read since it connected (or its socket is drained). Called on
  // an RPC thread before the call runs: whatever the client sent one-way
  // before the call is applied first.
  enum class Drained {
    kApplied,
    // The session is over or ending (its socket closed, or a record it sent
    // ended it): the call must not run.
    kEnded,
    // More than 4,096 records were still unread: the call must not run yet.
    kBehind,
  };
  Drained DrainSession(uint64_t session_id, uint64_t sent);

  // Ends a session as if its client had closed fd.sock (an operator's
  // EndSession): on the loop thread, then `done` runs there with the
  // outcome. kEndedLingering: ended, but fds it was sent are unread, so it
  // lingers (no calls, its holdings kept) until its client reads or drops
  // them. kLingering: it had ended already and lingers so.
  enum class Ended { kEnded, kEndedLingering, kNotFound, kLingering };
  void EndSessionSoon(uint64_t session_id, std::string why, std::function<void(Ended)> done);

  // Deliveries waiting for the client to read (for ListClients).
  size_t QueuedDeliveries(uint64_t session_id) const;

  // Returns the budget places of sent fds that their clients have read
  // since the last look (the budget's reclaimer; also done every tick).
  void ReapDelivered();

 private:
  struct Pending {
    std::string bytes;
    std::vector<LeasedFd> fds;
  };
  // A connection's read side, shared with RPC threads that drain it.
  struct Reader {
    absl::Mutex mu;
    // The socket's fd; -1 once the connection has ended (not read again).
    int fd ABSL_GUARDED_BY(mu) = -1;
    uint64_t session_id = 0;
    // Records read since the connection opened.
    uint64_t records ABSL_GUARDED_BY(mu) = 0;
    // The socket reported ECONNRESET: read what is queued, then end.
    bool reset ABSL_GUARDED_BY(mu) = false;
    // The loop stopped watching for input while an RPC thread drained it;
    // whoever clears this resumes the watch.
    std::atomic<bool> loop_paused{false};
  };
  // Why reading stopped, if the session must end.
  struct ReadEnd {
    std::string why;
    bool badly = false;
  };
  // Deliveries queued or in flight: made when a session is first sent fds,
  // dropped once they are all read, so an idle session carries none of it.
  struct Backlog {
    // Places of fds sent but maybe not read yet (see the class comment).
    std::vector<FdBudget::Lease> in_flight;
    // A list: empty, it allocates nothing.
    std::list<Pending> queue;
    // When the queue last became non-empty.
    absl::Time stalled_since;
  };
  // By session id (connections_' key).
  struct Connection {
    UnixSocket socket;
    // Not watched for input (a drain is under way).
    bool reading_paused = false;
    // The session ended but fds sent are unread: kept (and its session
    // open) until they are; no longer watched or delivered to.
    bool lingering = false;
    std::shared_ptr<Reader> reader;
    FdBudget::Lease lease;
    std::unique_ptr<Backlog> backlog;

    size_t QueuedCount() const { return backlog != nullptr ? backlog->queue.size() : 0; }
    bool Queued() const { return QueuedCount() != 0; }
    bool InFlight() const { return backlog != nullptr && !backlog->in_flight.empty(); }
  };

  void AcceptAll();
  // Opens a session for a new connection, or refuses it (Refused record).
  void Admit(UnixSocket socket);
  // Logs the last minute's session churn at info, if there was any.
  void SummarizeChurn();
  void OnEvents(uint64_t session_id, uint32_t events);
  // Hands what the client sent to the delegate; ends the session on EOF,
  // error or a malformed record.
  void OnReadable(uint64_t session_id);
  // Reads and applies at most `max` records (until `until` have been read
  // in all). nullopt when drained or stopped; otherwise why the session ends.
  // Marks the reader ended when it returns a reason.
  std::optional<ReadEnd> ReadRecordsLocked(Reader& reader, int max, uint64_t until)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(reader.mu);
  std::optional<ReadEnd> ReadSomeLocked(Reader& reader, int max, uint64_t until)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(reader.mu);
  // Marks the reader ended: nobody reads the socket again.
  static void CloseReader(const std::shared_ptr<Reader>& reader);
  void OnWritable(uint64_t session_id);
  // Every tick: returns read fds' places, ends drained lingering sessions
  // and stalled ones.
  void Tick();
  // Ends the session's connection; `badly` logs a warning (rate-limited),
  // otherwise a debug line. True if it lingers (fds it was sent unread).
  bool EndConnection(uint64_t session_id, absl::string_view why, bool badly = false);
  // Sends the records at once if nothing is queued and the socket takes
  // them, else queues what is left (all or nothing against the caps).
  absl::Status SendOrQueue(uint64_t session_id, std::vector<Pending> records);
  // Sends one record without waiting; once it is sent, its fds' budget
  // places move to in_flight (the record's own copies close with it).
  absl::Status SendRecordLocked(Connection& connection, Pending& record)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Flushes as much of the queue as the socket takes; an error if the
  // connection failed.
  absl::Status FlushLocked(Connection& connection) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Returns the places of sent fds once the client has read them all.
  void ReapDeliveredLocked(Connection& connection) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether the tick must look at the connection (deliveries queued or in
  // flight, or lingering); if not, drops its emptied backlog.
  static bool StillBusy(Connection& connection);
  // Marks the session as needing the tick, or not (StillBusy).
  void UpdateBusyLocked(uint64_t session_id, Connection& connection)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Watches the connection's socket for what it needs: input unless
  // paused, output while deliveries are queued.
  void UpdateWatchLocked(const Connection& connection) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Pauses or resumes watching a connection for input (loop thread).
  void SetReading(uint64_t session_id, bool reading);
  // The session's connection, unless it has ended (or lingers).
  Connection* LiveLocked(uint64_t session_id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  EventLoop* const loop_;
  FdBudget* const budget_;
  Delegate* const delegate_;
  const Options options_;
  UnixSocket listener_;
  // The periodic timers; and the one-shot that resumes accepts after a
  // pause (loop thread, or Stop once the loop has stopped).
  std::vector<EventLoop::TimerId> timers_;
  EventLoop::TimerId accept_resume_ = 0;

  mutable absl::Mutex mu_;
  // By session id (never reused, unlike fd numbers).
  std::map<uint64_t, Connection> connections_ ABSL_GUARDED_BY(mu_);
  // Sessions with deliveries queued or in flight, or lingering: the only
  // ones the tick looks at.
  std::set<uint64_t> busy_ ABSL_GUARDED_BY(mu_);
  size_t total_queued_ ABSL_GUARDED_BY(mu_) = 0;
  // Loop thread only: sessions opened, ended and refused since the last
  // churn summary.
  uint64_t opened_ = 0;
  uint64_t ended_ = 0;
  uint64_t refused_ = 0;
  absl::Time churn_since_ = absl::Now();
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_FD_CHANNEL_H_
