// FdBudget: every fd the daemon holds on a client's behalf, counted against
// one limit and a per-uid share of it.
//
// The daemon must never reach EMFILE: gRPC core does not recover from one on
// accept, and any other failure to open is an error a client caused for
// everyone. So every such fd (a live buffer's memfd, a session's fd.sock
// connection, a control.sock connection, an fd waiting in a delivery queue,
// a fence's pipe or imported sync fd) is covered by a Lease taken *before* the fd is
// opened and given back when it is closed. `total` is RLIMIT_NOFILE minus a
// fixed reserve for the daemon's own fds (listeners, epoll, gRPC's internals,
// transient opens), so the leases can never push the process over its limit.
// `per_uid` keeps one uid from taking what other uids need.
//
// Thread-safe. A Lease may be destroyed on any thread; the budget must
// outlive its leases.
#ifndef BUFFERD_BASE_FD_BUDGET_H_
#define BUFFERD_BASE_FD_BUDGET_H_

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/unique_fd.h"

namespace bufferd {

// What a leased fd is for (counted separately for ops and messages).
// What a leased fd is for. kExport: a buffer's fd a share token keeps until
// it is redeemed or expires (the daemon keeps no other fd of a buffer).
// kFencePage: a session's fence page (fences/fence_page.h), one per session
// that creates fences, kept while the session lives.
enum class FdUse { kExport, kSession, kControlConnection, kDelivery, kFence, kFencePage, kCount };

// The uid of leases no uid is charged for (they count in the total, in
// nobody's share); also "no uid known" in views.
inline constexpr uid_t kNoUid = static_cast<uid_t>(-1);
const char* FdUseName(FdUse use);

class FdBudget {
 public:
  struct Limits {
    // fds all leases together may hold.
    uint64_t total = 1 << 16;
    // fds the leases of one uid may hold (0 = `total`).
    uint64_t per_uid = 0;
    // For reports only: the RLIMIT_NOFILE the budget was cut from, and the
    // reserve kept below it for the daemon's own fds.
    uint64_t rlimit_nofile = 0;
    uint64_t reserve = 0;

    // One uid's share as enforced (`per_uid`, or the whole budget).
    uint64_t uid_share() const { return per_uid != 0 ? per_uid : total; }
  };

  // One fd's place in the budget. Move-only; gives the place back when
  // destroyed or Reset().
  class Lease {
   public:
    Lease() = default;
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&& other) noexcept;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { Reset(); }

    bool held() const { return budget_ != nullptr; }
    uid_t uid() const { return uid_; }
    void Reset();

   private:
    friend class FdBudget;
    Lease(FdBudget* budget, FdUse use, uid_t uid) : budget_(budget), use_(use), uid_(uid) {}
    FdBudget* budget_ = nullptr;
    FdUse use_ = FdUse::kExport;
    uid_t uid_ = 0;
  };

  struct Usage {
    uint64_t total = 0;
    std::array<uint64_t, static_cast<size_t>(FdUse::kCount)> by_use{};
    uint64_t of(FdUse use) const { return by_use[static_cast<size_t>(use)]; }
  };

  FdBudget();
  explicit FdBudget(Limits limits);

  // Changes the limits (the daemon sets them once it knows its own fd
  // count); leases already held stay valid even above a lower limit.
  void SetLimits(Limits limits);
  Limits limits() const;

  // A place for one fd of `use` charged to `uid`. RESOURCE_EXHAUSTED naming
  // the budget (daemon-wide or the uid's) and what holds it when full. Before
  // it refuses, it runs the reclaimers (at most every 10 ms) and tries again:
  // so the caller must not hold a lock a reclaimer takes.
  absl::StatusOr<Lease> Acquire(FdUse use, uid_t uid);

  // Adds a reclaimer: a function that returns leases whose fds someone else
  // has already closed but that their holder has not noticed yet (gRPC's
  // closed connections, deliveries the client has read). Called without the
  // budget's lock. Add them before serving.
  void AddReclaimer(std::function<void()> reclaim);
  // Drops every reclaimer (before what they point at goes).
  void ClearReclaimers();

  // OK if `count` more fds charged to `uid` fit now, else the refusal
  // Acquire would give (without running the reclaimers): for a dry run.
  absl::Status CheckRoom(uid_t uid, uint64_t count) const;

  Usage usage() const;
  uint64_t UsedBy(uid_t uid) const;

 private:
  absl::StatusOr<Lease> TryAcquire(FdUse use, uid_t uid);
  absl::Status RoomLocked(uid_t uid, uint64_t count) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void Take(FdUse use, uid_t uid) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Return(FdUse use, uid_t uid);
  void ReturnLocked(FdUse use, uid_t uid) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  Limits limits_ ABSL_GUARDED_BY(mu_);
  Usage usage_ ABSL_GUARDED_BY(mu_);
  std::map<uid_t, uint64_t> by_uid_ ABSL_GUARDED_BY(mu_);
  std::vector<std::function<void()>> reclaimers_ ABSL_GUARDED_BY(mu_);
  absl::Time last_reclaim_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

// An fd together with its place in the budget: closing the fd (destroying
// this) gives the place back.
struct LeasedFd {
  UniqueFd fd;
  FdBudget::Lease lease;
};

}  // namespace bufferd

#endif  // BUFFERD_BASE_FD_BUDGET_H_
