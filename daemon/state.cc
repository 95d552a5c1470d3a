#include "daemon/state.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/random.h>
#include <unistd.h>

#include <cerrno>
#include <limits>
#include <set>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/errno_status.h"
#include "base/protocol.h"
#include "google/protobuf/util/time_util.h"

namespace bufferd {

struct DaemonState::Buffer {
  Heap* heap = nullptr;
  std::unique_ptr<HeapBuffer> memory;
  v1::BufferInfo info;
  int handle_count = 0;
  // Handles per holder uid. The buffer's own fd is charged to one of them
  // (its creator first, then whoever still holds it), and to nobody once it
  // is being freed.
  std::map<uid_t, int> holder_uids;
  // Shared with the memory's after-free hook, which returns it.
  std::shared_ptr<FdBudget::Lease> fd_lease;
};

namespace {

using google::protobuf::util::TimeUtil;

constexpr size_t kMaxNameBytes = 200;
// Configured heap names are [a-z0-9_-]{1,32}: a longer request names none.
constexpr size_t kMaxHeapNameBytes = 32;
constexpr absl::Duration kMaxTokenTtl = absl::Hours(1);
constexpr absl::Duration kTombstoneGrace = absl::Minutes(10);
// Share tokens a session may have out that nobody redeemed yet (an expired
// one counts until it is forgotten, kTombstoneGrace after it expired).
constexpr uint32_t kMaxUnredeemedTokens = 4096;

google::protobuf::Timestamp ToProto(absl::Time t) {
  return TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(t));
}

std::string RandomBytes(size_t n) {
  std::string bytes(n, '\0');
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::getrandom(bytes.data() + got, n - got, 0);
    if (r > 0) got += static_cast<size_t>(r);
  }
  return bytes;
}

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

v1::HeapType ToProto(HeapKind kind) {
  switch (kind) {
    case HeapKind::kSystem:
      return v1::HEAP_TYPE_SYSTEM;
    case HeapKind::kContiguous:
      return v1::HEAP_TYPE_CONTIGUOUS;
    case HeapKind::kCarveout:
      return v1::HEAP_TYPE_CARVEOUT;
  }
  return v1::HEAP_TYPE_UNSPECIFIED;
}

v1::Backing ToProto(Backing backing) {
  switch (backing) {
    case Backing::kBasePages:
      return v1::BACKING_BASE_PAGES;
    case Backing::kThp:
      return v1::BACKING_THP;
    case Backing::kHugetlb2M:
      return v1::BACKING_HUGETLB_2M;
    case Backing::kHugetlb1G:
      return v1::BACKING_HUGETLB_1G;
  }
  return v1::BACKING_UNSPECIFIED;
}

// Bytes of the file really allocated (what a punch gives back shows here).
uint64_t AllocatedBytes(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 ? static_cast<uint64_t>(st.st_blocks) * 512 : 0;
}

// Bytes holders punched out of a prefaulted buffer (contiguous, carveout),
// given `allocated` of its `size`; 0 for system buffers, sparse by design.
uint64_t PunchedBytes(HeapKind kind, uint64_t size, uint64_t allocated) {
  return kind != HeapKind::kSystem && allocated < size ? size - allocated : 0;
}

// What a punched hole does to the other holders: a hugetlb page refaults
// only if the pool has one (else SIGBUS), and a carveout's page goes back to
// the system behind its accounting. Base pages elsewhere refault as zeros.
bool MayPunchHurtOthers(HeapKind kind, v1::Backing backing) {
  return kind == HeapKind::kCarveout || backing == v1::BACKING_HUGETLB_2M ||
         backing == v1::BACKING_HUGETLB_1G;
}

absl::Status ValidateName(absl::string_view name) {
  if (name.size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("name is ", name.size(), " bytes; at most ", kMaxNameBytes, " allowed"));
  }
  for (char c : name) {
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError("name must be printable ASCII");
    }
  }
  return absl::OkStatus();
}

}  // namespace

DaemonState::DaemonState(const HeapRegistry* heaps, Options options)
    : heaps_(heaps),
      options_(std::move(options)),
      own_budget_(options_.fd_budget == nullptr ? std::make_unique<FdBudget>() : nullptr),
      budget_(options_.fd_budget != nullptr ? options_.fd_budget : own_budget_.get()) {}

DaemonState::~DaemonState() {
  std::vector<std::unique_ptr<HeapBuffer>> graveyard;
  absl::MutexLock lock(&mu_);
  for (auto& [id, buffer] : buffers_) graveyard.push_back(std::move(buffer->memory));
}

absl::StatusOr<DaemonState::NewSession> DaemonState::OpenSession(const PeerCredentials& peer,
                                                                  std::string comm) {
  auto session = std::make_unique<Session>();
  session->peer = peer;
  session->comm = std::move(comm);
  session->connected = absl::Now();
  NewSession result;
  result.secret = RandomBytes(kSessionSecretBytes);
  session->secret = result.secret;
  absl::MutexLock lock(&mu_);
  if (sessions_.size() >= options_.max_sessions) {
    return absl::ResourceExhaustedError(absl::StrCat("bufferd has ", sessions_.size(),
                                                     " sessions open (limits.max_sessions)"));
  }
  uint32_t& of_uid = sessions_per_uid_[peer.uid];
  if (of_uid >= options_.max_sessions_per_uid) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "uid ", peer.uid, " has ", of_uid, " sessions open (limits.max_sessions_per_uid)"));
  }
  ++of_uid;
  session->id = result.id = next_session_id_++;
  sessions_[result.id] = std::move(session);
  return result;
}

void DaemonState::CloseSession(uint64_t session_id) {
  std::vector<std::unique_ptr<HeapBuffer>> graveyard;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session_id);
    if (it == sessions_.end()) return;
    while (!it->second->handles.empty()) {
      RemoveHandleLocked(it->second->handles.begin()->first, graveyard);
    }
    // What is left is charged by in-flight Allocates; they uncharge the uid
    // themselves when they find the session gone.
    auto of_uid = sessions_per_uid_.find(it->second->peer.uid);
    if (--of_uid->second == 0) sessions_per_uid_.erase(of_uid);
    sessions_.erase(it);
  }
  Dispose(graveyard);
}

void DaemonState::DetachSession(uint64_t session_id) {
  absl::MutexLock lock(&mu_);
  if (auto it = sessions_.find(session_id); it != sessions_.end()) it->second->detached = true;
}

void DaemonState::Dispose(std::vector<std::unique_ptr<HeapBuffer>>& graveyard) {
  for (std::unique_ptr<HeapBuffer>& memory : graveyard) {
    if (!memory->cheap_to_free() && options_.free_later) options_.free_later(std::move(memory));
  }
  graveyard.clear();  // the cheap ones, here
}

absl::StatusOr<uint64_t> DaemonState::Authenticate(absl::string_view metadata) const {
  ASSIGN_OR_RETURN(const SessionCredential credential, ParseSessionCredential(metadata));
  const uint64_t id = credential.session_id;
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end() || it->second->detached) {
    return absl::UnauthenticatedError(
        absl::StrCat("session ", id, " is not live (it ended or never existed)"));
  }
  if (!ConstantTimeEquals(it->second->secret, credential.secret)) {
    return absl::UnauthenticatedError(absl::StrCat("wrong secret for session ", id));
  }
  return id;
}

absl::StatusOr<DaemonState::Session*> DaemonState::FindSessionLocked(uint64_t session_id) const {
  auto it = sessions_.find(session_id);
  if (it == sessions_.end() || it->second->detached) {
    return absl::UnauthenticatedError(absl::StrCat("session ", session_id, " has ended"));
  }
  return it->second.get();
}

uint64_t DaemonState::SessionQuota(const std::string& heap) const {
  auto it = heap_quotas_.find(heap);
  if (it != heap_quotas_.end() && it->second.first != 0) return it->second.first;
  return options_.quotas.max_bytes_per_session();
}

uint64_t DaemonState::UidQuota(const std::string& heap) const {
  auto it = heap_quotas_.find(heap);
  if (it != heap_quotas_.end() && it->second.second != 0) return it->second.second;
  return options_.quotas.max_bytes_per_uid();
}

void DaemonState::SetHeapQuotas(const std::string& heap, uint64_t per_session, uint64_t per_uid) {
  heap_quotas_[heap] = {per_session, per_uid};
}

absl::Status DaemonState::ChargeLocked(Session& session, const std::string& heap, uint64_t bytes) {
  const uint64_t session_max = SessionQuota(heap);
  uint64_t& session_bytes = session.bytes[heap];
  if (session_max != 0 && bytes > session_max - std::min(session_max, session_bytes)) {
    uint64_t held = session_bytes;
    if (held == 0) session.bytes.erase(heap);
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota max_bytes_per_session on heap '", heap, "': session ", session.id, " holds ",
        FormatBytes(held), " of ", FormatBytes(session_max), ", asked for ", FormatBytes(bytes)));
  }
  const uint64_t uid_max = UidQuota(heap);
  const auto uid_key = std::make_pair(session.peer.uid, heap);
  uint64_t uid_held = 0;
  if (auto it = uid_bytes_.find(uid_key); it != uid_bytes_.end()) uid_held = it->second;
  if (uid_max != 0 && bytes > uid_max - std::min(uid_max, uid_held)) {
    if (session_bytes == 0) session.bytes.erase(heap);
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota max_bytes_per_uid on heap '", heap, "': uid ", session.peer.uid, " holds ",
        FormatBytes(uid_held), " of ", FormatBytes(uid_max), ", asked for ", FormatBytes(bytes)));
  }
  // Sums never wrap (a heap caps one buffer far below this; this is the
  // guard if a caller did not).
  if (bytes > std::numeric_limits<uint64_t>::max() - std::max(session_bytes, uid_held)) {
    if (session_bytes == 0) session.bytes.erase(heap);
    return absl::ResourceExhaustedError(
        absl::StrCat("byte counts of session ", session.id, " on heap '", heap, "' would wrap"));
  }
  session_bytes += bytes;
  uid_bytes_[uid_key] += bytes;
  return absl::OkStatus();
}

void DaemonState::UnchargeLocked(uint64_t session_id, uid_t uid, const std::string& heap,
                                 uint64_t bytes) {
  if (auto it = sessions_.find(session_id); it != sessions_.end()) {
    auto b = it->second->bytes.find(heap);
    if (b != it->second->bytes.end() && (b->second -= bytes) == 0) it->second->bytes.erase(b);
  }
  auto u = uid_bytes_.find({uid, heap});
  if (u != uid_bytes_.end() && (u->second -= bytes) == 0) uid_bytes_.erase(u);
}

absl::StatusOr<DaemonState::Grant> DaemonState::AddHandleLocked(Session& session, Buffer& buffer,
                                                                v1::Access access) {
  // The fd to deliver is the daemon's until the client has it.
  ASSIGN_OR_RETURN(FdBudget::Lease lease, budget_->Acquire(FdUse::kDelivery, session.peer.uid));
  UniqueFd fd;
  if (access == v1::ACCESS_READ_ONLY) {
    // A new open file description, O_RDONLY: the holder cannot map it writable.
    std::string path = absl::StrCat("/proc/self/fd/", buffer.memory->fd());
    fd.Reset(RetryOnEintr([&] { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC); }));
    if (!fd.valid()) return ErrnoError("reopen buffer read-only", errno);
  } else {
    ASSIGN_OR_RETURN(fd, DuplicateFd(buffer.memory->fd()));
  }
  Grant grant;
  grant.handle = next_handle_id_++;
  grant.transfer_id = next_transfer_id_++;
  grant.buffer = buffer.info;
  grant.access = access;
  grant.fd = LeasedFd{std::move(fd), std::move(lease)};
  handles_[grant.handle] = Handle{grant.handle, session.id, buffer.info.buffer_id(), access};
  session.handles[grant.handle] = buffer.info.buffer_id();
  ++session.held[buffer.info.buffer_id()];
  ++buffer.handle_count;
  ++buffer.holder_uids[session.peer.uid];
  return grant;
}

bool DaemonState::RemoveHandleLocked(uint64_t handle_id,
                                     std::vector<std::unique_ptr<HeapBuffer>>& graveyard) {
  auto h = handles_.find(handle_id);
  if (h == handles_.end()) return false;
  const Handle handle = h->second;
  handles_.erase(h);
  auto b = buffers_.find(handle.buffer);
  Buffer& buffer = *b->second;
  if (auto s = sessions_.find(handle.session); s != sessions_.end()) {
    Session& session = *s->second;
    session.handles.erase(handle_id);
    if (--session.held[handle.buffer] == 0) {
      session.held.erase(handle.buffer);
      UnchargeLocked(session.id, session.peer.uid, buffer.info.heap(), buffer.info.size());
    }
    auto u = buffer.holder_uids.find(session.peer.uid);
    if (u != buffer.holder_uids.end() && --u->second == 0) buffer.holder_uids.erase(u);
  }
  if (--buffer.handle_count > 0) {
    // The uid charged for the buffer's fd let go of it: whoever still holds
    // the buffer answers for its fd now (an importer cannot keep buffers
    // alive on another uid's share).
    if (buffer.fd_lease != nullptr && !buffer.holder_uids.empty() &&
        buffer.holder_uids.count(buffer.fd_lease->uid()) == 0) {
      buffer.fd_lease->Reassign(FdUse::kBuffer, buffer.holder_uids.begin()->first);
    }
    return false;
  }
  // Being freed: in the budget until the reaper closes it, in nobody's share.
  if (buffer.fd_lease != nullptr) buffer.fd_lease->Reassign(FdUse::kFreeing, kNoUid);
  for (auto t = tokens_.begin(); t != tokens_.end();) {
    t = t->second.buffer == handle.buffer ? EraseTokenLocked(t) : std::next(t);
  }
  buffer.memory->Retire();                        // the next Allocate sees the bytes free
  graveyard.push_back(std::move(buffer.memory));  // its fd closes with it
  buffers_.erase(b);
  return true;
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

absl::StatusOr<DaemonState::Grant> DaemonState::Allocate(uint64_t session_id,
                                                         const v1::AllocateRequest& request) {
  if (request.heap().size() > kMaxHeapNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("heap name is ", request.heap().size(),
                                                   " bytes; heap names are at most ",
                                                   kMaxHeapNameBytes));
  }
  ASSIGN_OR_RETURN(Heap * heap, heaps_->Get(request.heap()));
  if (request.size() == 0) return absl::InvalidArgumentError("size must be greater than 0");
  RETURN_IF_ERROR(ValidateName(request.name()));
  const uint64_t page = heap->page_size();
  if (request.size() > (uint64_t{1} << 62)) {
    return absl::InvalidArgumentError(absl::StrCat("size ", request.size(), " is too large"));
  }
  uint64_t rounded = (request.size() + page - 1) / page * page;
  const uint64_t max_allocation = options_.quotas.max_allocation_bytes();
  if (max_allocation != 0 && rounded > max_allocation) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota max_allocation_bytes: asked for ", FormatBytes(rounded), " on heap '", heap->name(),
        "', the largest allowed allocation is ", FormatBytes(max_allocation)));
  }
  uid_t uid;
  // The buffer's own fd, held until the reaper really closes it (maybe after
  // its last handle went): shared with the buffer's after-free hook.
  std::shared_ptr<FdBudget::Lease> fd_lease;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, FindSessionLocked(session_id));
    const uint32_t max_buffers = options_.quotas.max_buffers_per_session();
    if (max_buffers != 0 && session->handles.size() + session->pending >= max_buffers) {
      return absl::ResourceExhaustedError(
          absl::StrCat("quota max_buffers_per_session: session ", session_id, " holds ",
                       session->handles.size(), " handles (max ", max_buffers, ")"));
    }
    ASSIGN_OR_RETURN(FdBudget::Lease lease,
                     budget_->Acquire(FdUse::kBuffer, session->peer.uid));
    RETURN_IF_ERROR(ChargeLocked(*session, heap->name(), rounded));
    fd_lease = std::make_shared<FdBudget::Lease>(std::move(lease));
    ++session->pending;
    uid = session->peer.uid;
  }

  absl::StatusOr<std::unique_ptr<HeapBuffer>> memory =
      heap->Allocate(request.size(), request.name());
  if (memory.ok()) {
    // The fd's place is given back when the buffer's fd really closes (maybe
    // later, on the reaper), not when its last handle goes.
    (*memory)->SetAfterFree([fd_lease] { fd_lease->Reset(); });
    // No holder may add seals (say F_SEAL_WRITE, freezing everyone else's
    // writes) unless it was asked for.
    if (!request.freezable() && ::fcntl((*memory)->fd(), F_ADD_SEALS, F_SEAL_SEAL) != 0) {
      memory = ErrnoError("fcntl(F_ADD_SEALS, F_SEAL_SEAL)", errno);
    }
  }

  std::vector<std::unique_ptr<HeapBuffer>> graveyard;
  absl::MutexLock lock(&mu_);
  auto s = sessions_.find(session_id);
  Session* session = s == sessions_.end() ? nullptr : s->second.get();
  if (session != nullptr) --session->pending;
  if (!memory.ok() || session == nullptr) {
    UnchargeLocked(session_id, uid, heap->name(), rounded);
    if (!memory.ok()) return memory.status();
    graveyard.push_back(*std::move(memory));
    return absl::AbortedError(absl::StrCat("session ", session_id, " ended during Allocate"));
  }
  if (const uint64_t size = (*memory)->size(); size < rounded) {
    // A fallback with a smaller page than the heap's (1 GiB pages -> base
    // pages): the quota keeps only what the buffer really holds.
    UnchargeLocked(session_id, uid, heap->name(), rounded - size);
    rounded = size;
  }
  auto buffer = std::make_unique<Buffer>();
  buffer->heap = heap;
  buffer->memory = *std::move(memory);
  buffer->fd_lease = std::move(fd_lease);
  v1::BufferInfo& info = buffer->info;
  info.set_buffer_id(next_buffer_id_++);
  info.set_heap(heap->name());
  info.set_size(buffer->memory->size());
  info.set_requested_size(request.size());
  info.set_backing(ToProto(buffer->memory->backing()));
  info.set_name(request.name());
  info.set_freezable(request.freezable());
  info.set_creator_session(session_id);
  *info.mutable_created_at() = ToProto(absl::Now());
  Buffer& ref = *buffer;
  buffers_[info.buffer_id()] = std::move(buffer);
  absl::StatusOr<Grant> grant = AddHandleLocked(*session, ref, v1::ACCESS_READ_WRITE);
  if (!grant.ok()) {
    UnchargeLocked(session_id, uid, heap->name(), rounded);
    graveyard.push_back(std::move(ref.memory));
    buffers_.erase(ref.info.buffer_id());
  }
  return grant;
}

absl::StatusOr<bool> DaemonState::Release(
    uint64_t session_id, uint64_t handle,
    std::vector<std::unique_ptr<HeapBuffer>>* expensive_frees) {
  std::vector<std::unique_ptr<HeapBuffer>> graveyard;
  bool destroyed;
  {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(FindSessionLocked(session_id).status());
    RETURN_IF_ERROR(FindHandleLocked(session_id, handle).status());
    destroyed = RemoveHandleLocked(handle, graveyard);
  }
  if (expensive_frees != nullptr) {
    for (auto& memory : graveyard) {
      if (!memory->cheap_to_free()) expensive_frees->push_back(std::move(memory));
    }
    std::erase(graveyard, nullptr);
  }
  Dispose(graveyard);
  return destroyed;
}

absl::StatusOr<v1::ExportResponse> DaemonState::Export(uint64_t session_id,
                                                       const v1::ExportRequest& request) {
  absl::Duration ttl =
      request.ttl_ms() == 0 ? options_.default_token_ttl : absl::Milliseconds(request.ttl_ms());
  if (ttl > kMaxTokenTtl) {
    return absl::InvalidArgumentError(
        absl::StrCat("ttl_ms ", request.ttl_ms(), " is above the maximum of 3600000 (1 hour)"));
  }
  std::string token = absl::BytesToHexString(RandomBytes(16));
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(FindSessionLocked(session_id).status());
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
      MayPunchHurtOthers(buffer.heap->kind(), buffer.info.backing()) &&
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
  uint32_t& unredeemed = unredeemed_tokens_[session_id];
  if (unredeemed >= kMaxUnredeemedTokens) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "session ", session_id, " has ", unredeemed, " share tokens out that nobody imported (max ",
        kMaxUnredeemedTokens, "); they are forgotten 10 minutes after they expire"));
  }
  ++unredeemed;
  Token& entry = tokens_[token];
  entry.buffer = handle->buffer;
  entry.access = access;
  entry.expires = absl::Now() + ttl;
  entry.exporter = session_id;
  v1::ExportResponse response;
  response.set_token(token);
  *response.mutable_expires_at() = ToProto(entry.expires);
  return response;
}

absl::StatusOr<DaemonState::Grant> DaemonState::Import(uint64_t session_id,
                                                       absl::string_view token) {
  if (token.empty()) return absl::InvalidArgumentError("token is empty");
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, FindSessionLocked(session_id));
  auto it = tokens_.find(std::string(token));
  if (it == tokens_.end()) return absl::NotFoundError("unknown share token");
  Token& entry = it->second;
  if (entry.used_by != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("share token was already used (by session ", entry.used_by, ")"));
  }
  const absl::Time now = absl::Now();
  if (now >= entry.expires) {
    return absl::FailedPreconditionError(absl::StrCat(
        "share token expired ",
        absl::FormatDuration(absl::Trunc(now - entry.expires, absl::Milliseconds(1))), " ago"));
  }
  auto b = buffers_.find(entry.buffer);
  if (b == buffers_.end()) {
    return absl::NotFoundError(
        absl::StrCat("buffer ", entry.buffer, " behind the share token was released"));
  }
  Buffer& buffer = *b->second;
  const uint32_t max_buffers = options_.quotas.max_buffers_per_session();
  if (max_buffers != 0 && session->handles.size() + session->pending >= max_buffers) {
    return absl::ResourceExhaustedError(absl::StrCat("quota max_buffers_per_session: session ",
                                                     session_id, " holds ", session->handles.size(),
                                                     " handles (max ", max_buffers, ")"));
  }
  const bool charge = session->held.count(entry.buffer) == 0;
  if (charge) RETURN_IF_ERROR(ChargeLocked(*session, buffer.info.heap(), buffer.info.size()));
  absl::StatusOr<Grant> grant = AddHandleLocked(*session, buffer, entry.access);
  if (!grant.ok()) {
    if (charge) {
      UnchargeLocked(session_id, session->peer.uid, buffer.info.heap(), buffer.info.size());
    }
    return grant.status();
  }
  entry.used_by = session_id;
  ForgetUnredeemedLocked(entry.exporter);
  return grant;
}

void DaemonState::UnuseToken(absl::string_view token) {
  absl::MutexLock lock(&mu_);
  auto it = tokens_.find(std::string(token));
  if (it != tokens_.end() && it->second.used_by != 0) {
    it->second.used_by = 0;
    ++unredeemed_tokens_[it->second.exporter];
  }
}

void DaemonState::ForgetUnredeemedLocked(uint64_t exporter) {
  auto it = unredeemed_tokens_.find(exporter);
  if (it != unredeemed_tokens_.end() && --it->second == 0) unredeemed_tokens_.erase(it);
}

std::map<std::string, DaemonState::Token>::iterator DaemonState::EraseTokenLocked(
    std::map<std::string, Token>::iterator token) {
  if (token->second.used_by == 0) ForgetUnredeemedLocked(token->second.exporter);
  return tokens_.erase(token);
}

absl::StatusOr<v1::GetBufferResponse> DaemonState::GetBuffer(uint64_t session_id,
                                                             uint64_t handle_id) const {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(FindSessionLocked(session_id).status());
  ASSIGN_OR_RETURN(Handle * handle, FindHandleLocked(session_id, handle_id));
  const Buffer& buffer = *buffers_.at(handle->buffer);
  v1::GetBufferResponse response;
  *response.mutable_buffer() = buffer.info;
  response.set_access(handle->access);
  response.set_handle_count(static_cast<uint32_t>(buffer.handle_count));
  return response;
}

absl::StatusOr<v1::BufferInfo> DaemonState::Freeze(uint64_t session_id, uint64_t handle_id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(FindSessionLocked(session_id).status());
  ASSIGN_OR_RETURN(Handle * handle, FindHandleLocked(session_id, handle_id));
  Buffer& buffer = *buffers_.at(handle->buffer);
  if (handle->access != v1::ACCESS_READ_WRITE) {
    return absl::PermissionDeniedError(
        absl::StrCat("handle ", handle_id, " is read-only; only a read-write holder may freeze"));
  }
  if (buffer.info.frozen()) return buffer.info;
  if (!buffer.info.freezable()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "buffer ", buffer.info.buffer_id(),
        " was not allocated freezable (AllocateOptions.freezable); it cannot be frozen"));
  }
  if (::fcntl(buffer.memory->fd(), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SEAL) != 0) {
    if (errno == EBUSY) {
      return absl::FailedPreconditionError(absl::StrCat(
          "buffer ", buffer.info.buffer_id(),
          " still has a writable shared mapping in some process; unmap it (destroy the "
          "Mapping) and freeze again"));
    }
    return ErrnoError("fcntl(F_ADD_SEALS, F_SEAL_WRITE)", errno);
  }
  buffer.info.set_frozen(true);
  return buffer.info;
}

void DaemonState::Housekeeping(absl::Time now) {
  absl::MutexLock lock(&mu_);
  for (auto t = tokens_.begin(); t != tokens_.end();) {
    t = now > t->second.expires + kTombstoneGrace ? EraseTokenLocked(t) : std::next(t);
  }
}

v1::ListHeapsResponse DaemonState::ListHeaps() const {
  v1::ListHeapsResponse response;
  for (const auto& heap : heaps_->heaps()) {
    HeapStats stats = heap->Stats();
    v1::HeapInfo* info = response.add_heaps();
    info->set_name(heap->name());
    info->set_type(ToProto(heap->kind()));
    info->set_page_size(stats.page_size);
    info->set_capacity(stats.capacity);
    info->set_used(stats.used);
    info->set_peak(stats.peak);
    info->set_free(stats.capacity > stats.used ? stats.capacity - stats.used : 0);
    info->set_buffer_count(stats.buffer_count);
    info->set_allocations(stats.allocations);
    info->set_failures(stats.failures);
    info->set_backing(ToProto(stats.backing));
    if (stats.hugepages.page_size != 0) {
      v1::HugepagePool* pool = info->mutable_hugepages();
      pool->set_page_size(stats.hugepages.page_size);
      pool->set_total_pages(stats.hugepages.total);
      pool->set_free_pages(stats.hugepages.free);
      pool->set_reserved_pages(stats.hugepages.reserved);
    }
    info->set_reserved_resident(stats.reserved_resident);
    info->set_locked(stats.locked);
    info->set_note(stats.note);
    for (const auto& [name, count] : stats.buffers_by_backing) {
      (*info->mutable_buffers_by_backing())[name] = count;
    }
  }
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  // Holes holders punched in prefaulted buffers: given back to the system,
  // still in `used`.
  std::map<std::string, uint64_t> punched;
  for (const auto& [id, buffer] : buffers_) {
    if (buffer->heap->kind() == HeapKind::kSystem) continue;  // no fstat: never punched
    const uint64_t holes = PunchedBytes(buffer->heap->kind(), buffer->info.size(),
                                        AllocatedBytes(buffer->memory->fd()));
    if (holes != 0) punched[buffer->info.heap()] += holes;
  }
  for (v1::HeapInfo& info : *response.mutable_heaps()) {
    if (auto it = punched.find(info.name()); it != punched.end()) {
      info.set_punched(it->second);
      absl::StrAppend(info.mutable_note(), info.note().empty() ? "" : "; ", "holders punched ",
                      FormatBytes(it->second), " out of live buffers");
    }
  }
  response.set_live_buffers(buffers_.size());
  response.set_live_handles(handles_.size());
  uint64_t pending = 0;
  for (const auto& [token, entry] : tokens_) pending += entry.used_by == 0 && now < entry.expires;
  response.set_pending_tokens(pending);
  const FdBudget::Usage fds = budget_->usage();
  const FdBudget::Limits limits = budget_->limits();
  response.set_fds_in_use(fds.total);
  response.set_fd_budget(limits.total);
  v1::FdUsage* usage = response.mutable_fds();
  usage->set_rlimit_nofile(limits.rlimit_nofile);
  usage->set_reserve(limits.reserve);
  usage->set_budget(limits.total);
  usage->set_per_uid(limits.uid_share());
  usage->set_in_use(fds.total);
  usage->set_buffers(fds.of(FdUse::kBuffer));
  usage->set_sessions(fds.of(FdUse::kSession));
  usage->set_control_connections(fds.of(FdUse::kControlConnection));
  usage->set_deliveries(fds.of(FdUse::kDelivery));
  usage->set_freeing(fds.of(FdUse::kFreeing));
  return response;
}

std::vector<v1::ClientInfo> DaemonState::ListClients() const {
  std::vector<v1::ClientInfo> clients;
  absl::MutexLock lock(&mu_);
  for (const auto& [id, session] : sessions_) {
    v1::ClientInfo& info = clients.emplace_back();
    info.set_session_id(id);
    info.set_pid(static_cast<uint32_t>(session->peer.pid));
    info.set_uid(session->peer.uid);
    info.set_gid(session->peer.gid);
    info.set_comm(session->comm);
    for (const auto& [heap, bytes] : session->bytes) {
      v1::HeapBytes* entry = info.add_bytes();
      entry->set_heap(heap);
      entry->set_bytes(bytes);
    }
    info.set_handles(static_cast<uint32_t>(session->handles.size()));
    *info.mutable_connected_since() = ToProto(session->connected);
  }
  return clients;
}

v1::ListBuffersResponse DaemonState::ListBuffers(const v1::ListBuffersRequest& request) const {
  v1::ListBuffersResponse response;
  absl::MutexLock lock(&mu_);
  std::map<uint64_t, std::vector<const Handle*>> holders;
  for (const auto& [id, handle] : handles_) holders[handle.buffer].push_back(&handle);
  for (const auto& [id, buffer] : buffers_) {
    if (!request.heap().empty() && buffer->info.heap() != request.heap()) continue;
    const auto& held_by = holders[id];
    if (request.session_id() != 0 &&
        std::none_of(held_by.begin(), held_by.end(),
                     [&](const Handle* h) { return h->session == request.session_id(); })) {
      continue;
    }
    v1::BufferDebugInfo* entry = response.add_buffers();
    *entry->mutable_buffer() = buffer->info;
    const uint64_t allocated = AllocatedBytes(buffer->memory->fd());
    entry->set_allocated_bytes(allocated);
    entry->set_punched_bytes(PunchedBytes(buffer->heap->kind(), buffer->info.size(), allocated));
    // Any read-write holder (the creator included) can punch a hole that
    // the others then die of; a frozen buffer cannot be punched.
    std::set<uid_t> writer_uids;
    for (const Handle* h : held_by) {
      auto s = sessions_.find(h->session);
      if (h->access == v1::ACCESS_READ_WRITE && s != sessions_.end()) {
        writer_uids.insert(s->second->peer.uid);
      }
    }
    entry->set_sigbus_risk(MayPunchHurtOthers(buffer->heap->kind(), buffer->info.backing()) &&
                           !buffer->info.frozen() && held_by.size() > 1 &&
                           !writer_uids.empty());
    for (const Handle* h : held_by) {
      v1::BufferHolder* holder = entry->add_holders();
      holder->set_session_id(h->session);
      holder->set_handle(h->id);
      holder->set_access(h->access);
      if (auto s = sessions_.find(h->session); s != sessions_.end()) {
        const uid_t uid = s->second->peer.uid;
        holder->set_pid(static_cast<uint32_t>(s->second->peer.pid));
        holder->set_comm(s->second->comm);
        holder->set_uid(uid);
        // Root and the daemon's uid can reopen the memfd read-write; a
        // process of a writer's uid can take the writer's fd (pidfd_getfd).
        holder->set_read_only_enforced(
            h->access == v1::ACCESS_READ_ONLY &&
            (buffer->info.frozen() ||
             (uid != 0 && uid != ::geteuid() && writer_uids.count(uid) == 0)));
      }
    }
  }
  return response;
}

std::string DaemonState::Metrics() const {
  v1::ListHeapsResponse heaps = ListHeaps();
  std::string out;
  auto family = [&out](absl::string_view name, absl::string_view type, absl::string_view help) {
    absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
  };
  struct Metric {
    const char* name;
    const char* type;
    const char* help;
    uint64_t (v1::HeapInfo::*get)() const;
  };
  static const Metric kHeapMetrics[] = {
      {"bufferd_heap_capacity_bytes", "gauge", "Heap capacity (0 = unbounded).",
       &v1::HeapInfo::capacity},
      {"bufferd_heap_used_bytes", "gauge", "Bytes in live buffers.", &v1::HeapInfo::used},
      {"bufferd_heap_free_bytes", "gauge", "Capacity minus used (0 = unbounded heap).",
       &v1::HeapInfo::free},
      {"bufferd_heap_peak_bytes", "gauge", "Highest used bytes since start.", &v1::HeapInfo::peak},
      {"bufferd_heap_buffers", "gauge", "Live buffers.", &v1::HeapInfo::buffer_count},
      {"bufferd_heap_allocations_total", "counter", "Successful allocations.",
       &v1::HeapInfo::allocations},
      {"bufferd_heap_allocation_failures_total", "counter", "Failed allocations.",
       &v1::HeapInfo::failures},
  };
  for (const Metric& metric : kHeapMetrics) {
    family(metric.name, metric.type, metric.help);
    for (const v1::HeapInfo& heap : heaps.heaps()) {
      absl::StrAppend(&out, metric.name, "{heap=\"", heap.name(), "\"} ", (heap.*metric.get)(),
                      "\n");
    }
  }
  uint64_t sessions;
  {
    absl::MutexLock lock(&mu_);
    sessions = sessions_.size();
  }
  family("bufferd_sessions", "gauge", "Connected client sessions.");
  absl::StrAppend(&out, "bufferd_sessions ", sessions, "\n");
  family("bufferd_buffers", "gauge", "Live buffers in all heaps.");
  absl::StrAppend(&out, "bufferd_buffers ", heaps.live_buffers(), "\n");
  family("bufferd_handles", "gauge", "Live buffer handles.");
  absl::StrAppend(&out, "bufferd_handles ", heaps.live_handles(), "\n");
  family("bufferd_fds_in_use", "gauge", "fds held on clients' behalf, by use.");
  const v1::FdUsage& fds = heaps.fds();
  for (const auto& [use, count] :
       {std::pair<const char*, uint64_t>{"buffers", fds.buffers()},
        {"sessions", fds.sessions()},
        {"control_connections", fds.control_connections()},
        {"deliveries", fds.deliveries()},
        {"freeing", fds.freeing()}}) {
    absl::StrAppend(&out, "bufferd_fds_in_use{use=\"", use, "\"} ", count, "\n");
  }
  family("bufferd_fd_budget", "gauge", "Configured fd budget.");
  absl::StrAppend(&out, "bufferd_fd_budget ", heaps.fd_budget(), "\n");
  return out;
}

}  // namespace bufferd
