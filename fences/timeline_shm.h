// The shared memory of a timeline: what its owner, its waiters and the
// daemon read and write without talking to each other.
//
// A timeline is a 64-bit counter that only moves forward; point N is
// reached when the counter reaches N. Its state is four kinds of page,
// each 4 KiB of a sealed memfd (F_SEAL_SHRINK | F_SEAL_GROW: nobody can
// truncate a page under another's mapping; pages others map are sealed
// F_SEAL_SEAL too):
//   - CounterPage: written only by the owner. The owner's library creates
//     it, maps it writable, then seals it F_SEAL_FUTURE_WRITE, so no other
//     mapping, write() or re-opened fd can ever write it; the daemon and
//     the waiters map it read-only.
//   - StatePage: written only by the daemon (sealed the same way after the
//     daemon mapped it): points failed by the deadline, the end of the
//     timeline (owner died, cancelled), and who waits, for the owner.
//   - WaitPage: one per session, written only by that session, read only by
//     the daemon: the points the session's threads wait for now. The daemon
//     reads it on a timer (it never needs a wake per wait) to start each
//     waited point's deadline.
//   - WakePage: one per waiting session and timeline (below), made by the
//     daemon and mapped by that session, the owner and the daemon only.
//
// A blocking wait sleeps on the seq word of the session's wake page for the
// timeline (WakePage): a signal is a store and one FUTEX_WAKE per waiting
// session, with no daemon in it.
//
// A point waited on for the whole deadline (the daemon sees the waits at
// each scan) fails DEADLINE_EXCEEDED: for everyone if it is the next point
// (the owner is late with it), for the sessions that waited on it if it is
// further ahead (their waits end; nobody else's point fails). The timeline
// does not move either way.
//
// Nothing read here is trusted: an owner may write anything in its page,
// and a reader only ever gets "reached" or "failed" out of it, never a crash
// or an endless wait. Readers keep the highest point they saw reached, so
// an owner writing its counter backwards never makes a point look pending
// again to a reader that saw it reached.
#ifndef BUFFERD_FENCES_TIMELINE_SHM_H_
#define BUFFERD_FENCES_TIMELINE_SHM_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "bufferd/v1/fence.pb.h"

namespace bufferd::timeline {

inline constexpr size_t kPageSize = 4096;

// An owner's failed signal: points (from, to] failed with `message`.
// Written under a seqlock (gen odd while it is written).
struct Failure {
  uint32_t gen;
  uint32_t length;
  uint64_t from;
  uint64_t to;
  char message[200];
};

// A failure the daemon writes: points (from, to] failed with `status`
// (ERROR, CANCELLED, DEADLINE_EXCEEDED or OWNER_DIED of the fence behind
// them) and `message`. Written under a seqlock like Failure.
struct DaemonFailure {
  uint32_t gen;
  uint32_t status;
  uint64_t from;
  uint64_t to;
  uint32_t length;
  char message[300];
};

struct CounterPage {
  // Futex word: the owner adds one after every signal, then wakes.
  uint32_t seq;
  // The CPU the owner last signalled from, plus one (0: not known). A hint
  // only: a waiter on another CPU spins a little before it sleeps
  // (SpinUntilMoved); whatever the owner writes here costs a reader at most
  // that spin.
  uint32_t owner_cpu;
  // The last point reached.
  uint64_t reached;
  // Failures written since creation; the last kFailures are in `failures`.
  uint64_t failure_count;
  static constexpr size_t kFailures = 16;
  Failure failures[kFailures];
};

struct StatePage {
  // Futex word: the daemon adds one after every change, then wakes.
  uint32_t seq;
  // A v1::FenceStatus once the timeline has ended (OWNER_DIED: its owner's
  // session ended; CANCELLED: the owner dropped it): every point after
  // `ended_after` fails with it. 0 while it lives.
  uint32_t ended;
  uint64_t ended_after;
  // The highest point the daemon has seen reached: an owner that writes its
  // counter backwards cannot make a point the daemon saw reached (and
  // stopped timing) pending again.
  uint64_t observed;
  // Deadline marks: points that failed DEADLINE_EXCEEDED (waited on for the
  // whole deadline without being reached). The last kMarks of `mark_count`
  // are kept; an older mark is forgotten.
  uint64_t mark_count;
  static constexpr size_t kMarks = 64;
  uint64_t marks[kMarks];
  // For the owner: the earliest point someone waits for (0: none), and the
  // earliest need-by time a waiter gave (CLOCK_MONOTONIC ns, 0: none), as of
  // the daemon's last look at the wait pages.
  uint64_t waited_point;
  int64_t need_by_ns;
  // Adds one whenever a waker comes or goes: the owner then asks the
  // daemon for the new ones (Fence.TakeWakers).
  uint64_t wakers_gen;
  // What the daemon created it with.
  uint64_t timeline_id;
  uint32_t deadline_ms;
  uint32_t reserved;
  // The highest point with a fence standing behind it (the owner's
  // ImportFenceAsPoint / ImportSyncFdAsPoint): every point up to it is
  // *available* (it will be reached or fail without the owner signalling
  // again), like DRM_SYNCOBJ_WAIT_FLAGS_WAIT_AVAILABLE. A reached point is
  // available too.
  uint64_t available;
  // The lowest point with a fence behind it that has not settled yet (0:
  // none): the owner signals only points before it (points settle in
  // order).
  uint64_t unsettled;
  // Failures of points that stood behind a fence which signalled an error
  // (the fence's status and message): the last kFailures of
  // `failure_count`.
  uint64_t failure_count;
  static constexpr size_t kFailures = 8;
  DaemonFailure failures[kFailures];
};

// One waiting session's wake page for one timeline (a "waker"), made by the
// daemon and mapped writable by only three parties: that session, the
// timeline's owner and the daemon. Waiters sleep on `seq`; the owner and the
// daemon add one and wake. No other importer can see it, so none can
// requeue or spoil its wakes.
struct WakePage {
  // Futex word: the owner adds one at every signal, the daemon at every
  // mark and at the end; either wakes if `sleepers` says someone sleeps.
  uint32_t seq;
  // The session's threads sleeping (or about to) on `seq`.
  uint32_t sleepers;
  // Notify fd: the point an event-loop waiter wants (0: none), and the last
  // armed point the owner wrote a byte to the notify pipe for.
  uint64_t armed;
  uint64_t notified;
  // Set by the daemon once the waker is gone: the owner lets go of it.
  uint32_t closed;
  // Non-zero: `armed` waits for availability (StatePage::available), not
  // for the point to be reached; the daemon then writes the byte when a
  // fence comes to stand behind the point.
  uint32_t arm_available;
  uint64_t waker_id;
  uint64_t timeline_id;
  // Points more than one ahead of the timeline that this session waited on
  // for the whole deadline: they failed DEADLINE_EXCEEDED for this session
  // only (a wait far ahead must end, but must not fail the point for the
  // others). The last kExpired of `expired_count` are kept.
  uint64_t expired_count;
  static constexpr size_t kExpired = 16;
  uint64_t expired[kExpired];
};

struct WaitSlot {
  // Seqlock: odd while the session rewrites the slot. The daemon skips a
  // slot it cannot read stable (the session only hurts its own waits).
  uint32_t gen;
  uint32_t reserved;
  // 0: free.
  uint64_t timeline;
  uint64_t point;
  // CLOCK_MONOTONIC ns by which the waiter needs the point (0: no hint).
  int64_t need_by_ns;
};

struct WaitPage {
  // Which slots hold a wait: bit i % 64 of armed[i / 64] for slots[i]. The
  // session sets a slot's bit before it writes the slot and clears it after
  // it empties it; the daemon reads only the slots marked, so a scan costs a
  // session that waits on nothing one cache line. A bit past the last slot,
  // or a marked slot that is empty, is ignored; a session that marks too few
  // leaves only its own waits untimed.
  uint64_t armed[2];
  uint64_t reserved[2];
  static constexpr size_t kSlots = (kPageSize - 4 * sizeof(uint64_t)) / sizeof(WaitSlot);
  WaitSlot slots[kSlots];
};
static_assert(WaitPage::kSlots <= 8 * sizeof(WaitPage::armed));

// The bits of WaitPage::armed[word] that name a slot (the rest name none).
constexpr uint64_t SlotBits(size_t word) {
  const size_t first = word * 64;
  return first >= WaitPage::kSlots        ? 0
         : first + 64 <= WaitPage::kSlots ? ~uint64_t{0}
                                          : ~(~uint64_t{0} << (WaitPage::kSlots - first));
}
static_assert(SlotBits(0) == ~uint64_t{0} && SlotBits(1) == ~uint64_t{0} >> 1);

static_assert(sizeof(CounterPage) <= kPageSize);
static_assert(sizeof(StatePage) <= kPageSize);
static_assert(sizeof(WaitPage) == kPageSize);
static_assert(sizeof(WakePage) <= kPageSize);

// Atomic access to a word of shared memory.
template <typename T>
T Load(const T& word) {
  return std::atomic_ref<T>(const_cast<T&>(word)).load(std::memory_order_acquire);
}
template <typename T>
void Store(T& word, T value) {
  std::atomic_ref<T>(word).store(value, std::memory_order_release);
}
inline void Bump(uint32_t& seq) {
  std::atomic_ref<uint32_t>(seq).fetch_add(1, std::memory_order_seq_cst);
}

// The longest a waiter sleeps in one futex_waitv before it looks again. Any
// process that can read a page can FUTEX_CMP_REQUEUE the waiters off its
// futex words, so that no wake reaches them; looking again this often bounds
// what that costs a waiter.
inline constexpr int64_t kMaxSleepNs = 20'000'000;

// How long a waiter spins on the words it would sleep on before it sleeps,
// when the owner of what it waits for last ran on another CPU: a signal
// that comes within it reaches the waiter with no wake at all (and the
// owner, finding nobody asleep, makes no syscall). Read once per process
// from BUFFERD_SPIN_US (0 turns spinning off; at most 1000); default 20.
int64_t SpinNs();
// Sets it for this process from now on, whatever BUFFERD_SPIN_US says
// (benchmarks compare with and without); clamped to 0..1 ms.
void SetSpinNs(int64_t ns);

// Spins until one of `words` moves from `expected` or the clock passes
// `until_ns`; true if a word moved.
bool SpinUntilMoved(const uint32_t* const* words, const uint32_t* expected, size_t count,
                    int64_t until_ns);

// The CPU this thread runs on, plus one (0: not known).
uint32_t CurrentCpu();

// Wakes every process blocked on `seq` (any mapping of the same page);
// returns how many woke.
int WakeAll(const uint32_t& seq);

// What the owner and the daemon do to a waker: bump its seq and wake its
// sleepers (only if there are any: no syscall otherwise).
void WakeWaker(WakePage& page);

// Sends one byte to `notify_fd` (a waker's notify channel) for the waker's
// armed point if it is at most `upto` and has had no byte yet: the owner at
// a signal, the daemon at a scan and when a fence comes to stand behind an
// availability-armed point. MSG_DONTWAIT | MSG_NOSIGNAL: it never blocks (a
// full channel is readable anyway) and never raises SIGPIPE. The load of
// `armed` is seq_cst: after the caller's store of what it reached, one of
// the caller and an arming waiter sees the other.
void NotifyArmed(WakePage& page, int notify_fd, uint64_t upto);

// What a reader knows of one point.
struct PointState {
  bool done = false;
  // OK, ERROR (the owner's), DEADLINE_EXCEEDED, OWNER_DIED or CANCELLED.
  v1::FenceStatus status = v1::FENCE_STATUS_UNSPECIFIED;
  std::string message;
};

// The last point reached as this reader sees it (the owner's counter, or
// where it stood when the timeline ended, and what the daemon observed);
// raises `*seen` to it and returns the new `*seen`.
uint64_t Reached(const CounterPage& counters, const StatePage& state, std::atomic<uint64_t>& seen);

// `point` as this reader sees it now (`wake`: the reader's waker, whose
// expired points failed for it alone; may be null).
PointState Evaluate(const CounterPage& counters, const StatePage& state, uint64_t point,
                    std::atomic<uint64_t>& seen, const WakePage* wake = nullptr);

// Whether `point` is available to this reader: reached (as Reached sees
// it), or at most StatePage::available.
bool Available(const CounterPage& counters, const StatePage& state, uint64_t point,
               std::atomic<uint64_t>& seen);

// Checks a page a client uploads: a memfd of exactly kPageSize bytes sealed
// against shrinking and growing (and, with `read_only_for_others`, against
// new writable mappings and new seals). INVALID_ARGUMENT saying what is wrong.
absl::Status CheckPageFd(int fd, bool read_only_for_others, const char* what);

// Blocks until any of `words[i]` differs from `expected[i]` or a wake comes,
// or until `until` (CLOCK_MONOTONIC ns), but never longer than kMaxSleepNs.
// At most 128 words.
// OK (woken or changed, or kMaxSleepNs passed: then `*capped`, if given, is
// set), DEADLINE_EXCEEDED (timed out), or the error. `now_ns`: the caller's
// fresh MonotonicNs(), or 0 to read the clock here.
absl::Status WaitAny(const uint32_t* const* words, const uint32_t* expected, size_t count,
                     int64_t until_ns, bool* capped = nullptr, int64_t now_ns = 0);

// CLOCK_MONOTONIC now, in ns.
int64_t MonotonicNs();

}  // namespace bufferd::timeline

#endif  // BUFFERD_FENCES_TIMELINE_SHM_H_
