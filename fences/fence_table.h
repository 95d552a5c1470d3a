// FenceTable: every fence the daemon serves, with dma_fence / sync_file
// semantics, independent of gRPC and of fd.sock.
//
// A fence is one-shot: pending -> signalled, with a status (OK, ERROR with a
// short message, CANCELLED; OWNER_DIED and DEADLINE_EXCEEDED only from the
// table itself) and the time it happened. Every fence has a deadline: a
// timer on the EventLoop signals DEADLINE_EXCEEDED when it passes, and a
// session's end signals its pending fences OWNER_DIED, so no fence is
// indefinite. Three kinds:
//   - created: the owner signals it (Signal);
//   - merged: signalled when all its inputs are, with the first error by
//     signal time (or OK);
//   - imported: an fd the table watches on the EventLoop (a kernel
//     sync_file, an eventfd, a timerfd, a pipe's read end), signalled when
//     it polls readable;
//   - timeline point: a timeline's point as a fence (ExportPoint),
//     signalled by whoever watches the timeline (SignalPoint), never by a
//     session.
//
// The fd is the capability. A session holds the fences it created, merged
// or imported (importing a pipe the table exported gives back that very
// fence); it may use those and no others: every other id is NOT_FOUND,
// whether it exists or not. Holds are counted per session (Forget drops
// one) and charged to the holder's uid. A held fence stays known (status,
// times) until the session forgets it or ends, so a wait on a fence
// signalled long ago answers at once. Ids are never reused.
//
// Waiters never take a thread: Wait registers a callback, run once, when
// the condition holds, at the timeout, or with an error when the session
// ends; CancelWait drops it. Big batches of callbacks go to an executor.
// Exported fds are the read ends of one pipe per fence (made at the first
// export, kept while the fence is known) whose write end only the table
// holds and closes at the signal: POLLHUP for every holder at once, forever,
// and nothing a holder does changes what the others see.
//
// Every fd the table holds (pipes, imported fds) and every exported copy in
// flight is leased from the FdBudget. Every cap is RESOURCE_EXHAUSTED or
// INVALID_ARGUMENT naming it (FenceLimits).
//
// Thread-safe, with its own lock; callbacks run without it. Call Stop()
// after the loop has stopped and before destruction.
#ifndef BUFFERD_FENCES_FENCE_TABLE_H_
#define BUFFERD_FENCES_FENCE_TABLE_H_

#include <sys/types.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/event_loop.h"
#include "base/fd_budget.h"
#include "base/lazy.h"
#include "base/mapping.h"
#include "base/unique_fd.h"
#include "bufferd/v1/fence.pb.h"

namespace bufferd {

struct FenceLimits {
  // A fence created or imported without a deadline gets this one.
  absl::Duration default_deadline = absl::Seconds(10);
  absl::Duration max_deadline = absl::Minutes(5);
  // Pending fences one session owns (0 = no per-session cap).
  uint32_t max_pending_per_session = 4096;
  // Fences one session holds, pending or signalled and not yet forgotten.
  uint32_t max_held_per_session = 16384;
  // Fences known daemon-wide (pending, or signalled and still held), and
  // fences held by one uid's sessions (each session's hold counted: a uid
  // answers for what it keeps alive, never for what others keep of its
  // fences): memory is bounded, and no uid can take every place.
  uint32_t max_fences = 65536;
  uint32_t max_fences_per_uid = 16384;
  // Fences waited on by pending waits (each wait counts the fences it
  // names), per session, per uid and daemon-wide: what a registered wait
  // costs (memory, and the work of answering it) is bounded.
  uint32_t max_waits_per_session = 16384;
  uint32_t max_waits_per_uid = 65536;
  uint32_t max_waits = 262144;
  // Ids in one Wait and one Merge.
  size_t max_wait_ids = 1024;
  size_t max_merge_ids = 256;
};

// What kinds of fd Import takes: a pipe, an eventfd, a timerfd or a kernel
// sync_file. INVALID_ARGUMENT naming the kind otherwise (a socket could keep
// a client's own fd.sock alive; a file or directory never polls).
absl::Status CheckImportable(int fd);

enum class FenceKind { kCreated, kMerged, kImported, kTimelinePoint };
const char* FenceKindName(FenceKind kind);

// A fence as it is now.
struct FenceView {
  uint64_t id = 0;
  FenceKind kind = FenceKind::kCreated;
  std::string name;
  std::string timeline;
  // A timeline point's fence: which (0 otherwise).
  uint64_t timeline_id = 0;
  uint64_t timeline_point = 0;
  uint64_t owner_session = 0;
  bool signaled = false;
  // UNSPECIFIED while pending.
  v1::FenceStatus status = v1::FENCE_STATUS_UNSPECIFIED;
  std::string message;
  absl::Time created;
  absl::Time signaled_at = absl::InfinitePast();
  absl::Time deadline;
  // The earliest time a waiter said it needs the fence (InfiniteFuture: none).
  absl::Time need_by = absl::InfiniteFuture();
  // Waits registered on it now.
  uint32_t waiters = 0;
  // Copies of its pipe handed out (the table cannot see which are still open).
  uint32_t exports = 0;
  // A pending created fence's word in its owner's fence page
  // (fences/fence_page.h) and the word's generation; 0 without one.
  uint32_t page_slot = 0;
  uint32_t page_generation = 0;
};

struct FenceQuery {
  // Only pending (true) or only signalled (false) fences.
  std::optional<bool> pending;
  // Only fences this session owns (0 = all).
  uint64_t owner_session = 0;
  // At most this many (0: kMaxListed; never more than kMaxListed + 1, so a
  // pager can ask one more than a page to tell a full page from the last).
  size_t limit = 0;
  static constexpr size_t kMaxListed = 10000;
  // Where a page starts: after this fence in the listing order (pending
  // first, oldest first; then signalled, newest first). Unset: the first
  // page.
  struct After {
    bool signaled = false;
    absl::Time signaled_at;
    uint64_t id = 0;
  };
  std::optional<After> after;
};

class FenceTable {
 public:
  using WaitId = uint64_t;

  struct WaitResult {
    // The condition held (all or any signalled) before the timeout.
    bool satisfied = false;
    // The fences waited on, in the order asked (duplicates once): id, kind,
    // state, status, message and signal time only (answering a wait costs
    // no more than that per fence; Info has the rest).
    std::vector<FenceView> fences;
  };
  // Called once, without the table's lock: the result, or an error when the
  // session ended (ABORTED) or the table stopped (UNAVAILABLE).
  using WaitDone = std::function<void(absl::StatusOr<WaitResult>)>;

  struct WaitRequest {
    std::vector<uint64_t> ids;
    bool all = true;
    // Zero polls.
    absl::Duration timeout = absl::ZeroDuration();
    // When the waiter needs the fences (a hint shown to their owners).
    std::optional<absl::Time> need_by;
  };

  struct Counts {
    uint64_t pending = 0;
    uint64_t signaled = 0;
    uint64_t waits = 0;
    // Signals by status (index: v1::FenceStatus), since start.
    std::array<uint64_t, v1::FenceStatus_ARRAYSIZE> signals{};
  };
  // Satisfied waits by how long they waited, since start.
  struct WaitLatency {
    // Upper bounds of the buckets; the last bucket is +Inf.
    static constexpr std::array<absl::Duration, 7> kBounds = {
        absl::Microseconds(100), absl::Milliseconds(1), absl::Milliseconds(10),
        absl::Milliseconds(100), absl::Seconds(1),      absl::Seconds(10),
        absl::Seconds(60)};
    std::array<uint64_t, kBounds.size() + 1> buckets{};
    absl::Duration sum;
    uint64_t count = 0;
  };

  // Runs a batch of completions elsewhere (a work queue): a signal that
  // answers many waits does not hold up the thread that signalled (the
  // event loop, for one-way signals and deadlines).
  using Executor = std::function<void(std::function<void()>)>;
  // Completions beyond this many in one batch go to the executor.
  static constexpr size_t kInlineCompletions = 32;

  // `loop` and `budget` (and whatever `executor` posts to) must outlive
  // this object. Without an executor every completion runs inline.
  FenceTable(EventLoop* loop, FdBudget* budget, FenceLimits limits, Executor executor = nullptr);
  ~FenceTable();
  FenceTable(const FenceTable&) = delete;
  FenceTable& operator=(const FenceTable&) = delete;

  // Sessions must be added before they call anything else.
  void AddSession(uint64_t session, uid_t uid);
  // The session is over: its pending fences are signalled OWNER_DIED, its
  // waits end with ABORTED, and it holds nothing any more.
  void CloseSession(uint64_t session);

  // The session's fence page (fences/fence_page.h): a 4096-byte memfd sealed
  // against writable mappings (INVALID_ARGUMENT naming a missing seal), made
  // by a process of the session's uid and no other session's page, kept
  // read-only; one per session (the same page again is fine: a client whose
  // call failed offers it again; INVALID_ARGUMENT for another). The fences
  // it creates from now on get a word of it while pending (as long as one
  // is free).
  absl::Status SetPage(uint64_t session, UniqueFd page);
  // A read-only copy of the fence page the pending fence `id` has a word of,
  // for `session` (an fd in flight, charged to it), and the page's owner;
  // NOT_FOUND if `id` is unknown, signalled or has no word. The caller checks
  // that `session` may wait on `id` (it holds a buffer `id` is attached to).
  absl::StatusOr<std::pair<LeasedFd, uint64_t>> PageOf(uint64_t session, uint64_t id);
  // A new pending fence owned by `session`. `deadline` zero is the default.
  absl::StatusOr<FenceView> Create(uint64_t session, absl::string_view name,
                                   absl::string_view timeline, absl::Duration deadline);
  // The doorbell of `session`'s new fence `id` (CreateFenceRequest's
  // doorbell_upload_id): the read end of a pipe, watched until its owner
  // closes the write end, which makes the table read the fence's word.
  // Dropped when the fence has no word or is signalled already, or the fd
  // budget is out (the owner's record signals it as ever). True if watched:
  // the owner may then signal OK by the doorbell alone, with no record
  // (CreateFenceResponse.doorbell_watched).
  bool SetDoorbell(uint64_t session, uint64_t id, UniqueFd fd);
  // Fences `session` signalled OK by their doorbells alone, which a call
  // carries (kRungMetadataKey): each one it owns that is pending and whose
  // word says OK signals now, before the call runs, as its doorbell would.
  // Any other id is skipped: a call carries ids again until one succeeds,
  // and a client that lies only moves fences it could signal anyway.
  void SignalRung(uint64_t session, const std::vector<uint64_t>& ids);
  // INVALID_ARGUMENT unless `fd` is the read end of a pipe.
  static absl::Status CheckDoorbell(int fd);
  // The owner signals a created fence: OK, ERROR (with `message`) or
  // CANCELLED. FAILED_PRECONDITION if it is signalled already;
  // PERMISSION_DENIED for a fence the session holds but does not own (or
  // one only its inputs or its fd signal).
  absl::StatusOr<FenceView> Signal(uint64_t session, uint64_t id, v1::FenceStatus status,
                                   absl::string_view message);
  // A timeline point's fence for `session` (it holds it and answers for it
  // as for an imported fence), signalled only through SignalPoint;
  // DEADLINE_EXCEEDED at `deadline` if nothing signals it first.
  absl::StatusOr<FenceView> CreatePoint(uint64_t session, absl::string_view timeline,
                                        uint64_t timeline_id, uint64_t point,
                                        absl::Duration deadline);
  // Signals a timeline point's fence (any status); false if it is unknown or
  // signalled already.
  bool SignalPoint(uint64_t id, v1::FenceStatus status, absl::string_view message);
  // The same without the view: the one-way path, kept short.
  absl::Status SignalOneWay(uint64_t session, uint64_t id, v1::FenceStatus status,
                            absl::string_view message);
  absl::StatusOr<FenceView> Info(uint64_t session, uint64_t id) const;
  // A fence signalled when all of `ids` are (duplicates are fine).
  absl::StatusOr<FenceView> Merge(uint64_t session, const std::vector<uint64_t>& ids,
                                  absl::string_view name);
  // A fence signalled when `fd` polls readable; the table keeps the fd
  // until then. The fence itself when `fd` is one of its exported pipes.
  absl::StatusOr<FenceView> Import(uint64_t session, UniqueFd fd, absl::string_view name,
                                   absl::Duration deadline);
  // A read-only fd that polls readable once the fence is signalled, with
  // its place in the budget (as an fd in flight, charged to the session).
  absl::StatusOr<LeasedFd> Export(uint64_t session, uint64_t id);
  // The session lets go of a fence (a pending one it owns is cancelled:
  // nobody could signal it any more). Unknown ids are ignored.
  void Forget(uint64_t session, uint64_t id);
  // Reservation objects (fences/reservations.h). HoldFor gives `session`
  // one more hold on a known fence it may not hold yet (it may then wait on
  // it, merge it, export it; each hold needs its Forget), within its hold
  // limits. Peek is the fence as it is now, to anyone (nullopt if unknown).
  // A fence is known while it is pending (whoever holds it), and after its
  // signal while someone holds it.
  absl::StatusOr<FenceView> HoldFor(uint64_t session, uint64_t id);
  std::optional<FenceView> Peek(uint64_t id) const;
  // Reservation objects publish their state (fences/reservation_page.h):
  // the watch hook runs once for each watched fence when it is signalled,
  // as early as a polled pipe is closed (before the rest of the signal's
  // work), under the table's lock: it must never call the table. It
  // returns whether it woke a process (the thread then yields, as after
  // closing a polled pipe). Set it before serving. Watch marks a pending
  // fence; false if it is unknown or signalled already (no hook will run
  // for it).
  using WatchHook = std::function<bool(const FenceView& signalled)>;
  void SetWatchHook(WatchHook hook);
  bool Watch(uint64_t id);
  // Undoes a fence a call just made for `session` and could not finish
  // with (an imported or timeline-point fence it owns and holds once): it
  // is signalled CANCELLED with `why`, then forgotten. Any other fence is
  // only forgotten.
  void Abandon(uint64_t session, uint64_t id, absl::string_view why);

  // A new id for a Wait (taken first, so the waiter can cancel at any time).
  WaitId NewWaitId();
  // Returns the result now when the condition holds or the timeout is
  // zero; otherwise nullopt, and `done` runs later (possibly before this
  // returns, on another thread).
  absl::StatusOr<std::optional<WaitResult>> Wait(uint64_t session, WaitId wait,
                                                 const WaitRequest& request, WaitDone done);
  // Drops a registered wait without calling its `done`. False if it is not
  // registered (finished, or not registered yet).
  bool CancelWait(WaitId wait);

  // Every fence, pending ones first (oldest first), then signalled ones
  // (newest first).
  std::vector<FenceView> List(const FenceQuery& query) const;
  Counts counts() const;
  WaitLatency wait_latency() const;
  // Pending fences a session owns and fences it holds.
  struct SessionCounts {
    uint32_t pending = 0;
    uint32_t held = 0;
  };
  SessionCounts session_counts(uint64_t session) const;
  const FenceLimits& limits() const { return limits_; }
  // A new quota max_fences_per_session (a config reload; 0 = none): fences
  // pending now stay, only new ones meet it.
  void SetMaxPendingPerSession(uint32_t max) {
    max_pending_per_session_.store(max, std::memory_order_relaxed);
  }

  // Ends every wait (UNAVAILABLE), stops every watch and timer and closes
  // every fd. Call once the loop has stopped.
  void Stop();

 private:
  // Fence deadlines and wait timeouts, on the monotonic clock.
  enum class TimerKind { kDeadline, kWaitTimeout };
  using Timers = std::multimap<absl::Duration, std::pair<TimerKind, uint64_t>>;

  struct Fence {
    FenceView view;
    uid_t owner_uid = 0;
    // Its entry in timers_ while pending (merged fences have none: their
    // inputs' deadlines bound them).
    std::optional<Timers::iterator> timer;
    // Sessions holding it.
    uint32_t holders = 0;
    // Waits on it.
    absl::flat_hash_set<WaitId> waits;
    // Merged fences waiting for it.
    std::vector<uint64_t> dependents;
    // Merged: inputs still pending, and the first error seen.
    uint32_t inputs_pending = 0;
    std::optional<std::pair<v1::FenceStatus, std::string>> first_error;
    // Its one pipe, made at the first export: the write end (closed at the
    // signal) and a read end exports are copied from, kept while the fence
    // is known so that its inode (in exported_pipes_) is never reused.
    LeasedFd pipe_write;
    LeasedFd pipe_read;
    std::optional<std::pair<dev_t, ino_t>> pipe_inode;
    // Imported: the fd watched, and whether it is a kernel sync_file.
    LeasedFd imported;
    bool imported_sync_file = false;
    // Created with a word: its owner's doorbell, watched while pending.
    LeasedFd doorbell;
    // Its signal goes to the watch hook.
    bool watched = false;
    // Signalled by what its owner wrote in its fence page (the owner's own
    // signal, come through another way first).
    bool via_page = false;
  };
  struct Waiter {
    uint64_t session = 0;
    uid_t uid = 0;
    std::vector<uint64_t> ids;  // distinct
    bool all = true;
    size_t remaining = 0;
    absl::Duration started_mono;
    std::optional<Timers::iterator> timer;
    WaitDone done;
  };
  struct Session {
    uid_t uid = 0;
    // Fences its pending waits name, summed.
    uint32_t wait_entries = 0;
    struct Sets {
      // Fence id -> holds (a fence imported twice is held twice: one Forget
      // drops one).
      absl::flat_hash_map<uint64_t, uint32_t> held;
      // Pending fences it owns (held or not).
      absl::flat_hash_set<uint64_t> pending_owned;
      absl::flat_hash_set<WaitId> waits;
    };
    // Made at its first fence, hold or wait: a session that never uses a
    // fence costs the table one slot of sessions_ and no allocation.
    Lazy<Sets> sets;
  };
  // A session's fence page (fences/fence_page.h), read-only here.
  struct Page {
    LeasedFd fd;
    Mapping map;
    // Slots not given to a pending fence, the longest free first (a slot's
    // generation wraps only after 2^24 uses of it).
    std::deque<uint32_t> free;
    // Each slot's last generation.
    std::vector<uint32_t> generations;
    std::pair<dev_t, ino_t> inode;
  };
  // Work to do once the lock is dropped.
  struct Completions {
    std::vector<std::pair<WaitDone, absl::StatusOr<WaitResult>>> waits;
    // A pipe was closed: processes polling it are runnable now.
    bool woke_pollers = false;
    // Doorbells of fences that signalled: unwatched and closed after the
    // wakes (Run), off the path to the woken.
    std::vector<LeasedFd> doorbells;
  };

  // Signal and SignalOneWay; fills `view` if not null.
  absl::Status SignalBy(uint64_t session, uint64_t id, v1::FenceStatus status,
                        absl::string_view message, FenceView* view);
  absl::StatusOr<Session*> SessionLocked(uint64_t session) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The fence if `session` holds it, else NOT_FOUND.
  absl::StatusOr<Fence*> HeldLocked(uint64_t session, uint64_t id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Checks the caps for one more pending fence owned by `session`.
  absl::Status CheckNewFenceLocked(const Session& session) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Checks the caps for one more fence held by `session`.
  absl::Status CheckNewHoldLocked(const Session& session) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<absl::Duration> CheckDeadline(absl::Duration deadline) const;
  // Adds a pending fence owned and held by `session`.
  Fence& AddFenceLocked(uint64_t session_id, Session& session, FenceKind kind,
                        absl::string_view name, absl::string_view timeline, absl::Duration deadline,
                        bool arm_timer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void HoldLocked(Session& session, Fence& fence) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops all of `session`'s holds; erases the fence if signalled and unheld.
  void UnholdLocked(Session& session, uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Remembers the status of an exported fence that is going away.
  void RememberPipeLocked(const Fence& fence) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What the owner wrote into `fence`'s word of its page, if it signalled
  // it there (OK, ERROR or CANCELLED of the fence's generation).
  std::optional<v1::FenceStatus> WrittenLocked(const Fence& fence) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends a pending fence without its owner (its session's end, its
  // deadline, its drop): with what the owner wrote in its page if it
  // signalled it there (`written_message`), else `status` and `message`.
  void EndWithoutOwnerLocked(Fence& fence, v1::FenceStatus status, std::string message,
                             std::string written_message, Completions& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Signals `fence` and everything that follows from it (merged fences,
  // waits).
  void SignalLocked(Fence& fence, v1::FenceStatus status, std::string message, Completions& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EraseIfUnusedLocked(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // EraseIfUnusedLocked for the fences finished waits were on (deferred:
  // FinishWaitLocked runs while callers still use fences).
  void SweepLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishWaitLocked(WaitId id, absl::StatusOr<bool> satisfied, Completions& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  WaitResult ResultLocked(const Waiter& waiter, bool satisfied) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  FenceView ViewLocked(const Fence& fence) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One loop timer, for the earliest entry of timers_.
  void RemoveTimerLocked(std::optional<Timers::iterator>& timer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RearmLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnTimer(uint64_t generation);
  void OnImportReadable(uint64_t id, uint32_t events);
  void OnDoorbell(uint64_t id);
  // `fence`'s owner signalled OK through its word (read by its doorbell, or
  // a call that carries it): it signals so, and true; else false.
  bool SignalWrittenOkLocked(Fence& fence, Completions& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Run(Completions& completions);

  EventLoop* const loop_;
  FdBudget* const budget_;
  const FenceLimits limits_;
  std::atomic<uint32_t> max_pending_per_session_{0};
  const Executor executor_;
  WatchHook watch_hook_;

  mutable absl::Mutex mu_;
  uint64_t next_fence_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::atomic<WaitId> next_wait_id_{1};
  // Node maps: references stay valid while others are added.
  absl::node_hash_map<uint64_t, Fence> fences_ ABSL_GUARDED_BY(mu_);
  // Flat: a Session* lives only while the lock is held, and only
  // AddSession inserts.
  absl::flat_hash_map<uint64_t, Session> sessions_ ABSL_GUARDED_BY(mu_);
  // Fence pages by session (few sessions upload one: not in Session).
  absl::flat_hash_map<uint64_t, std::unique_ptr<Page>> pages_ ABSL_GUARDED_BY(mu_);
  absl::node_hash_map<WaitId, Waiter> waiters_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<dev_t, ino_t>, uint64_t> exported_pipes_ ABSL_GUARDED_BY(mu_);
  // The last kRecentPipes exported fences that went away: an import of their
  // pipe gets their status, not a fresh OK. Oldest first.
  struct GonePipe {
    std::pair<dev_t, ino_t> inode;
    uint64_t id;
    v1::FenceStatus status;
    std::string message;
  };
  std::deque<GonePipe> gone_pipes_ ABSL_GUARDED_BY(mu_);
  // Fences held, by the uid of the holding session (one per session and
  // fence).
  absl::flat_hash_map<uid_t, uint32_t> held_by_uid_ ABSL_GUARDED_BY(mu_);
  // Fences named by pending waits, by uid and in all.
  absl::flat_hash_map<uid_t, uint32_t> wait_entries_by_uid_ ABSL_GUARDED_BY(mu_);
  uint64_t wait_entries_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<uint64_t> sweep_ ABSL_GUARDED_BY(mu_);
  Timers timers_ ABSL_GUARDED_BY(mu_);
  EventLoop::TimerId loop_timer_ ABSL_GUARDED_BY(mu_) = 0;
  // Counts the loop timers armed: a stale one that fires anyway is harmless.
  uint64_t loop_timer_generation_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Duration loop_timer_at_ ABSL_GUARDED_BY(mu_) = absl::InfiniteDuration();
  uint64_t pending_ ABSL_GUARDED_BY(mu_) = 0;
  Counts counts_ ABSL_GUARDED_BY(mu_);
  WaitLatency latency_ ABSL_GUARDED_BY(mu_);
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace bufferd

#endif  // BUFFERD_FENCES_FENCE_TABLE_H_
