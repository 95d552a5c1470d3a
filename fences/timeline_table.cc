#include "fences/timeline_table.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <iterator>
#include <map>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "base/client_text.h"
#include "base/errno_status.h"

namespace bufferd {
namespace {

using timeline::Load;
using timeline::Store;

absl::Time WallOf(absl::Duration monotonic) {
  return absl::Now() + (monotonic - MonotonicNow());
}

}  // namespace

TimelineTable::TimelineTable(EventLoop* loop, FdBudget* budget, TimelineLimits limits)
    : loop_(loop), budget_(budget), limits_(limits) {}

TimelineTable::~TimelineTable() { Stop(); }

void TimelineTable::AddSession(uint64_t session, uid_t uid) {
  absl::MutexLock lock(&mu_);
  sessions_[session].uid = uid;
}

void TimelineTable::CloseSession(uint64_t session_id) {
  Calls calls;
  {
    absl::MutexLock lock(&mu_);
    CloseSessionLocked(session_id);
    calls.swap(deferred_);
  }
  Run(calls);
}

void TimelineTable::CloseSessionLocked(uint64_t session_id) {
  auto it = sessions_.find(session_id);
  if (it == sessions_.end()) return;
  Session& session = it->second;
  // The owned ones end first, so their waiters wake before anything else.
  for (const auto& [id, hold] : session.details.Read().held) {
    if (hold.owned) EndLocked(timelines_.at(id), v1::FENCE_STATUS_OWNER_DIED);
  }
  std::vector<uint64_t> held;
  for (const auto& [id, hold] : session.details.Read().held) held.push_back(id);
  // Its exported points (the fence table fails their fences itself).
  for (auto& [id, timeline] : timelines_) {
    std::erase_if(timeline.watches,
                  [&](const auto& watch) { return watch.second.session == session_id; });
  }
  for (uint64_t id : held) UnholdLocked(session_id, session, id);
  if (session.details.Read().wait_map.valid()) --wait_pages_;
  sessions_.erase(it);
  UpdateTimerLocked();
}

absl::StatusOr<TimelineTable::Session*> TimelineTable::SessionLocked(uint64_t session) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) {
    return absl::UnauthenticatedError(absl::StrCat("session ", session, " has ended"));
  }
  return &it->second;
}

absl::StatusOr<TimelineTable::Timeline*> TimelineTable::HeldLocked(uint64_t session,
                                                                   uint64_t id) const {
  auto s = sessions_.find(session);
  auto t = timelines_.find(id);
  if (s == sessions_.end() || t == timelines_.end() ||
      !s->second.details.Read().held.contains(id)) {
    return absl::NotFoundError(absl::StrCat("timeline ", id, " not found"));
  }
  return const_cast<Timeline*>(&t->second);
}

bool TimelineTable::ThroughBufferLocked(uint64_t session, uint64_t id) const {
  auto s = sessions_.find(session);
  if (s == sessions_.end()) return false;
  const auto& held = s->second.details.Read().held;
  auto it = held.find(id);
  return it != held.end() && it->second.through_buffer;
}

absl::Status TimelineTable::CheckNotThroughBufferLocked(uint64_t session, uint64_t id,
                                                        absl::string_view what) const {
  if (ThroughBufferLocked(session, id)) {
    return absl::PermissionDeniedError(
        absl::StrCat("timeline ", id,
                     " was opened through a buffer it has a point attached to: that view "
                     "waits and queries only, it cannot ",
                     what));
  }
  return absl::OkStatus();
}

absl::Status TimelineTable::CheckNewHoldLocked(const Session& session) const {
  if (session.details.Read().held.size() >= limits_.max_per_session) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "this session holds ", session.details.Read().held.size(),
        " timelines, the limit (max_timelines_per_session ", limits_.max_per_session, ")"));
  }
  auto by_uid = held_by_uid_.find(session.uid);
  if (by_uid != held_by_uid_.end() && by_uid->second >= limits_.max_per_uid) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "uid ", session.uid, "'s sessions hold ", by_uid->second,
        " timelines, the limit (max_timelines_per_uid ", limits_.max_per_uid, ")"));
  }
  return absl::OkStatus();
}

absl::Status TimelineTable::CheckNewTimelineLocked(const Session& session) const {
  RETURN_IF_ERROR(CheckNewHoldLocked(session));
  if (timelines_.size() >= limits_.max_timelines) {
    return absl::ResourceExhaustedError(absl::StrCat("the daemon has ", timelines_.size(),
                                                     " timelines, the limit (max_timelines ",
                                                     limits_.max_timelines, ")"));
  }
  return absl::OkStatus();
}

absl::Status TimelineTable::SetWaitPage(uint64_t session_id, UniqueFd page) {
  RETURN_IF_ERROR(timeline::CheckPageFd(page.get(), false, "the wait page"));
  ASSIGN_OR_RETURN(auto inode, FileIdentity(page.get()));
  uid_t uid;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
    if (session->details.Read().wait_map.valid()) {
      if (session->details.Read().wait_inode == inode) return absl::OkStatus();
      return absl::FailedPreconditionError("this session has another wait page already");
    }
    uid = session->uid;
  }
  ASSIGN_OR_RETURN(FdBudget::Lease lease, budget_->Acquire(FdUse::kFence, uid));
  ASSIGN_OR_RETURN(UniqueFd read_only, ReopenReadOnly(page.get(), "a timeline page"));
  page.Reset();
  ASSIGN_OR_RETURN(Mapping map, Mapping::Create(read_only.get(), timeline::kPageSize,
                                                Mapping::Protection::kReadOnly));
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
  if (session->details.Read().wait_map.valid()) {
    if (session->details.Read().wait_inode == inode) return absl::OkStatus();
    return absl::FailedPreconditionError("this session has another wait page already");
  }
  if (auto known = inodes_.find(inode); known != inodes_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the wait page is a page of timeline ", known->second));
  }
  Session::Details& details = session->details.Use();
  details.wait_fd = LeasedFd{std::move(read_only), std::move(lease)};
  details.wait_map = std::move(map);
  details.wait_inode = inode;
  ++wait_pages_;
  UpdateTimerLocked();
  return absl::OkStatus();
}

bool TimelineTable::HasWaitPage(uint64_t session) const {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(session);
  return it != sessions_.end() && it->second.details.Read().wait_map.valid();
}

absl::StatusOr<TimelineTable::Created> TimelineTable::Create(uint64_t session_id,
                                                             UniqueFd counters,
                                                             absl::string_view name,
                                                             absl::Duration deadline) {
  RETURN_IF_ERROR(CheckClientText("name", name));
  if (deadline < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("deadline_ms is negative");
  }
  if (deadline == absl::ZeroDuration()) deadline = limits_.default_deadline;
  if (deadline > limits_.max_deadline) {
    return absl::InvalidArgumentError(absl::StrCat(
        "deadline ", absl::ToInt64Milliseconds(deadline), " ms is over max_fence_deadline_ms (",
        absl::ToInt64Milliseconds(limits_.max_deadline), "): timelines are never indefinite"));
  }
  RETURN_IF_ERROR(timeline::CheckPageFd(counters.get(), true, "the counter page"));
  ASSIGN_OR_RETURN(auto counters_inode, FileIdentity(counters.get()));
  uid_t uid;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
    RETURN_IF_ERROR(CheckNewTimelineLocked(*session));
    uid = session->uid;
  }
  // Leased without the table's lock (the budget may run reclaimers): the
  // two pages kept, and the state page's copy for the owner.
  ASSIGN_OR_RETURN(FdBudget::Lease counters_lease, budget_->Acquire(FdUse::kFence, uid));
  ASSIGN_OR_RETURN(FdBudget::Lease state_lease, budget_->Acquire(FdUse::kFence, uid));
  ASSIGN_OR_RETURN(FdBudget::Lease out_lease, budget_->Acquire(FdUse::kDelivery, uid));

  ASSIGN_OR_RETURN(UniqueFd counters_ro, ReopenReadOnly(counters.get(), "a timeline page"));
  counters.Reset();
  ASSIGN_OR_RETURN(Mapping counters_map, Mapping::Create(counters_ro.get(), timeline::kPageSize,
                                                         Mapping::Protection::kReadOnly));
  // The state page: the daemon maps it writable, then seals it so that
  // nobody else ever can.
  ASSIGN_OR_RETURN(SealedPage state_page, CreateSealedPage("bufferd-timeline-state",
                                                           timeline::kPageSize,
                                                           "a timeline's state page"));
  Mapping state_map = std::move(state_page.writable);
  UniqueFd state_ro = std::move(state_page.read_only);
  ASSIGN_OR_RETURN(auto state_inode, FileIdentity(state_ro.get()));
  ASSIGN_OR_RETURN(UniqueFd out_fd, DuplicateFd(state_ro.get()));

  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
  RETURN_IF_ERROR(CheckNewTimelineLocked(*session));
  if (auto known = inodes_.find(counters_inode); known != inodes_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the counter page is a page of timeline ", known->second));
  }
  const uint64_t id = next_id_++;
  Timeline& timeline = timelines_[id];
  timeline.id = id;
  timeline.name = std::string(name);
  timeline.owner_session = session_id;
  timeline.creator_session = session_id;
  timeline.owner_uid = uid;
  timeline.deadline = deadline;
  timeline.created = absl::Now();
  timeline.counters_fd = LeasedFd{std::move(counters_ro), std::move(counters_lease)};
  timeline.state_fd = LeasedFd{std::move(state_ro), std::move(state_lease)};
  timeline.counters_map = std::move(counters_map);
  timeline.state_map = std::move(state_map);
  timeline.counters_inode = counters_inode;
  timeline.state_inode = state_inode;
  timeline::StatePage& state = timeline.state();
  Store(state.timeline_id, id);
  Store(state.deadline_ms, static_cast<uint32_t>(absl::ToInt64Milliseconds(deadline)));
  // Whatever the owner wrote before it handed the page over counts.
  timeline::Reached(timeline.counters(), state, timeline.seen);
  inodes_[counters_inode] = id;
  inodes_[state_inode] = id;
  session->details.Use().held[id] = Holding{.owned = true, .count = 1};
  ++held_by_uid_[uid];
  timeline.holders = 1;
  UpdateTimerLocked();
  return Created{ViewLocked(timeline), LeasedFd{std::move(out_fd), std::move(out_lease)}};
}

namespace {

// Hold's refusal of a hold through a buffer to the timeline's owner: its
// hold must end with its Timeline.
absl::Status OwnTimelineThroughBuffer(uint64_t id) {
  return absl::FailedPreconditionError(
      absl::StrCat("timeline ", id, " is this session's own: wait on it through its Timeline"));
}

}  // namespace

absl::StatusOr<TimelineTable::Handout> TimelineTable::Hold(uint64_t session_id, uint64_t id,
                                                           bool through_buffer) {
  uid_t uid;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
    if (!timelines_.contains(id)) {
      return absl::NotFoundError(absl::StrCat("timeline ", id, " is gone"));
    }
    if (auto held = session->details.Read().held.find(id);
        held == session->details.Read().held.end()) {
      RETURN_IF_ERROR(CheckNewHoldLocked(*session));
    } else if (through_buffer && held->second.owned) {
      return OwnTimelineThroughBuffer(id);
    }
    uid = session->uid;
  }
  ASSIGN_OR_RETURN(FdBudget::Lease counters_lease, budget_->Acquire(FdUse::kDelivery, uid));
  ASSIGN_OR_RETURN(FdBudget::Lease state_lease, budget_->Acquire(FdUse::kDelivery, uid));
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
  auto it = timelines_.find(id);
  if (it == timelines_.end()) return absl::NotFoundError(absl::StrCat("timeline ", id, " is gone"));
  Timeline& timeline = it->second;
  ASSIGN_OR_RETURN(UniqueFd counters_fd, DuplicateFd(timeline.counters_fd.fd.get()));
  ASSIGN_OR_RETURN(UniqueFd state_fd, DuplicateFd(timeline.state_fd.fd.get()));
  auto& holds = session->details.Use().held;
  if (auto held = holds.find(id); held != holds.end()) {
    if (through_buffer && held->second.owned) {
      return OwnTimelineThroughBuffer(id);
    }
    ++held->second.count;
    // A token (or anything but a buffer) gives the whole timeline.
    if (!through_buffer) held->second.through_buffer = false;
  } else {
    RETURN_IF_ERROR(CheckNewHoldLocked(*session));
    holds[id] = Holding{.owned = false, .through_buffer = through_buffer, .count = 1};
    ++held_by_uid_[session->uid];
    ++timeline.holders;
  }
  return Handout{ViewLocked(timeline), LeasedFd{std::move(counters_fd), std::move(counters_lease)},
                 LeasedFd{std::move(state_fd), std::move(state_lease)}};
}

namespace {

// A notify channel: a datagram socket pair, both ends leased. Writers send
// with MSG_DONTWAIT | MSG_NOSIGNAL: a full queue never blocks them (it is
// readable anyway) and a reader gone never raises SIGPIPE, whatever anyone
// does to the ends' flags.
absl::Status MakeChannel(LeasedFd& read_end, LeasedFd& write_end, FdBudget::Lease read_lease,
                         FdBudget::Lease write_lease) {
  int ends[2];
  if (::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, ends) != 0) {
    return ErrnoError("socketpair", errno);
  }
  read_end = LeasedFd{UniqueFd(ends[0]), std::move(read_lease)};
  write_end = LeasedFd{UniqueFd(ends[1]), std::move(write_lease)};
  return absl::OkStatus();
}

void Notify(int fd) {
  const char byte = 1;
  (void)::send(fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
}

}  // namespace

absl::StatusOr<TimelineTable::Waker> TimelineTable::NewWaker(uid_t uid, bool page, bool notify) {
  Waker made;
  if (page) {
    ASSIGN_OR_RETURN(FdBudget::Lease lease, budget_->Acquire(FdUse::kFence, uid));
    UniqueFd fd(::memfd_create("bufferd-timeline-wake", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (!fd.valid()) return ErrnoError("memfd_create", errno);
    if (::ftruncate(fd.get(), timeline::kPageSize) != 0) return ErrnoError("ftruncate", errno);
    if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
      return ErrnoError("sealing a wake page", errno);
    }
    // Like the daemon's other files: nobody reopens it through /proc.
    (void)::fchmod(fd.get(), 0600);
    ASSIGN_OR_RETURN(made.page, Mapping::Create(fd.get(), timeline::kPageSize,
                                                Mapping::Protection::kReadWrite));
    made.page_fd = LeasedFd{std::move(fd), std::move(lease)};
  }
  if (notify) {
    ASSIGN_OR_RETURN(FdBudget::Lease read_lease, budget_->Acquire(FdUse::kFence, uid));
    ASSIGN_OR_RETURN(FdBudget::Lease write_lease, budget_->Acquire(FdUse::kFence, uid));
    RETURN_IF_ERROR(
        MakeChannel(made.notify_read, made.notify_write, std::move(read_lease),
                    std::move(write_lease)));
  }
  return made;
}

absl::StatusOr<TimelineTable::Registered> TimelineTable::RegisterWaker(uint64_t session_id,
                                                                       uint64_t id, bool notify) {
  uid_t uid;
  bool has_waker, has_notify;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Timeline * timeline, HeldLocked(session_id, id));
    uid = sessions_.at(session_id).uid;
    auto waker = timeline->wakers.find(session_id);
    has_waker = waker != timeline->wakers.end();
    has_notify = has_waker && waker->second.notify();
  }
  // Made and leased without the table's lock (the budget may run reclaimers).
  std::vector<FdBudget::Lease> leases;
  for (size_t i = 0; i < (notify ? 2u : 1u); ++i) {
    ASSIGN_OR_RETURN(FdBudget::Lease lease, budget_->Acquire(FdUse::kDelivery, uid));
    leases.push_back(std::move(lease));
  }
  auto take = [&] {
    FdBudget::Lease lease = std::move(leases.back());
    leases.pop_back();
    return lease;
  };
  ASSIGN_OR_RETURN(Waker made, NewWaker(uid, !has_waker, notify && !has_notify));
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Timeline * timeline, HeldLocked(session_id, id));
  auto [waker, added] = timeline->wakers.try_emplace(session_id);
  bool changed = false;
  if (added) {
    if (!made.page.valid()) {
      timeline->wakers.erase(waker);
      return absl::UnavailableError("the waker went while it was registered; try again");
    }
    made.id = next_id_++;
    timeline::WakePage& page = made.wake();
    Store(page.waker_id, made.id);
    Store(page.timeline_id, id);
    waker->second.id = made.id;
    waker->second.page_fd = std::move(made.page_fd);
    waker->second.page = std::move(made.page);
    changed = true;
  }
  Waker& kept = waker->second;
  if (notify && !kept.notify()) {
    if (!made.notify_write.fd.valid()) {
      return absl::UnavailableError("the waker changed while it was registered; try again");
    }
    kept.notify_write = std::move(made.notify_write);
    kept.notify_read = std::move(made.notify_read);
    changed = true;
  }
  Registered out;
  out.waker_id = kept.id;
  ASSIGN_OR_RETURN(UniqueFd page, DuplicateFd(kept.page_fd.fd.get()));
  out.page = LeasedFd{std::move(page), take()};
  if (notify) {
    ASSIGN_OR_RETURN(UniqueFd read_end, DuplicateFd(kept.notify_read.fd.get()));
    out.notify_read = LeasedFd{std::move(read_end), take()};
  }
  if (changed) {
    timeline::StatePage& state = timeline->state();
    Store(state.wakers_gen, Load(state.wakers_gen) + 1);
  }
  return out;
}

absl::StatusOr<TimelineTable::Wakers> TimelineTable::TakeWakers(
    uint64_t session_id, uint64_t id, const std::vector<uint64_t>& known,
    const std::vector<uint64_t>& known_notify) {
  const absl::flat_hash_set<uint64_t> have_page(known.begin(), known.end());
  const absl::flat_hash_set<uint64_t> have_notify(known_notify.begin(), known_notify.end());
  // Up to date: the owner has its page, and its notify fd if it has one.
  auto up_to_date = [&](const Waker& waker) {
    return have_page.contains(waker.id) && (!waker.notify() || have_notify.contains(waker.id));
  };
  uid_t uid;
  size_t wanted = 0;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Timeline * timeline, HeldLocked(session_id, id));
    if (!sessions_.at(session_id).details.Read().held.at(id).owned) {
      return absl::PermissionDeniedError(
          absl::StrCat("timeline ", id, " is not this session's: only its owner takes wakers"));
    }
    uid = sessions_.at(session_id).uid;
    for (const auto& [session, waker] : timeline->wakers) {
      if (!up_to_date(waker)) wanted += waker.notify() ? 2 : 1;
    }
  }
  std::vector<FdBudget::Lease> leases;
  for (size_t i = 0; i < wanted; ++i) {
    ASSIGN_OR_RETURN(FdBudget::Lease lease, budget_->Acquire(FdUse::kDelivery, uid));
    leases.push_back(std::move(lease));
  }
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Timeline * timeline, HeldLocked(session_id, id));
  Wakers out;
  out.gen = Load(timeline->state().wakers_gen);
  bool complete = true;
  for (const auto& [session, waker] : timeline->wakers) {
    if (up_to_date(waker)) continue;
    // One waker that cannot be handed out (came meanwhile, out of fds)
    // does not keep the owner from the others: it asks again later.
    const size_t needed = waker.notify() ? 2 : 1;
    if (leases.size() < needed) {
      complete = false;
      continue;
    }
    absl::StatusOr<UniqueFd> page = DuplicateFd(waker.page_fd.fd.get());
    absl::StatusOr<UniqueFd> notify =
        waker.notify() ? DuplicateFd(waker.notify_write.fd.get()) : absl::StatusOr<UniqueFd>(UniqueFd());
    if (!page.ok() || !notify.ok()) {
      complete = false;
      continue;
    }
    WakerHandout handout;
    handout.waker_id = waker.id;
    handout.page = LeasedFd{*std::move(page), std::move(leases.back())};
    leases.pop_back();
    if (notify->valid()) {
      handout.notify = LeasedFd{*std::move(notify), std::move(leases.back())};
      leases.pop_back();
    }
    out.wakers.push_back(std::move(handout));
  }
  if (!complete) out.gen = 0;
  return out;
}

absl::Status TimelineTable::CheckHeld(uint64_t session, uint64_t id, bool to_share) const {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(HeldLocked(session, id).status());
  if (to_share) return CheckNotThroughBufferLocked(session, id, "share it on");
  return absl::OkStatus();
}

absl::StatusOr<TimelineView> TimelineTable::Info(uint64_t session, uint64_t id) const {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Timeline * timeline, HeldLocked(session, id));
  return ViewLocked(*timeline);
}

void TimelineTable::Forget(uint64_t session_id, uint64_t id, bool by_owner) {
  Calls calls;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session_id);
    if (it == sessions_.end()) return;
    if (it->second.details.get() == nullptr) return;
    auto& holds = it->second.details.get()->held;
    auto held = holds.find(id);
    if (held == holds.end()) return;
    if (held->second.owned && (by_owner || held->second.count == 1)) {
      EndLocked(timelines_.at(id), v1::FENCE_STATUS_CANCELLED);
      held->second.owned = false;  // ended: the session's imports keep it
    }
    if (--held->second.count == 0) UnholdLocked(session_id, it->second, id);
    UpdateTimerLocked();
    calls.swap(deferred_);
  }
  Run(calls);
}

void TimelineTable::UnholdLocked(uint64_t session_id, Session& session, uint64_t id) {
  if (session.details.get() == nullptr || session.details.get()->held.erase(id) == 0) return;
  if (auto by_uid = held_by_uid_.find(session.uid);
      by_uid != held_by_uid_.end() && --by_uid->second == 0) {
    held_by_uid_.erase(by_uid);
  }
  auto it = timelines_.find(id);
  if (it == timelines_.end()) return;
  if (auto waker = it->second.wakers.find(session_id); waker != it->second.wakers.end()) {
    // The owner lets go of its copy when it sees this; a waiter still
    // sleeping on the page or polling the notify fd (its session ended
    // under it) wakes to see it too, rather than never.
    Store(waker->second.wake().closed, uint32_t{1});
    timeline::WakeWaker(waker->second.wake());
    if (waker->second.notify()) Notify(waker->second.notify_write.fd.get());
    it->second.wakers.erase(waker);
    timeline::StatePage& state = it->second.state();
    Store(state.wakers_gen, Load(state.wakers_gen) + 1);
  }
  if (--it->second.holders > 0) return;
  UnwatchLocked(it->second);
  // Ended (the owner holds it while it lives): its watches are settled, but
  // none may be dropped uncalled.
  CheckWatchesLocked(it->second, deferred_);
  for (auto& [point, watch] : it->second.watches) {
    deferred_.emplace_back(std::move(watch.done),
                           timeline::PointState{true, v1::FENCE_STATUS_CANCELLED,
                                                absl::StrCat("timeline ", id, " is gone")});
  }
  for (const auto& inode : {it->second.counters_inode, it->second.state_inode}) {
    if (auto known = inodes_.find(inode); known != inodes_.end() && known->second == id) {
      inodes_.erase(known);
    }
  }
  timelines_.erase(it);
}

void TimelineTable::EndLocked(Timeline& timeline, v1::FenceStatus status) {
  timeline.owner_session = 0;
  timeline::StatePage& state = timeline.state();
  if (Load(state.ended) != 0) return;
  // Where the owner got to is what it signalled while it was there; nothing
  // it writes later counts.
  const uint64_t reached = ObserveLocked(timeline);
  Store(state.ended_after, reached);
  Store(state.ended, static_cast<uint32_t>(status));
  timeline.tracked.clear();
  // The fences behind later points no longer count: those points fail.
  for (auto& [point, promised] : timeline.promised) {
    if (promised.result.has_value() || promised.dropped == nullptr) continue;
    deferred_.emplace_back([dropped = std::move(promised.dropped)](timeline::PointState) { dropped(); },
                           timeline::PointState{});
  }
  timeline.promised.clear();
  Store(state.unsettled, uint64_t{0});
  // Exported points fail now, not at the daemon's next look.
  CheckWatchesLocked(timeline, deferred_);
  Store(state.waited_point, uint64_t{0});
  Store(state.need_by_ns, int64_t{0});
  WakeAllLocked(timeline);
}

void TimelineTable::WakeAllLocked(Timeline& timeline) {
  timeline::StatePage& state = timeline.state();
  timeline::Bump(state.seq);
  timeline::WakeAll(state.seq);
  for (auto& [session, waker] : timeline.wakers) {
    timeline::WakeWaker(waker.wake());
    if (waker.notify()) Notify(waker.notify_write.fd.get());
  }
}

void TimelineTable::MarkLocked(Timeline& timeline, const std::vector<uint64_t>& points) {
  timeline::StatePage& state = timeline.state();
  uint64_t count = Load(state.mark_count);
  for (uint64_t point : points) {
    Store(state.marks[count % timeline::StatePage::kMarks], point);
    Store(state.mark_count, ++count);
  }
  WakeAllLocked(timeline);
}

uint64_t TimelineTable::ObserveLocked(Timeline& timeline) {
  timeline::StatePage& state = timeline.state();
  const uint64_t reached = timeline::Reached(timeline.counters(), state, timeline.seen);
  if (reached <= Load(state.observed)) return reached;
  Store(state.observed, reached);
  // A waiter blocked on a point the owner reached without a wake (or
  // reached and took back) must see it: only where someone waits, so the
  // steady state costs no wake.
  if (!timeline.tracked.empty() && timeline.tracked.begin()->first <= reached) {
    WakeAllLocked(timeline);
  }
  return reached;
}

void TimelineTable::Scan(absl::Duration now) {
  Calls calls;
  {
    absl::MutexLock lock(&mu_);
    ScanLocked(now, calls);
  }
  Run(calls);
}

void TimelineTable::ScanLocked(absl::Duration now, Calls& calls) {
  if (stopped_) return;
  // Per timeline: the points waited on now (and the earliest need-by).
  struct Waited {
    // Point, and the session waiting on it.
    std::vector<std::pair<uint64_t, uint64_t>> points;
    int64_t need_by_ns = 0;
    // Waits through a buffer (Hold's through_buffer): they join a point
    // another wait or a watch times (the attached point's), and then end
    // with it, but never start a deadline themselves.
    std::vector<std::pair<uint64_t, uint64_t>> joining;
  };
  absl::flat_hash_map<uint64_t, Waited> waited;
  for (const auto& [session_id, session] : sessions_) {
    if (!session.details.Read().wait_map.valid()) continue;
    const auto& page =
        *reinterpret_cast<const timeline::WaitPage*>(session.details.Read().wait_map.data());
    // Only the slots the session marks as holding a wait (a bit past the
    // last slot names none).
    for (size_t word = 0; word < std::size(page.armed); ++word) {
      for (uint64_t bits = Load(page.armed[word]) & timeline::SlotBits(word); bits != 0;
           bits &= bits - 1) {
        const timeline::WaitSlot& slot = page.slots[word * 64 + std::countr_zero(bits)];
        // A slot read while its session rewrites it is skipped (next scan).
        const uint32_t gen = Load(slot.gen);
        const uint64_t id = Load(slot.timeline);
        const uint64_t point = Load(slot.point);
        const int64_t need_by = Load(slot.need_by_ns);
        std::atomic_thread_fence(std::memory_order_acquire);
        if (gen % 2 != 0 || Load(slot.gen) != gen) continue;
        if (id == 0) continue;
        auto held = session.details.Read().held.find(id);
        if (held == session.details.Read().held.end()) continue;
        if (held->second.through_buffer) {
          waited[id].joining.emplace_back(point, session_id);
          continue;
        }
        Waited& entry = waited[id];
        entry.points.emplace_back(point, session_id);
        if (need_by > 0 && (entry.need_by_ns == 0 || need_by < entry.need_by_ns)) {
          entry.need_by_ns = need_by;
        }
      }
    }
  }
  for (auto& [id, timeline] : timelines_) {
    timeline::StatePage& state = timeline.state();
    if (Load(state.ended) != 0) continue;
    // An event-loop waiter's armed point is a wait like any other, and so
    // is an exported point (the daemon's waker's expired ring has those
    // further ahead than the next that fail).
    const uint64_t available = Load(state.available);
    for (const auto& [session, waker] : timeline.wakers) {
      if (session == kDaemonWaker) continue;
      const uint64_t armed = Load(waker.wake().armed);
      if (armed == 0) continue;
      // Armed for availability and available: nothing waited for any more.
      if (Load(waker.wake().arm_available) != 0 && armed <= available) continue;
      if (ThroughBufferLocked(session, id)) {
        waited[id].joining.emplace_back(armed, session);
      } else {
        waited[id].points.emplace_back(armed, session);
      }
    }
    for (const auto& [point, watch] : timeline.watches) {
      waited[id].points.emplace_back(point, kDaemonWaker);
    }
    if (auto it = waited.find(id); it != waited.end() && !it->second.joining.empty()) {
      // Only points someone else waits on.
      Waited& entry = it->second;
      absl::flat_hash_set<uint64_t> timed;
      for (const auto& [point, session] : entry.points) timed.insert(point);
      for (const auto& [point, session] : entry.joining) {
        if (timed.contains(point)) entry.points.emplace_back(point, session);
      }
    }
    // Observed before the tracked points are dropped: a point reached since
    // the last scan wakes its waiters if they missed it.
    const uint64_t reached = ObserveLocked(timeline);
    std::map<uint64_t, Tracked> tracked;
    uint64_t earliest = 0;
    int64_t need_by = 0;
    std::vector<uint64_t> due;
    // Due points further ahead than the next: session -> points.
    std::map<uint64_t, std::vector<uint64_t>> expired;
    if (auto it = waited.find(id); it != waited.end()) {
      for (const auto& [point, session] : it->second.points) {
        if (point <= reached) continue;
        // Behind a fence not signalled yet: that fence's deadline bounds
        // it (its own, which may be longer than the timeline's), so it is
        // not timed; the owner still sees it waited on.
        if (timeline.promised.empty() || point > available) {
          auto before = timeline.tracked.find(point);
          const Tracked entry = before != timeline.tracked.end()
                                    ? before->second
                                    : Tracked{now, now + timeline.deadline};
          if (entry.due <= now) {
            if (point == reached + 1) {
              due.push_back(point);
            } else {
              expired[session].push_back(point);
            }
            continue;
          }
          tracked.emplace(point, entry);
        }
        if (earliest == 0 || point < earliest) earliest = point;
        need_by = it->second.need_by_ns;
      }
    }
    // Far ahead: those sessions' waits end, nobody else's point fails.
    for (const auto& [session, points] : expired) {
      if (session == kDaemonWaker) {
        // Exported points far ahead: their fences fail, nobody else's.
        for (uint64_t point : points) {
          auto [first, last] = timeline.watches.equal_range(point);
          for (auto it = first; it != last; ++it) {
            calls.emplace_back(
                std::move(it->second.done),
                timeline::PointState{
                    true, v1::FENCE_STATUS_DEADLINE_EXCEEDED,
                    absl::StrCat("point ", point, " (the timeline is at ", reached,
                                 ") was not reached within the timeline's deadline (",
                                 absl::ToInt64Milliseconds(timeline.deadline),
                                 " ms of being waited on); it is not the next point, so it "
                                 "failed for its waiters only")});
          }
          timeline.watches.erase(first, last);
        }
        continue;
      }
      auto waker = timeline.wakers.find(session);
      if (waker == timeline.wakers.end()) continue;
      timeline::WakePage& page = waker->second.wake();
      uint64_t count = Load(page.expired_count);
      for (uint64_t point : points) {
        Store(page.expired[count % timeline::WakePage::kExpired], point);
        Store(page.expired_count, ++count);
      }
      timeline::WakeWaker(page);
      if (waker->second.notify()) Notify(waker->second.notify_write.fd.get());
    }
    // Points nobody waits on any more are dropped with the rest.
    timeline.tracked = std::move(tracked);
    // An armed point reached that the owner wrote no byte for (a lazy or
    // hostile owner, or one that has not taken the waker yet): the daemon
    // writes it, a scan late at worst.
    for (auto& [session, waker] : timeline.wakers) {
      if (session == kDaemonWaker || !waker.notify()) continue;
      timeline::NotifyArmed(waker.wake(), waker.notify_write.fd.get(), reached);
    }
    if (!due.empty()) {
      std::sort(due.begin(), due.end());
      due.erase(std::unique(due.begin(), due.end()), due.end());
      MarkLocked(timeline, due);
    }
    if (Load(state.waited_point) != earliest) Store(state.waited_point, earliest);
    if (Load(state.need_by_ns) != need_by) Store(state.need_by_ns, need_by);
  }
  // Exported points: whatever the owner sent or did not (and a channel it
  // flooded goes back on the loop).
  for (auto& [id, timeline] : timelines_) {
    if (!timeline.wakers.contains(kDaemonWaker)) continue;
    timeline.notifies = 0;
    if (!timeline.notify_watched && !timeline.watches.empty()) {
      const int fd = timeline.wakers.at(kDaemonWaker).notify_read.fd.get();
      const uint64_t timeline_id = id;
      timeline.notify_watched =
          loop_->Watch(fd, EPOLLIN, [this, timeline_id](uint32_t) { OnDaemonNotify(timeline_id); })
              .ok();
    }
    CheckWatchesLocked(timeline, calls);
  }
}

absl::Status TimelineTable::WatchPoint(uint64_t session_id, uint64_t id, uint64_t point,
                                       PointDone done) {
  if (point == UINT64_MAX) {
    return absl::InvalidArgumentError(
        "point 18446744073709551615 (UINT64_MAX) is reserved: no point could follow it");
  }
  uid_t uid;
  bool has_waker;
  {
    absl::ReleasableMutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Timeline * timeline, HeldLocked(session_id, id));
    RETURN_IF_ERROR(CheckNotThroughBufferLocked(session_id, id, "export or attach its points"));
    // Done already (reached, failed, ended): no waker needed.
    timeline::PointState now =
        timeline::Evaluate(timeline->counters(), timeline->state(), point, timeline->seen);
    if (now.done) {
      Calls calls;
      calls.emplace_back(std::move(done), std::move(now));
      lock.Release();
      Run(calls);
      return absl::OkStatus();
    }
    uid = sessions_.at(session_id).uid;
    has_waker = timeline->wakers.contains(kDaemonWaker);
  }
  Waker made;
  if (!has_waker) {
    ASSIGN_OR_RETURN(made, NewWaker(uid, true, true));
  }
  Calls calls;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Timeline * timeline, HeldLocked(session_id, id));
    if (!timeline->wakers.contains(kDaemonWaker)) {
      if (!made.page.valid()) {
        return absl::UnavailableError("the daemon's waker went while it was made; try again");
      }
      made.id = next_id_++;
      Store(made.wake().waker_id, made.id);
      Store(made.wake().timeline_id, id);
      timeline->wakers.emplace(kDaemonWaker, std::move(made));
      timeline::StatePage& state = timeline->state();
      Store(state.wakers_gen, Load(state.wakers_gen) + 1);
    }
    // Not while the owner's flood keeps it off the loop (the scan puts it
    // back).
    if (!timeline->notify_watched && timeline->notifies <= kMaxNotifiesPerScan) {
      const int fd = timeline->wakers.at(kDaemonWaker).notify_read.fd.get();
      RETURN_IF_ERROR(loop_->Watch(fd, EPOLLIN, [this, id](uint32_t) { OnDaemonNotify(id); }));
      timeline->notify_watched = true;
    }
    timeline->watches.emplace(point, Timeline::Watch{session_id, std::move(done)});
    CheckWatchesLocked(*timeline, calls);
    UpdateTimerLocked();
  }
  Run(calls);
  return absl::OkStatus();
}

void TimelineTable::CheckWatchesLocked(Timeline& timeline, Calls& out) {
  auto daemon = timeline.wakers.find(kDaemonWaker);
  if (daemon == timeline.wakers.end()) return;
  timeline::WakePage& wake = daemon->second.wake();
  while (true) {
    for (auto it = timeline.watches.begin(); it != timeline.watches.end();) {
      // Not the waker's expired ring: the owner can write that page. Far
      // points that expire are settled by the scan itself.
      timeline::PointState state = timeline::Evaluate(timeline.counters(), timeline.state(),
                                                      it->first, timeline.seen);
      if (!state.done) {
        ++it;
        continue;
      }
      out.emplace_back(std::move(it->second.done), std::move(state));
      it = timeline.watches.erase(it);
    }
    const uint64_t lowest = timeline.watches.empty() ? 0 : timeline.watches.begin()->first;
    // The owner stores its counter, then loads `armed`: after this store,
    // one of the two sees the other.
    std::atomic_ref<uint64_t>(wake.armed).store(lowest, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (lowest == 0 ||
        lowest > timeline::Reached(timeline.counters(), timeline.state(), timeline.seen)) {
      return;
    }
  }
}

void TimelineTable::OnDaemonNotify(uint64_t id) {
  Calls calls;
  {
    absl::MutexLock lock(&mu_);
    auto it = timelines_.find(id);
    if (it == timelines_.end() || !it->second.notify_watched) return;
    Timeline& timeline = it->second;
    const int fd = timeline.wakers.at(kDaemonWaker).notify_read.fd.get();
    char drained[256];
    while (::recv(fd, drained, sizeof(drained), MSG_DONTWAIT) > 0) {
      if (++timeline.notifies > kMaxNotifiesPerScan) {
        // Only an owner sends this many: its points wait for the scan.
        UnwatchLocked(timeline);
        break;
      }
    }
    ObserveLocked(timeline);
    CheckWatchesLocked(timeline, calls);
  }
  Run(calls);
}

void TimelineTable::UnwatchLocked(Timeline& timeline) {
  if (!timeline.notify_watched) return;
  loop_->Unwatch(timeline.wakers.at(kDaemonWaker).notify_read.fd.get());
  timeline.notify_watched = false;
}

void TimelineTable::Run(Calls& calls) {
  for (auto& [done, state] : calls) done(std::move(state));
  calls.clear();
}

absl::Status TimelineTable::CheckPromise(uint64_t session, uint64_t id, uint64_t point) {
  absl::MutexLock lock(&mu_);
  return CheckPromiseLocked(session, id, point).status();
}

absl::StatusOr<TimelineTable::Timeline*> TimelineTable::CheckPromiseLocked(uint64_t session_id,
                                                                           uint64_t id,
                                                                           uint64_t point) {
  if (point == 0 || point == UINT64_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "point ", point, point == 0 ? " is reached from the start" : " (UINT64_MAX) is reserved",
        ": a fence can stand behind points 1 to 2^64-2"));
  }
  ASSIGN_OR_RETURN(Timeline * timeline, HeldLocked(session_id, id));
  if (!sessions_.at(session_id).details.Read().held.at(id).owned) {
    return absl::PermissionDeniedError(absl::StrCat(
        "timeline ", id, " was imported: only its owner puts fences behind its points"));
  }
  timeline::StatePage& state = timeline->state();
  if (const uint32_t ended = Load(state.ended); ended != 0) {
    return absl::FailedPreconditionError(absl::StrCat("timeline ", id, " has ended"));
  }
  const uint64_t reached = ObserveLocked(*timeline);
  const uint64_t available = Load(state.available);
  if (point <= reached || point <= available) {
    return absl::FailedPreconditionError(absl::StrCat(
        "point ", point, " is not after timeline ", id, "'s last point ", reached,
        available > reached ? absl::StrCat(" and the last point with a fence behind it, ",
                                           available)
                            : ""));
  }
  if (timeline->promised.size() >= limits_.max_points_behind_fences) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "timeline ", id, " has ", timeline->promised.size(),
        " points behind fences that have not signalled, the limit "
        "(max_points_behind_fences ",
        limits_.max_points_behind_fences, ")"));
  }
  return timeline;
}

absl::Status TimelineTable::Promise(uint64_t session_id, uint64_t id, uint64_t point,
                                    std::function<void()> dropped) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Timeline * timeline, CheckPromiseLocked(session_id, id, point));
  timeline::StatePage& state = timeline->state();
  timeline->promised.emplace(point, Timeline::Promised{std::nullopt, std::move(dropped)});
  Store(state.unsettled, timeline->promised.begin()->first);
  // Before the loads of `armed` below: a waiter arms, then loads this.
  std::atomic_ref<uint64_t>(state.available).store(point, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  // Waiters for availability wake (blocked ones look again; an event loop
  // armed for it gets its byte), and the waiters on the point learn that a
  // fence stands behind it.
  timeline::Bump(state.seq);
  for (auto& [session, waker] : timeline->wakers) {
    timeline::WakePage& page = waker.wake();
    timeline::WakeWaker(page);
    if (waker.notify() && Load(page.arm_available) != 0) {
      timeline::NotifyArmed(page, waker.notify_write.fd.get(), point);
    }
  }
  return absl::OkStatus();
}

void TimelineTable::Settle(uint64_t id, uint64_t point, v1::FenceStatus status,
                           absl::string_view message) {
  absl::MutexLock lock(&mu_);
  auto it = timelines_.find(id);
  if (it == timelines_.end()) return;
  Timeline& timeline = it->second;
  auto promised = timeline.promised.find(point);
  if (promised == timeline.promised.end() || promised->second.result.has_value()) return;
  promised->second.result.emplace(status, std::string(message));
  timeline::StatePage& state = timeline.state();
  bool moved = false;
  // In order: a point is settled once every point promised before it is.
  while (!timeline.promised.empty() && timeline.promised.begin()->second.result.has_value()) {
    const uint64_t at = timeline.promised.begin()->first;
    auto [how, why] = *std::move(timeline.promised.begin()->second.result);
    timeline.promised.erase(timeline.promised.begin());
    const uint64_t reached = ObserveLocked(timeline);
    // Reached already (the owner signalled past it): nothing to do.
    if (at <= reached || Load(state.ended) != 0) continue;
    if (how != v1::FENCE_STATUS_OK) {
      const uint64_t index = Load(state.failure_count);
      timeline::DaemonFailure& failure =
          state.failures[index % timeline::StatePage::kFailures];
      const uint32_t gen = Load(failure.gen);
      Store(failure.gen, gen + 1 + gen % 2);  // odd: being written
      std::atomic_thread_fence(std::memory_order_release);
      Store(failure.status, static_cast<uint32_t>(how));
      Store(failure.from, reached);
      Store(failure.to, at);
      const size_t length = std::min(why.size(), sizeof(failure.message));
      std::memcpy(failure.message, why.data(), length);
      Store(failure.length, static_cast<uint32_t>(length));
      Store(failure.gen, gen + 2 + gen % 2);
      Store(state.failure_count, index + 1);
    }
    Store(state.observed, at);
    timeline::Reached(timeline.counters(), state, timeline.seen);
    moved = true;
  }
  Store(state.unsettled, timeline.promised.empty() ? 0 : timeline.promised.begin()->first);
  // Every waiter looks again; the daemon's own waker (exported points)
  // hears it on the loop.
  if (moved) WakeAllLocked(timeline);
}

TimelineView TimelineTable::ViewLocked(const Timeline& timeline) const {
  TimelineView view;
  view.id = timeline.id;
  view.name = timeline.name;
  view.owner_session = timeline.owner_session;
  const timeline::StatePage& state = timeline.state();
  // A copy: only Scan raises what the daemon has seen (and publishes it).
  std::atomic<uint64_t> seen{timeline.seen.load()};
  view.reached = timeline::Reached(timeline.counters(), state, seen);
  view.deadline_failures = Load(state.mark_count);
  view.ended = static_cast<v1::FenceStatus>(Load(state.ended));
  view.deadline = timeline.deadline;
  view.created = timeline.created;
  view.holders = timeline.holders;
  for (const auto& [session, waker] : timeline.wakers) {
    if (session == kDaemonWaker) continue;  // counted as exported points
    ++view.wakers;
    view.notify_fds += waker.notify();
  }
  for (const auto& [point, tracked] : timeline.tracked) {
    view.waits.push_back({point, WallOf(tracked.since), WallOf(tracked.due)});
  }
  if (const int64_t need_by = Load(state.need_by_ns); need_by > 0) {
    view.need_by = WallOf(absl::Nanoseconds(need_by));
  }
  view.available = Load(state.available);
  for (const auto& [point, settled] : timeline.promised) {
    if (view.promised.size() == TimelineView::kMaxListed) break;
    view.promised.push_back(point);
  }
  view.promised_count = static_cast<uint32_t>(timeline.promised.size());
  view.exported_points = static_cast<uint32_t>(timeline.watches.size());
  return view;
}

std::vector<TimelineView> TimelineTable::List(size_t limit) const {
  absl::MutexLock lock(&mu_);
  std::vector<const Timeline*> all;
  for (const auto& [id, timeline] : timelines_) all.push_back(&timeline);
  std::sort(all.begin(), all.end(),
            [](const Timeline* a, const Timeline* b) { return a->id < b->id; });
  if (limit != 0 && all.size() > limit) all.resize(limit);
  std::vector<TimelineView> views;
  views.reserve(all.size());
  for (const Timeline* timeline : all) views.push_back(ViewLocked(*timeline));
  return views;
}

size_t TimelineTable::size() const {
  absl::MutexLock lock(&mu_);
  return timelines_.size();
}

void TimelineTable::UpdateTimerLocked() {
  const bool needed = !stopped_ && wait_pages_ > 0 && !timelines_.empty();
  if (needed && timer_ == 0) {
    timer_ = loop_->RunEvery(limits_.scan_interval, [this] { Scan(MonotonicNow()); });
  } else if (!needed && timer_ != 0) {
    loop_->Cancel(timer_);
    timer_ = 0;
  }
}

void TimelineTable::Stop() {
  absl::MutexLock lock(&mu_);
  if (stopped_) return;
  stopped_ = true;
  if (timer_ != 0) loop_->Cancel(timer_);
  timer_ = 0;
  for (auto& [id, timeline] : timelines_) UnwatchLocked(timeline);
  timelines_.clear();
  sessions_.clear();
  held_by_uid_.clear();
  inodes_.clear();
  wait_pages_ = 0;
}

}  // namespace bufferd
