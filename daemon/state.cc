#include "daemon/state.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <set>
#include <utility>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/errno_status.h"
#include "daemon/proto_convert.h"
#include "daemon/requests.h"

namespace bufferd {

struct DaemonState::Buffer {
  Heap* heap = nullptr;
  // Its identity and page work; no fd past the creator's grant.
  std::unique_ptr<HeapBuffer> memory;
  // Without the frame and metadata: kept below as values, and added to
  // every answer by InfoOf (protos of them would cost allocations a frame
  // Allocate cannot spare).
  v1::BufferInfo info;
  std::optional<FrameFormat> frame;
  std::optional<KeptMetadata> metadata;
  // Its handles (views list a page's holders from here); one, mostly.
  absl::InlinedVector<uint64_t, 1> handles;
  // Who made it (for debug views).
  ProcessRef creator;
};

namespace {

// Hands buffers that died outside Release/CloseSession (an undone grant, a
// session that ended mid-Allocate) to the reaper, or frees them here.
void Discard(Reaper* reaper, std::vector<DeadBuffer> dead) {
  if (reaper != nullptr && !dead.empty()) reaper->Free(std::move(dead));
}

// Why a heap's RESOURCE_EXHAUSTED skipped it.
v1::SkipReason SkipReasonOf(const absl::Status& refused) {
  switch (RefusalOf(refused)) {
    case HeapRefusal::kPoolEmpty:
      return v1::SKIP_REASON_POOL_EMPTY;
    case HeapRefusal::kTooLarge:
      return v1::SKIP_REASON_TOO_LARGE;
    default:
      return v1::SKIP_REASON_HEAP_FULL;
  }
}

v1::HeapSkip MakeSkip(const Heap& heap, v1::SkipReason reason, const absl::Status& why) {
  v1::HeapSkip skip;
  skip.set_heap(heap.name());
  skip.set_reason(reason);
  skip.set_message(std::string(why.message()));
  return skip;
}

// "no heap could serve 3 x 8 MiB: <why>; <why>".
std::string NoHeapMessage(const AllocationPlan& plan, const std::vector<v1::HeapSkip>& skipped) {
  std::vector<std::string> reasons;
  for (const v1::HeapSkip& skip : skipped) reasons.push_back(skip.message());
  return absl::StrCat("no heap could serve ",
                      plan.count == 1 ? "" : absl::StrCat(plan.count, " x "),
                      FormatBytes(plan.size), ": ", absl::StrJoin(reasons, "; "));
}

}  // namespace

namespace {

absl::string_view RefusalName(int why) {
  static constexpr absl::string_view kNames[] = {"quota",     "heap_full", "pool_empty",
                                                 "too_large", "fd_budget", "other"};
  return kNames[why];
}

}  // namespace

DaemonState::Refusal DaemonState::RefusalOfSkip(v1::SkipReason skip) {
  switch (skip) {
    case v1::SKIP_REASON_QUOTA:
      return Refusal::kQuota;
    case v1::SKIP_REASON_POOL_EMPTY:
      return Refusal::kPoolEmpty;
    case v1::SKIP_REASON_TOO_LARGE:
      return Refusal::kTooLarge;
    default:
      return Refusal::kHeapFull;
  }
}

std::map<std::string, std::map<std::string, uint64_t>> DaemonState::Refusals() const {
  absl::MutexLock lock(&counters_mu_);
  return refusals_;
}

void DaemonState::CountRefusal(const std::string& heap, Refusal why, uint64_t session_id,
                               const absl::Status& status) {
  const absl::string_view reason = RefusalName(static_cast<int>(why));
  bool first = false;
  {
    absl::MutexLock lock(&mu_);
    if (auto s = sessions_.find(session_id); s != sessions_.end()) {
      const uint32_t bit = 1u << static_cast<int>(why);
      first = (s->second.refusals_logged & bit) == 0;
      s->second.refusals_logged |= bit;
    }
  }
  LogLimiter* limiter;
  {
    absl::MutexLock lock(&counters_mu_);
    ++refusals_[heap][std::string(reason)];
    std::unique_ptr<LogLimiter>& slot = limiters_[absl::StrCat("refused:", reason)];
    if (slot == nullptr) slot = std::make_unique<LogLimiter>(5, absl::Seconds(10));
    limiter = slot.get();  // never erased
  }
  if (!first) return;  // said once for this client already
  LogLimited(*limiter, spdlog::level::info, "session {}: allocation on heap '{}' refused ({}): {}",
             session_id, heap, std::string(reason), std::string(status.message()));
}

void DaemonState::LogFallback(const Heap& heap, Backing backing, uint64_t size,
                              const std::string& why) {
  LogLimiter* limiter;
  {
    absl::MutexLock lock(&counters_mu_);
    std::unique_ptr<LogLimiter>& slot = limiters_[absl::StrCat("fallback:", heap.name())];
    if (slot == nullptr) slot = std::make_unique<LogLimiter>(1, absl::Minutes(1));
    limiter = slot.get();
  }
  LogLimited(*limiter, spdlog::level::warn,
             "heap '{}' fell back to {} for a {} buffer: {} (`bufctl heaps` shows the heap's "
             "backing mix and fallback count)",
             heap.name(), std::string(BackingName(backing)), FormatBytes(size), why);
}

bool PunchMayHurtOthers(HeapKind kind, v1::Backing backing) {
  return kind == HeapKind::kCarveout || backing == v1::BACKING_HUGETLB_2M ||
         backing == v1::BACKING_HUGETLB_1G;
}

DaemonState::PendingGrant::PendingGrant(DaemonState* state, uint64_t session, Grant grant,
                                        std::string token, LeasedFd token_fd)
    : state_(state),
      session_(session),
      grant_(std::move(grant)),
      token_(std::move(token)),
      token_fd_(std::move(token_fd)) {}

DaemonState::PendingGrant::PendingGrant(PendingGrant&& other) noexcept
    : state_(std::exchange(other.state_, nullptr)),
      session_(other.session_),
      grant_(std::move(other.grant_)),
      token_(std::move(other.token_)),
      token_fd_(std::move(other.token_fd_)) {}

DaemonState::PendingGrant::~PendingGrant() {
  if (state_ != nullptr) state_->Undo(session_, grant_.handle, token_, std::move(token_fd_));
}

DaemonState::Grant DaemonState::PendingGrant::Commit() && {
  state_ = nullptr;
  return std::move(grant_);
}

DaemonState::DaemonState(const HeapRegistry* heaps, Options options)
    : heaps_(heaps),
      options_(std::move(options)),
      rules_{options_.quotas, options_.usages, options_.max_buffers_per_call,
             options_.max_frame_dimension},
      own_budget_(options_.fd_budget == nullptr ? std::make_unique<FdBudget>() : nullptr),
      budget_(options_.fd_budget != nullptr ? options_.fd_budget : own_budget_.get()),
      quotas_(options_.quotas),
      max_allocation_bytes_(options_.quotas.max_allocation_bytes()) {}

DaemonState::~DaemonState() {
  std::map<uint64_t, std::unique_ptr<Buffer>> buffers;
  absl::MutexLock lock(&mu_);
  buffers.swap(buffers_);  // freed once the lock is dropped
}

void DaemonState::SetQuotas(const v1::QuotaConfig& quotas) {
  absl::MutexLock lock(&mu_);
  quotas_.SetQuotas(quotas);
  max_allocation_bytes_.store(quotas.max_allocation_bytes(), std::memory_order_relaxed);
}

void DaemonState::SetHeapQuotas(const std::string& heap, uint64_t per_session, uint64_t per_uid) {
  absl::MutexLock lock(&mu_);
  quotas_.SetHeapQuotas(heap, per_session, per_uid);
}

void DaemonState::AddSession(uint64_t session_id, uid_t uid, ProcessRef process) {
  absl::MutexLock lock(&mu_);
  Session& session = sessions_[session_id];
  session.uid = uid;
  session.process = std::move(process);
}

void DaemonState::DetachSession(uint64_t session_id) {
  absl::MutexLock lock(&mu_);
  if (auto it = sessions_.find(session_id); it != sessions_.end()) it->second.detached = true;
}

std::vector<DeadBuffer> DaemonState::CloseSession(uint64_t session_id) {
  std::vector<DeadBuffer> dead;
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(session_id);
  if (it == sessions_.end()) return dead;
  while (!it->second.holdings.Read().handles.empty()) {
    RemoveHandleLocked(it->second.holdings.Read().handles.begin()->first, dead);
  }
  // What is left is charged by in-flight Allocates; they uncharge the uid
  // themselves when they find the session gone.
  quotas_.ForgetSession(session_id);
  sessions_.erase(it);
  return dead;
}

absl::StatusOr<DaemonState::Session*> DaemonState::FindSessionLocked(uint64_t session_id) const {
  auto it = sessions_.find(session_id);
  if (it == sessions_.end() || it->second.detached) {
    return absl::UnauthenticatedError(absl::StrCat("session ", session_id, " has ended"));
  }
  return const_cast<Session*>(&it->second);
}

absl::Status DaemonState::CheckBufferCountLocked(uint64_t session_id, const Session& session,
                                                 uint32_t count) const {
  const uint32_t max_buffers = quotas_.quotas().max_buffers_per_session();
  if (max_buffers != 0 &&
      session.holdings.Read().handles.size() + session.pending + count > max_buffers) {
    return absl::ResourceExhaustedError(
        absl::StrCat("quota max_buffers_per_session: session ", session_id, " holds ",
                     session.holdings.Read().handles.size(), " handles (max ", max_buffers, ")",
                     count == 1 ? "" : absl::StrCat(", asked for ", count)));
  }
  return absl::OkStatus();
}

absl::StatusOr<LeasedFd> DaemonState::DeliveryFdLocked(uid_t uid, int source, v1::Access access) {
  // The fd to deliver is the daemon's until the client has it.
  ASSIGN_OR_RETURN(FdBudget::Lease lease, budget_->Acquire(FdUse::kDelivery, uid));
  UniqueFd fd;
  if (access == v1::ACCESS_READ_ONLY) {
    // A new open file description, O_RDONLY: the holder cannot map it writable.
    std::string path = absl::StrCat("/proc/self/fd/", source);
    fd.Reset(RetryOnEintr([&] { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC); }));
    if (!fd.valid()) return ErrnoError("reopen buffer read-only", errno);
  } else {
    ASSIGN_OR_RETURN(fd, DuplicateFd(source));
  }
  return LeasedFd{std::move(fd), std::move(lease)};
}

v1::BufferInfo DaemonState::InfoOf(const Buffer& buffer) {
  v1::BufferInfo info;
  InfoOf(buffer, info);
  return info;
}

void DaemonState::InfoOf(const Buffer& buffer, v1::BufferInfo& info) {
  info = buffer.info;
  if (buffer.frame.has_value()) FillProto(*buffer.frame, *info.mutable_frame());
  if (buffer.metadata.has_value()) buffer.metadata->FillProto(*info.mutable_metadata());
}

DaemonState::Grant DaemonState::AddHandleLocked(uint64_t session_id, Session& session,
                                                Buffer& buffer, v1::Access access, LeasedFd fd,
                                                google::protobuf::Arena* answers) {
  Grant grant;
  grant.handle = next_handle_id_++;
  grant.transfer_id = next_transfer_id_++;
  grant.buffer.reset(google::protobuf::Arena::CreateMessage<v1::BufferInfo>(answers));
  InfoOf(buffer, *grant.buffer);
  grant.access = access;
  grant.fd = std::move(fd);
  handles_[grant.handle] = Handle{grant.handle, session_id, buffer.info.buffer_id(), access};
  Session::Holdings& holdings = session.holdings.Use();
  holdings.handles[grant.handle] = buffer.info.buffer_id();
  ++holdings.held[buffer.info.buffer_id()];
  buffer.handles.push_back(grant.handle);
  return grant;
}

void DaemonState::RemoveHandleLocked(uint64_t handle_id, std::vector<DeadBuffer>& dead) {
  auto h = handles_.find(handle_id);
  if (h == handles_.end()) return;
  const Handle handle = h->second;
  handles_.erase(h);
  auto b = buffers_.find(handle.buffer);
  Buffer& buffer = *b->second;
  if (auto s = sessions_.find(handle.session); s != sessions_.end()) {
    Session& session = s->second;
    Session::Holdings& holdings = session.holdings.Use();
    holdings.handles.erase(handle_id);
    if (--holdings.held[handle.buffer] == 0) {
      holdings.held.erase(handle.buffer);
      quotas_.Uncharge(handle.session, session.uid, buffer.info.heap(), buffer.info.size());
    }
  }
  buffer.handles.erase(std::find(buffer.handles.begin(), buffer.handles.end(), handle_id));
  if (!buffer.handles.empty()) return;
  // Its tokens' fds close with it (on the reaper's thread if its pages are
  // worth it): a token never keeps a buffer alive.
  std::vector<LeasedFd> token_fds = tokens_.ForgetBuffer(handle.buffer);
  released_.push_back(ReleasedView{handle.buffer, buffer.info.heap(), buffer.info.name(),
                                   buffer.info.size(), buffer.memory->dev(), buffer.memory->ino(),
                                   absl::Now(), buffer.creator});
  if (released_.size() > kMaxReleasedRemembered) released_.pop_front();
  buffer.memory->Retire();  // the next Allocate sees the bytes free
  dead.push_back(DeadBuffer{std::move(buffer.memory), handle.buffer, std::move(token_fds)});
  if (auto h = buffers_by_heap_.find(buffer.heap); h != buffers_by_heap_.end()) {
    h->second.erase(handle.buffer);
  }
  buffers_.erase(b);
}

absl::StatusOr<DaemonState::Handle*> DaemonState::FindHandleLocked(uint64_t session_id,
                                                                   uint64_t handle_id) const {
  auto it = handles_.find(handle_id);
  if (it == handles_.end()) {
    if (handle_id != 0 && handle_id < next_handle_id_) {
      return absl::NotFoundError(
          absl::StrCat("handle ", handle_id, " is not live (already released)"));
    }
    return absl::NotFoundError(absl::StrCat("no handle ", handle_id));
  }
  if (it->second.session != session_id) {
    return absl::PermissionDeniedError(
        absl::StrCat("handle ", handle_id, " belongs to another session"));
  }
  return const_cast<Handle*>(&it->second);
}

absl::StatusOr<DaemonState::PendingGrant> DaemonState::Allocate(
    uint64_t session_id, const v1::AllocateRequest& request) {
  ASSIGN_OR_RETURN(Allocation allocation, AllocateSet(session_id, request, 1));
  return std::move(allocation.grants.front());
}

absl::StatusOr<AllocationPlan> DaemonState::Plan(const v1::AllocateRequest& request,
                                                 uint32_t count) const {
  return CheckAllocateRequest(*heaps_, rules_, request, count);
}

absl::StatusOr<DaemonState::Allocation> DaemonState::AllocateSet(uint64_t session_id,
                                                                 const v1::AllocateRequest& request,
                                                                 uint32_t count) {
  ASSIGN_OR_RETURN(const AllocationPlan plan, Plan(request, count));
  return AllocatePlanned(session_id, plan, request);
}

absl::StatusOr<DaemonState::Allocation> DaemonState::AllocatePlanned(
    uint64_t session_id, const AllocationPlan& plan, const v1::AllocateRequest& request,
    google::protobuf::Arena* answers) {
  Allocation allocation;
  std::vector<absl::Status> refusals;
  const uint64_t max_allocation = max_allocation_bytes_.load(std::memory_order_relaxed);
  for (Heap* heap : plan.heaps) {
    std::optional<v1::SkipReason> skip;
    std::optional<Refusal> refused;
    absl::StatusOr<std::vector<PendingGrant>> grants = [&] {
      absl::StatusOr<uint64_t> rounded = RoundForHeap(*heap, max_allocation, plan.size, plan.count);
      if (!rounded.ok()) {
        skip = v1::SKIP_REASON_TOO_LARGE;
        return absl::StatusOr<std::vector<PendingGrant>>(rounded.status());
      }
      return AllocateOn(session_id, *heap, *rounded, plan, request, answers, &skip, &refused);
    }();
    if (!refused.has_value() && skip.has_value()) refused = RefusalOfSkip(*skip);
    if (!grants.ok() && refused.has_value()) {
      CountRefusal(heap->name(), *refused, session_id, grants.status());
    }
    if (grants.ok()) {
      allocation.grants = *std::move(grants);
      return allocation;
    }
    if (!skip.has_value()) return grants.status();
    allocation.skipped.push_back(MakeSkip(*heap, *skip, grants.status()));
    refusals.push_back(grants.status());
  }
  // A single heap's refusal stands as it is.
  if (refusals.size() == 1) return refusals.front();
  return absl::ResourceExhaustedError(NoHeapMessage(plan, allocation.skipped));
}

absl::StatusOr<std::vector<DaemonState::PendingGrant>> DaemonState::AllocateOn(
    uint64_t session_id, Heap& heap, uint64_t rounded, const AllocationPlan& plan,
    const v1::AllocateRequest& request, google::protobuf::Arena* answers,
    std::optional<v1::SkipReason>* skip, std::optional<Refusal>* refused) {
  const uint32_t count = plan.count;
  const uint64_t total = rounded * count;
  // Whether the heap could hold them all, asked before any is made: a set
  // that cannot fit is refused without punching, prefaulting and undoing
  // the part that would. The pool's answer is only advice (the heap may
  // wait for buffers being freed): the allocation itself decides that.
  const absl::Status room = heap.CheckAllocate(plan.size, count);
  const HeapRefusal refusal = RefusalOf(room);
  if (refusal == HeapRefusal::kTooLarge) {
    *skip = v1::SKIP_REASON_TOO_LARGE;
    return room;
  }
  uid_t uid;
  // The places of the fds going to the creator, until they are sent.
  std::vector<FdBudget::Lease> fd_leases;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, FindSessionLocked(session_id));
    if (absl::Status status = CheckBufferCountLocked(session_id, *session, count); !status.ok()) {
      *refused = Refusal::kQuota;
      return status;
    }
    if (absl::Status quota = quotas_.Check(session_id, session->uid, heap.name(), total);
        !quota.ok()) {
      *skip = v1::SKIP_REASON_QUOTA;
      return quota;
    }
    if (refusal == HeapRefusal::kFull) {
      *skip = v1::SKIP_REASON_HEAP_FULL;
      return room;
    }
    for (uint32_t i = 0; i < count; ++i) {
      absl::StatusOr<FdBudget::Lease> lease = budget_->Acquire(FdUse::kDelivery, session->uid);
      if (!lease.ok()) {
        *refused = Refusal::kFdBudget;
        return lease.status();
      }
      fd_leases.push_back(*std::move(lease));
    }
    // Checked above, in this critical section: it cannot fail.
    RETURN_IF_ERROR(quotas_.Charge(session_id, session->uid, heap.name(), total));
    session->pending += static_cast<int>(count);
    uid = session->uid;
  }

  std::vector<std::unique_ptr<HeapBuffer>> memories;
  absl::Status failed;
  for (uint32_t i = 0; i < count && failed.ok(); ++i) {
    absl::StatusOr<std::unique_ptr<HeapBuffer>> memory = heap.Allocate(plan.size, request.name());
    // No holder may add seals (say F_SEAL_WRITE, freezing everyone else's
    // writes) unless it was asked for.
    if (memory.ok() && !request.freezable() &&
        ::fcntl((*memory)->fd(), F_ADD_SEALS, F_SEAL_SEAL) != 0) {
      memory = ErrnoError("fcntl(F_ADD_SEALS, F_SEAL_SEAL)", errno);
    }
    if (memory.ok()) {
      memories.push_back(*std::move(memory));
    } else {
      failed = memory.status();
    }
  }

  // The first buffer a fallback served, for the log (the buffers move on
  // before it is written).
  Backing fell_back_backing = Backing::kBasePages;
  uint64_t fell_back_size = 0;
  std::string fell_back_why;
  for (const auto& memory : memories) {
    if (memory->fell_back_because().empty()) continue;
    fell_back_backing = memory->backing();
    fell_back_size = memory->size();
    fell_back_why = memory->fell_back_because();
    break;
  }

  std::vector<DeadBuffer> dead;
  // Buffers not (yet) owned by a handle: retired, and their charge given
  // back, if the allocation does not go through.
  auto discard = [&](size_t from) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (size_t i = from; i < memories.size(); ++i) {
      memories[i]->Retire();  // its bytes are free for the next Allocate at once
      dead.push_back(DeadBuffer{std::move(memories[i])});
    }
  };
  absl::StatusOr<std::vector<Grant>> made = [&]() -> absl::StatusOr<std::vector<Grant>> {
    absl::MutexLock lock(&mu_);
    auto s = sessions_.find(session_id);
    Session* session = s == sessions_.end() ? nullptr : &s->second;
    if (session != nullptr) session->pending -= static_cast<int>(count);
    if (!failed.ok() || session == nullptr) {
      quotas_.Uncharge(session_id, uid, heap.name(), total);
      discard(0);
      if (!failed.ok()) {
        // The heap could not serve: the next one may.
        if (failed.code() == absl::StatusCode::kResourceExhausted) {
          *skip = SkipReasonOf(failed);
        } else {
          *refused = Refusal::kOther;
        }
        return failed;
      }
      return absl::AbortedError(absl::StrCat("session ", session_id, " ended during Allocate"));
    }
    std::vector<Grant> grants;
    const absl::Time now = absl::Now();
    for (size_t i = 0; i < memories.size(); ++i) {
      const uint64_t size = memories[i]->size();
      auto buffer = std::make_unique<Buffer>();
      buffer->heap = &heap;
      buffer->memory = std::move(memories[i]);
      buffer->creator = session->process;
      v1::BufferInfo& info = buffer->info;
      info.set_buffer_id(next_buffer_id_++);
      info.set_heap(heap.name());
      info.set_size(size);
      info.set_requested_size(plan.size);
      info.set_backing(ToProto(buffer->memory->backing()));
      info.set_name(request.name());
      info.set_freezable(request.freezable());
      info.set_creator_session(session_id);
      *info.mutable_created_at() = ToProto(now);
      // A caller that lays the frame out itself is not sent it: set after
      // the grant's copy of the info (AllocateRequest.caller_lays_out_frame).
      const bool frame_in_answer = !request.caller_lays_out_frame();
      if (frame_in_answer) buffer->frame = plan.frame;
      Buffer& ref = *buffer;
      buffers_[info.buffer_id()] = std::move(buffer);
      buffers_by_heap_[&heap].insert(info.buffer_id());
      // A fallback with a smaller page than the heap's (1 GiB pages -> base
      // pages): the quota keeps only what the buffer really holds.
      if (size < rounded) quotas_.Uncharge(session_id, uid, heap.name(), rounded - size);
      // The creator gets the daemon's own fd: from here on the daemon
      // keeps none (an Export brings one back, for its token).
      LeasedFd fd{ref.memory->TakeFd(), std::move(fd_leases[i])};
      grants.push_back(AddHandleLocked(session_id, *session, ref, v1::ACCESS_READ_WRITE,
                                       std::move(fd), answers));
      // After the grant's copy of the info: the creator sent the metadata
      // and is not sent it back (AllocateResponse.buffer).
      if (!frame_in_answer) ref.frame = plan.frame;
      ref.metadata = plan.metadata;
    }
    return grants;
  }();
  Discard(options_.reaper, std::move(dead));
  if (!made.ok()) return made.status();
  if (!fell_back_why.empty()) LogFallback(heap, fell_back_backing, fell_back_size, fell_back_why);
  std::vector<PendingGrant> pending;
  pending.reserve(made->size());
  for (Grant& grant : *made)
    pending.push_back(PendingGrant(this, session_id, std::move(grant), ""));
  return pending;
}

absl::StatusOr<v1::CanAllocateResponse> DaemonState::CanAllocate(uint64_t session_id,
                                                                 const v1::AllocateRequest& request,
                                                                 uint32_t count) const {
  ASSIGN_OR_RETURN(const AllocationPlan plan,
                   CheckAllocateRequest(*heaps_, rules_, request, count));
  v1::CanAllocateResponse response;
  if (plan.frame.has_value()) *response.mutable_frame() = ToProto(*plan.frame);
  const uint64_t max_allocation = max_allocation_bytes_.load(std::memory_order_relaxed);
  for (Heap* heap : plan.heaps) {
    std::optional<v1::SkipReason> skip;
    absl::StatusOr<uint64_t> rounded = RoundForHeap(*heap, max_allocation, plan.size, plan.count);
    absl::Status status = rounded.status();
    uid_t uid = kNoUid;
    if (!rounded.ok()) {
      skip = v1::SKIP_REASON_TOO_LARGE;
    } else {
      // As AllocateSet: a heap too small at all, then the quota, then room,
      // then the fds' places.
      const absl::Status room = heap->CheckAllocate(plan.size, count);
      if (!room.ok() && room.code() != absl::StatusCode::kResourceExhausted) return room;
      if (RefusalOf(room) == HeapRefusal::kTooLarge) {
        status = room;
      } else {
        absl::MutexLock lock(&mu_);
        ASSIGN_OR_RETURN(Session * session, FindSessionLocked(session_id));
        if (absl::Status handles = CheckBufferCountLocked(session_id, *session, count);
            !handles.ok()) {
          response.set_message(std::string(handles.message()));
          return response;
        }
        uid = session->uid;
        status = quotas_.Check(session_id, session->uid, heap->name(), *rounded * count);
        if (!status.ok()) {
          skip = v1::SKIP_REASON_QUOTA;
        } else {
          status = room;
        }
      }
      if (!skip.has_value() && !status.ok()) skip = SkipReasonOf(status);
    }
    if (!skip.has_value()) {
      // No place for the fds: AllocateSet stops there, on any heap.
      if (absl::Status fds = budget_->CheckRoom(uid, count); !fds.ok()) {
        response.set_message(std::string(fds.message()));
        return response;
      }
      response.set_ok(true);
      response.set_heap(heap->name());
      response.set_size(*rounded);
      return response;
    }
    *response.add_skipped() = MakeSkip(*heap, *skip, status);
  }
  response.set_message(
      response.skipped_size() == 1
          ? response.skipped(0).message()
          : NoHeapMessage(plan, {response.skipped().begin(), response.skipped().end()}));
  return response;
}

absl::StatusOr<v1::BufferInfo> DaemonState::SetMetadata(
    uint64_t session_id, uint64_t handle_id, const v1::FrameMetadata& metadata,
    std::optional<uint64_t> expected_generation) {
  if (metadata.generation() != 0) {
    return absl::InvalidArgumentError(
        "metadata.generation is the daemon's to set; guard a change with expected_generation");
  }
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(FindSessionLocked(session_id).status());
  ASSIGN_OR_RETURN(Handle * handle, FindHandleLocked(session_id, handle_id));
  Buffer& buffer = *buffers_.at(handle->buffer);
  if (handle->access != v1::ACCESS_READ_WRITE) {
    return absl::PermissionDeniedError(absl::StrCat(
        "handle ", handle_id, " is read-only; only a read-write holder may change metadata"));
  }
  RETURN_IF_ERROR(
      CheckMetadata(metadata, buffer.frame.has_value() ? &*buffer.frame : nullptr, "metadata"));
  const uint64_t generation = buffer.metadata.has_value() ? buffer.metadata->generation : 0;
  if (expected_generation.has_value() && *expected_generation != generation) {
    return absl::FailedPreconditionError(
        absl::StrCat("expected_generation ", *expected_generation, " is not current: buffer ",
                     buffer.info.buffer_id(), "'s metadata is at generation ", generation,
                     "; read it again and retry"));
  }
  buffer.metadata = KeptMetadata::Of(metadata);
  buffer.metadata->generation = generation + 1;
  return InfoOf(buffer);
}

absl::StatusOr<std::vector<DeadBuffer>> DaemonState::Release(uint64_t session_id, uint64_t handle,
                                                             uint64_t* let_go) {
  if (let_go != nullptr) *let_go = 0;
  std::vector<DeadBuffer> dead;
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, FindSessionLocked(session_id));
  ASSIGN_OR_RETURN(Handle * found, FindHandleLocked(session_id, handle));
  const uint64_t buffer = found->buffer;
  RemoveHandleLocked(handle, dead);
  if (let_go != nullptr && !session->holdings.Read().held.contains(buffer)) *let_go = buffer;
  return dead;
}

void DaemonState::Undo(uint64_t session_id, uint64_t handle, const std::string& token,
                       LeasedFd token_fd) {
  std::vector<DeadBuffer> dead;
  {
    absl::MutexLock lock(&mu_);
    // The token first: if this handle was the buffer's last, the buffer's
    // death forgets the token (and closes its fd) as always.
    if (!token.empty()) tokens_.Unredeem(token, std::move(token_fd));  // the importer may retry
    auto h = handles_.find(handle);
    // Gone already if the session ended meanwhile.
    if (h != handles_.end() && h->second.session == session_id) RemoveHandleLocked(handle, dead);
  }
  Discard(options_.reaper, std::move(dead));
}

absl::Status DaemonState::CheckUploadLocked(const Buffer& buffer, int fd, bool writable,
                                            absl::string_view what) const {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return ErrnoError("fstat of the uploaded fd", errno);
  const HeapBuffer& memory = *buffer.memory;
  if (st.st_dev != memory.dev() || st.st_ino != memory.ino() || st.st_uid != memory.uid() ||
      static_cast<uint64_t>(st.st_size) != memory.file_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the fd uploaded for ", what, " is not buffer ", buffer.info.buffer_id(),
        "'s memfd (it is ", S_ISREG(st.st_mode) ? "another file" : "not a regular file",
        "); upload this Buffer's own fd()"));
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return ErrnoError("fcntl(F_GETFL) of the uploaded fd", errno);
  if (writable && (flags & O_ACCMODE) != O_RDWR) {
    return absl::InvalidArgumentError(absl::StrCat("the fd uploaded for ", what, " of buffer ",
                                                   buffer.info.buffer_id(),
                                                   " is not open read-write; upload the "
                                                   "read-write holder's fd()"));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::ExportResponse> DaemonState::Export(uint64_t session_id,
                                                       const v1::ExportRequest& request,
                                                       absl::StatusOr<UniqueFd> fd) {
  ASSIGN_OR_RETURN(const absl::Duration ttl,
                   CheckExportTtl(request, options_.default_token_ttl, ShareTokens::kMaxTtl));
  // A refusal at the fd budget is counted and logged once the lock is
  // dropped.
  std::string refused_heap;
  absl::StatusOr<v1::ExportResponse> exported = [&]() -> absl::StatusOr<v1::ExportResponse> {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * exporter, FindSessionLocked(session_id));
    ASSIGN_OR_RETURN(Handle * handle, FindHandleLocked(session_id, request.handle()));
    v1::Access access =
        request.access() == v1::ACCESS_UNSPECIFIED ? handle->access : request.access();
    if (access != v1::ACCESS_READ_ONLY && access != v1::ACCESS_READ_WRITE) {
      return absl::InvalidArgumentError(absl::StrCat("unknown access ", request.access()));
    }
    if (handle->access == v1::ACCESS_READ_ONLY && access == v1::ACCESS_READ_WRITE) {
      return absl::PermissionDeniedError(absl::StrCat(
          "handle ", request.handle(), " is read-only; it cannot be exported read-write"));
    }
    const Buffer& buffer = *buffers_.at(handle->buffer);
    if (access == v1::ACCESS_READ_WRITE &&
        PunchMayHurtOthers(buffer.heap->kind(), buffer.info.backing()) &&
        !request.accept_sigbus_risk()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "buffer ", buffer.info.buffer_id(), " is ",
          buffer.heap->kind() == HeapKind::kCarveout
              ? absl::StrCat("carved from carveout '", buffer.info.heap(), "'")
              : absl::StrCat(BackingName(buffer.memory->backing()), "-backed"),
          ": a read-write importer could punch holes in it and make its other holders SIGBUS (or "
          "hand its pages back behind the heap's accounting); export it READ_ONLY, or set "
          "accept_sigbus_risk for an importer you trust"));
    }
    if (!fd.ok()) return fd.status();
    RETURN_IF_ERROR(CheckUploadLocked(
        buffer, fd->get(), access == v1::ACCESS_READ_WRITE,
        access == v1::ACCESS_READ_WRITE ? "a read-write export" : "a read-only export"));
    // The token keeps the fd until it is redeemed or expires, in the
    // exporter's share of the fd budget.
    absl::StatusOr<FdBudget::Lease> lease = budget_->Acquire(FdUse::kExport, exporter->uid);
    if (!lease.ok()) {
      refused_heap = buffer.info.heap();
      return lease.status();
    }
    const absl::Time expires = absl::Now() + ttl;
    ASSIGN_OR_RETURN(std::string token, tokens_.Create(session_id, handle->buffer, access, expires,
                                                       LeasedFd{*std::move(fd), *std::move(lease)},
                                                       exporter->process));
    v1::ExportResponse response;
    response.set_token(std::move(token));
    *response.mutable_expires_at() = ToProto(expires);
    return response;
  }();
  if (!exported.ok() && !refused_heap.empty()) {
    CountRefusal(refused_heap, Refusal::kFdBudget, session_id, exported.status());
  }
  return exported;
}

absl::StatusOr<DaemonState::PendingGrant> DaemonState::Import(uint64_t session_id,
                                                              absl::string_view token) {
  if (token.empty()) return absl::InvalidArgumentError("token is empty");
  // A quota refusal is counted and logged once the lock is dropped.
  std::string refused_heap;
  absl::StatusOr<PendingGrant> imported = [&]() -> absl::StatusOr<PendingGrant> {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, FindSessionLocked(session_id));
    ASSIGN_OR_RETURN(const ShareTokens::Token entry, tokens_.Find(token, absl::Now()));
    auto b = buffers_.find(entry.buffer);
    if (b == buffers_.end()) {
      return absl::NotFoundError(
          absl::StrCat("buffer ", entry.buffer, " behind the share token was released"));
    }
    Buffer& buffer = *b->second;
    if (absl::Status status = CheckBufferCountLocked(session_id, *session); !status.ok()) {
      refused_heap = buffer.info.heap();
      return status;
    }
    const bool charge = session->holdings.Read().held.count(entry.buffer) == 0;
    if (charge) {
      if (absl::Status quota =
              quotas_.Charge(session_id, session->uid, buffer.info.heap(), buffer.info.size());
          !quota.ok()) {
        refused_heap = buffer.info.heap();
        return quota;
      }
    }
    absl::StatusOr<LeasedFd> fd = DeliveryFdLocked(session->uid, tokens_.fd(token), entry.access);
    if (!fd.ok()) {
      if (charge) {
        quotas_.Uncharge(session_id, session->uid, buffer.info.heap(), buffer.info.size());
      }
      return fd.status();
    }
    Grant grant = AddHandleLocked(session_id, *session, buffer, entry.access, *std::move(fd));
    LeasedFd token_fd = tokens_.Redeem(token, session_id);
    return PendingGrant(this, session_id, std::move(grant), std::string(token),
                        std::move(token_fd));
  }();
  if (!imported.ok() && !refused_heap.empty()) {
    CountRefusal(refused_heap, Refusal::kQuota, session_id, imported.status());
  }
  return imported;
}

bool DaemonState::Holds(uint64_t session_id, uint64_t buffer_id) const {
  absl::ReaderMutexLock lock(&mu_);
  absl::StatusOr<Session*> session = FindSessionLocked(session_id);
  return session.ok() && (*session)->holdings.Read().held.contains(buffer_id);
}

absl::StatusOr<v1::GetBufferResponse> DaemonState::GetBuffer(uint64_t session_id,
                                                             uint64_t handle_id) const {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(FindSessionLocked(session_id).status());
  ASSIGN_OR_RETURN(Handle * handle, FindHandleLocked(session_id, handle_id));
  const Buffer& buffer = *buffers_.at(handle->buffer);
  v1::GetBufferResponse response;
  *response.mutable_buffer() = InfoOf(buffer);
  response.set_access(handle->access);
  response.set_handle_count(static_cast<uint32_t>(buffer.handles.size()));
  return response;
}

absl::StatusOr<v1::BufferInfo> DaemonState::Freeze(uint64_t session_id, uint64_t handle_id,
                                                   absl::StatusOr<UniqueFd> fd) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(FindSessionLocked(session_id).status());
  ASSIGN_OR_RETURN(Handle * handle, FindHandleLocked(session_id, handle_id));
  Buffer& buffer = *buffers_.at(handle->buffer);
  if (handle->access != v1::ACCESS_READ_WRITE) {
    return absl::PermissionDeniedError(
        absl::StrCat("handle ", handle_id, " is read-only; only a read-write holder may freeze"));
  }
  if (buffer.info.frozen()) return InfoOf(buffer);
  if (!buffer.info.freezable()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "buffer ", buffer.info.buffer_id(),
        " was not allocated freezable (AllocateOptions.freezable); it cannot be frozen"));
  }
  if (!fd.ok()) return fd.status();
  RETURN_IF_ERROR(CheckUploadLocked(buffer, fd->get(), /*writable=*/true, "Freeze"));
  if (::fcntl(fd->get(), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SEAL) != 0) {
    if (errno == EBUSY) {
      return absl::FailedPreconditionError(absl::StrCat(
          "buffer ", buffer.info.buffer_id(),
          " still has a writable shared mapping in some process; unmap it (destroy the "
          "Mapping) and freeze again"));
    }
    return ErrnoError("fcntl(F_ADD_SEALS, F_SEAL_WRITE)", errno);
  }
  buffer.info.set_frozen(true);
  return InfoOf(buffer);
}

void DaemonState::ExpireTokens(absl::Time now) {
  std::vector<LeasedFd> expired;
  {
    absl::MutexLock lock(&mu_);
    expired = tokens_.Expire(now);
  }
  // Any may be the last fd of a big buffer (its holders closed theirs but
  // kept their handles): its pages go on the reaper's thread, never here
  // on the event loop.
  if (options_.reaper != nullptr) options_.reaper->Close(std::move(expired));
}

std::vector<DaemonState::Holdings> DaemonState::ListHoldings() const {
  std::vector<Holdings> list;
  absl::MutexLock lock(&mu_);
  list.reserve(sessions_.size());
  for (const auto& [id, session] : sessions_) {
    Holdings& holdings = list.emplace_back(
        Holdings{id, session.uid, static_cast<uint32_t>(session.holdings.Read().handles.size()),
                 quotas_.SessionBytes(id)});
    for (const auto& [buffer_id, count] : session.holdings.Read().held) {
      const Buffer& buffer = *buffers_.at(buffer_id);
      holdings.buffers[buffer_id] = {buffer.info.heap(), buffer.info.size()};
    }
  }
  return list;
}

DaemonState::BufferPage DaemonState::ListBuffers(const BufferQuery& query) const {
  BufferPage page;
  absl::MutexLock lock(&mu_);
  const size_t limit = query.limit == 0 ? SIZE_MAX : query.limit;
  const size_t scan_limit = query.scan_limit == 0 ? SIZE_MAX : query.scan_limit;
  size_t scanned = 0;
  uint64_t last = query.after;
  // Looks at one more buffer; false (and where to resume) once the page is
  // full or has looked at enough.
  auto visit = [&](uint64_t id, const Buffer& buffer) ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    if (page.views.size() == limit || scanned == scan_limit) {
      page.next_after = last;
      return false;
    }
    ++scanned;
    last = id;
    if (!query.heap.empty() && buffer.info.heap() != query.heap) return true;
    BufferView& view = page.views.emplace_back();
    view.info = InfoOf(buffer);
    view.kind = buffer.heap->kind();
    view.dev = buffer.memory->dev();
    view.ino = buffer.memory->ino();
    view.creator = buffer.creator;
    if (!query.holders) return true;
    for (uint64_t handle_id : buffer.handles) {
      const Handle& h = handles_.at(handle_id);
      auto s = sessions_.find(h.session);
      view.holders.push_back(BufferView::Holder{
          h.session, h.id, s != sessions_.end() ? s->second.uid : kNoUid, h.access});
    }
    return true;
  };
  if (query.session_id == 0 && !query.heap.empty()) {
    // The heap's own buffers, from its index.
    const Heap* heap = heaps_->Find(query.heap);
    auto h = heap == nullptr ? buffers_by_heap_.end() : buffers_by_heap_.find(heap);
    if (h == buffers_by_heap_.end()) return page;
    for (auto it = h->second.upper_bound(query.after);
         it != h->second.end() && visit(*it, *buffers_.at(*it)); ++it) {
    }
    return page;
  }
  if (query.session_id != 0) {
    // The session's own buffers, from its index.
    auto s = sessions_.find(query.session_id);
    if (s == sessions_.end()) return page;
    const auto& held = s->second.holdings.Read().held;
    for (auto it = held.upper_bound(query.after);
         it != held.end() && visit(it->first, *buffers_.at(it->first)); ++it) {
    }
    return page;
  }
  for (auto it = buffers_.upper_bound(query.after);
       it != buffers_.end() && visit(it->first, *it->second); ++it) {
  }
  return page;
}

std::vector<DaemonState::ReleasedView> DaemonState::ListReleased(const std::string& heap) const {
  std::vector<ReleasedView> views;
  absl::MutexLock lock(&mu_);
  for (const ReleasedView& released : released_) {
    if (heap.empty() || released.heap == heap) views.push_back(released);
  }
  return views;
}

std::vector<DaemonState::TokenView> DaemonState::ListTokens() const {
  std::vector<TokenView> views;
  absl::MutexLock lock(&mu_);
  for (ShareTokens::Token& token : tokens_.ListPending(absl::Now())) {
    TokenView& view = views.emplace_back();
    if (auto b = buffers_.find(token.buffer); b != buffers_.end()) {
      view.heap = b->second->info.heap();
      view.buffer_name = b->second->info.name();
      view.size = b->second->info.size();
    }
    view.token = std::move(token);
  }
  return views;
}

DaemonState::Totals DaemonState::totals() const {
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  return Totals{buffers_.size(), handles_.size(), tokens_.Pending(now)};
}

}  // namespace bufferd
