#include "fences/fence_table.h"

#include <fcntl.h>
#include <linux/sync_file.h>
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "base/client_text.h"
#include "base/errno_status.h"
#include "fences/fence_page.h"
#include "fences/timeline_shm.h"

namespace bufferd {
namespace {

// A wait never outlives this, whatever it asks (its fences end sooner).
constexpr absl::Duration kMaxWaitTimeout = absl::Hours(24);

absl::Status NotFound(uint64_t id) {
  return absl::NotFoundError(absl::StrCat("fence ", id, " not found"));
}

std::string StatusName(v1::FenceStatus status) { return v1::FenceStatus_Name(status); }

// Imports of our own pipes after their fence went: how many are remembered.
constexpr size_t kRecentPipes = 4096;

// What /proc says an fd is ("anon_inode:[eventfd]", "pipe:[123]", ...).
std::string FdLink(int fd) {
  char link[128];
  const ssize_t n = ::readlink(absl::StrCat("/proc/self/fd/", fd).c_str(), link, sizeof(link) - 1);
  return n > 0 ? std::string(link, static_cast<size_t>(n)) : std::string();
}

bool IsSyncFile(int fd) { return FdLink(fd) == "anon_inode:sync_file"; }

// What an imported fd that polled readable says: a sync_file's own error,
// or OK.
std::pair<v1::FenceStatus, std::string> ImportedStatus(int fd, bool sync_file, uint32_t events) {
  sync_file_info info{};
  if (sync_file && ::ioctl(fd, SYNC_IOC_FILE_INFO, &info) == 0) {
    if (info.status < 0) {
      return {v1::FENCE_STATUS_ERROR,
              absl::StrCat("the imported sync_file failed: ", std::strerror(-info.status))};
    }
    return {v1::FENCE_STATUS_OK, ""};
  }
  if ((events & EPOLLERR) != 0 && (events & EPOLLIN) == 0) {
    return {v1::FENCE_STATUS_ERROR, "the imported fd reported an error (EPOLLERR)"};
  }
  return {v1::FENCE_STATUS_OK, ""};
}

// Why a merged fence failed: its input's root cause (never nested: a merge
// of merges names the fence that really failed), at most 2 * kMaxClientTextBytes.
std::string MergedError(const FenceView& input) {
  std::string why = input.kind == FenceKind::kMerged
                        ? input.message
                        : absl::StrCat("input fence ", input.id, " ('", input.name,
                                       "'): ", v1::FenceStatus_Name(input.status),
                                       input.message.empty() ? "" : ": ", input.message);
  if (why.size() > 2 * kMaxClientTextBytes) why.resize(2 * kMaxClientTextBytes);
  return why;
}

}  // namespace

absl::Status CheckImportable(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return ErrnoError("fstat of the uploaded fd", errno);
  const int flags = ::fcntl(fd, F_GETFL);
  if (S_ISFIFO(st.st_mode) && flags >= 0 && (flags & O_ACCMODE) == O_WRONLY) {
    return absl::InvalidArgumentError(
        "the uploaded fd is the write end of a pipe, which never polls readable: import the read "
        "end");
  }
  if (S_ISFIFO(st.st_mode)) return absl::OkStatus();
  std::string what;
  if (S_ISREG(st.st_mode)) {
    what = "a regular file";
  } else if (S_ISDIR(st.st_mode)) {
    what = "a directory";
  } else if (S_ISSOCK(st.st_mode)) {
    what = "a socket";
  } else if (S_ISCHR(st.st_mode)) {
    what = "a character device";
  } else if (S_ISBLK(st.st_mode)) {
    what = "a block device";
  } else {
    const std::string link = FdLink(fd);
    if (link == "anon_inode:[eventfd]" || link == "anon_inode:sync_file" ||
        link == "anon_inode:[timerfd]") {
      return absl::OkStatus();
    }
    what = link.empty() ? "of an unknown kind" : absl::StrCat("'", link, "'");
  }
  return absl::InvalidArgumentError(
      absl::StrCat("the uploaded fd is ", what,
                   ": only a sync_file, an eventfd, a timerfd or a pipe can be imported"));
}

const char* FenceKindName(FenceKind kind) {
  switch (kind) {
    case FenceKind::kCreated:
      return "created";
    case FenceKind::kMerged:
      return "merged";
    case FenceKind::kImported:
      return "imported";
    case FenceKind::kTimelinePoint:
      return "timeline point";
  }
  return "?";
}

FenceTable::FenceTable(EventLoop* loop, FdBudget* budget, FenceLimits limits, Executor executor)
    : loop_(loop), budget_(budget), limits_(limits), executor_(std::move(executor)) {
  max_pending_per_session_.store(limits_.max_pending_per_session, std::memory_order_relaxed);
}

FenceTable::~FenceTable() { Stop(); }

void FenceTable::AddSession(uint64_t session, uid_t uid) {
  absl::MutexLock lock(&mu_);
  sessions_[session].uid = uid;
}

void FenceTable::CloseSession(uint64_t session_id) {
  Completions done;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(session_id);
    if (it == sessions_.end()) return;
    Session& session = it->second;
    const std::vector<WaitId> waits(session.sets.Read().waits.begin(),
                                    session.sets.Read().waits.end());
    for (WaitId wait : waits) {
      FinishWaitLocked(wait, absl::AbortedError(absl::StrCat("session ", session_id, " ended")),
                       done);
    }
    // Its promises fail first, so every waiter elsewhere wakes.
    const std::vector<uint64_t> owned(session.sets.Read().pending_owned.begin(),
                                      session.sets.Read().pending_owned.end());
    for (uint64_t id : owned) {
      auto fence = fences_.find(id);
      if (fence == fences_.end() || fence->second.view.signaled) continue;
      // Signalled through its fence page before the end (its record lost
      // with the session): what readers of the page saw stands.
      EndWithoutOwnerLocked(fence->second, v1::FENCE_STATUS_OWNER_DIED,
                            absl::StrCat("owner session ", session_id, " ended"),
                            absl::StrCat("signalled through its owner's fence page before session ",
                                         session_id, " ended"),
                            done);
    }
    pages_.erase(session_id);
    std::vector<uint64_t> held;
    for (const auto& [id, holds] : session.sets.Read().held) held.push_back(id);
    for (uint64_t id : held) UnholdLocked(session, id);
    sessions_.erase(it);
    SweepLocked();
  }
  Run(done);
}

absl::StatusOr<FenceTable::Session*> FenceTable::SessionLocked(uint64_t session) {
  if (stopped_) return absl::UnavailableError("the fence table has stopped");
  auto it = sessions_.find(session);
  if (it == sessions_.end()) {
    return absl::UnauthenticatedError(absl::StrCat("session ", session, " is not open"));
  }
  return &it->second;
}

absl::StatusOr<FenceTable::Fence*> FenceTable::HeldLocked(uint64_t session, uint64_t id) const {
  auto s = sessions_.find(session);
  if (s == sessions_.end() || !s->second.sets.Read().held.contains(id)) return NotFound(id);
  auto it = fences_.find(id);
  if (it == fences_.end()) return NotFound(id);
  return const_cast<Fence*>(&it->second);
}

absl::Status FenceTable::CheckNewFenceLocked(const Session& session) const {
  RETURN_IF_ERROR(CheckNewHoldLocked(session));
  const uint32_t max_pending = max_pending_per_session_.load(std::memory_order_relaxed);
  if (max_pending != 0 && session.sets.Read().pending_owned.size() >= max_pending) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota max_fences_per_session: the session owns ", session.sets.Read().pending_owned.size(),
        " pending fences, the most allowed"));
  }
  if (fences_.size() >= limits_.max_fences) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "limit max_fences: ", fences_.size(),
        " fences are known daemon-wide (pending, or signalled and still held), the most allowed"));
  }
  return absl::OkStatus();
}

absl::Status FenceTable::CheckNewHoldLocked(const Session& session) const {
  if (session.sets.Read().held.size() >= limits_.max_held_per_session) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "limit max_held_fences_per_session: the session holds ", session.sets.Read().held.size(),
        " fences (pending, or signalled and not forgotten), the most allowed; drop Fences "
        "it no longer needs"));
  }
  auto by_uid = held_by_uid_.find(session.uid);
  if (by_uid != held_by_uid_.end() && by_uid->second >= limits_.max_fences_per_uid) {
    return absl::ResourceExhaustedError(absl::StrCat("limit max_fences_per_uid: sessions of uid ",
                                                     session.uid, " hold ", by_uid->second,
                                                     " fences, the most allowed"));
  }
  return absl::OkStatus();
}

absl::StatusOr<absl::Duration> FenceTable::CheckDeadline(absl::Duration deadline) const {
  if (deadline < absl::ZeroDuration()) return absl::InvalidArgumentError("deadline is negative");
  if (deadline == absl::ZeroDuration()) return limits_.default_deadline;
  if (deadline > limits_.max_deadline) {
    return absl::InvalidArgumentError(absl::StrCat(
        "deadline_ms ", absl::ToInt64Milliseconds(deadline), " is above max_fence_deadline_ms (",
        absl::ToInt64Milliseconds(limits_.max_deadline), "): fences are never indefinite"));
  }
  return deadline;
}

FenceTable::Fence& FenceTable::AddFenceLocked(uint64_t session_id, Session& session, FenceKind kind,
                                              absl::string_view name, absl::string_view timeline,
                                              absl::Duration deadline, bool arm_timer) {
  const uint64_t id = next_fence_id_++;
  Fence& fence = fences_[id];
  fence.view.id = id;
  fence.view.kind = kind;
  fence.view.name = std::string(name);
  fence.view.timeline = std::string(timeline);
  fence.view.owner_session = session_id;
  fence.view.created = absl::Now();
  fence.view.deadline = fence.view.created + deadline;
  fence.owner_uid = session.uid;
  if (arm_timer) {
    fence.timer =
        timers_.emplace(MonotonicNow() + deadline, std::make_pair(TimerKind::kDeadline, id));
    RearmLocked();
  }
  ++pending_;
  session.sets.Use().pending_owned.insert(id);
  HoldLocked(session, fence);
  return fence;
}

void FenceTable::HoldLocked(Session& session, Fence& fence) {
  if (session.sets.Use().held[fence.view.id]++ == 0) {
    ++fence.holders;
    ++held_by_uid_[session.uid];
  }
}

void FenceTable::UnholdLocked(Session& session, uint64_t id) {
  if (session.sets.get() == nullptr || session.sets.get()->held.erase(id) == 0) return;
  auto by_uid = held_by_uid_.find(session.uid);
  if (by_uid != held_by_uid_.end() && --by_uid->second == 0) held_by_uid_.erase(by_uid);
  auto it = fences_.find(id);
  if (it == fences_.end()) return;
  --it->second.holders;
  EraseIfUnusedLocked(id);
}

void FenceTable::EraseIfUnusedLocked(uint64_t id) {
  auto it = fences_.find(id);
  if (it == fences_.end()) return;
  const Fence& fence = it->second;
  if (!fence.view.signaled || fence.holders != 0 || !fence.waits.empty()) return;
  if (fence.pipe_inode) {
    RememberPipeLocked(fence);
    exported_pipes_.erase(*fence.pipe_inode);
  }
  fences_.erase(it);
}

void FenceTable::RememberPipeLocked(const Fence& fence) {
  if (gone_pipes_.size() >= kRecentPipes) gone_pipes_.pop_front();
  gone_pipes_.push_back(
      GonePipe{*fence.pipe_inode, fence.view.id, fence.view.status, fence.view.message});
}

void FenceTable::SweepLocked() {
  std::vector<uint64_t> ids;
  ids.swap(sweep_);
  for (uint64_t id : ids) EraseIfUnusedLocked(id);
}

absl::StatusOr<FenceView> FenceTable::Create(uint64_t session_id, absl::string_view name,
                                             absl::string_view timeline, absl::Duration deadline) {
  RETURN_IF_ERROR(CheckClientText("name", name));
  RETURN_IF_ERROR(CheckClientText("timeline", timeline));
  ASSIGN_OR_RETURN(const absl::Duration lifetime, CheckDeadline(deadline));
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
  RETURN_IF_ERROR(CheckNewFenceLocked(*session));
  Fence& fence = AddFenceLocked(session_id, *session, FenceKind::kCreated, name, timeline, lifetime,
                                /*arm_timer=*/true);
  // A word of the owner's fence page while it is pending, if one is free.
  if (auto page = pages_.find(session_id); page != pages_.end() && !page->second->free.empty()) {
    const uint32_t slot = page->second->free.front();
    page->second->free.pop_front();
    uint32_t& generation = page->second->generations[slot];
    generation = fence_page::NextGeneration(generation);
    fence.view.page_slot = slot;
    fence.view.page_generation = generation;
  }
  return ViewLocked(fence);
}

absl::Status FenceTable::CheckDoorbell(int fd) {
  struct stat st {};
  const int flags = ::fcntl(fd, F_GETFL);
  if (::fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode) || flags < 0 ||
      (flags & O_ACCMODE) != O_RDONLY) {
    return absl::InvalidArgumentError(
        "doorbell_upload_id names no pipe's read end: a fence's doorbell is one");
  }
  return absl::OkStatus();
}

bool FenceTable::SetDoorbell(uint64_t session_id, uint64_t id, UniqueFd fd) {
  uid_t uid;
  {
    absl::MutexLock lock(&mu_);
    auto session = SessionLocked(session_id);
    if (!session.ok()) return false;
    uid = (*session)->uid;
  }
  // Taken without the table's lock (the budget may run reclaimers). Out of
  // fds: no doorbell, the owner's record signals it as before.
  absl::StatusOr<FdBudget::Lease> lease = budget_->Acquire(FdUse::kFence, uid);
  if (!lease.ok()) return false;
  absl::MutexLock lock(&mu_);
  auto it = fences_.find(id);
  if (it == fences_.end() || it->second.view.signaled || it->second.view.page_slot == 0 ||
      it->second.view.owner_session != session_id || it->second.doorbell.fd.valid()) {
    return false;
  }
  if (!loop_->Watch(fd.get(), EPOLLIN, [this, id](uint32_t) { OnDoorbell(id); }).ok()) {
    return false;
  }
  it->second.doorbell = LeasedFd{std::move(fd), *std::move(lease)};
  return true;
}

bool FenceTable::SignalWrittenOkLocked(Fence& fence, Completions& out) {
  if (fence.view.signaled || WrittenLocked(fence) != v1::FENCE_STATUS_OK) return false;
  fence.via_page = true;
  SignalLocked(fence, v1::FENCE_STATUS_OK, "", out);
  return true;
}

void FenceTable::OnDoorbell(uint64_t id) {
  Completions done;
  {
    absl::MutexLock lock(&mu_);
    auto it = fences_.find(id);
    if (it == fences_.end() || !it->second.doorbell.fd.valid()) return;
    Fence& fence = it->second;
    // Rung once: the owner closed its end (or wrote to it: either way the
    // word says whether it signalled). The signal first (its pollers wake
    // first); it drops the doorbell too.
    if (!SignalWrittenOkLocked(fence, done)) {
      loop_->Unwatch(fence.doorbell.fd.get());
      fence.doorbell = {};
    }
  }
  Run(done);
}

void FenceTable::SignalRung(uint64_t session_id, const std::vector<uint64_t>& ids) {
  Completions done;
  {
    absl::MutexLock lock(&mu_);
    for (uint64_t id : ids) {
      auto it = fences_.find(id);
      if (it == fences_.end() || it->second.view.kind != FenceKind::kCreated ||
          it->second.view.owner_session != session_id) {
        continue;
      }
      SignalWrittenOkLocked(it->second, done);
    }
  }
  Run(done);
}

absl::Status FenceTable::SetPage(uint64_t session_id, UniqueFd page) {
  RETURN_IF_ERROR(
      timeline::CheckPageFd(page.get(), /*read_only_for_others=*/true, "the fence page"));
  struct stat st {};
  if (::fstat(page.get(), &st) != 0) return ErrnoError("fstat of the fence page", errno);
  const std::pair<dev_t, ino_t> inode{st.st_dev, st.st_ino};
  // Its own, fresh page: not another session's (a reader's copy of it would
  // put that owner's words behind this session's fences), not one made by
  // another uid (the daemon's own pages among them).
  auto check = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> absl::StatusOr<bool> {
    ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
    if (st.st_uid != session->uid) {
      return absl::InvalidArgumentError(absl::StrCat("the fence page belongs to uid ", st.st_uid,
                                                     ", not the session's uid ", session->uid,
                                                     ": a session uploads a page it made"));
    }
    if (auto own = pages_.find(session_id); own != pages_.end()) {
      if (own->second->inode == inode) return true;  // offered again
      return absl::InvalidArgumentError(
          "this session has a fence page already: fence_page_upload_id offers that one only");
    }
    for (const auto& [other, kept] : pages_) {
      if (kept->inode == inode) {
        return absl::InvalidArgumentError(absl::StrCat("the fence page is session ", other,
                                                       "'s: a session uploads a page it made"));
      }
    }
    return false;
  };
  uid_t uid;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(const bool known, check());
    if (known) return absl::OkStatus();
    uid = sessions_.at(session_id).uid;
  }
  // Leased without the table's lock (the budget may run reclaimers).
  ASSIGN_OR_RETURN(FdBudget::Lease lease, budget_->Acquire(FdUse::kFencePage, uid));
  ASSIGN_OR_RETURN(UniqueFd read_only, ReopenReadOnly(page.get(), "a fence page"));
  page.Reset();
  ASSIGN_OR_RETURN(Mapping map, Mapping::Create(read_only.get(), fence_page::kPageSize,
                                                Mapping::Protection::kReadOnly));
  auto made = std::make_unique<Page>();
  made->fd = LeasedFd{std::move(read_only), std::move(lease)};
  made->map = std::move(map);
  made->generations.assign(fence_page::kSlots, 0);
  made->inode = inode;
  for (uint32_t slot = 1; slot < fence_page::kSlots; ++slot) made->free.push_back(slot);
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(const bool known, check());
  if (!known) pages_.emplace(session_id, std::move(made));
  return absl::OkStatus();
}

absl::StatusOr<std::pair<LeasedFd, uint64_t>> FenceTable::PageOf(uint64_t session_id, uint64_t id) {
  uid_t uid;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
    uid = session->uid;
  }
  ASSIGN_OR_RETURN(FdBudget::Lease out, budget_->Acquire(FdUse::kDelivery, uid));
  absl::MutexLock lock(&mu_);
  auto it = fences_.find(id);
  if (it == fences_.end() || it->second.view.signaled || it->second.view.page_slot == 0) {
    return absl::NotFoundError(absl::StrCat(
        "fence ", id, " has no word in a fence page (it signalled, or its owner has no page)"));
  }
  const uint64_t owner = it->second.view.owner_session;
  auto page = pages_.find(owner);
  if (page == pages_.end()) return NotFound(id);
  ASSIGN_OR_RETURN(UniqueFd copy, DuplicateFd(page->second->fd.fd.get()));
  return std::make_pair(LeasedFd{std::move(copy), std::move(out)}, owner);
}

void FenceTable::EndWithoutOwnerLocked(Fence& fence, v1::FenceStatus status, std::string message,
                                       std::string written_message, Completions& out) {
  if (std::optional<v1::FenceStatus> written = WrittenLocked(fence)) {
    fence.via_page = true;
    SignalLocked(fence, *written, std::move(written_message), out);
    return;
  }
  SignalLocked(fence, status, std::move(message), out);
}

std::optional<v1::FenceStatus> FenceTable::WrittenLocked(const Fence& fence) const {
  if (fence.view.page_slot == 0) return std::nullopt;
  auto page = pages_.find(fence.view.owner_session);
  if (page == pages_.end()) return std::nullopt;
  const uint32_t word = fence_page::Load(
      reinterpret_cast<const uint32_t*>(page->second->map.data())[fence.view.page_slot]);
  if (fence_page::Generation(word) != fence.view.page_generation) return std::nullopt;
  switch (const uint32_t status = fence_page::Status(word)) {
    case v1::FENCE_STATUS_OK:
    case v1::FENCE_STATUS_ERROR:
    case v1::FENCE_STATUS_CANCELLED:
      return static_cast<v1::FenceStatus>(status);
    default:
      return std::nullopt;
  }
}

absl::StatusOr<FenceView> FenceTable::CreatePoint(uint64_t session_id, absl::string_view timeline,
                                                  uint64_t timeline_id, uint64_t point,
                                                  absl::Duration deadline) {
  RETURN_IF_ERROR(CheckClientText("timeline", timeline));
  // The timeline's deadline may be up to max_deadline, and its point fails a
  // little after it: the fence's own deadline is only a backstop.
  if (deadline <= absl::ZeroDuration()) deadline = limits_.default_deadline;
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
  RETURN_IF_ERROR(CheckNewFenceLocked(*session));
  Fence& fence = AddFenceLocked(session_id, *session, FenceKind::kTimelinePoint,
                                absl::StrCat("point ", point), timeline, deadline,
                                /*arm_timer=*/true);
  fence.view.timeline_id = timeline_id;
  fence.view.timeline_point = point;
  return ViewLocked(fence);
}

bool FenceTable::SignalPoint(uint64_t id, v1::FenceStatus status, absl::string_view message) {
  Completions done;
  {
    absl::MutexLock lock(&mu_);
    auto it = fences_.find(id);
    if (it == fences_.end() || it->second.view.signaled ||
        it->second.view.kind != FenceKind::kTimelinePoint) {
      return false;
    }
    SignalLocked(it->second, status, std::string(message), done);
  }
  Run(done);
  return true;
}

absl::StatusOr<FenceView> FenceTable::Signal(uint64_t session_id, uint64_t id,
                                             v1::FenceStatus status, absl::string_view message) {
  FenceView view;
  RETURN_IF_ERROR(SignalBy(session_id, id, status, message, &view));
  return view;
}

absl::Status FenceTable::SignalOneWay(uint64_t session_id, uint64_t id, v1::FenceStatus status,
                                      absl::string_view message) {
  return SignalBy(session_id, id, status, message, nullptr);
}

absl::Status FenceTable::SignalBy(uint64_t session_id, uint64_t id, v1::FenceStatus status,
                                  absl::string_view message, FenceView* view) {
  if (status != v1::FENCE_STATUS_OK && status != v1::FENCE_STATUS_ERROR &&
      status != v1::FENCE_STATUS_CANCELLED) {
    const std::string name = v1::FenceStatus_IsValid(status)
                                 ? StatusName(status)
                                 : absl::StrCat(static_cast<int>(status));
    return absl::InvalidArgumentError(absl::StrCat(
        "status ", name, " cannot be signalled: a client signals OK, ERROR or CANCELLED"));
  }
  RETURN_IF_ERROR(CheckClientText("message", message));
  Completions done;
  absl::Status result = absl::OkStatus();
  {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(SessionLocked(session_id).status());
    ASSIGN_OR_RETURN(Fence * fence, HeldLocked(session_id, id));
    if (fence->view.kind != FenceKind::kCreated) {
      return absl::PermissionDeniedError(absl::StrCat(
          "fence ", id, " is ", FenceKindName(fence->view.kind), ": ",
          fence->view.kind == FenceKind::kMerged     ? "its inputs signal it"
          : fence->view.kind == FenceKind::kImported ? "its fd signals it"
                                                     : "its timeline signals it"));
    }
    if (fence->view.owner_session != session_id) {
      return absl::PermissionDeniedError(absl::StrCat("fence ", id, " is owned by session ",
                                                      fence->view.owner_session,
                                                      "; only its owner signals it"));
    }
    // An OK its owner wrote in its word came first: a signal by doorbell
    // alone whose ring (or the call carrying it) this signal overtook.
    SignalWrittenOkLocked(*fence, done);
    if (!fence->view.signaled) {
      SignalLocked(*fence, status, std::string(message), done);
    } else if (!fence->via_page || fence->view.status != status) {
      // Its owner's own signal read from its fence page first (at the
      // deadline, say) is this one; anything else is a second signal.
      result = absl::FailedPreconditionError(
          absl::StrCat("fence ", id, " was signalled already (", StatusName(fence->view.status),
                       " at ", absl::FormatTime(fence->view.signaled_at), ")"));
    }
    if (result.ok() && view != nullptr) *view = ViewLocked(*fence);
  }
  Run(done);
  return result;
}

void FenceTable::SignalLocked(Fence& first, v1::FenceStatus status, std::string message,
                              Completions& out) {
  // Processes polling its pipe wake first, before anything else is done.
  if (!first.view.signaled && first.pipe_write.fd.valid()) {
    first.pipe_write = {};
    out.woke_pollers = true;
  }
  struct Step {
    uint64_t id;
    v1::FenceStatus status;
    std::string message;
  };
  absl::InlinedVector<Step, 2> work;
  work.push_back({first.view.id, status, std::move(message)});
  absl::InlinedVector<uint64_t, 2> signalled;
  const absl::Time now = absl::Now();
  while (!work.empty()) {
    Step step = std::move(work.back());
    work.pop_back();
    auto it = fences_.find(step.id);
    if (it == fences_.end() || it->second.view.signaled) continue;
    Fence& fence = it->second;
    // Every holder of the pipe sees POLLHUP now: first, so waiters on
    // exported fds wake before the bookkeeping.
    if (fence.pipe_write.fd.valid()) out.woke_pollers = true;
    fence.pipe_write = {};
    fence.view.signaled = true;
    fence.view.status = step.status;
    fence.view.message = std::move(step.message);
    fence.view.signaled_at = now;
    // Accesses sleeping on a reservation status page wake as early as
    // pollers do.
    if (fence.watched && watch_hook_ != nullptr && watch_hook_(fence.view)) {
      out.woke_pollers = true;
    }
    --pending_;
    ++counts_.signals[step.status];
    signalled.push_back(step.id);
    auto owner = sessions_.find(fence.view.owner_session);
    if (owner != sessions_.end()) owner->second.sets.Use().pending_owned.erase(step.id);
    if (fence.view.page_slot != 0) {
      // Its word may serve another fence now (under a new generation).
      if (auto page = pages_.find(fence.view.owner_session); page != pages_.end()) {
        page->second->free.push_back(fence.view.page_slot);
      }
      fence.view.page_slot = 0;
      fence.view.page_generation = 0;
    }
    RemoveTimerLocked(fence.timer);
    if (fence.imported.fd.valid()) {
      loop_->Unwatch(fence.imported.fd.get());
      fence.imported = {};
    }
    if (fence.doorbell.fd.valid()) out.doorbells.push_back(std::exchange(fence.doorbell, {}));
    absl::flat_hash_set<WaitId> waits;
    waits.swap(fence.waits);
    for (WaitId wait : waits) {
      auto w = waiters_.find(wait);
      if (w == waiters_.end()) continue;
      if (!w->second.all || --w->second.remaining == 0) FinishWaitLocked(wait, true, out);
    }
    for (uint64_t dependent : fence.dependents) {
      auto d = fences_.find(dependent);
      if (d == fences_.end() || d->second.view.signaled) continue;
      Fence& merged = d->second;
      // Inputs signal in time order, so the first error seen is the first
      // by signal time.
      if (fence.view.status != v1::FENCE_STATUS_OK && !merged.first_error) {
        merged.first_error.emplace(fence.view.status, MergedError(fence.view));
      }
      if (--merged.inputs_pending == 0) {
        work.push_back(merged.first_error
                           ? Step{dependent, merged.first_error->first, merged.first_error->second}
                           : Step{dependent, v1::FENCE_STATUS_OK, ""});
      }
    }
    fence.dependents.clear();
  }
  RearmLocked();
  for (uint64_t id : signalled) EraseIfUnusedLocked(id);
  SweepLocked();
}

absl::StatusOr<FenceView> FenceTable::Info(uint64_t session, uint64_t id) const {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(const Fence* fence, HeldLocked(session, id));
  return ViewLocked(*fence);
}

absl::StatusOr<FenceView> FenceTable::Merge(uint64_t session_id, const std::vector<uint64_t>& ids,
                                            absl::string_view name) {
  if (ids.empty())
    return absl::InvalidArgumentError("fence_ids is empty: merge at least one fence");
  if (ids.size() > limits_.max_merge_ids) {
    return absl::InvalidArgumentError(
        absl::StrCat(ids.size(), " fence ids in one merge; at most ", limits_.max_merge_ids));
  }
  RETURN_IF_ERROR(CheckClientText("name", name));
  std::vector<uint64_t> distinct = ids;
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  Completions done;
  FenceView view;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
    std::vector<Fence*> inputs;
    for (uint64_t id : distinct) {
      ASSIGN_OR_RETURN(Fence * input, HeldLocked(session_id, id));
      inputs.push_back(input);
    }
    RETURN_IF_ERROR(CheckNewFenceLocked(*session));
    // Bounded by its inputs' deadlines: the latest of them.
    absl::Time deadline = absl::InfinitePast();
    for (Fence* input : inputs) deadline = std::max(deadline, input->view.deadline);
    Fence& merged = AddFenceLocked(session_id, *session, FenceKind::kMerged, name, "",
                                   std::max(deadline - absl::Now(), absl::ZeroDuration()),
                                   /*arm_timer=*/false);
    merged.view.deadline = deadline;
    // Errors of inputs signalled already, the earliest first.
    const Fence* earliest_error = nullptr;
    for (Fence* input : inputs) {
      if (!input->view.signaled) {
        input->dependents.push_back(merged.view.id);
        ++merged.inputs_pending;
      } else if (input->view.status != v1::FENCE_STATUS_OK &&
                 (earliest_error == nullptr ||
                  input->view.signaled_at < earliest_error->view.signaled_at)) {
        earliest_error = input;
      }
    }
    if (earliest_error != nullptr) {
      merged.first_error.emplace(earliest_error->view.status, MergedError(earliest_error->view));
    }
    if (merged.inputs_pending == 0) {
      SignalLocked(merged, merged.first_error ? merged.first_error->first : v1::FENCE_STATUS_OK,
                   merged.first_error ? merged.first_error->second : "", done);
    }
    view = ViewLocked(merged);
  }
  Run(done);
  return view;
}

absl::StatusOr<FenceView> FenceTable::Import(uint64_t session_id, UniqueFd fd,
                                             absl::string_view name, absl::Duration deadline) {
  RETURN_IF_ERROR(CheckClientText("name", name));
  ASSIGN_OR_RETURN(const absl::Duration lifetime, CheckDeadline(deadline));
  RETURN_IF_ERROR(CheckImportable(fd.get()));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return ErrnoError("fstat of the uploaded fd", errno);
  const bool sync_file = !S_ISFIFO(st.st_mode) && IsSyncFile(fd.get());
  // A pipe of ours whose fence went: already signalled, with its status
  // (or, if that is no longer remembered, with an error: never a fresh OK).
  std::optional<GonePipe> gone;
  const bool ours = S_ISFIFO(st.st_mode) && (st.st_mode & 0777) == 0400 && st.st_uid == ::geteuid();
  uid_t uid;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
    uid = session->uid;
    if (S_ISFIFO(st.st_mode)) {
      // One of our own pipes: the fence itself, not a proxy. (The table
      // keeps a read end of each, so no other pipe has its inode.)
      auto known = exported_pipes_.find({st.st_dev, st.st_ino});
      if (known != exported_pipes_.end()) {
        auto it = fences_.find(known->second);
        if (it != fences_.end()) {
          if (!session->sets.Read().held.contains(known->second)) {
            RETURN_IF_ERROR(CheckNewHoldLocked(*session));
          }
          HoldLocked(*session, it->second);
          return ViewLocked(it->second);
        }
      }
      for (auto it = gone_pipes_.rbegin(); ours && it != gone_pipes_.rend(); ++it) {
        if (it->inode == std::make_pair(st.st_dev, st.st_ino)) {
          gone = *it;
          break;
        }
      }
    }
  }
  pollfd poll_fd{fd.get(), POLLIN, 0};
  const bool ready = gone || RetryOnEintr([&] { return ::poll(&poll_fd, 1, 0); }) == 1;
  if (ours && ready && !gone && (poll_fd.revents & POLLHUP) != 0) {
    gone = GonePipe{{st.st_dev, st.st_ino}, 0, v1::FENCE_STATUS_ERROR, ""};
  }
  // The fd is kept (and leased) only if it is watched. Taken without the
  // table's lock (the budget may run reclaimers).
  FdBudget::Lease lease;
  if (!ready) {
    ASSIGN_OR_RETURN(lease, budget_->Acquire(FdUse::kFence, uid));
  }
  Completions done;
  FenceView view;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
    RETURN_IF_ERROR(CheckNewFenceLocked(*session));
    if (ready) {
      Fence& fence = AddFenceLocked(session_id, *session, FenceKind::kImported, name, "", lifetime,
                                    /*arm_timer=*/false);
      if (gone && gone->id == 0) {
        SignalLocked(fence, v1::FENCE_STATUS_ERROR,
                     "the pipe of a bufferd fence no longer known: its status is lost", done);
      } else if (gone) {
        SignalLocked(fence, gone->status,
                     absl::StrCat("the pipe of fence ", gone->id, ", gone since, which was ",
                                  StatusName(gone->status), gone->message.empty() ? "" : ": ",
                                  gone->message),
                     done);
      } else {
        uint32_t events = 0;
        if (poll_fd.revents & POLLIN) events |= EPOLLIN;
        if (poll_fd.revents & POLLERR) events |= EPOLLERR;
        if (poll_fd.revents & POLLHUP) events |= EPOLLHUP;
        auto [status, message] = ImportedStatus(fd.get(), sync_file, events);
        SignalLocked(fence, status, std::move(message), done);
      }
      view = ViewLocked(fence);
    } else {
      const uint64_t id = next_fence_id_;
      absl::Status watched = loop_->Watch(
          fd.get(), EPOLLIN, [this, id](uint32_t events) { OnImportReadable(id, events); });
      if (!watched.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("the uploaded fd cannot be polled (", watched.message(),
                         "): only a sync_file, an eventfd, a timerfd or a pipe can be imported"));
      }
      Fence& fence = AddFenceLocked(session_id, *session, FenceKind::kImported, name, "", lifetime,
                                    /*arm_timer=*/true);
      fence.imported = LeasedFd{std::move(fd), std::move(lease)};
      fence.imported_sync_file = sync_file;
      view = ViewLocked(fence);
    }
  }
  Run(done);
  return view;
}

void FenceTable::OnImportReadable(uint64_t id, uint32_t events) {
  Completions done;
  {
    absl::MutexLock lock(&mu_);
    auto it = fences_.find(id);
    if (it == fences_.end() || it->second.view.signaled || !it->second.imported.fd.valid()) return;
    auto [status, message] =
        ImportedStatus(it->second.imported.fd.get(), it->second.imported_sync_file, events);
    SignalLocked(it->second, status, std::move(message), done);
  }
  Run(done);
}

absl::StatusOr<LeasedFd> FenceTable::Export(uint64_t session_id, uint64_t id) {
  uid_t uid;
  bool needs_pipe;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
    ASSIGN_OR_RETURN(Fence * fence, HeldLocked(session_id, id));
    uid = session->uid;
    needs_pipe = !fence->pipe_read.fd.valid();
  }
  // Taken without the table's lock (the budget may run reclaimers): the
  // copy sent, and the pipe's ends if it has none yet.
  ASSIGN_OR_RETURN(FdBudget::Lease out, budget_->Acquire(FdUse::kDelivery, uid));
  FdBudget::Lease read_lease, write_lease;
  if (needs_pipe) {
    ASSIGN_OR_RETURN(read_lease, budget_->Acquire(FdUse::kFence, uid));
    ASSIGN_OR_RETURN(write_lease, budget_->Acquire(FdUse::kFence, uid));
  }
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(SessionLocked(session_id).status());
  ASSIGN_OR_RETURN(Fence * fence, HeldLocked(session_id, id));
  if (!fence->pipe_read.fd.valid()) {
    if (!read_lease.held()) {
      return absl::UnavailableError("the fence's pipe went while it was exported; try again");
    }
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0) return ErrnoError("pipe2", errno);
    UniqueFd read_end(ends[0]), write_end(ends[1]);
    // Read-only even for the daemon's own uid through /proc (like buffers).
    (void)::fchmod(ends[0], 0400);
    ASSIGN_OR_RETURN(auto inode, FileIdentity(ends[0]));
    fence->pipe_read = LeasedFd{std::move(read_end), std::move(read_lease)};
    // Signalled already: no writer, readable at once.
    if (!fence->view.signaled) {
      fence->pipe_write = LeasedFd{std::move(write_end), std::move(write_lease)};
    }
    fence->pipe_inode = inode;
    exported_pipes_[inode] = id;
  }
  const int copy = ::fcntl(fence->pipe_read.fd.get(), F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return ErrnoError("dup of a fence pipe", errno);
  ++fence->view.exports;
  return LeasedFd{UniqueFd(copy), std::move(out)};
}

void FenceTable::Forget(uint64_t session_id, uint64_t id) {
  Completions done;
  {
    absl::MutexLock lock(&mu_);
    auto s = sessions_.find(session_id);
    if (s == sessions_.end()) return;
    if (s->second.sets.get() == nullptr) return;
    auto held = s->second.sets.get()->held.find(id);
    if (held == s->second.sets.get()->held.end()) return;
    // One hold of several (the fence was imported again): nothing else.
    if (--held->second > 0) return;
    auto it = fences_.find(id);
    if (it != fences_.end() && !it->second.view.signaled &&
        it->second.view.kind == FenceKind::kCreated &&
        it->second.view.owner_session == session_id) {
      // Signalled through its fence page, its record lost: that stands.
      EndWithoutOwnerLocked(it->second, v1::FENCE_STATUS_CANCELLED,
                            "its owner let go of it unsignalled",
                            "signalled through its owner's fence page", done);
    }
    UnholdLocked(s->second, id);
  }
  Run(done);
}

absl::StatusOr<FenceView> FenceTable::HoldFor(uint64_t session_id, uint64_t id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
  auto it = fences_.find(id);
  if (it == fences_.end()) return NotFound(id);
  if (!session->sets.Read().held.contains(id)) RETURN_IF_ERROR(CheckNewHoldLocked(*session));
  HoldLocked(*session, it->second);
  return ViewLocked(it->second);
}

std::optional<FenceView> FenceTable::Peek(uint64_t id) const {
  absl::MutexLock lock(&mu_);
  auto it = fences_.find(id);
  if (it == fences_.end()) return std::nullopt;
  return ViewLocked(it->second);
}

void FenceTable::Abandon(uint64_t session_id, uint64_t id, absl::string_view why) {
  Completions done;
  {
    absl::MutexLock lock(&mu_);
    auto s = sessions_.find(session_id);
    auto it = fences_.find(id);
    if (s != sessions_.end() && it != fences_.end() && !it->second.view.signaled &&
        it->second.view.owner_session == session_id &&
        (it->second.view.kind == FenceKind::kImported ||
         it->second.view.kind == FenceKind::kTimelinePoint)) {
      const auto& holds = s->second.sets.Read().held;
      auto held = holds.find(id);
      if (held != holds.end() && held->second == 1) {
        SignalLocked(it->second, v1::FENCE_STATUS_CANCELLED, std::string(why), done);
      }
    }
  }
  Run(done);
  Forget(session_id, id);
}

FenceTable::WaitId FenceTable::NewWaitId() { return next_wait_id_.fetch_add(1); }

absl::StatusOr<std::optional<FenceTable::WaitResult>> FenceTable::Wait(uint64_t session_id,
                                                                       WaitId wait,
                                                                       const WaitRequest& request,
                                                                       WaitDone done) {
  if (request.ids.empty()) {
    return absl::InvalidArgumentError("fence_ids is empty: wait on at least one fence");
  }
  if (request.ids.size() > limits_.max_wait_ids) {
    return absl::InvalidArgumentError(
        absl::StrCat(request.ids.size(), " fence ids in one wait; at most ", limits_.max_wait_ids));
  }
  Waiter waiter;
  waiter.session = session_id;
  waiter.all = request.all;
  waiter.done = std::move(done);
  waiter.started_mono = MonotonicNow();
  absl::flat_hash_set<uint64_t> seen;
  for (uint64_t id : request.ids) {
    if (seen.insert(id).second) waiter.ids.push_back(id);
  }
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, SessionLocked(session_id));
  size_t signalled = 0;
  std::vector<Fence*> fences;
  for (uint64_t id : waiter.ids) {
    ASSIGN_OR_RETURN(Fence * fence, HeldLocked(session_id, id));
    fences.push_back(fence);
    if (fence->view.signaled) ++signalled;
  }
  if (request.need_by) {
    for (Fence* fence : fences) {
      if (!fence->view.signaled)
        fence->view.need_by = std::min(fence->view.need_by, *request.need_by);
    }
  }
  const bool satisfied = request.all ? signalled == fences.size() : signalled > 0;
  if (satisfied || request.timeout <= absl::ZeroDuration()) {
    if (satisfied) {
      ++latency_.buckets[0];
      ++latency_.count;
    }
    return ResultLocked(waiter, satisfied);
  }
  const uint32_t entries = static_cast<uint32_t>(fences.size());
  if (session->wait_entries + entries > limits_.max_waits_per_session) {
    return absl::ResourceExhaustedError(
        absl::StrCat("limit max_fence_waits_per_session: the session's pending waits name ",
                     session->wait_entries, " fences, and this one ", entries, "; at most ",
                     limits_.max_waits_per_session));
  }
  uint32_t& by_uid = wait_entries_by_uid_[session->uid];
  if (by_uid + entries > limits_.max_waits_per_uid) {
    const uint32_t now = by_uid;
    if (by_uid == 0) wait_entries_by_uid_.erase(session->uid);
    return absl::ResourceExhaustedError(absl::StrCat(
        "limit max_fence_waits_per_uid: pending waits of uid ", session->uid, " name ", now,
        " fences, and this one ", entries, "; at most ", limits_.max_waits_per_uid));
  }
  if (wait_entries_ + entries > limits_.max_waits) {
    if (by_uid == 0) wait_entries_by_uid_.erase(session->uid);
    return absl::ResourceExhaustedError(absl::StrCat(
        "limit max_fence_waits: pending waits name ", wait_entries_,
        " fences daemon-wide, and this one ", entries, "; at most ", limits_.max_waits));
  }
  by_uid += entries;
  session->wait_entries += entries;
  wait_entries_ += entries;
  waiter.uid = session->uid;
  waiter.remaining = fences.size() - signalled;
  for (Fence* fence : fences) {
    if (!fence->view.signaled) fence->waits.insert(wait);
  }
  waiter.timer = timers_.emplace(waiter.started_mono + std::min(request.timeout, kMaxWaitTimeout),
                                 std::make_pair(TimerKind::kWaitTimeout, wait));
  session->sets.Use().waits.insert(wait);
  waiters_.emplace(wait, std::move(waiter));
  ++counts_.waits;
  RearmLocked();
  return std::nullopt;
}

bool FenceTable::CancelWait(WaitId wait) {
  absl::MutexLock lock(&mu_);
  auto it = waiters_.find(wait);
  if (it == waiters_.end()) return false;
  Completions dropped;
  FinishWaitLocked(wait, absl::CancelledError("cancelled"), dropped);
  SweepLocked();
  // Not run: a cancelled wait's callback is never called.
  return true;
}

void FenceTable::FinishWaitLocked(WaitId id, absl::StatusOr<bool> satisfied, Completions& out) {
  auto it = waiters_.find(id);
  if (it == waiters_.end()) return;
  Waiter waiter = std::move(it->second);
  waiters_.erase(it);
  for (uint64_t fence_id : waiter.ids) {
    auto fence = fences_.find(fence_id);
    if (fence != fences_.end()) fence->second.waits.erase(id);
  }
  RemoveTimerLocked(waiter.timer);
  const uint32_t entries = static_cast<uint32_t>(waiter.ids.size());
  auto session = sessions_.find(waiter.session);
  if (session != sessions_.end()) {
    session->second.sets.Use().waits.erase(id);
    session->second.wait_entries -= entries;
  }
  auto by_uid = wait_entries_by_uid_.find(waiter.uid);
  if (by_uid != wait_entries_by_uid_.end()) {
    by_uid->second -= entries;
    if (by_uid->second == 0) wait_entries_by_uid_.erase(by_uid);
  }
  wait_entries_ -= entries;
  absl::StatusOr<WaitResult> result;
  if (!satisfied.ok()) {
    result = satisfied.status();
  } else {
    if (*satisfied) {
      const absl::Duration waited = MonotonicNow() - waiter.started_mono;
      size_t bucket = 0;
      while (bucket < WaitLatency::kBounds.size() && waited > WaitLatency::kBounds[bucket]) {
        ++bucket;
      }
      ++latency_.buckets[bucket];
      latency_.sum += waited;
      ++latency_.count;
    }
    result = ResultLocked(waiter, *satisfied);
  }
  sweep_.insert(sweep_.end(), waiter.ids.begin(), waiter.ids.end());
  out.waits.emplace_back(std::move(waiter.done), std::move(result));
}

FenceTable::WaitResult FenceTable::ResultLocked(const Waiter& waiter, bool satisfied) const {
  WaitResult result;
  result.satisfied = satisfied;
  result.fences.reserve(waiter.ids.size());
  for (uint64_t id : waiter.ids) {
    FenceView& out = result.fences.emplace_back();
    out.id = id;
    auto it = fences_.find(id);
    if (it == fences_.end()) continue;
    const FenceView& view = it->second.view;
    out.kind = view.kind;
    out.owner_session = view.owner_session;
    out.signaled = view.signaled;
    out.status = view.status;
    out.message = view.message;
    out.signaled_at = view.signaled_at;
    out.created = view.created;
    out.deadline = view.deadline;
  }
  return result;
}

FenceView FenceTable::ViewLocked(const Fence& fence) const {
  FenceView view = fence.view;
  view.waiters = static_cast<uint32_t>(fence.waits.size());
  return view;
}

void FenceTable::RemoveTimerLocked(std::optional<Timers::iterator>& timer) {
  if (!timer) return;
  timers_.erase(*timer);
  timer.reset();
}

void FenceTable::RearmLocked() {
  const absl::Duration earliest =
      timers_.empty() ? absl::InfiniteDuration() : timers_.begin()->first;
  // Only an earlier entry moves the loop timer. One that fires with nothing
  // due re-arms for what is left: removing an entry (a signal, a finished
  // wait) never touches the loop, so the signal path stays short.
  if (earliest >= loop_timer_at_ || stopped_) return;
  if (loop_timer_ != 0) loop_->Cancel(loop_timer_);
  loop_timer_ = 0;
  loop_timer_at_ = earliest;
  if (earliest == absl::InfiniteDuration()) return;
  const uint64_t generation = ++loop_timer_generation_;
  loop_timer_ =
      loop_->RunAfter(earliest - MonotonicNow(), [this, generation] { OnTimer(generation); });
}

void FenceTable::OnTimer(uint64_t generation) {
  Completions done;
  {
    absl::MutexLock lock(&mu_);
    if (generation == loop_timer_generation_) {
      loop_timer_ = 0;
      loop_timer_at_ = absl::InfiniteDuration();
    }
    const absl::Duration now = MonotonicNow();
    while (!timers_.empty() && timers_.begin()->first <= now) {
      const auto [kind, id] = timers_.begin()->second;
      if (kind == TimerKind::kDeadline) {
        auto it = fences_.find(id);
        if (it == fences_.end()) {
          timers_.erase(timers_.begin());
          continue;
        }
        RemoveTimerLocked(it->second.timer);
        // Signalled through its fence page, its record not read yet.
        EndWithoutOwnerLocked(it->second, v1::FENCE_STATUS_DEADLINE_EXCEEDED,
                              absl::StrCat("its deadline passed ",
                                           absl::ToInt64Milliseconds(it->second.view.deadline -
                                                                     it->second.view.created),
                                           " ms after it was created"),
                              "signalled through its owner's fence page", done);
      } else {
        auto it = waiters_.find(id);
        if (it == waiters_.end()) {
          timers_.erase(timers_.begin());
          continue;
        }
        FinishWaitLocked(id, false, done);
      }
    }
    SweepLocked();
    RearmLocked();
  }
  Run(done);
}

std::vector<FenceView> FenceTable::List(const FenceQuery& query) const {
  // Chosen on small keys, then copied: the lock is held for a scan, not
  // for copying every fence's strings.
  struct Key {
    bool signaled;
    absl::Time signaled_at;
    uint64_t id;
  };
  // Pending first, oldest first; then signalled, newest first.
  auto before = [](const Key& a, const Key& b) {
    if (a.signaled != b.signaled) return !a.signaled;
    if (!a.signaled) return a.id < b.id;
    return a.signaled_at != b.signaled_at ? a.signaled_at > b.signaled_at : a.id > b.id;
  };
  std::optional<Key> after;
  if (query.after.has_value()) {
    after = Key{query.after->signaled, query.after->signaled_at, query.after->id};
  }
  std::vector<Key> keys;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, fence] : fences_) {
      if (query.pending && *query.pending == fence.view.signaled) continue;
      if (query.owner_session != 0 && fence.view.owner_session != query.owner_session) continue;
      const Key key{fence.view.signaled, fence.view.signaled_at, id};
      if (after.has_value() && !before(*after, key)) continue;
      keys.push_back(key);
    }
  }
  const size_t limit =
      query.limit == 0 ? FenceQuery::kMaxListed : std::min(query.limit, FenceQuery::kMaxListed + 1);
  if (keys.size() > limit) {
    std::partial_sort(keys.begin(), keys.begin() + static_cast<ptrdiff_t>(limit), keys.end(),
                      before);
    keys.resize(limit);
  } else {
    std::sort(keys.begin(), keys.end(), before);
  }
  std::vector<FenceView> views;
  views.reserve(keys.size());
  absl::MutexLock lock(&mu_);
  for (const Key& key : keys) {
    auto it = fences_.find(key.id);
    if (it != fences_.end()) views.push_back(ViewLocked(it->second));
  }
  return views;
}

FenceTable::Counts FenceTable::counts() const {
  absl::MutexLock lock(&mu_);
  Counts counts = counts_;
  counts.pending = pending_;
  counts.signaled = fences_.size() - pending_;
  counts.waits = waiters_.size();
  return counts;
}

FenceTable::WaitLatency FenceTable::wait_latency() const {
  absl::MutexLock lock(&mu_);
  return latency_;
}

FenceTable::SessionCounts FenceTable::session_counts(uint64_t session) const {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return {};
  return {static_cast<uint32_t>(it->second.sets.Read().pending_owned.size()),
          static_cast<uint32_t>(it->second.sets.Read().held.size())};
}

void FenceTable::Stop() {
  Completions done;
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return;
    std::vector<WaitId> waits;
    for (const auto& [id, waiter] : waiters_) waits.push_back(id);
    for (WaitId wait : waits) {
      FinishWaitLocked(wait, absl::UnavailableError("the daemon is shutting down"), done);
    }
    stopped_ = true;
    if (loop_timer_ != 0) loop_->Cancel(loop_timer_);
    loop_timer_ = 0;
    for (auto& [id, fence] : fences_) {
      if (fence.imported.fd.valid()) loop_->Unwatch(fence.imported.fd.get());
      if (fence.doorbell.fd.valid()) loop_->Unwatch(fence.doorbell.fd.get());
    }
    fences_.clear();
    sessions_.clear();
    pages_.clear();
    timers_.clear();
    exported_pipes_.clear();
    gone_pipes_.clear();
    held_by_uid_.clear();
    wait_entries_by_uid_.clear();
    wait_entries_ = 0;
    sweep_.clear();
  }
  // Inline: whatever an executor posts to may be going away too.
  for (auto& [callback, result] : done.waits) {
    if (callback) callback(std::move(result));
  }
}

void FenceTable::SetWatchHook(WatchHook hook) { watch_hook_ = std::move(hook); }

bool FenceTable::Watch(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = fences_.find(id);
  if (it == fences_.end() || it->second.view.signaled) return false;
  it->second.watched = true;
  return true;
}

void FenceTable::Run(Completions& completions) {
  if (executor_ != nullptr && completions.waits.size() > kInlineCompletions) {
    auto batch = std::make_shared<decltype(completions.waits)>(std::move(completions.waits));
    executor_([batch] {
      for (auto& [done, result] : *batch) {
        if (done) done(std::move(result));
      }
    });
  }
  for (auto& [done, result] : completions.waits) {
    if (done) done(std::move(result));
  }
  completions.waits.clear();
  // A poller woken on this CPU would otherwise wait for this thread to
  // block (a wakeup does not preempt at once under lazy preemption): the
  // frame it waits for matters more than the bookkeeping left here.
  if (completions.woke_pollers) ::sched_yield();
  for (LeasedFd& doorbell : completions.doorbells) loop_->Unwatch(doorbell.fd.get());
  completions.doorbells.clear();
}

}  // namespace bufferd
