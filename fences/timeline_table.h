// TimelineTable: the daemon's side of timelines (drm_syncobj-style 64-bit
// counters; fences/timeline_shm.h has the shared memory and the rules).
//
// The daemon is not on a timeline's hot path: the owner signals by writing
// its counter page and waking a futex, and waiters block on that futex. The
// table keeps what the kernel cannot give userspace fences:
//   - a bound on every wait: a point's deadline runs from when the daemon
//     first sees it waited on (it reads every session's wait page each
//     scan interval) for as long as someone waits on it; when it passes,
//     the table marks that point failed (DEADLINE_EXCEEDED) in the
//     timeline's state page and wakes every waiter itself;
//   - the end: when the owner's session ends, every pending and future point
//     fails OWNER_DIED at once (CANCELLED when the owner drops it);
//   - who may see what: a session holds the timelines it created or
//     imported; every other id is NOT_FOUND to it.
//
// Every page fd the table keeps and every copy in flight is leased from the
// FdBudget. Thread-safe, with its own lock. Call Stop() after the loop has
// stopped and before destruction.
#ifndef BUFFERD_FENCES_TIMELINE_TABLE_H_
#define BUFFERD_FENCES_TIMELINE_TABLE_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/event_loop.h"
#include "base/fd_budget.h"
#include "base/lazy.h"
#include "base/mapping.h"
#include "base/unique_fd.h"
#include "fences/timeline_shm.h"

namespace bufferd {

struct TimelineLimits {
  // A timeline created without a deadline gets this one.
  absl::Duration default_deadline = absl::Seconds(10);
  absl::Duration max_deadline = absl::Minutes(5);
  // How often the daemon reads the wait pages: a point fails between its
  // deadline and its deadline plus twice this after it was first waited on.
  absl::Duration scan_interval = absl::Milliseconds(100);
  // Timelines one session holds (created or imported), one uid's sessions
  // hold, and the daemon knows.
  uint32_t max_per_session = 256;
  uint32_t max_per_uid = 1024;
  uint32_t max_timelines = 4096;
  // Points with a fence behind them not yet settled, per timeline.
  uint32_t max_points_behind_fences = 1024;
};

struct TimelineView {
  uint64_t id = 0;
  std::string name;
  uint64_t owner_session = 0;
  // The last point reached, as the daemon reads it.
  uint64_t reached = 0;
  // Points failed by the deadline, since creation.
  uint64_t deadline_failures = 0;
  // UNSPECIFIED while it lives; OWNER_DIED or CANCELLED once ended.
  v1::FenceStatus ended = v1::FENCE_STATUS_UNSPECIFIED;
  absl::Duration deadline;
  absl::Time created;
  // Sessions holding it (its owner among them until it drops it).
  uint32_t holders = 0;
  // Sessions with a waker on it, and those of them with a notify fd.
  uint32_t wakers = 0;
  uint32_t notify_fds = 0;
  // Points waited on, as of the last scan: each with when the daemon first
  // saw it waited on and when it fails.
  struct Wait {
    uint64_t point = 0;
    absl::Time since;
    absl::Time fails_at;
  };
  std::vector<Wait> waits;
  // The earliest need-by time a waiter gave (InfiniteFuture: none).
  absl::Time need_by = absl::InfiniteFuture();
  // The highest point with a fence behind it (0: none), and the points
  // whose fences have not signalled yet.
  uint64_t available = 0;
  static constexpr size_t kMaxListed = 64;
  std::vector<uint64_t> promised;  // the first kMaxListed
  uint32_t promised_count = 0;
  // Points exported as fences (WatchPoint) and not yet reached or failed.
  uint32_t exported_points = 0;
};

class TimelineTable {
 public:
  // `loop` and `budget` must outlive this object.
  TimelineTable(EventLoop* loop, FdBudget* budget, TimelineLimits limits);
  ~TimelineTable();
  TimelineTable(const TimelineTable&) = delete;
  TimelineTable& operator=(const TimelineTable&) = delete;

  void AddSession(uint64_t session, uid_t uid);
  // The session is over: the timelines it owns end (OWNER_DIED), and it
  // holds nothing any more.
  void CloseSession(uint64_t session);

  // The session's wait page (timeline_shm.h WaitPage), once per session:
  // the same page again is fine (a call that gave it may have failed
  // later), another is FAILED_PRECONDITION.
  absl::Status SetWaitPage(uint64_t session, UniqueFd page);
  bool HasWaitPage(uint64_t session) const;

  // A new timeline owned by `session`, counting in `counters` (a sealed
  // CounterPage the owner mapped writable first). `deadline` zero is the
  // default. Returns its view and a read-only copy of its state page for the
  // owner (leased as an fd in flight).
  struct Created {
    TimelineView view;
    LeasedFd state;
  };
  absl::StatusOr<Created> Create(uint64_t session, UniqueFd counters, absl::string_view name,
                                 absl::Duration deadline);

  // `session` may use timeline `id` from now on (an imported token): it
  // gets read-only copies of both pages.
  struct Handout {
    TimelineView view;
    LeasedFd counters;
    LeasedFd state;
  };
  //
  // `through_buffer`: held only because a point of it is attached to a
  // buffer the session reads (ImportTimeline by buffer). Such a hold waits
  // and queries only: its waits start no deadline (the attached point's own
  // watch bounds it), and it cannot share the timeline on, export or attach
  // its points (PERMISSION_DENIED); a hold by token or ownership lifts it.
  // The owner's own session is refused one (FAILED_PRECONDITION): its hold
  // must end with its Timeline.
  absl::StatusOr<Handout> Hold(uint64_t session, uint64_t id, bool through_buffer = false);
  // OK if `session` holds `id`, else NOT_FOUND; with `to_share`,
  // PERMISSION_DENIED for a hold through a buffer (ExportTimeline).
  absl::Status CheckHeld(uint64_t session, uint64_t id, bool to_share = false) const;
  absl::StatusOr<TimelineView> Info(uint64_t session, uint64_t id) const;
  // The session lets go of one Timeline object (an owner's timeline ends
  // CANCELLED with its last one, or at once `by_owner`, the owner's own
  // object: the session's other objects, its imports, cannot signal it).
  // Unknown ids are ignored.
  void Forget(uint64_t session, uint64_t id, bool by_owner = false);

  // The session's waker for timeline `id` (it must hold it), made at the
  // first call: a copy of its wake page (read-write) for the session, and
  // with `notify` (the channel made at the first such call) a copy of the
  // read end of its notify channel.
  struct Registered {
    uint64_t waker_id = 0;
    LeasedFd page;
    std::optional<LeasedFd> notify_read;
  };
  absl::StatusOr<Registered> RegisterWaker(uint64_t session, uint64_t id, bool notify);
  // The owner's copies of the wakers it does not know (PERMISSION_DENIED for
  // anyone else): each page and its notify channel's write end, and the
  // wakers_gen they answer (0 when some could not be handed out: the owner
  // asks again).
  struct WakerHandout {
    uint64_t waker_id = 0;
    LeasedFd page;
    std::optional<LeasedFd> notify;
  };
  struct Wakers {
    std::vector<WakerHandout> wakers;
    uint64_t gen = 0;
  };
  // `known`: the wakers the owner has; `known_notify`: those of them it has
  // the notify fd of (a waker that gained one since is sent again).
  absl::StatusOr<Wakers> TakeWakers(uint64_t session, uint64_t id,
                                    const std::vector<uint64_t>& known,
                                    const std::vector<uint64_t>& known_notify);

  // ExportPoint: `done` runs once, without the table's lock, when `point`
  // of timeline `id` (held by `session`) is reached or fails: at once,
  // before this returns, if it is already; else from the loop (the daemon
  // keeps a waker of its own on the timeline, whose notify channel the
  // owner writes to like any waiter's) or from a scan. A watched point
  // counts as waited on: its deadline runs. The session's end drops its
  // watches without calling them.
  using PointDone = std::function<void(timeline::PointState)>;
  absl::Status WatchPoint(uint64_t session, uint64_t id, uint64_t point, PointDone done);

  // ImportFenceAsPoint, the owner's (PERMISSION_DENIED for anyone else): a
  // fence stands behind `point` from now on, which must be after every point
  // reached and every point promised before (FAILED_PRECONDITION); the
  // point is available at once (StatePage::available). Settle says how the
  // fence came out: points are settled in order (like a dma_fence_chain, a
  // point is reached only once every fence promised before it signalled),
  // OK raising the timeline to the point, anything else failing the points
  // up to it with the fence's status and `message`.
  // `dropped` runs (once, without the lock) if the timeline ends before
  // Settle: whoever waits on the fence may stop.
  absl::Status Promise(uint64_t session, uint64_t id, uint64_t point,
                       std::function<void()> dropped = nullptr);
  // What Promise would refuse, without promising anything.
  absl::Status CheckPromise(uint64_t session, uint64_t id, uint64_t point);
  void Settle(uint64_t id, uint64_t point, v1::FenceStatus status, absl::string_view message);

  // Every timeline, oldest first (at most `limit`; 0: all).
  std::vector<TimelineView> List(size_t limit = 0) const;
  size_t size() const;
  const TimelineLimits& limits() const { return limits_; }

  // Reads the wait pages and fails what is due, as of `now` (monotonic);
  // the scan timer calls it every scan interval.
  void Scan(absl::Duration now);

  // Stops the scan timer and closes every fd. Call once the loop has stopped.
  void Stop();

 private:
  struct Tracked {
    absl::Duration since;  // monotonic
    absl::Duration due;
  };
  struct Waker {
    uint64_t id = 0;
    LeasedFd page_fd;  // read-write: copies come from it
    Mapping page;      // read-write: the daemon's own
    // The notify channel (a datagram socket pair), once asked for. The
    // daemon keeps both ends: copies of the read end for the session, of the
    // write end for the owner; the owner closing its copy never makes the
    // session's end hang up. The owner never holds a read end, so it cannot
    // consume a byte the daemon sent; whatever it does to its end (fill the
    // queue, shut it down) leaves the session's end readable: spurious
    // wakes, never a missed one.
    LeasedFd notify_write;
    LeasedFd notify_read;
    bool notify() const { return notify_write.fd.valid(); }
    timeline::WakePage& wake() const {
      return *reinterpret_cast<timeline::WakePage*>(page.data());
    }
  };
  struct Timeline {
    uint64_t id = 0;
    std::string name;
    uint64_t owner_session = 0;  // 0 once the owner is gone
    uint64_t creator_session = 0;
    uid_t owner_uid = 0;
    absl::Duration deadline;
    absl::Time created;
    LeasedFd counters_fd;  // read-only
    LeasedFd state_fd;     // read-only
    Mapping counters_map;
    Mapping state_map;  // writable: the daemon's own
    std::pair<dev_t, ino_t> counters_inode;
    std::pair<dev_t, ino_t> state_inode;
    std::atomic<uint64_t> seen{0};
    // Sessions holding it.
    uint32_t holders = 0;
    // Points waited on (as of the last scan) and not reached: when the
    // daemon first saw each waited on, and when it fails. A point nobody
    // waits on any more is dropped (its deadline starts again if someone
    // waits on it again), so this holds at most as many points as there are
    // wait slots of the sessions holding the timeline.
    std::map<uint64_t, Tracked> tracked;
    // Session -> its waker; the daemon's own (for watches) is kDaemonWaker.
    std::map<uint64_t, Waker> wakers;
    // Exported points, by point.
    struct Watch {
      uint64_t session = 0;
      PointDone done;
    };
    std::multimap<uint64_t, Watch> watches;
    // The daemon's waker's notify read end is on the loop (it comes off
    // for the rest of a scan interval when the owner floods it).
    bool notify_watched = false;
    uint32_t notifies = 0;
    // Points promised (a fence behind each), with how that fence came out
    // once it has.
    struct Promised {
      std::optional<std::pair<v1::FenceStatus, std::string>> result;
      // Called if the timeline ends before the fence signalled.
      std::function<void()> dropped;
    };
    std::map<uint64_t, Promised> promised;

    const timeline::CounterPage& counters() const {
      return *reinterpret_cast<const timeline::CounterPage*>(counters_map.data());
    }
    timeline::StatePage& state() const {
      return *reinterpret_cast<timeline::StatePage*>(state_map.data());
    }
  };
  struct Holding {
    bool owned = false;
    // Held only through a buffer (Hold's through_buffer).
    bool through_buffer = false;
    // Timeline objects of the session on it (one Forget drops one).
    uint32_t count = 0;
  };
  // By session id (sessions_' key).
  struct Session {
    uid_t uid = 0;
    struct Details {
      absl::flat_hash_map<uint64_t, Holding> held;
      LeasedFd wait_fd;
      Mapping wait_map;
      std::pair<dev_t, ino_t> wait_inode;
    };
    // Made at its first timeline or wait page: a session that never uses
    // one costs the table one slot of sessions_ and no allocation.
    Lazy<Details> details;
  };

  // The daemon's waker in Timeline::wakers (sessions are numbered from 1).
  static constexpr uint64_t kDaemonWaker = 0;
  // More notify bytes than this in one scan interval on the daemon's own
  // waker (only the owner sends that many) takes it off the loop until the
  // next scan: an owner cannot keep the daemon's loop busy.
  static constexpr uint32_t kMaxNotifiesPerScan = 1000;
  using Calls = std::vector<std::pair<PointDone, timeline::PointState>>;

  // A new waker (its page and, with `notify`, its channel), leased to `uid`.
  absl::StatusOr<Waker> NewWaker(uid_t uid, bool page, bool notify);
  // Resolves the watches of `timeline` that are done (into `out`) and arms
  // the daemon's waker at the lowest one left.
  void CheckWatchesLocked(Timeline& timeline, Calls& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnDaemonNotify(uint64_t id);
  absl::StatusOr<Timeline*> CheckPromiseLocked(uint64_t session, uint64_t id, uint64_t point)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CloseSessionLocked(uint64_t session) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ScanLocked(absl::Duration now, Calls& calls) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Stops watching the daemon's notify channel of `timeline`.
  void UnwatchLocked(Timeline& timeline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void Run(Calls& calls);
  absl::StatusOr<Session*> SessionLocked(uint64_t session) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool ThroughBufferLocked(uint64_t session, uint64_t id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // PERMISSION_DENIED naming `what` for a hold through a buffer.
  absl::Status CheckNotThroughBufferLocked(uint64_t session, uint64_t id,
                                           absl::string_view what) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Timeline*> HeldLocked(uint64_t session, uint64_t id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckNewHoldLocked(const Session& session) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The hold caps and the daemon-wide cap, for one more timeline.
  absl::Status CheckNewTimelineLocked(const Session& session) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends a timeline whose owner is gone: every point after the last reached
  // fails with `status`, and every waiter wakes.
  void EndLocked(Timeline& timeline, v1::FenceStatus status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Fails `points` (DEADLINE_EXCEEDED) and wakes every waiter.
  void MarkLocked(Timeline& timeline, const std::vector<uint64_t>& points)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The last point reached as the daemon sees it, published in the state
  // page (waking every waiter if it rose under a point someone waits on).
  uint64_t ObserveLocked(Timeline& timeline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Wakes every waker of `timeline`: its sleepers and its notify fd.
  void WakeAllLocked(Timeline& timeline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops all of the session's holds on `id`.
  void UnholdLocked(uint64_t session_id, Session& session, uint64_t id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  TimelineView ViewLocked(const Timeline& timeline) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs the scan timer while there is something to scan.
  void UpdateTimerLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  EventLoop* const loop_;
  FdBudget* const budget_;
  const TimelineLimits limits_;

  mutable absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::node_hash_map<uint64_t, Timeline> timelines_ ABSL_GUARDED_BY(mu_);
  // Flat: a Session* lives only while the lock is held, and only
  // AddSession inserts.
  absl::flat_hash_map<uint64_t, Session> sessions_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uid_t, uint32_t> held_by_uid_ ABSL_GUARDED_BY(mu_);
  // Page inodes of known timelines: a page of one is never taken as a new
  // one's counters or as a wait page.
  absl::flat_hash_map<std::pair<dev_t, ino_t>, uint64_t> inodes_ ABSL_GUARDED_BY(mu_);
  uint32_t wait_pages_ ABSL_GUARDED_BY(mu_) = 0;
  EventLoop::TimerId timer_ ABSL_GUARDED_BY(mu_) = 0;
  // Watches settled where no Calls could be passed (a timeline's end): run
  // by the public call that ended it, once its lock is dropped.
  Calls deferred_ ABSL_GUARDED_BY(mu_);
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace bufferd

#endif  // BUFFERD_FENCES_TIMELINE_TABLE_H_
