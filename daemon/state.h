// DaemonState: buffers and the handles sessions hold on them.
//
// It orchestrates one Allocate, Import or Release: the quota check and
// charge (QuotaLedger), the share token (ShareTokens), the fd budget, and
// the handle, in critical sections of one mutex, independent of gRPC and
// sockets so it can be unit-tested. Heap work (memfd creation, prefaulting)
// never runs under the lock.
//
// Allocate and Import return a PendingGrant: the new handle and the fd to
// deliver. The caller delivers the fd and then commits; a grant dropped
// uncommitted undoes itself (the handle goes, an import's token is
// redeemable again). Release and CloseSession return what died and free
// nothing themselves: the caller hands the DeadBuffers to the Reaper. A
// buffer is destroyed when its last handle goes; share tokens do not keep
// it alive.
//
// Sessions are SessionTable's (identity, authentication); this class knows
// a session only by id and uid, from AddSession to CloseSession.
//
// Thread-safe: every public method may be called from any thread.
#ifndef BUFFERD_DAEMON_STATE_H_
#define BUFFERD_DAEMON_STATE_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <deque>
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
#include "base/fd_budget.h"
#include "base/lazy.h"
#include "bufferd/v1/buffer.pb.h"
#include "bufferd/v1/config.pb.h"
#include "daemon/log.h"
#include "daemon/process_ref.h"
#include "daemon/quota_ledger.h"
#include "daemon/reaper.h"
#include "daemon/requests.h"
#include "daemon/share_tokens.h"
#include "google/protobuf/arena.h"
#include "heaps/heap_registry.h"

namespace bufferd {

class DaemonState {
 public:
  struct Options {
    v1::QuotaConfig quotas;
    // Usage name -> heaps to try, in order (the config's `usages`).
    std::map<std::string, std::vector<std::string>> usages;
    uint32_t max_buffers_per_call = 64;
    uint32_t max_frame_dimension = 16384;
    // Where buffers' fds and the fds granted to clients are counted (must
    // outlive this object and every buffer). Null: a budget of its own with
    // FdBudget's default limits.
    FdBudget* fd_budget = nullptr;
    absl::Duration default_token_ttl = absl::Seconds(30);
    // Where an undone grant's buffer goes. Null: freed on the undoing thread.
    Reaper* reaper = nullptr;
  };

  // A proto on an answer's arena, which the answer takes without a copy,
  // or on the heap; deleted only in the second case.
  struct UnlessOnArena {
    void operator()(v1::BufferInfo* info) const {
      if (info->GetArena() == nullptr) delete info;
    }
  };
  using InfoPtr = std::unique_ptr<v1::BufferInfo, UnlessOnArena>;
  // What a session gets from Allocate/Import: its handle, and the fd to
  // deliver on fd.sock (its own open file for READ_ONLY access), counted in
  // the fd budget until it is sent.
  struct Grant {
    uint64_t handle = 0;
    uint64_t transfer_id = 0;
    InfoPtr buffer;
    v1::Access access = v1::ACCESS_READ_WRITE;
    LeasedFd fd;
  };

  // A Grant not yet committed: destroyed uncommitted, it undoes the
  // Allocate or Import. Move-only.
  class PendingGrant {
   public:
    PendingGrant(PendingGrant&& other) noexcept;
    PendingGrant& operator=(PendingGrant&&) = delete;
    ~PendingGrant();

    Grant& operator*() { return grant_; }
    Grant* operator->() { return &grant_; }
    // Keeps the handle; returns the grant (its fd, if not moved out yet).
    Grant Commit() &&;

   private:
    friend class DaemonState;
    PendingGrant(DaemonState* state, uint64_t session, Grant grant, std::string token,
                 LeasedFd token_fd = {});
    DaemonState* state_;
    uint64_t session_;
    Grant grant_;
    // The redeemed token of an Import, made redeemable again (with its fd)
    // on undo; the fd closes when the import commits.
    std::string token_;
    LeasedFd token_fd_;
  };

  // A session's holdings, for debug views.
  struct Holdings {
    uint64_t session_id = 0;
    uid_t uid = 0;
    uint32_t handles = 0;
    std::map<std::string, uint64_t> bytes;  // heap -> bytes charged
    // The distinct buffers it has handles on: id -> (heap, size).
    std::map<uint64_t, std::pair<std::string, uint64_t>> buffers;
  };
  // One buffer and who holds it, for debug views.
  struct BufferView {
    v1::BufferInfo info;
    HeapKind kind = HeapKind::kSystem;
    // The memfd's st_dev and st_ino.
    uint64_t dev = 0;
    uint64_t ino = 0;
    // The process whose session allocated it.
    ProcessRef creator;
    struct Holder {
      uint64_t session_id = 0;
      uint64_t handle = 0;
      uid_t uid = 0;
      v1::Access access = v1::ACCESS_READ_WRITE;
    };
    std::vector<Holder> holders;
  };
  // A buffer whose last handle went, remembered for debug views (the most
  // recent kMaxReleasedRemembered): mappings and fds of it may outlive it in
  // any process, and its inode tells them from a look-alike memfd.
  struct ReleasedView {
    uint64_t buffer_id = 0;
    std::string heap;
    std::string name;
    uint64_t size = 0;
    uint64_t dev = 0;
    uint64_t ino = 0;
    absl::Time released;
    ProcessRef creator;
  };
  static constexpr size_t kMaxReleasedRemembered = 4096;
  // A pending share token, without the token string.
  struct TokenView {
    ShareTokens::Token token;
    std::string heap;
    std::string buffer_name;
    uint64_t size = 0;
  };
  struct Totals {
    uint64_t buffers = 0;
    uint64_t handles = 0;
    uint64_t pending_tokens = 0;
  };

  // `heaps` must outlive this object.
  DaemonState(const HeapRegistry* heaps, Options options);
  ~DaemonState();

  // Per-heap quota overrides (0 = the global value). Call before serving.
  // New global quotas (a config reload): buffers held stay, only new
  // allocations and imports meet them.
  void SetQuotas(const v1::QuotaConfig& quotas);
  void SetHeapQuotas(const std::string& heap, uint64_t per_session, uint64_t per_uid);

  // Sessions, by id (SessionTable gives them out), with the process behind
  // each (named in debug views next to what it made).
  void AddSession(uint64_t session_id, uid_t uid, ProcessRef process = {});
  // No new handles for the session (UNAUTHENTICATED); what it holds stays
  // until CloseSession: for a client whose socket still holds fds it was
  // sent but never read.
  void DetachSession(uint64_t session_id);
  // Drops every handle of the session; returns the buffers that died.
  // Idempotent.
  std::vector<DeadBuffer> CloseSession(uint64_t session_id);

  // What AllocateSet made: `count` grants from one heap, and the heaps
  // tried before it with why each could not serve.
  struct Allocation {
    std::vector<PendingGrant> grants;
    std::vector<v1::HeapSkip> skipped;
  };

  // Buffers. AllocateSet makes `count` buffers from the first of the
  // request's heaps that can serve them all, or none: a heap that cannot
  // (full, pool empty, a quota on it, too large) is skipped and said why;
  // when none can, RESOURCE_EXHAUSTED gives every reason.
  absl::StatusOr<Allocation> AllocateSet(uint64_t session_id, const v1::AllocateRequest& request,
                                         uint32_t count);
  // The same in two steps: the request checked and planned (its heaps, its
  // size, its frame's layout, its metadata), then allocated.
  absl::StatusOr<AllocationPlan> Plan(const v1::AllocateRequest& request, uint32_t count) const;
  // `answers`: the arena of the call's response, where the grants' infos
  // are made (null: the heap).
  absl::StatusOr<Allocation> AllocatePlanned(uint64_t session_id, const AllocationPlan& plan,
                                             const v1::AllocateRequest& request,
                                             google::protobuf::Arena* answers = nullptr);
  absl::StatusOr<PendingGrant> Allocate(uint64_t session_id, const v1::AllocateRequest& request);
  // What AllocateSet would do now, allocating nothing. Errors for a bad
  // request are AllocateSet's.
  absl::StatusOr<v1::CanAllocateResponse> CanAllocate(uint64_t session_id,
                                                      const v1::AllocateRequest& request,
                                                      uint32_t count) const;
  // Replaces a buffer's metadata (a read-write holder's; see
  // Allocator.SetMetadata).
  // `expected_generation` set: only if the metadata is still at it.
  absl::StatusOr<v1::BufferInfo> SetMetadata(uint64_t session_id, uint64_t handle,
                                             const v1::FrameMetadata& metadata,
                                             std::optional<uint64_t> expected_generation);
  // Drops a handle; returns the buffer if it died. Its bytes are back in the
  // heap's accounting before this returns (HeapBuffer::Retire).
  // `let_go` (if not null) gets the buffer's id if the session holds no
  // handle on it any more (0 otherwise).
  absl::StatusOr<std::vector<DeadBuffer>> Release(uint64_t session_id, uint64_t handle,
                                                  uint64_t* let_go = nullptr);
  // `fd`: the exporter's own fd of the buffer (uploaded on fd.sock), or
  // why there is none (returned once the handle and access are checked).
  // The token keeps it until it is redeemed or expires (the daemon keeps no
  // fd per buffer). INVALID_ARGUMENT unless it is the buffer's memfd
  // (device, inode and owner) and, for a READ_WRITE export, open read-write.
  absl::StatusOr<v1::ExportResponse> Export(uint64_t session_id, const v1::ExportRequest& request,
                                            absl::StatusOr<UniqueFd> fd);
  absl::StatusOr<PendingGrant> Import(uint64_t session_id, absl::string_view token);
  absl::StatusOr<v1::GetBufferResponse> GetBuffer(uint64_t session_id, uint64_t handle) const;
  // Whether the session holds a handle on buffer `buffer_id`.
  bool Holds(uint64_t session_id, uint64_t buffer_id) const;
  // Seals a freezable buffer against all writes (see Allocator.Freeze),
  // through `fd`: the holder's read-write fd of it, checked as Export's.
  absl::StatusOr<v1::BufferInfo> Freeze(uint64_t session_id, uint64_t handle,
                                        absl::StatusOr<UniqueFd> fd);

  // Forgets share tokens long expired.
  void ExpireTokens(absl::Time now);

  // Views, each taken in one critical section.
  std::vector<Holdings> ListHoldings() const;
  struct BufferQuery {
    std::string heap;         // empty: every heap
    uint64_t session_id = 0;  // 0: held by anyone
    // Buffers with ids above `after`, at most `limit` (0: all), in id order,
    // looking at no more than `scan_limit` buffers (0: no limit) when a
    // filter skips some: a page costs its own buffers, never all of them.
    uint64_t after = 0;
    size_t limit = 0;
    size_t scan_limit = 0;
    // False: BufferView::holders stay empty.
    bool holders = true;
  };
  struct BufferPage {
    std::vector<BufferView> views;
    // Nonzero when more may follow: the `after` of the next page (the last
    // buffer looked at, listed or not).
    uint64_t next_after = 0;
  };
  BufferPage ListBuffers(const BufferQuery& query) const;
  // Released buffers remembered, oldest first; `heap` empty: every heap.
  std::vector<ReleasedView> ListReleased(const std::string& heap) const;
  // Share tokens live and not redeemed, soonest expiry first.
  std::vector<TokenView> ListTokens() const;
  Totals totals() const;

  // Allocations and imports refused since start, by heap and reason
  // (RefusalName: quota, heap_full, pool_empty, too_large, fd_budget,
  // other).
  std::map<std::string, std::map<std::string, uint64_t>> Refusals() const;

  const HeapRegistry& heaps() const { return *heaps_; }
  FdBudget& fd_budget() const { return *budget_; }

 private:
  struct Buffer;
  struct Handle {
    uint64_t id = 0;
    uint64_t session = 0;
    uint64_t buffer = 0;
    v1::Access access = v1::ACCESS_READ_WRITE;
  };
  // By session id (sessions_' key).
  struct Session {
    uid_t uid = 0;
    ProcessRef process;
    struct Holdings {
      std::map<uint64_t, uint64_t> handles;  // handle id -> buffer id
      // buffer id -> number of this session's handles on it.
      std::map<uint64_t, int> held;
    };
    // Made at its first handle: a session that holds nothing costs no
    // allocation for them.
    Lazy<Holdings> holdings;
    // Allocations charged but not yet committed.
    int pending = 0;
    bool detached = false;
    // Refusal reasons already logged for it (bit 1 << Refusal): one line
    // per client and reason.
    uint32_t refusals_logged = 0;
  };

  // Undoes a grant that was never committed.
  void Undo(uint64_t session_id, uint64_t handle, const std::string& token, LeasedFd token_fd);
  // OK if `fd` is `buffer`'s memfd (device, inode and owner uid as the
  // heap made it) and, if `writable`, open read-write; `what` names the
  // call in the error.
  absl::Status CheckUploadLocked(const Buffer& buffer, int fd, bool writable,
                                 absl::string_view what) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // An fd to deliver for `access`, made from `source` (a dup, or for
  // READ_ONLY a new read-only open file), in `uid`'s share of the budget.
  absl::StatusOr<LeasedFd> DeliveryFdLocked(uid_t uid, int source, v1::Access access)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The session's room for `count` more handles (max_buffers_per_session).
  absl::Status CheckBufferCountLocked(uint64_t session_id, const Session& session,
                                      uint32_t count = 1) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Why an allocation or import was refused, for Refusals().
  enum class Refusal { kQuota, kHeapFull, kPoolEmpty, kTooLarge, kFdBudget, kOther };
  // The refusal a heap skip stands for.
  static Refusal RefusalOfSkip(v1::SkipReason skip);
  // AllocateSet on one heap, `rounded` bytes a buffer: the grants, or why
  // not; `skip` is set when the heap could not serve (the next may), and
  // `refused` for a refusal worth counting that is no skip (the buffer
  // quota, the fd budget, the kernel).
  absl::StatusOr<std::vector<PendingGrant>> AllocateOn(uint64_t session_id, Heap& heap,
                                                       uint64_t rounded, const AllocationPlan& plan,
                                                       const v1::AllocateRequest& request,
                                                       google::protobuf::Arena* answers,
                                                       std::optional<v1::SkipReason>* skip,
                                                       std::optional<Refusal>* refused);
  // Counts a refusal on `heap` and logs it: once per session and reason,
  // and within a rate limit per reason across sessions. Never with mu_.
  void CountRefusal(const std::string& heap, Refusal why, uint64_t session_id,
                    const absl::Status& status);
  // Logs, at most once a minute per heap, that a fallback served `buffer`.
  void LogFallback(const Heap& heap, Backing backing, uint64_t size, const std::string& why);
  // A buffer's info as answers carry it (with its frame and metadata),
  // the second into `info` (on its arena, if it has one).
  static v1::BufferInfo InfoOf(const Buffer& buffer);
  static void InfoOf(const Buffer& buffer, v1::BufferInfo& info);
  // Adds a handle (the session must already be charged for the buffer) and
  // returns the Grant with `fd`, the fd to deliver, its info on `answers`.
  Grant AddHandleLocked(uint64_t session_id, Session& session, Buffer& buffer, v1::Access access,
                        LeasedFd fd, google::protobuf::Arena* answers = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes a handle; a buffer that dies is retired and appended to `dead`.
  void RemoveHandleLocked(uint64_t handle_id, std::vector<DeadBuffer>& dead)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Handle*> FindHandleLocked(uint64_t session_id, uint64_t handle_id) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Session*> FindSessionLocked(uint64_t session_id) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const HeapRegistry* heaps_;
  const Options options_;
  const AllocationRules rules_;
  const std::unique_ptr<FdBudget> own_budget_;
  FdBudget* const budget_;

  // Refusal counters and log limiters: never held with mu_.
  mutable absl::Mutex counters_mu_;
  std::map<std::string, std::map<std::string, uint64_t>> refusals_ ABSL_GUARDED_BY(counters_mu_);
  std::map<std::string, std::unique_ptr<LogLimiter>> limiters_ ABSL_GUARDED_BY(counters_mu_);

  mutable absl::Mutex mu_;
  QuotaLedger quotas_ ABSL_GUARDED_BY(mu_);
  // quotas_.quotas().max_allocation_bytes, read before the lock is taken
  // (Allocate's first check); SetQuotas changes both.
  std::atomic<uint64_t> max_allocation_bytes_;
  ShareTokens tokens_ ABSL_GUARDED_BY(mu_);
  uint64_t next_buffer_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_handle_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_transfer_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<uint64_t, Session> sessions_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::unique_ptr<Buffer>> buffers_ ABSL_GUARDED_BY(mu_);
  // The ids of buffers_ by heap (a heap's page of ListBuffers costs its own
  // buffers).
  std::map<const Heap*, std::set<uint64_t>> buffers_by_heap_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, Handle> handles_ ABSL_GUARDED_BY(mu_);
  std::deque<ReleasedView> released_ ABSL_GUARDED_BY(mu_);
};

// Whether a hole punched in a buffer of this heap kind and backing hurts its
// other holders: a hugetlb page refaults only if the pool has one (else
// SIGBUS), and a carveout's page goes back to the system behind its
// accounting. Base pages elsewhere refault as zeros.
bool PunchMayHurtOthers(HeapKind kind, v1::Backing backing);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_STATE_H_
