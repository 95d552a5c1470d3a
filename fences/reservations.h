// ReservationTable: a reservation object per buffer (the kernel's dma_resv,
// with the usages of its 2021 rework), over the FenceTable.
//
// Every fence attached to a buffer has a usage: KERNEL (memory management:
// everything waits for it), WRITE (a writer: readers and writers wait),
// READ (a reader: writers wait) or BOOKKEEP (never waited on implicitly,
// listed for debugging). A read access waits for KERNEL + WRITE; a write
// access for KERNEL + WRITE + READ. The table keeps fence ids only: the
// FenceTable keeps every pending fence known whoever holds it, and a
// signalled one is of no more use here: it leaves every buffer at its
// signal, and a buffer's reservation goes with the buffer. Fences end in bounded time (their
// deadlines, their owner's death), so no buffer stays blocked forever.
//
// The table knows buffers by id and trusts its caller (the daemon's Fence
// service) to have checked that the session holds a handle on the buffer
// and may attach that usage. Thread-safe, with its own lock, taken after
// the FenceTable's (whose signals call OnSignaled under it): it never calls
// the FenceTable while holding it. Every attached fence is watched, so the
// lists hold exactly the pending fences: OnSignaled takes each out at its
// signal.
//
// It publishes each buffer's state to the sessions that subscribed to it,
// in each session's status page (fences/reservation_page.h): at every
// attach, before Attach returns, and at every signal of an attached fence,
// through the FenceTable's watch hook (OnSignaled), before any waiter of
// that fence is answered.
#ifndef BUFFERD_FENCES_RESERVATIONS_H_
#define BUFFERD_FENCES_RESERVATIONS_H_

#include <algorithm>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "bufferd/v1/fence.pb.h"
#include "base/mapping.h"
#include "base/unique_fd.h"
#include "fences/fence_table.h"
#include "fences/reservation_page.h"

namespace bufferd {

struct ReservationLimits {
  // Unsignalled fences attached to one buffer, on each side: the writers'
  // (KERNEL, WRITE: read-write holders only) and the readers' (READ,
  // BOOKKEEP), so readers can never crowd out the writer. A fence attached
  // with several usages counts once per side.
  uint32_t max_fences_per_buffer = 64;
  // One session's share of the readers' side (which read-only importers
  // fill): a quarter of it, at least 1.
  uint32_t reader_share() const { return std::max<uint32_t>(1, max_fences_per_buffer / 4); }
};

class ReservationTable {
 public:
  struct Attached {
    uint64_t fence_id = 0;
    v1::FenceUsage usage = v1::FENCE_USAGE_UNSPECIFIED;
    uint64_t attached_by = 0;  // session
    absl::Time attached_at;
    // The buffer's attach sequence number (reservation_page.h).
    uint64_t seq = 0;
  };
  // Where a Pending answer stands: the last fence attached to the buffer
  // (its sequence number), and its waited-for fences that failed so far.
  struct Snapshot {
    uint64_t seq = 0;
    uint32_t failures = 0;
  };
  // A waited-for fence of the buffer that ended other than OK: the
  // buffer's `number`th such (the status page's failure count).
  struct Failure {
    uint32_t number = 0;
    uint64_t fence_id = 0;
    v1::FenceStatus status = v1::FENCE_STATUS_UNSPECIFIED;
    std::string message;
    absl::Time signaled_at;
  };
  // Failures kept per buffer (the latest): twice the most fences a buffer
  // can have pending, so one round of all of them failing fits.
  static constexpr size_t kFailuresKept = 256;
  struct Subscription {
    // The buffer's slot in the session's status page (0: the page is full;
    // ask the daemon).
    uint32_t slot = 0;
    // The page, read-only, the first time the session subscribes.
    UniqueFd page;
  };

  // `fences` must outlive this object. Sets the FenceTable's watch hook.
  ReservationTable(FenceTable* fences, ReservationLimits limits);
  ~ReservationTable();
  ReservationTable(const ReservationTable&) = delete;
  ReservationTable& operator=(const ReservationTable&) = delete;

  // Attaches fence `fence_id` (which `session` must hold: NOT_FOUND
  // otherwise) to `buffer` with `usage` (INVALID_ARGUMENT for UNSPECIFIED;
  // RESOURCE_EXHAUSTED at max_fences_per_buffer on the usage's side). A fence
  // signalled already
  // is not kept. Attaching the same fence again with the same usage is a
  // no-op.
  // `added` (if not null) gets the attachment's sequence number, or 0 if
  // nothing was added (a repeat, or a fence signalled meanwhile).
  absl::Status Attach(uint64_t session, uint64_t buffer, uint64_t fence_id, v1::FenceUsage usage,
                      uint64_t* added = nullptr);

  // The unsignalled fences an access to `buffer` waits for: READ (KERNEL +
  // WRITE) or WRITE (KERNEL + WRITE + READ); BOOKKEEP lists every
  // unsignalled fence, whatever its usage. Oldest first, each fence once
  // (attached with several usages: the first).
  // `snapshot` (if not null) gets where the answer stands; `arm` (a
  // subscribed session, or 0) has its slot armed in the same step, so that
  // a waiter told this answer is woken at every change until it is clear.
  absl::StatusOr<std::vector<Attached>> Pending(uint64_t buffer, v1::FenceUsage for_access,
                                                Snapshot* snapshot = nullptr, uint64_t arm = 0);

  // The buffer's failures numbered above `since`, oldest first (at most
  // kFailuresKept: the latest).
  std::vector<Failure> FailuresSince(uint64_t buffer, uint32_t since) const;
  // `session` reads `buffer`'s state in its status page from now on, until
  // the buffer goes, the session lets go of it (Unsubscribe) or the session
  // ends (CloseSession). The page is made at the session's first
  // subscription, and made again if `new_page` (the client never got it).
  // A subscription also arms the slot: the daemon wakes it at the next
  // changes, until the buffer has nothing pending (a waiter always asks
  // before it sleeps, so slots nobody sleeps on cost no syscall).
  absl::StatusOr<Subscription> Subscribe(uint64_t session, uint64_t buffer, bool new_page = false);
  void Unsubscribe(uint64_t session, uint64_t buffer);
  // The session is over: its page and its slots go.
  void CloseSession(uint64_t session);
  // The FenceTable's watch hook, under the FenceTable's lock: an attached
  // fence was signalled. Returns whether a waiter was woken.
  bool OnSignaled(const FenceView& signalled);

  // The buffer is gone: its reservation goes.
  void DropBuffer(uint64_t buffer);
  // One merged fence per buffer, session and access, reused while the same
  // fences are pending (GetBufferFences as an fd, asked every frame, makes
  // no new fence each time): the cached one if it still merges exactly
  // `ids` (sorted) and is pending.
  std::optional<uint64_t> CachedMerge(uint64_t buffer, uint64_t session,
                                      v1::FenceUsage for_access,
                                      const std::vector<uint64_t>& ids);
  void CacheMerge(uint64_t buffer, uint64_t session, v1::FenceUsage for_access,
                  std::vector<uint64_t> ids, uint64_t merged);
  // Takes back one attachment (an attach whose handle went meanwhile): the
  // one Attach numbered `seq`, nobody else's.
  void Detach(uint64_t buffer, uint64_t seq);
  // Unsignalled fences attached to each buffer that has some (for debug
  // views).
  absl::flat_hash_map<uint64_t, std::vector<Attached>> List() const;
  // Those of one buffer (a page of a debug view costs only its buffers).
  std::vector<Attached> AttachedTo(uint64_t buffer) const;
  const ReservationLimits& limits() const { return limits_; }
  // Sessions with a status page (for tests).
  size_t pages() const;


 private:
  struct Reservation {
    std::vector<Attached> attached;
    uint64_t last_seq = 0;
    uint32_t failures = 0;
    std::deque<Failure> failed;  // the latest kFailuresKept
    struct Subscriber {
      uint64_t session = 0;
      uint32_t slot = 0;
      // Woken at changes (see Subscribe).
      bool armed = false;
    };
    absl::InlinedVector<Subscriber, 2> subscribers;
  };
  struct StatusPage {
    Mapping map;
    // Buffer -> slot, and the slots free (1 .. kSlots-1).
    absl::flat_hash_map<uint64_t, uint32_t> slots;
    std::vector<uint32_t> free;
    reservation::Slot& slot(uint32_t index) const {
      return reinterpret_cast<reservation::Slot*>(map.data())[index];
    }
  };

  // Writes the buffer's state into its subscribers' slots and wakes them.
  // Returns whether it woke a waiter.
  bool PublishLocked(uint64_t buffer, Reservation& reservation) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Counts a failure of a waited-for fence and keeps it (the latest
  // kFailuresKept).
  void RecordFailureLocked(Reservation& reservation, uint64_t fence_id, v1::FenceStatus status,
                           std::string message, absl::Time signaled_at)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Erases the buffer's entry if nothing is attached and nobody subscribed.
  void EraseIfUnusedLocked(uint64_t buffer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static absl::StatusOr<StatusPage> NewPage(UniqueFd* read_only);
  // Frees the session's slot for `buffer` (cleared and woken first).
  void UnsubscribeLocked(uint64_t session, StatusPage& page, uint64_t buffer)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The session's page goes: every slot cleared and woken, then unmapped.
  void DropPageLocked(uint64_t session) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  struct Merge {
    std::vector<uint64_t> ids;
    uint64_t merged = 0;
  };
  // Keyed by (buffer, session, access): one each at most.
  using MergeKey = std::tuple<uint64_t, uint64_t, int>;

  FenceTable* const fences_;
  const ReservationLimits limits_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Reservation> buffers_ ABSL_GUARDED_BY(mu_);
  // Fence -> the buffers it was attached to, each with whether a failure of
  // it counts there (not BOOKKEEP only); until its signal.
  absl::flat_hash_map<uint64_t, absl::InlinedVector<std::pair<uint64_t, bool>, 1>> watched_
      ABSL_GUARDED_BY(mu_);
  // Status pages, by session.
  absl::flat_hash_map<uint64_t, StatusPage> pages_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<MergeKey, Merge> merges_ ABSL_GUARDED_BY(mu_);
};

// INVALID_ARGUMENT unless `for_access` is READ, WRITE or BOOKKEEP (every
// fence, for debugging).
absl::Status CheckAccess(v1::FenceUsage for_access);
// Whether an access `for_access` (READ or WRITE) waits for a fence of
// `usage`.
bool AccessWaitsFor(v1::FenceUsage for_access, v1::FenceUsage usage);

}  // namespace bufferd

#endif  // BUFFERD_FENCES_RESERVATIONS_H_
