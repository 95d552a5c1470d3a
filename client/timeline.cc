// The client library's timelines: Timeline and Client's timeline calls.
// The shared memory and its rules are fences/timeline_shm.h.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "base/client_text.h"
#include "base/errno_status.h"
#include "client/client.h"
#include "client/connection.h"
#include "fences/timeline_shm.h"

namespace bufferd {

using timeline::Load;
using timeline::Store;

struct Timeline::Shared {
  Mapping counters;  // writable for the owner
  Mapping state;
  bool owner = false;
  std::atomic<uint64_t> seen{0};
  // The owner's signals, one at a time (one writer of the counter page).
  std::mutex signal_mu;
  // Owner: the wakers of the sessions that wait (taken from the daemon when
  // the state page's wakers_gen moves), woken at every signal.
  struct OwnedWaker {
    uint64_t id = 0;
    Mapping page;
    UniqueFd notify;
    timeline::WakePage& wake() const {
      return *reinterpret_cast<timeline::WakePage*>(page.data());
    }
  };
  // A few (one per waiting session): a vector, walked at every signal.
  std::vector<OwnedWaker> wakers;
  uint64_t wakers_gen = 0;
  // This session's own waker, registered at its first wait.
  std::mutex waker_mu;
  std::shared_ptr<internal::Waker> waker;
  // waker.get(), published once `waker` is set (it never changes after):
  // what a wait reads without waker_mu.
  std::atomic<internal::Waker*> registered{nullptr};

  timeline::CounterPage& counter_page() const {
    return *reinterpret_cast<timeline::CounterPage*>(counters.data());
  }
  const timeline::StatePage& state_page() const {
    return *reinterpret_cast<const timeline::StatePage*>(state.data());
  }
};

namespace {

constexpr uint64_t kMaxPoint = std::numeric_limits<uint64_t>::max();
// futex_waitv takes 128 words: two per timeline.
constexpr size_t kMaxWaitPoints = 64;

absl::Status CheckPoint(uint64_t point) {
  if (point == kMaxPoint) {
    return absl::InvalidArgumentError(
        "point 18446744073709551615 (UINT64_MAX) is reserved: no point could follow it");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::pair<UniqueFd, Mapping>> NewPage(const char* name, int seals) {
  return internal::NewSealedPage(name, timeline::kPageSize, seals);
}

// A page the daemon sent: read-only, and exactly a page.
absl::StatusOr<Mapping> MapDelivered(const UniqueFd& fd) {
  return internal::MapDeliveredPage(fd, timeline::kPageSize, /*seals=*/0,
                                    "a delivered timeline page");
}

// Runs `call` with the id of the session's wait page uploaded for it, or 0
// when the daemon has it already. The first time, the page is made and the
// call runs under the page's lock, so only one call carries it.
// `place_reserved`: the caller holds an upload place for the page (taken
// with its others at once); else one is taken here, before the page's lock,
// so no thread holding places or the lock ever waits for more.
template <typename Call>
absl::Status WithWaitPage(internal::Connection& connection, Call call,
                          bool place_reserved = false) {
  std::optional<internal::Connection::UploadPlaces> place;
  if (!place_reserved) place.emplace(connection.ReserveUploads(1));
  internal::Connection::WaitPage& page = connection.wait_page();
  std::unique_lock lock(page.mu);
  if (page.given) {
    lock.unlock();
    return call(0);
  }
  if (!page.fd.valid()) {
    ASSIGN_OR_RETURN(auto made, NewPage("bufferd-timeline-waits",
                                        F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL));
    page.fd = std::move(made.first);
    page.map = std::move(made.second);
    page.mapped.store(reinterpret_cast<timeline::WaitPage*>(page.map.data()),
                      std::memory_order_release);
  }
  ASSIGN_OR_RETURN(const uint64_t upload_id, connection.Upload(page.fd.get()));
  absl::Status status = call(upload_id);
  // The daemon takes the page before anything else the call does, and takes
  // the same page again: a failed call may have given it.
  if (status.ok()) page.given = true;
  return status;
}

// Wait slots of the session's page, claimed for one wait and cleared after.
// A slot is claimed by setting its bit in the page's `armed` masks (which
// also tells the daemon to read it), by compare-and-swap: no lock.
class Slots {
 public:
  explicit Slots(internal::Connection& connection)
      : mapped_(connection.wait_page().mapped.load(std::memory_order_acquire)) {}
  ~Slots() {
    for (size_t slot : claimed_) {
      Write(mapped_->slots[slot], 0, 0, 0);
      std::atomic_ref<uint64_t>(mapped_->armed[slot / 64])
          .fetch_and(~(uint64_t{1} << (slot % 64)), std::memory_order_release);
    }
  }
  absl::Status Arm(uint64_t timeline, uint64_t point, int64_t need_by_ns) {
    if (mapped_ == nullptr) {
      return absl::FailedPreconditionError("this session has no timeline wait page");
    }
    ASSIGN_OR_RETURN(const size_t slot, Claim());
    claimed_.push_back(slot);
    Write(mapped_->slots[slot], timeline, point, need_by_ns);
    return absl::OkStatus();
  }

 private:
  // The lowest free slot, now this wait's.
  absl::StatusOr<size_t> Claim() {
    constexpr size_t kSlots = timeline::WaitPage::kSlots;
    for (size_t word = 0; word < std::size(mapped_->armed); ++word) {
      std::atomic_ref<uint64_t> bits(mapped_->armed[word]);
      // The bits past the last slot count as taken.
      const uint64_t beyond = ~timeline::SlotBits(word);
      uint64_t seen = bits.load(std::memory_order_relaxed);
      while ((seen | beyond) != ~uint64_t{0}) {
        const int bit = std::countr_one(seen | beyond);
        if (bits.compare_exchange_weak(seen, seen | (uint64_t{1} << bit), std::memory_order_acquire,
                                       std::memory_order_relaxed)) {
          return word * 64 + bit;
        }
      }
    }
    return absl::ResourceExhaustedError(absl::StrCat(
        "all ", kSlots,
        " timeline wait slots of this session are in use (that many points waited on at "
        "once); use another Client for more"));
  }

  // Under the slot's seqlock (the daemon may read it at any time).
  static void Write(timeline::WaitSlot& slot, uint64_t timeline, uint64_t point,
                    int64_t need_by_ns) {
    const uint32_t gen = Load(slot.gen);
    Store(slot.gen, gen + 1);
    std::atomic_thread_fence(std::memory_order_release);
    Store(slot.timeline, timeline);
    Store(slot.point, point);
    Store(slot.need_by_ns, need_by_ns);
    Store(slot.gen, gen + 2);
  }

  // The session's wait page (null if it has none).
  timeline::WaitPage* const mapped_;
  absl::InlinedVector<size_t, 4> claimed_;
};

// The daemon let go of one of these wakers: it does so when the session
// ends (and wakes it once more).
bool WakerClosed(std::span<internal::Waker* const> wakers) {
  return std::any_of(wakers.begin(), wakers.end(),
                     [](const auto& waker) { return Load(waker->wake().closed) != 0; });
}

}  // namespace

Timeline::Timeline(std::shared_ptr<internal::Connection> connection, v1::TimelineInfo info,
                   std::unique_ptr<Shared> shared)
    : connection_(std::move(connection)), info_(std::move(info)), shared_(std::move(shared)) {}

Timeline::Timeline(Timeline&& other) noexcept = default;

Timeline& Timeline::operator=(Timeline&& other) noexcept {
  if (this != &other) {
    Timeline dropped(std::move(*this));
    connection_ = std::move(other.connection_);
    info_ = std::move(other.info_);
    shared_ = std::move(other.shared_);
  }
  return *this;
}

Timeline::~Timeline() {
  if (connection_ == nullptr || shared_ == nullptr) return;
  v1::FdChannelMessage message;
  v1::ForgetTimelines& forget = *message.mutable_forget_timelines();
  forget.add_timeline_ids(id());
  // The owner's own object: the timeline ends now, whatever imports of it
  // this session still keeps (they cannot signal it).
  forget.set_by_owner(shared_->owner);
  // Fails only when the session is over, which forgets everything anyway.
  (void)connection_->SendRecord(message);
}

bool Timeline::ended() const {
  return shared_ != nullptr && Load(shared_->state_page().ended) != 0;
}

bool Timeline::owned() const { return shared_ != nullptr && shared_->owner; }

absl::Status Timeline::Signal(uint64_t point) { return SignalWith(point, "", false); }

absl::Status Timeline::Fail(uint64_t point, absl::string_view message) {
  RETURN_IF_ERROR(CheckClientText("message", message));
  return SignalWith(point, message, true);
}

absl::Status Timeline::SignalWith(uint64_t point, absl::string_view message, bool failed) {
  if (shared_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  if (!shared_->owner) {
    return absl::PermissionDeniedError(
        absl::StrCat("timeline ", id(), " was imported: only its owner signals it"));
  }
  if (point == 0) {
    return absl::InvalidArgumentError("point 0 is reached from the start; signal 1 or later");
  }
  RETURN_IF_ERROR(CheckPoint(point));
  std::lock_guard lock(shared_->signal_mu);
  timeline::CounterPage& counters = shared_->counter_page();
  const timeline::StatePage& state = shared_->state_page();
  if (const uint32_t ended = Load(state.ended); ended != 0) {
    const std::string why = absl::StrCat("timeline ", id(), " has ended (",
                                         v1::FenceStatus_Name(static_cast<v1::FenceStatus>(ended)),
                                         "): its session is over or it was dropped");
    // Over because the daemon went (or ended the session): say so.
    if (connection_->EndedByDaemon()) return connection_->SessionGone(why);
    return absl::FailedPreconditionError(why);
  }
  const uint64_t reached = timeline::Reached(counters, state, shared_->seen);
  if (point <= reached) {
    return absl::FailedPreconditionError(absl::StrCat(
        "point ", point, " is not after timeline ", id(), "'s last point ", reached));
  }
  // A point a fence stands behind is reached when that fence signals, and
  // no later point before it (points settle in order, as in a
  // dma_fence_chain).
  if (const uint64_t unsettled = Load(state.unsettled);
      unsettled > reached && point >= unsettled) {
    return absl::FailedPreconditionError(absl::StrCat(
        "point ", unsettled, " of timeline ", id(),
        " stands behind a fence that has not signalled yet: signal only points before it"));
  }
  if (failed) {
    const uint64_t index = Load(counters.failure_count);
    timeline::Failure& failure = counters.failures[index % timeline::CounterPage::kFailures];
    const uint32_t gen = Load(failure.gen);
    Store(failure.gen, gen + 1 + gen % 2);  // odd: being written
    std::atomic_thread_fence(std::memory_order_release);
    // From the last point reached as everyone sees it (a fence may have
    // raised it past this page's counter): no point that read OK fails.
    Store(failure.from, reached);
    Store(failure.to, point);
    std::memcpy(failure.message, message.data(), message.size());
    Store(failure.length, static_cast<uint32_t>(message.size()));
    Store(failure.gen, gen + 2 + gen % 2);  // even: done
    Store(counters.failure_count, index + 1);
  }
  if (const uint32_t cpu = timeline::CurrentCpu(); Load(counters.owner_cpu) != cpu) {
    Store(counters.owner_cpu, cpu);
  }
  Store(counters.reached, point);
  timeline::Bump(counters.seq);
  WakeWakers(point);
  return absl::OkStatus();
}

namespace {

// Wakes one waiting session: its sleepers, and its event loop if it armed a
// point now reached.
void WakeOne(timeline::WakePage& page, int notify, uint64_t point) {
  timeline::WakeWaker(page);
  if (notify >= 0) timeline::NotifyArmed(page, notify, point);
}

}  // namespace

void Timeline::WakeWakers(uint64_t point) {
  // The wakers known first: a waiter never waits for the round trip below.
  // Every sleeper before any notify fd: a write to one wakes an event loop
  // (the daemon's, when it watches a point for a fence or a buffer), which
  // on this CPU may run before this thread gets to the next futex.
  for (Shared::OwnedWaker& waker : shared_->wakers) timeline::WakeWaker(waker.wake());
  for (Shared::OwnedWaker& waker : shared_->wakers) {
    if (waker.notify.valid()) timeline::NotifyArmed(waker.wake(), waker.notify.get(), point);
  }
  const timeline::StatePage& state = shared_->state_page();
  // seq_cst after the store of the counter: a waker registered after this
  // load was registered after the store, and its waiter sees the point.
  const uint64_t gen = std::atomic_ref<uint64_t>(const_cast<uint64_t&>(state.wakers_gen))
                           .load(std::memory_order_seq_cst);
  if (gen == shared_->wakers_gen) return;
  // A waiter came, went or added a notify fd: one round trip, then none
  // until the next. On failure (the session ending) waiters still look
  // again within timeline::kMaxSleepNs, and the daemon writes to a notify
  // fd whose armed point was reached without a byte at its next scan.
  v1::TakeWakersRequest request;
  request.set_timeline_id(id());
  std::erase_if(shared_->wakers,
                [](const Shared::OwnedWaker& waker) { return Load(waker.wake().closed) != 0; });
  for (const Shared::OwnedWaker& waker : shared_->wakers) {
    request.add_known_waker_ids(waker.id);
    if (waker.notify.valid()) request.add_notify_known_waker_ids(waker.id);
  }
  v1::TakeWakersResponse response;
  internal::Call call = connection_->NewCall();
  if (!connection_->Finish(call, connection_->fence().TakeWakers(call.context.get(), request,
                                                                 &response))
           .ok()) {
    return;
  }
  bool complete = response.wakers_gen() != 0;
  for (const v1::TakeWakersResponse::Waker& waker : response.wakers()) {
    // Every fd the answer names is taken, used or not.
    absl::StatusOr<UniqueFd> page = connection_->TakeFd(waker.page_transfer_id());
    absl::StatusOr<UniqueFd> notify = waker.notify_transfer_id() != 0
                                          ? connection_->TakeFd(waker.notify_transfer_id())
                                          : absl::StatusOr<UniqueFd>(UniqueFd());
    absl::StatusOr<Mapping> map =
        page.ok() ? Mapping::Create(page->get(), timeline::kPageSize,
                                    Mapping::Protection::kReadWrite)
                  : page.status();
    if (!map.ok() || !notify.ok()) {
      complete = false;
      continue;
    }
    auto known =
        std::find_if(shared_->wakers.begin(), shared_->wakers.end(),
                     [&](const Shared::OwnedWaker& kept) { return kept.id == waker.waker_id(); });
    Shared::OwnedWaker& kept =
        known != shared_->wakers.end() ? *known : shared_->wakers.emplace_back();
    kept = {waker.waker_id(), *std::move(map), *std::move(notify)};
    WakeOne(kept.wake(), kept.notify.valid() ? kept.notify.get() : -1, point);
  }
  if (complete) shared_->wakers_gen = response.wakers_gen();
}

uint64_t Timeline::Query() const {
  if (shared_ == nullptr) return 0;
  return timeline::Reached(shared_->counter_page(), shared_->state_page(), shared_->seen);
}

Timeline::Waited Timeline::WaitedOn() const {
  Waited waited;
  if (shared_ == nullptr) return waited;
  const timeline::StatePage& state = shared_->state_page();
  waited.point = Load(state.waited_point);
  if (const int64_t need_by = Load(state.need_by_ns); need_by > 0 && waited.point != 0) {
    waited.need_by = absl::Now() + absl::Nanoseconds(need_by - timeline::MonotonicNs());
  }
  return waited;
}

absl::StatusOr<PointResult> Timeline::Wait(uint64_t point, absl::Duration timeout,
                                           absl::Duration need_by) const {
  if (shared_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  const TimelinePoint points[] = {{this, point}};
  PointResult result;
  RETURN_IF_ERROR(WaitPoints(connection_, points, true, timeout, need_by, TimelineWait::kReached,
                             std::span(&result, 1)));
  return result;
}

absl::StatusOr<PointResult> Timeline::WaitAvailable(uint64_t point, absl::Duration timeout) const {
  if (shared_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  const TimelinePoint points[] = {{this, point}};
  PointResult result;
  RETURN_IF_ERROR(WaitPoints(connection_, points, true, timeout, absl::ZeroDuration(),
                             TimelineWait::kAvailable, std::span(&result, 1)));
  return result;
}

absl::StatusOr<std::shared_ptr<internal::Waker>> Timeline::EnsureWaker(bool with_notify) const {
  std::lock_guard lock(shared_->waker_mu);
  if (shared_->waker != nullptr && (!with_notify || shared_->waker->notify.valid())) {
    return shared_->waker;
  }
  // One per session and timeline, shared by this session's Timeline objects
  // of it; (re-)registered under the connection's lock: the daemon hands
  // the same waker out again to an object that lost it.
  std::lock_guard wakers(connection_->wakers_mu());
  auto& all = connection_->wakers();
  if (all.size() > 64) {
    // Wakers of timelines this session no longer waits on.
    std::erase_if(all, [](const auto& entry) { return entry.second.expired(); });
  }
  std::weak_ptr<internal::Waker>& known = all[id()];
  std::shared_ptr<internal::Waker> waker = known.lock();
  if (waker == nullptr || (with_notify && !waker->notify.valid())) {
    v1::RegisterWakerRequest request;
    request.set_timeline_id(id());
    request.set_notify(with_notify);
    v1::RegisterWakerResponse response;
    internal::Call call = connection_->NewCall();
    RETURN_IF_ERROR(connection_->Finish(
        call, connection_->fence().RegisterWaker(call.context.get(), request, &response)));
    // Every fd the answer names is taken, used or not.
    absl::StatusOr<UniqueFd> page = connection_->TakeFd(response.page_transfer_id());
    absl::StatusOr<UniqueFd> notify =
        with_notify ? connection_->TakeFd(response.notify_transfer_id()) : UniqueFd();
    RETURN_IF_ERROR(page.status());
    RETURN_IF_ERROR(notify.status());
    if (waker == nullptr) {
      waker = std::make_shared<internal::Waker>();
      waker->id = response.waker_id();
      ASSIGN_OR_RETURN(waker->page, Mapping::Create(page->get(), timeline::kPageSize,
                                                    Mapping::Protection::kReadWrite));
      known = waker;
    }
    if (with_notify) {
      std::lock_guard notify_lock(waker->mu);
      waker->notify = *std::move(notify);
    }
  }
  shared_->waker = waker;
  shared_->registered.store(waker.get(), std::memory_order_release);
  return waker;
}

absl::StatusOr<internal::Waker*> Timeline::WaitWaker() const {
  if (internal::Waker* waker = shared_->registered.load(std::memory_order_acquire)) return waker;
  ASSIGN_OR_RETURN(std::shared_ptr<internal::Waker> waker, EnsureWaker(false));
  return waker.get();
}

absl::StatusOr<int> Timeline::NotifyFd() const {
  if (shared_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  ASSIGN_OR_RETURN(std::shared_ptr<internal::Waker> waker, EnsureWaker(true));
  return waker->notify.get();
}

absl::StatusOr<std::optional<PointResult>> Timeline::Arm(uint64_t point) const {
  return ArmFor(point, TimelineWait::kReached);
}

absl::StatusOr<std::optional<PointResult>> Timeline::ArmAvailable(uint64_t point) const {
  return ArmFor(point, TimelineWait::kAvailable);
}

absl::StatusOr<std::optional<PointResult>> Timeline::ArmFor(uint64_t point, TimelineWait what) const {
  if (shared_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  RETURN_IF_ERROR(CheckPoint(point));
  ASSIGN_OR_RETURN(std::shared_ptr<internal::Waker> waker, EnsureWaker(true));
  char drained[4096];
  while (::recv(waker->notify.get(), drained, sizeof(drained), MSG_DONTWAIT) > 0) {
  }
  // The owner stores its counter (the daemon its available point), then
  // loads this: one of the two sees the other (a full fence between the
  // store and the loads below).
  Store(waker->wake().arm_available, static_cast<uint32_t>(what == TimelineWait::kAvailable));
  std::atomic_ref<uint64_t>(waker->wake().armed).store(point, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (point == 0) return std::nullopt;  // disarmed
  timeline::PointState state = timeline::Evaluate(shared_->counter_page(), shared_->state_page(),
                                                  point, shared_->seen, &waker->wake());
  if (!state.done && what == TimelineWait::kAvailable &&
      timeline::Available(shared_->counter_page(), shared_->state_page(), point, shared_->seen)) {
    state = {true, v1::FENCE_STATUS_OK, ""};
  }
  if (!state.done && Load(waker->wake().closed) != 0) {
    // The daemon let go of this session's waker: the session ended (the
    // daemon wrote the notify fd a last time so an event loop gets here).
    // Nothing will write the fd again, and nothing bounds the wait.
    std::atomic_ref<uint64_t>(waker->wake().armed).store(0, std::memory_order_seq_cst);
    constexpr absl::string_view kWhy = "the session ended while the notify fd was armed";
    return connection_->Ended() && !connection_->EndedByDaemon()
               ? absl::UnavailableError(absl::StrCat(kWhy, " (this Client closed it)"))
               : connection_->SessionGone(kWhy);
  }
  if (!state.done) return std::nullopt;
  // Done: nothing more to wait for (the daemon stops timing it).
  std::atomic_ref<uint64_t>(waker->wake().armed).store(0, std::memory_order_seq_cst);
  return PointResult{point, state.status, std::move(state.message)};
}

absl::StatusOr<Fence> Timeline::ExportPoint(uint64_t point) const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  RETURN_IF_ERROR(CheckPoint(point));
  v1::ExportPointRequest request;
  request.set_timeline_id(id());
  request.set_point(point);
  v1::ExportPointResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().ExportPoint(call.context.get(), request, &response)));
  return Fence(connection_, response.fence());
}

absl::StatusOr<UniqueFd> Timeline::ExportPointFd(uint64_t point, IfReached if_reached) const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  RETURN_IF_ERROR(CheckPoint(point));
  if (if_reached == IfReached::kMinusOne) {
    // Reached OK: nothing to wait for. A failed point still gets an fd (and
    // the daemon's fence keeps its status).
    const timeline::PointState state = timeline::Evaluate(
        shared_->counter_page(), shared_->state_page(), point, shared_->seen);
    if (state.done && state.status == v1::FENCE_STATUS_OK) return UniqueFd();
  }
  v1::ExportPointRequest request;
  request.set_timeline_id(id());
  request.set_point(point);
  request.set_fd_only(true);
  v1::ExportPointResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().ExportPoint(call.context.get(), request, &response)));
  ASSIGN_OR_RETURN(UniqueFd fd, connection_->TakeFd(response.transfer_id()));
  return internal::CheckFenceFd(std::move(fd));
}

absl::Status Timeline::ImportFence(uint64_t point, const Fence& fence) const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  if (fence.connection_ != connection_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "fence ", fence.id(), " belongs to another Client's session (or was moved from)"));
  }
  v1::ImportFenceAsPointRequest request;
  request.set_timeline_id(id());
  request.set_point(point);
  request.set_fence_id(fence.id());
  v1::ImportFenceAsPointResponse response;
  internal::Call call = connection_->NewCall();
  return connection_->Finish(
      call, connection_->fence().ImportFenceAsPoint(call.context.get(), request, &response));
}

absl::Status Timeline::ImportSyncFd(uint64_t point, int fd, absl::Duration deadline) const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  if (::fcntl(fd, F_GETFD) < 0) {
    return absl::InvalidArgumentError(absl::StrCat("fd ", fd, " is not open"));
  }
  ASSIGN_OR_RETURN(const uint32_t deadline_ms, internal::DeadlineMs(deadline));
  const internal::Connection::UploadPlaces place = connection_->ReserveUploads(1);
  ASSIGN_OR_RETURN(const uint64_t upload_id, connection_->Upload(fd));
  v1::ImportSyncFdAsPointRequest request;
  request.set_timeline_id(id());
  request.set_point(point);
  request.set_upload_id(upload_id);
  request.set_deadline_ms(deadline_ms);
  v1::ImportSyncFdAsPointResponse response;
  internal::Call call = connection_->NewCall();
  return connection_->Finish(
      call, connection_->fence().ImportSyncFdAsPoint(call.context.get(), request, &response));
}

absl::StatusOr<std::string> Timeline::Export(absl::Duration ttl) const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  if (ttl < absl::ZeroDuration()) return absl::InvalidArgumentError("ttl is negative");
  v1::ExportTimelineRequest request;
  request.set_timeline_id(id());
  request.set_ttl_ms(static_cast<uint32_t>(
      std::min<int64_t>(absl::ToInt64Milliseconds(ttl), std::numeric_limits<uint32_t>::max())));
  v1::ExportTimelineResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().ExportTimeline(call.context.get(), request, &response)));
  return response.token();
}

absl::StatusOr<v1::TimelineInfo> Timeline::Info() const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Timeline");
  v1::GetTimelineInfoRequest request;
  request.set_timeline_id(id());
  v1::GetTimelineInfoResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().GetTimelineInfo(call.context.get(), request, &response)));
  return response.timeline();
}

absl::StatusOr<Timeline> Client::CreateTimeline(const TimelineOptions& options) const {
  RETURN_IF_ERROR(CheckClientText("name", options.name));
  if (options.deadline < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("deadline is negative");
  }
  if (options.deadline > absl::Hours(24)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "deadline ", absl::FormatDuration(options.deadline),
        " is too long: waits are never indefinite (the daemon's max_fence_deadline_ms is at "
        "most a day)"));
  }
  auto shared = std::make_unique<Timeline::Shared>();
  shared->owner = true;
  // Sealed against new writable mappings once this one exists: nobody else
  // can ever write the counters.
  ASSIGN_OR_RETURN(auto counters,
                   NewPage("bufferd-timeline-counters",
                           F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL));
  shared->counters = std::move(counters.second);
  // The counters' upload and the wait page's, together.
  const internal::Connection::UploadPlaces places = connection_->ReserveUploads(2);
  ASSIGN_OR_RETURN(const uint64_t counters_upload, connection_->Upload(counters.first.get()));
  v1::CreateTimelineRequest request;
  request.set_name(options.name);
  const int64_t ms = absl::ToInt64Milliseconds(options.deadline);
  request.set_deadline_ms(static_cast<uint32_t>(ms == 0 && options.deadline > absl::ZeroDuration()
                                                    ? 1
                                                    : ms));
  request.set_counters_upload_id(counters_upload);
  v1::CreateTimelineResponse response;
  RETURN_IF_ERROR(WithWaitPage(
      *connection_,
      [&](uint64_t wait_upload) {
        request.set_wait_page_upload_id(wait_upload);
        internal::Call call = connection_->NewCall();
        return connection_->Finish(
            call, connection_->fence().CreateTimeline(call.context.get(), request, &response));
      },
      /*place_reserved=*/true));
  // Made first: if a page cannot be taken, dropping it forgets the timeline.
  Timeline::Shared* pages = shared.get();
  Timeline created(connection_, response.timeline(), std::move(shared));
  ASSIGN_OR_RETURN(UniqueFd state, connection_->TakeFd(response.state_transfer_id()));
  ASSIGN_OR_RETURN(pages->state, MapDelivered(state));
  return created;
}

absl::StatusOr<Timeline> Client::ImportTimeline(absl::string_view token) const {
  v1::ImportTimelineRequest request;
  request.set_token(std::string(token));
  return Timeline::Import(connection_, std::move(request));
}

absl::StatusOr<Timeline> Timeline::Import(std::shared_ptr<internal::Connection> holder,
                                          v1::ImportTimelineRequest request) {
  internal::Connection& connection = *holder;
  v1::ImportTimelineResponse response;
  RETURN_IF_ERROR(WithWaitPage(connection, [&](uint64_t wait_upload) {
    request.set_wait_page_upload_id(wait_upload);
    internal::Call call = connection.NewCall();
    return connection.Finish(
        call, connection.fence().ImportTimeline(call.context.get(), request, &response));
  }));
  auto shared = std::make_unique<Timeline::Shared>();
  // Made first: if a page cannot be taken, dropping it forgets the timeline.
  Timeline::Shared* pages = shared.get();
  Timeline imported(std::move(holder), response.timeline(), std::move(shared));
  absl::StatusOr<UniqueFd> counters = connection.TakeFd(response.counters_transfer_id());
  absl::StatusOr<UniqueFd> state = connection.TakeFd(response.state_transfer_id());
  if (!counters.ok()) return counters.status();
  if (!state.ok()) return state.status();
  ASSIGN_OR_RETURN(pages->counters, MapDelivered(*counters));
  ASSIGN_OR_RETURN(pages->state, MapDelivered(*state));
  return imported;
}

absl::StatusOr<std::vector<PointResult>> Client::WaitTimelines(
    std::span<const TimelinePoint> points, bool all, absl::Duration timeout, TimelineWait what) const {
  return Timeline::WaitPoints(connection_, points, all, timeout, absl::ZeroDuration(), what);
}

absl::StatusOr<std::vector<PointResult>> Timeline::WaitPoints(
    const std::shared_ptr<internal::Connection>& connection, std::span<const TimelinePoint> points,
    bool all, absl::Duration timeout, absl::Duration need_by, TimelineWait what) {
  std::vector<PointResult> results(points.size());
  RETURN_IF_ERROR(WaitPoints(connection, points, all, timeout, need_by, what, results));
  return results;
}

namespace {

// What a wait says once its session is over: nothing bounds it any more.
absl::Status SessionOver(internal::Connection& connection) {
  constexpr absl::string_view kWhy = "the session ended while it waited for a timeline point";
  // Closed by this Client, or ended by the daemon (which may have let go of
  // the waker before fd.sock's end reached this process).
  return connection.Ended() && !connection.EndedByDaemon()
             ? absl::UnavailableError(absl::StrCat(kWhy, " (this Client closed it)"))
             : connection.SessionGone(kWhy);
}

}  // namespace

absl::Status Timeline::WaitPoints(const std::shared_ptr<internal::Connection>& connection,
                                  std::span<const TimelinePoint> points, bool all,
                                  absl::Duration timeout, absl::Duration need_by, TimelineWait what,
                                  std::span<PointResult> results) {
  if (points.empty() || points.size() > kMaxWaitPoints) {
    return absl::InvalidArgumentError(absl::StrCat("a wait takes 1 to ", kMaxWaitPoints,
                                                   " timeline points, not ", points.size()));
  }
  for (const TimelinePoint& point : points) {
    if (point.timeline == nullptr || point.timeline->shared_ == nullptr) {
      return absl::InvalidArgumentError("a timeline point names no (or a moved-from) timeline");
    }
    if (point.timeline->connection_ != connection) {
      return absl::InvalidArgumentError(absl::StrCat(
          "timeline ", point.timeline->id(), " belongs to another Client's session"));
    }
    RETURN_IF_ERROR(CheckPoint(point.point));
  }
  const int64_t start = timeline::MonotonicNs();
  // Saturating: a timeout of years (or InfiniteDuration) is "no timeout".
  auto after = [&](absl::Duration duration) {
    const int64_t ns = absl::ToInt64Nanoseconds(std::max(duration, absl::ZeroDuration()));
    return ns > std::numeric_limits<int64_t>::max() - start ? std::numeric_limits<int64_t>::max()
                                                            : start + ns;
  };
  const int64_t until = after(timeout);
  if (results.size() != points.size()) {
    return absl::InternalError("WaitPoints needs one result per point");
  }
  // Each point's timeline's waker (this session's; registered at its first
  // wait): one futex word per timeline.
  // (Each Timeline keeps its waker alive: the caller keeps the Timelines.)
  absl::InlinedVector<internal::Waker*, 4> wakers;
  absl::InlinedVector<const uint32_t*, 4> words;
  absl::InlinedVector<internal::Waker*, 4> waker_of;
  for (const TimelinePoint& point : points) {
    ASSIGN_OR_RETURN(internal::Waker* const waker, point.timeline->WaitWaker());
    waker_of.push_back(waker);
    if (std::find(wakers.begin(), wakers.end(), waker) != wakers.end()) continue;
    words.push_back(&waker->wake().seq);
    wakers.push_back(waker);
  }
  absl::InlinedVector<uint32_t, 4> expected(words.size());
  // Counted as sleepers from before the last look until the end, so the
  // owner (which skips the wake when nobody sleeps) never misses us.
  struct Sleeping {
    absl::InlinedVector<internal::Waker*, 4>* wakers = nullptr;
    ~Sleeping() {
      if (wakers == nullptr) return;
      for (internal::Waker* waker : *wakers) {
        std::atomic_ref<uint32_t>(waker->wake().sleepers).fetch_sub(1);
      }
    }
  } sleeping;
  std::optional<Slots> slots;
  // This session ended under the wait: nothing bounds it any more.
  bool session_over = false;
  int64_t now = start;
  bool now_is_fresh = false;
  bool spun = false;
  while (true) {
    for (size_t i = 0; i < words.size(); ++i) expected[i] = Load(*words[i]);
    size_t done = 0;
    for (size_t i = 0; i < points.size(); ++i) {
      Shared& shared = *points[i].timeline->shared_;
      timeline::PointState state =
          timeline::Evaluate(shared.counter_page(), shared.state_page(), points[i].point,
                             shared.seen, &waker_of[i]->wake());
      if (!state.done && what == TimelineWait::kAvailable &&
          timeline::Available(shared.counter_page(), shared.state_page(), points[i].point,
                              shared.seen)) {
        state = {true, v1::FENCE_STATUS_OK, ""};
      }
      if (state.done) {
        results[i] = {points[i].point, state.status, std::move(state.message)};
        ++done;
      }
    }
    if (all ? done == points.size() : done > 0) return absl::OkStatus();
    // Read just before arming, the clock is recent enough for the look
    // after it (a sleep's end is absolute); the first look and every look
    // after a sleep read it (registering a waker may have taken a while).
    if (!now_is_fresh) now = timeline::MonotonicNs();
    now_is_fresh = false;
    // A poll (or a timeout) after this session ended says so, as a sleep
    // that saw it end does: "not yet" would be told for ever.
    if (now >= until && (session_over || WakerClosed(wakers) || connection->Ended())) {
      return SessionOver(*connection);
    }
    if (now >= until) {
      const char* state_word = what == TimelineWait::kAvailable ? "available" : "reached";
      std::string pending;
      for (size_t i = 0; i < points.size(); ++i) {
        if (results[i].status != v1::FENCE_STATUS_UNSPECIFIED) continue;
        absl::StrAppend(&pending, pending.empty() ? "" : ", ", "point ", points[i].point,
                        " of timeline ", points[i].timeline->id());
      }
      return absl::DeadlineExceededError(
          timeout <= absl::ZeroDuration()
              ? absl::StrCat(pending, " not ", state_word, " yet (polled)")
              : absl::StrCat(pending, " not ", state_word, " within ",
                             absl::FormatDuration(timeout)));
    }
    if (!slots.has_value() && !spun) {
      // Before arming: a signal that comes while this thread spins needs no
      // wake, and the owner (finding no sleeper) no syscall.
      spun = true;
      if (const int64_t spin = timeline::SpinNs(); spin > 0) {
        const uint32_t cpu = timeline::CurrentCpu();
        absl::InlinedVector<const uint32_t*, 8> spin_words(words.begin(), words.end());
        absl::InlinedVector<uint32_t, 8> spin_expected(expected.begin(), expected.end());
        bool elsewhere = false;
        for (size_t i = 0; i < points.size(); ++i) {
          if (results[i].status != v1::FENCE_STATUS_UNSPECIFIED) continue;
          const timeline::CounterPage& counters = points[i].timeline->shared_->counter_page();
          const uint32_t owner_cpu = Load(counters.owner_cpu);
          elsewhere |= owner_cpu != 0 && owner_cpu != cpu;
          spin_words.push_back(&counters.seq);
          spin_expected.push_back(Load(counters.seq));
        }
        if (elsewhere && cpu != 0) {
          const bool moved =
              timeline::SpinUntilMoved(spin_words.data(), spin_expected.data(), spin_words.size(),
                                       std::min(until, now + spin));
          now = timeline::MonotonicNs();
          now_is_fresh = true;
          if (moved) continue;
        }
      }
    }
    if (!slots.has_value()) {
      // The daemon starts each point's deadline when it sees it here.
      slots.emplace(*connection);
      const int64_t need_by_ns = need_by > absl::ZeroDuration() ? after(need_by) : 0;
      for (size_t i = 0; i < points.size(); ++i) {
        if (results[i].status != v1::FENCE_STATUS_UNSPECIFIED) continue;
        RETURN_IF_ERROR(slots->Arm(points[i].timeline->id(), points[i].point, need_by_ns));
      }
      for (internal::Waker* waker : wakers) {
        std::atomic_ref<uint32_t>(waker->wake().sleepers).fetch_add(1, std::memory_order_seq_cst);
      }
      sleeping.wakers = &wakers;
      std::atomic_thread_fence(std::memory_order_seq_cst);
      now_is_fresh = true;
      continue;  // look again: a signal may have come while arming
    }
    if (session_over) return SessionOver(*connection);
    // `now` was read at or before the last look: at worst a capped sleep
    // ends a little early and the loop looks again.
    // Its timeout is the wait's: the next look says what is still pending.
    if (absl::Status slept =
            timeline::WaitAny(words.data(), expected.data(), words.size(), until, nullptr, now);
        !slept.ok() && slept.code() != absl::StatusCode::kDeadlineExceeded) {
      return slept;
    }
    // The daemon let go of a waker (it does so when the session ends, and
    // wakes it), or a wake that changed nothing (WaitAny looks again every
    // timeline::kMaxSleepNs) while the session ended under it: either way
    // the daemon's bound on the wait is gone.
    bool moved = false;
    for (size_t i = 0; i < words.size(); ++i) moved |= Load(*words[i]) != expected[i];
    if (!session_over && (WakerClosed(wakers) || (!moved && connection->Ended()))) {
      session_over = true;  // after one more look at the points
      continue;
    }
  }
}

}  // namespace bufferd
