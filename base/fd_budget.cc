#include "base/fd_budget.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace bufferd {

const char* FdUseName(FdUse use) {
  switch (use) {
    case FdUse::kExport:
      return "exported buffers (share tokens not yet redeemed)";
    case FdUse::kSession:
      return "sessions";
    case FdUse::kControlConnection:
      return "control connections";
    case FdUse::kDelivery:
      return "fds in flight to clients";
    case FdUse::kFence:
      return "fences and timelines (pipes, imported sync fds, timeline pages)";
    case FdUse::kFencePage:
      return "sessions' fence pages";
    case FdUse::kCount:
      break;
  }
  return "?";
}

FdBudget::Lease::Lease(Lease&& other) noexcept
    : budget_(std::exchange(other.budget_, nullptr)), use_(other.use_), uid_(other.uid_) {}

FdBudget::Lease& FdBudget::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    Reset();
    budget_ = std::exchange(other.budget_, nullptr);
    use_ = other.use_;
    uid_ = other.uid_;
  }
  return *this;
}

void FdBudget::Lease::Reset() {
  if (FdBudget* budget = std::exchange(budget_, nullptr)) budget->Return(use_, uid_);
}

FdBudget::FdBudget() : FdBudget(Limits{}) {}
FdBudget::FdBudget(Limits limits) : limits_(limits) {}

void FdBudget::SetLimits(Limits limits) {
  absl::MutexLock lock(&mu_);
  limits_ = limits;
}

FdBudget::Limits FdBudget::limits() const {
  absl::MutexLock lock(&mu_);
  return limits_;
}

void FdBudget::AddReclaimer(std::function<void()> reclaim) {
  absl::MutexLock lock(&mu_);
  reclaimers_.push_back(std::move(reclaim));
}

void FdBudget::ClearReclaimers() {
  absl::MutexLock lock(&mu_);
  reclaimers_.clear();
}

absl::StatusOr<FdBudget::Lease> FdBudget::Acquire(FdUse use, uid_t uid) {
  absl::StatusOr<Lease> lease = TryAcquire(use, uid);
  if (lease.ok()) return lease;
  std::vector<std::function<void()>> reclaimers;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    if (reclaimers_.empty() || now - last_reclaim_ < absl::Milliseconds(10)) return lease;
    last_reclaim_ = now;
    reclaimers = reclaimers_;
  }
  for (const auto& reclaim : reclaimers) reclaim();
  return TryAcquire(use, uid);
}

absl::StatusOr<FdBudget::Lease> FdBudget::TryAcquire(FdUse use, uid_t uid) {
  absl::MutexLock lock(&mu_);
  if (absl::Status room = RoomLocked(uid, 1); !room.ok()) return room;
  Take(use, uid);
  return Lease(this, use, uid);
}

absl::Status FdBudget::CheckRoom(uid_t uid, uint64_t count) const {
  absl::ReaderMutexLock lock(&mu_);
  return RoomLocked(uid, count);
}

absl::Status FdBudget::RoomLocked(uid_t uid, uint64_t count) const {
  auto holders = [&] {
    std::string text;
    for (size_t i = 0; i < usage_.by_use.size(); ++i) {
      if (usage_.by_use[i] == 0) continue;
      absl::StrAppend(&text, text.empty() ? "" : ", ", usage_.by_use[i], " ",
                      FdUseName(static_cast<FdUse>(i)));
    }
    return text;
  };
  // "N more" only when more than one is asked for (a set's dry run).
  const std::string more = count > 1 ? absl::StrCat("; ", count, " more asked for") : "";
  if (usage_.total + count > limits_.total) {
    return absl::ResourceExhaustedError(
        absl::StrCat("daemon fd budget reached: ", usage_.total, " of ", limits_.total,
                     " fds in use (", holders(), ")", more, "; try again when some close"));
  }
  // A uid's "holds N" counts what is charged to it now.
  const uint64_t per_uid = limits_.uid_share();
  if (uid != kNoUid) {
    auto it = by_uid_.find(uid);
    const uint64_t held = it == by_uid_.end() ? 0 : it->second;
    if (held + count > per_uid) {
      return absl::ResourceExhaustedError(
          absl::StrCat("fd budget of uid ", uid, " reached: it holds ", held, " of ", per_uid,
                       " fds (limits.max_fds_per_uid)", more,
                       ": buffers it exported (share tokens not "
                       "yet redeemed), sessions, control connections, fences and timelines "
                       "(their pipes and pages) and fds not yet read; let tokens be redeemed or "
                       "expire, drop fences and timelines or close sessions"));
    }
  }
  return absl::OkStatus();
}

void FdBudget::Take(FdUse use, uid_t uid) {
  ++usage_.total;
  ++usage_.by_use[static_cast<size_t>(use)];
  if (uid != kNoUid) ++by_uid_[uid];
}

void FdBudget::Return(FdUse use, uid_t uid) {
  absl::MutexLock lock(&mu_);
  ReturnLocked(use, uid);
}

void FdBudget::ReturnLocked(FdUse use, uid_t uid) {
  --usage_.total;
  --usage_.by_use[static_cast<size_t>(use)];
  auto it = by_uid_.find(uid);
  if (it != by_uid_.end() && --it->second == 0) by_uid_.erase(it);
}

FdBudget::Usage FdBudget::usage() const {
  absl::MutexLock lock(&mu_);
  return usage_;
}

uint64_t FdBudget::UsedBy(uid_t uid) const {
  absl::MutexLock lock(&mu_);
  auto it = by_uid_.find(uid);
  return it == by_uid_.end() ? 0 : it->second;
}

}  // namespace bufferd
