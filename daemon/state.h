// DaemonState: sessions, buffers, handles, share tokens and quotas.
//
// Everything the daemon knows about who holds what lives here, behind one
// mutex, independent of gRPC and sockets so it can be unit-tested. Heap work
// (memfd creation, prefaulting, carveout refills) never runs under the lock.
//
// Accounting: a session is charged a buffer's size once per buffer it holds at
// least one handle on (per heap); a uid is charged the sum over its sessions.
// Quotas are checked and charged in one critical section, so they hold under
// any concurrency. A buffer is destroyed when its last handle goes; share
// tokens do not keep it alive.
//
// Thread-safe: every public method may be called from any thread.
#ifndef BUFFERD_DAEMON_STATE_H_
#define BUFFERD_DAEMON_STATE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/fd_budget.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "bufferd/v1/buffer.pb.h"
#include "bufferd/v1/config.pb.h"
#include "bufferd/v1/debug.pb.h"
#include "heaps/heap_registry.h"

namespace bufferd {

class DaemonState {
 public:
  struct Options {
    v1::QuotaConfig quotas;
    // Where buffers' fds and the fds granted to clients are counted (must
    // outlive this object and every buffer). Null: a budget of its own with
    // FdBudget's default limits.
    FdBudget* fd_budget = nullptr;
    // Sessions open at once, in total and per uid.
    uint32_t max_sessions = 4096;
    uint32_t max_sessions_per_uid = 1024;
    absl::Duration default_token_ttl = absl::Seconds(30);
    // Where destroyed buffers whose freeing is not cheap (big, or a carveout
    // refill) go: one FIFO thread, never one that allocates (a carveout
    // allocation may wait for a refill). Null: freed on the calling thread.
    std::function<void(std::unique_ptr<HeapBuffer>)> free_later;
  };

  // What a session gets back from Allocate/Import: its handle, and the fd to
  // deliver on fd.sock (its own open file for READ_ONLY access), counted in
  // the fd budget until it is sent.
  struct Grant {
    uint64_t handle = 0;
    uint64_t transfer_id = 0;
    v1::BufferInfo buffer;
    v1::Access access = v1::ACCESS_READ_WRITE;
    LeasedFd fd;
  };

  struct NewSession {
    uint64_t id = 0;
    std::string secret;  // kSessionSecretBytes random bytes
  };

  // `heaps` must outlive this object.
  DaemonState(const HeapRegistry* heaps, Options options);
  ~DaemonState();

  // Per-heap quota overrides (0 = the global value). Call before serving.
  void SetHeapQuotas(const std::string& heap, uint64_t per_session, uint64_t per_uid);

  // Sessions. RESOURCE_EXHAUSTED at Options::max_sessions or
  // max_sessions_per_uid, naming the cap.
  absl::StatusOr<NewSession> OpenSession(const PeerCredentials& peer, std::string comm);
  // Releases every handle of the session (freeing as Release does).
  // Idempotent.
  void CloseSession(uint64_t session_id);
  // Ends the session for calls (they get UNAUTHENTICATED, as after
  // CloseSession) while its handles and accounting stay until CloseSession:
  // for a client whose socket still holds fds it was sent but never read.
  void DetachSession(uint64_t session_id);
  // Checks a session credential (base/protocol.h); UNAUTHENTICATED with a
  // reason otherwise.
  absl::StatusOr<uint64_t> Authenticate(absl::string_view metadata) const;

  // Buffers.
  absl::StatusOr<Grant> Allocate(uint64_t session_id, const v1::AllocateRequest& request);
  // Returns true when the buffer was destroyed. Its bytes are back in the
  // heap's accounting before this returns (HeapBuffer::Retire); its memory is
  // freed here too if that is cheap, else handed to Options::free_later, or,
  // if `expensive_frees` is given, moved there for the caller to free.
  absl::StatusOr<bool> Release(uint64_t session_id, uint64_t handle,
                               std::vector<std::unique_ptr<HeapBuffer>>* expensive_frees = nullptr);
  absl::StatusOr<v1::ExportResponse> Export(uint64_t session_id, const v1::ExportRequest& request);
  absl::StatusOr<Grant> Import(uint64_t session_id, absl::string_view token);
  // Makes a token redeemable again after its Import could not be completed
  // (the fd could not be delivered).
  void UnuseToken(absl::string_view token);
  absl::StatusOr<v1::GetBufferResponse> GetBuffer(uint64_t session_id, uint64_t handle) const;
  // Seals a freezable buffer against all writes (see Allocator.Freeze).
  absl::StatusOr<v1::BufferInfo> Freeze(uint64_t session_id, uint64_t handle);

  // Drops expired tokens and old tombstones.
  void Housekeeping(absl::Time now);

  // Debug views.
  v1::ListHeapsResponse ListHeaps() const;
  std::vector<v1::ClientInfo> ListClients() const;
  v1::ListBuffersResponse ListBuffers(const v1::ListBuffersRequest& request) const;
  std::string Metrics() const;

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
  struct Session {
    uint64_t id = 0;
    PeerCredentials peer;
    std::string comm;
    std::string secret;  // raw bytes
    absl::Time connected;
    // handle ids of this session.
    std::map<uint64_t, uint64_t> handles;  // handle id -> buffer id
    // buffer id -> number of this session's handles on it.
    std::map<uint64_t, int> held;
    // heap -> bytes charged (includes in-flight allocations).
    std::map<std::string, uint64_t> bytes;
    // Allocations charged but not yet committed.
    int pending = 0;
    // DetachSession: no more calls; CloseSession follows.
    bool detached = false;
  };
  struct Token {
    uint64_t buffer = 0;
    v1::Access access = v1::ACCESS_READ_WRITE;
    absl::Time expires;
    uint64_t exporter = 0;
    // Set once redeemed; kept as a tombstone until it would have expired.
    uint64_t used_by = 0;
  };

  // Charges `bytes` of `heap` to the session and its uid, checking quotas.
  absl::Status ChargeLocked(Session& session, const std::string& heap, uint64_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UnchargeLocked(uint64_t session_id, uid_t uid, const std::string& heap, uint64_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds a handle (the session must already be charged for the buffer) and
  // returns the Grant with the fd to deliver.
  absl::StatusOr<Grant> AddHandleLocked(Session& session, Buffer& buffer, v1::Access access)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes a handle; a destroyed buffer is retired and its memory moved to
  // `graveyard` so it is freed after the lock is dropped (see Dispose).
  bool RemoveHandleLocked(uint64_t handle_id, std::vector<std::unique_ptr<HeapBuffer>>& graveyard)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees cheap buffers here and hands the rest to options_.free_later.
  void Dispose(std::vector<std::unique_ptr<HeapBuffer>>& graveyard) ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<Handle*> FindHandleLocked(uint64_t session_id, uint64_t handle_id) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Session*> FindSessionLocked(uint64_t session_id) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Token bookkeeping: every erase goes through EraseTokenLocked so the
  // per-exporter count of unredeemed tokens stays exact.
  std::map<std::string, Token>::iterator EraseTokenLocked(std::map<std::string, Token>::iterator t)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ForgetUnredeemedLocked(uint64_t exporter) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint64_t SessionQuota(const std::string& heap) const;
  uint64_t UidQuota(const std::string& heap) const;

  const HeapRegistry* heaps_;
  const Options options_;
  const std::unique_ptr<FdBudget> own_budget_;
  FdBudget* const budget_;
  // Per-heap quota overrides from the config, by heap name.
  std::map<std::string, std::pair<uint64_t, uint64_t>> heap_quotas_;

  mutable absl::Mutex mu_;
  uint64_t next_session_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_buffer_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_handle_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_transfer_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<uint64_t, std::unique_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  std::map<uid_t, uint32_t> sessions_per_uid_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::unique_ptr<Buffer>> buffers_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, Handle> handles_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Token> tokens_ ABSL_GUARDED_BY(mu_);
  // Exporter session -> its tokens in tokens_ not redeemed (used_by == 0).
  std::map<uint64_t, uint32_t> unredeemed_tokens_ ABSL_GUARDED_BY(mu_);
  // (uid, heap) -> bytes.
  std::map<std::pair<uid_t, std::string>, uint64_t> uid_bytes_ ABSL_GUARDED_BY(mu_);
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_STATE_H_
