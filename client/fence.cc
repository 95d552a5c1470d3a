// The client library's fences: Fence and Client's fence calls.
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <unordered_set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/client_text.h"
#include "base/errno_status.h"
#include "client/client.h"
#include "client/connection.h"
#include "fences/fence_page.h"

namespace bufferd {
namespace {

uint32_t ToMs(absl::Duration duration) {
  const int64_t ms = absl::ToInt64Milliseconds(std::max(duration, absl::ZeroDuration()));
  return static_cast<uint32_t>(std::min<int64_t>(ms, std::numeric_limits<uint32_t>::max()));
}

// A call whose daemon-side work may take `wait` on top of the usual.
internal::Call NewWaitCall(internal::Connection& connection, absl::Duration wait) {
  internal::Call call = connection.NewCall();
  call.context->set_deadline(std::chrono::system_clock::now() +
                             absl::ToChronoMilliseconds(absl::Milliseconds(ToMs(wait)) +
                                                        connection.timeout() +
                                                        internal::Connection::kCallSlack));
  return call;
}

absl::Status NotSignalled(const v1::WaitFenceResponse& response, absl::Duration timeout) {
  std::string ids;
  for (const v1::FenceInfo& fence : response.fences()) {
    if (fence.state() != v1::FENCE_STATE_SIGNALED) {
      absl::StrAppend(&ids, ids.empty() ? "" : ", ", fence.fence_id());
    }
  }
  return absl::DeadlineExceededError(
      timeout <= absl::ZeroDuration()
          ? absl::StrCat("fence ", ids, " not signalled yet (polled)")
          : absl::StrCat("fence ", ids, " not signalled within ", absl::FormatDuration(timeout)));
}

}  // namespace

namespace internal {

// A fence's deadline as the protocol takes it: never negative, never
// indefinite (the daemon says what its maximum is).
absl::StatusOr<uint32_t> DeadlineMs(absl::Duration deadline) {
  if (deadline < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("deadline is negative");
  }
  if (deadline > absl::Milliseconds(std::numeric_limits<uint32_t>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat("deadline ", absl::FormatDuration(deadline),
                     " is too long: fences are never indefinite (the daemon's "
                     "max_fence_deadline_ms is at most a day)"));
  }
  const uint32_t ms = ToMs(deadline);
  return deadline > absl::ZeroDuration() && ms == 0 ? 1 : ms;
}

absl::StatusOr<std::vector<v1::FenceInfo>> WaitFences(Connection& connection,
                                                      const std::vector<uint64_t>& ids, bool all,
                                                      absl::Duration timeout, absl::Duration said) {
  v1::WaitFenceRequest request;
  for (uint64_t id : ids) request.add_fence_ids(id);
  request.set_wait_all(all);
  request.set_timeout_ms(ToMs(timeout));
  v1::WaitFenceResponse response;
  Call call = NewWaitCall(connection, timeout);
  RETURN_IF_ERROR(
      connection.Finish(call, connection.fence().WaitFence(call.context.get(), request, &response)));
  if (!response.satisfied()) {
    return NotSignalled(response, said == absl::InfiniteDuration() ? timeout : said);
  }
  return std::vector<v1::FenceInfo>(response.fences().begin(), response.fences().end());
}

absl::StatusOr<UniqueFd> CheckFenceFd(UniqueFd fd) {
  // A pipe's read end, as the daemon promised: nothing this process could
  // write to.
  const int flags = ::fcntl(fd.get(), F_GETFL);
  struct stat st {};
  if (flags < 0 || (flags & O_ACCMODE) != O_RDONLY || ::fstat(fd.get(), &st) != 0 ||
      !S_ISFIFO(st.st_mode)) {
    return absl::InternalError("the delivered fence fd is not a read-only pipe");
  }
  return fd;
}

}  // namespace internal

namespace internal {
namespace {

// The doorbell write ends this process holds. A doorbell rings only when its
// last write end closes, and a child forked without exec would hold copies:
// at the fork (pthread_atfork) the child's copies become a harmless eventfd
// under the same numbers, before the child runs anything else. Made, and
// closed, under the lock, so no fork falls in between.
struct DoorbellEnds {
  std::mutex mu;
  std::unordered_set<int> fds;
};

DoorbellEnds& Ends();

void ForkChild() {
  DoorbellEnds& ends = Ends();
  if (const int filler = ::eventfd(0, EFD_CLOEXEC); filler >= 0) {
    for (int fd : ends.fds) (void)::dup3(filler, fd, O_CLOEXEC);
    ::close(filler);
  }
  // None is a doorbell in this process: a later fork here leaves those
  // numbers alone (the child may close them and use them again).
  ends.fds.clear();
  ends.mu.unlock();
}

DoorbellEnds& Ends() {
  static DoorbellEnds* const ends = [] {
    auto* made = new DoorbellEnds;
    ::pthread_atfork([] { Ends().mu.lock(); }, [] { Ends().mu.unlock(); }, ForkChild);
    return made;
  }();
  return *ends;
}

}  // namespace

Doorbell::Doorbell(Doorbell&& other) noexcept
    : write_end_(std::move(other.write_end_)),
      read_end_(std::move(other.read_end_)),
      count_(std::exchange(other.count_, nullptr)) {}

Doorbell& Doorbell::operator=(Doorbell&& other) noexcept {
  if (this != &other) {
    Doorbell dropped(std::move(*this));
    write_end_ = std::move(other.write_end_);
    read_end_ = std::move(other.read_end_);
    count_ = std::exchange(other.count_, nullptr);
  }
  return *this;
}

Doorbell::~Doorbell() { (void)Ring(); }

bool Doorbell::Ring() {
  const bool had = write_end_.valid();
  if (had) {
    DoorbellEnds& ends = Ends();
    std::lock_guard lock(ends.mu);
    const int fd = write_end_.get();
    // The close first: the daemon wakes at it, the rest is this process's.
    // (Under the lock, so no fork sees the number closed but still listed.)
    write_end_.Reset();
    ends.fds.erase(fd);
  }
  if (count_ != nullptr) std::exchange(count_, nullptr)->fetch_sub(1, std::memory_order_relaxed);
  read_end_.Reset();
  return had;
}

Doorbell Doorbell::Make(Connection& connection) {
  std::atomic<int>& count = connection.doorbells();
  if (count.fetch_add(1, std::memory_order_relaxed) >= Connection::kMaxDoorbells) {
    count.fetch_sub(1, std::memory_order_relaxed);
    return Doorbell();
  }
  Doorbell made;
  made.count_ = &count;
  DoorbellEnds& held = Ends();
  std::lock_guard lock(held.mu);
  int ends[2];
  if (::pipe2(ends, O_CLOEXEC) != 0) return Doorbell();  // `made` gives its count back
  made.read_end_ = UniqueFd(ends[0]);
  made.write_end_ = UniqueFd(ends[1]);
  held.fds.insert(ends[1]);
  return made;
}

}  // namespace internal

Fence::Fence(std::shared_ptr<internal::Connection> connection, v1::FenceInfo info)
    : connection_(std::move(connection)), info_(std::move(info)) {}

Fence::Fence(Fence&& other) noexcept
    : connection_(std::move(other.connection_)),
      info_(std::move(other.info_)),
      doorbell_(std::move(other.doorbell_)),
      signalled_(std::exchange(other.signalled_, std::nullopt)),
      attached_(other.attached_.exchange(false)) {
  other.info_.set_fence_id(0);
}

Fence& Fence::operator=(Fence&& other) noexcept {
  if (this != &other) {
    Fence dropped(std::move(*this));
    connection_ = std::move(other.connection_);
    info_ = std::move(other.info_);
    doorbell_ = std::move(other.doorbell_);
    signalled_ = std::exchange(other.signalled_, std::nullopt);
    attached_ = other.attached_.exchange(false);
    other.info_.set_fence_id(0);
  }
  return *this;
}

Fence::~Fence() {
  if (connection_ == nullptr || id() == 0) return;
  v1::FdChannelMessage message;
  message.mutable_forget()->add_fence_ids(id());
  // Fails only when the session is over, which forgets everything anyway.
  (void)connection_->SendRecord(message);
}

namespace {

// What the daemon would refuse in a one-way signal, refused here: there it
// would end the session.
absl::Status CheckOneWaySignal(v1::FenceStatus status, absl::string_view message) {
  if (status != v1::FENCE_STATUS_OK && status != v1::FENCE_STATUS_ERROR &&
      status != v1::FENCE_STATUS_CANCELLED) {
    return absl::InvalidArgumentError(
        absl::StrCat("status ", v1::FenceStatus_Name(status),
                     " cannot be signalled: a client signals OK, ERROR or CANCELLED"));
  }
  return CheckClientText("message", message);
}

absl::Status SignalledAlready(uint64_t id, v1::FenceStatus status) {
  return absl::FailedPreconditionError(absl::StrCat(
      "fence ", id, " was signalled already (", v1::FenceStatus_Name(status), ", by this Fence)"));
}

}  // namespace

absl::Status Fence::Signal(v1::FenceStatus status, absl::string_view message) const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Fence");
  RETURN_IF_ERROR(CheckOneWaySignal(status, message));
  // Only the owner signals, and only a fence it created: anything else
  // would end the session.
  if (info_.kind() != v1::FENCE_KIND_CREATED) {
    return absl::PermissionDeniedError(absl::StrCat(
        "fence ", id(), " is ",
        info_.kind() == v1::FENCE_KIND_MERGED     ? "merged: its inputs signal it"
        : info_.kind() == v1::FENCE_KIND_IMPORTED ? "imported: its fd signals it"
                                                  : "a timeline point: its timeline signals it"));
  }
  if (info_.owner_session() != connection_->session_id()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "fence ", id(), " is not one this session created; only its owner signals it"));
  }
  if (signalled_) return SignalledAlready(id(), *signalled_);
  if (PublishInPage(status) && status == v1::FENCE_STATUS_OK) {
    // OK in the word, then the doorbell: the daemon reads the word when it
    // rings, and this session's next calls carry the id (so the signal is
    // applied before them): no record. Without a watched doorbell, or with
    // too many carried, the record tells the daemon (after the doorbell, it
    // is taken as the same signal).
    // (After the session's end the daemon has failed the fence already: a
    // record would say UNAUTHENTICATED, a doorbell cannot tell.)
    // Rung first (the daemon reads the word at once), noted after.
    const bool alone = doorbell_.Ring() && connection_->NoteRung(id());
    if (alone) {
      signalled_ = status;
      return absl::OkStatus();
    }
  }
  v1::FdChannelMessage record;
  v1::FenceSignal* signal = record.mutable_signal();
  signal->set_fence_id(id());
  signal->set_status(status);
  signal->set_message(std::string(message));
  RETURN_IF_ERROR(connection_->SendRecord(record));
  signalled_ = status;
  return absl::OkStatus();
}

bool Fence::PublishInPage(v1::FenceStatus status) const {
  uint32_t* words = connection_->fence_words();
  const uint32_t slot = info_.page_slot();
  if (words == nullptr || slot == 0 || slot >= fence_page::kSlots ||
      info_.owner_session() != connection_->session_id()) {
    return false;
  }
  // Only over this fence's own pending word: a word the daemon gave another
  // fence since (this one signalled before) is not this one's to write.
  uint32_t pending = fence_page::Word(info_.page_generation(), 0);
  if (std::atomic_ref<uint32_t>(words[slot])
          .compare_exchange_strong(pending, fence_page::Word(info_.page_generation(), status))) {
    fence_page::Publish(words[slot], fence_page::Word(info_.page_generation(), status),
                        /*wake=*/attached_.load(std::memory_order_acquire));
    return true;
  }
  return false;
}

absl::StatusOr<v1::FenceInfo> Fence::SignalAndConfirm(v1::FenceStatus status,
                                                      absl::string_view message) {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Fence");
  if (signalled_) return SignalledAlready(id(), *signalled_);
  if (info_.kind() == v1::FENCE_KIND_CREATED &&
      (status == v1::FENCE_STATUS_OK || status == v1::FENCE_STATUS_ERROR ||
       status == v1::FENCE_STATUS_CANCELLED) &&
      CheckClientText("message", message).ok()) {
    PublishInPage(status);
  }
  v1::SignalFenceRequest request;
  request.set_fence_id(id());
  request.set_status(status);
  request.set_message(std::string(message));
  v1::SignalFenceResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().SignalFence(call.context.get(), request, &response)));
  info_ = response.fence();
  signalled_ = status;
  return info_;
}

absl::StatusOr<v1::FenceInfo> Fence::Wait(absl::Duration timeout) {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Fence");
  v1::WaitFenceRequest request;
  request.add_fence_ids(id());
  request.set_wait_all(true);
  request.set_timeout_ms(ToMs(timeout));
  v1::WaitFenceResponse response;
  internal::Call call = NewWaitCall(*connection_, timeout);
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().WaitFence(call.context.get(), request, &response)));
  if (response.fences_size() == 1) info_ = response.fences(0);
  if (!response.satisfied()) return NotSignalled(response, timeout);
  return info_;
}

absl::StatusOr<v1::FenceInfo> Fence::Info() {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Fence");
  v1::GetFenceInfoRequest request;
  request.set_fence_id(id());
  v1::GetFenceInfoResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().GetFenceInfo(call.context.get(), request, &response)));
  info_ = response.fence();
  return info_;
}

absl::StatusOr<UniqueFd> Fence::ExportFd() const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Fence");
  v1::ExportFenceRequest request;
  request.set_fence_id(id());
  v1::ExportFenceResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().ExportFence(call.context.get(), request, &response)));
  ASSIGN_OR_RETURN(UniqueFd fd, connection_->TakeFd(response.transfer_id()));
  return internal::CheckFenceFd(std::move(fd));
}

absl::StatusOr<Fence> Client::CreateFence(const FenceOptions& options) const {
  v1::CreateFenceRequest request;
  request.set_name(options.name);
  request.set_timeline(options.timeline);
  ASSIGN_OR_RETURN(const uint32_t deadline_ms, internal::DeadlineMs(options.deadline));
  request.set_deadline_ms(deadline_ms);
  v1::CreateFenceResponse response;
  // The first fence brings the session's fence page (fences/fence_page.h),
  // under its lock: only one call carries it. A call that fails offers it
  // again with the next (the same page: the daemon may have kept it), a few
  // times at most; a session without one (not kept by the daemon, or
  // offered in vain) still works, through the daemon.
  internal::Connection::FencePage& page = connection_->fence_page();
  std::unique_lock<std::mutex> page_lock;
  std::optional<internal::Connection::UploadPlaces> place;
  bool offering = false;
  if (connection_->fence_words() == nullptr) {
    place.emplace(connection_->ReserveUploads(1));
    page_lock = std::unique_lock(page.mu);
    if (!page.offered.has_value() && page.offers < internal::Connection::FencePage::kMaxOffers) {
      absl::StatusOr<std::pair<UniqueFd, Mapping>> fresh =
          internal::NewSealedPage("bufferd-fence-page", fence_page::kPageSize,
                                  F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL);
      // Readable by all (the daemon reopens it read-only, whatever its
      // uid); the one writable mapping is the one made before the seal.
      if (fresh.ok() && ::fchmod(fresh->first.get(), 0444) == 0) page.offered = *std::move(fresh);
    }
    if (page.offered.has_value() && page.offers < internal::Connection::FencePage::kMaxOffers) {
      if (absl::StatusOr<uint64_t> upload = connection_->Upload(page.offered->first.get());
          upload.ok()) {
        ++page.offers;
        request.set_fence_page_upload_id(*upload);
        offering = true;
      }
    }
    if (!offering) {
      page_lock.unlock();
      place.reset();
    }
  }
  // With the page in place, a doorbell: the pipe's read end goes up, the
  // write end stays with the Fence (closed by its OK Signal).
  internal::Doorbell doorbell;
  std::optional<internal::Connection::UploadPlaces> doorbell_place;
  if (!offering && connection_->fence_words() != nullptr) {
    doorbell = internal::Doorbell::Make(*connection_);
    if (doorbell.valid()) {
      doorbell_place.emplace(connection_->ReserveUploads(1));
      if (absl::StatusOr<uint64_t> upload = connection_->Upload(doorbell.read_end().get());
          upload.ok()) {
        request.set_doorbell_upload_id(*upload);
        doorbell.DropReadEnd();
      } else {
        doorbell = internal::Doorbell();
        doorbell_place.reset();
      }
    }
  }
  internal::Call call = connection_->NewCall();
  absl::Status created = connection_->Finish(
      call, connection_->fence().CreateFence(call.context.get(), request, &response));
  if (offering && absl::IsInvalidArgument(created) &&
      absl::StrContains(created.message(), "fence page")) {
    // The page was refused (this process's uid changed since it connected,
    // say): never a reason to fail a fence. Once more without, and no page
    // for this session.
    page.offers = internal::Connection::FencePage::kMaxOffers;
    request.clear_fence_page_upload_id();
    internal::Call again = connection_->NewCall();
    created = connection_->Finish(
        again, connection_->fence().CreateFence(again.context.get(), request, &response));
  }
  if (offering) {
    if (created.ok() && response.fence().page_slot() != 0) {
      page.map = std::move(page.offered->second);
      connection_->SetFenceWords(reinterpret_cast<uint32_t*>(page.map.data()));
      page.offered.reset();
    } else if (created.ok() || page.offers >= internal::Connection::FencePage::kMaxOffers) {
      // Not kept (the daemon's fd budget), or offered in vain: no more.
      page.offered.reset();
      page.offers = internal::Connection::FencePage::kMaxOffers;
    }
  }
  RETURN_IF_ERROR(created);
  // Pending in its word before anyone can be given the fence.
  if (uint32_t* words = connection_->fence_words();
      words != nullptr && response.fence().page_slot() != 0 &&
      response.fence().page_slot() < fence_page::kSlots) {
    std::atomic_ref<uint32_t>(words[response.fence().page_slot()])
        .store(fence_page::Word(response.fence().page_generation(), 0), std::memory_order_release);
  }
  Fence fence(connection_, response.fence());
  // Only a doorbell the daemon watches may signal alone (Fence::Signal).
  if (response.fence().page_slot() != 0 && response.doorbell_watched()) {
    fence.doorbell_ = std::move(doorbell);
  }
  return fence;
}

absl::StatusOr<WaitResult> Client::WaitFor(std::span<const Fence* const> fences, bool all,
                                           absl::Duration timeout) const {
  std::vector<uint64_t> ids;
  for (const Fence* fence : fences) ids.push_back(fence->id());
  ASSIGN_OR_RETURN(std::vector<v1::FenceInfo> waited,
                   internal::WaitFences(*connection_, ids, all, timeout));
  return WaitResult{std::move(waited)};
}

absl::StatusOr<WaitResult> Client::WaitAll(std::span<const Fence* const> fences,
                                           absl::Duration timeout) const {
  return WaitFor(fences, true, timeout);
}

absl::StatusOr<WaitResult> Client::WaitAny(std::span<const Fence* const> fences,
                                           absl::Duration timeout) const {
  return WaitFor(fences, false, timeout);
}

absl::StatusOr<Fence> Client::Merge(std::span<const Fence* const> fences,
                                    absl::string_view name) const {
  v1::MergeFencesRequest request;
  for (const Fence* fence : fences) request.add_fence_ids(fence->id());
  request.set_name(std::string(name));
  v1::MergeFencesResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().MergeFences(call.context.get(), request, &response)));
  return Fence(connection_, response.fence());
}

absl::StatusOr<Fence> Client::ImportSyncFd(int fd, const FenceOptions& options) const {
  if (::fcntl(fd, F_GETFD) < 0) {
    return absl::InvalidArgumentError(absl::StrCat("fd ", fd, " is not open"));
  }
  ASSIGN_OR_RETURN(const uint32_t deadline_ms, internal::DeadlineMs(options.deadline));
  const internal::Connection::UploadPlaces place = connection_->ReserveUploads(1);
  ASSIGN_OR_RETURN(const uint64_t upload_id, connection_->Upload(fd));
  v1::ImportSyncFdRequest request;
  request.set_upload_id(upload_id);
  request.set_name(options.name);
  request.set_deadline_ms(deadline_ms);
  v1::ImportSyncFdResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().ImportSyncFd(call.context.get(), request, &response)));
  return Fence(connection_, response.fence());
}

absl::StatusOr<v1::ListFencesResponse> Client::ListFences(
    const v1::ListFencesRequest& request) const {
  v1::ListFencesResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->debug().ListFences(call.context.get(), request, &response)));
  return response;
}

}  // namespace bufferd
