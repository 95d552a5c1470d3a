#include "fences/reservations.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "fences/timeline_shm.h"

namespace bufferd {

bool AccessWaitsFor(v1::FenceUsage for_access, v1::FenceUsage usage) {
  switch (usage) {
    case v1::FENCE_USAGE_KERNEL:
    case v1::FENCE_USAGE_WRITE:
      return for_access == v1::FENCE_USAGE_READ || for_access == v1::FENCE_USAGE_WRITE ||
             for_access == v1::FENCE_USAGE_BOOKKEEP;
    case v1::FENCE_USAGE_READ:
      return for_access == v1::FENCE_USAGE_WRITE || for_access == v1::FENCE_USAGE_BOOKKEEP;
    case v1::FENCE_USAGE_BOOKKEEP:
      return for_access == v1::FENCE_USAGE_BOOKKEEP;
    default:
      return false;
  }
}

absl::Status CheckAccess(v1::FenceUsage for_access) {
  if (for_access != v1::FENCE_USAGE_READ && for_access != v1::FENCE_USAGE_WRITE &&
      for_access != v1::FENCE_USAGE_BOOKKEEP) {
    return absl::InvalidArgumentError(absl::StrCat(
        "for_access ", static_cast<int>(for_access),
        " is not an access: READ or WRITE (or BOOKKEEP to list every fence)"));
  }
  return absl::OkStatus();
}

namespace {

// The writers' side of a reservation (KERNEL, WRITE) or the readers'.
bool WriterSide(v1::FenceUsage usage) {
  return usage == v1::FENCE_USAGE_KERNEL || usage == v1::FENCE_USAGE_WRITE;
}

absl::Status CheckUsage(v1::FenceUsage usage, const char* what) {
  if (usage == v1::FENCE_USAGE_UNSPECIFIED || !v1::FenceUsage_IsValid(usage)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " ", static_cast<int>(usage),
        " is not a usage: KERNEL, WRITE, READ or BOOKKEEP (FENCE_USAGE_*)"));
  }
  return absl::OkStatus();
}

}  // namespace

ReservationTable::ReservationTable(FenceTable* fences, ReservationLimits limits)
    : fences_(fences), limits_(limits) {
  fences_->SetWatchHook(
      [this](const FenceView& signalled) { return OnSignaled(signalled); });
}

ReservationTable::~ReservationTable() { fences_->SetWatchHook(nullptr); }

absl::Status ReservationTable::Attach(uint64_t session, uint64_t buffer, uint64_t fence_id,
                                      v1::FenceUsage usage, uint64_t* added) {
  if (added != nullptr) *added = 0;
  RETURN_IF_ERROR(CheckUsage(usage, "usage"));
  // The fence first: one the session does not hold is NOT_FOUND, and one
  // signalled already has nothing to hold anyone back.
  ASSIGN_OR_RETURN(FenceView fence, fences_->Info(session, fence_id));
  if (fence.signaled) return absl::OkStatus();
  const bool waited = usage != v1::FENCE_USAGE_BOOKKEEP;
  uint64_t seq = 0;
  {
    absl::MutexLock lock(&mu_);
    Reservation& reservation = buffers_[buffer];
    std::vector<Attached>& attached = reservation.attached;
    // Distinct fences on the usage's side (a fence attached twice there
    // counts once).
    std::vector<uint64_t> side;
    for (const Attached& entry : attached) {
      if (entry.fence_id == fence_id && entry.usage == usage) return absl::OkStatus();
      if (WriterSide(entry.usage) == WriterSide(usage)) side.push_back(entry.fence_id);
    }
    std::sort(side.begin(), side.end());
    side.erase(std::unique(side.begin(), side.end()), side.end());
    const bool counted = std::binary_search(side.begin(), side.end(), fence_id);
    if (!counted && !WriterSide(usage)) {
      // The readers' side is open to read-only importers: one session gets
      // a share of it, so no one importer shuts the other readers out.
      std::vector<uint64_t> own;
      for (const Attached& entry : attached) {
        if (!WriterSide(entry.usage) && entry.attached_by == session) own.push_back(entry.fence_id);
      }
      std::sort(own.begin(), own.end());
      own.erase(std::unique(own.begin(), own.end()), own.end());
      if (own.size() >= limits_.reader_share()) {
        EraseIfUnusedLocked(buffer);
        return absl::ResourceExhaustedError(absl::StrCat(
            "this session has ", own.size(), " unsignalled READ/BOOKKEEP fences attached to buffer ",
            buffer, ", its share (a quarter of max_fences_per_buffer ",
            limits_.max_fences_per_buffer, ", at least 1): signal some first"));
      }
    }
    if (!counted && side.size() >= limits_.max_fences_per_buffer) {
      EraseIfUnusedLocked(buffer);
      return absl::ResourceExhaustedError(absl::StrCat(
          "buffer ", buffer, " has ", side.size(), " unsignalled ",
          WriterSide(usage) ? "KERNEL/WRITE" : "READ/BOOKKEEP",
          " fences attached, the limit (max_fences_per_buffer ", limits_.max_fences_per_buffer,
          "): signal some first"));
    }
    seq = ++reservation.last_seq;
    attached.push_back({fence_id, usage, session, absl::Now(), seq});
    auto& buffers = watched_[fence_id];
    auto known = std::find_if(buffers.begin(), buffers.end(),
                              [&](const auto& entry) { return entry.first == buffer; });
    if (known == buffers.end()) {
      buffers.emplace_back(buffer, waited);
    } else {
      known->second = known->second || waited;
    }
    PublishLocked(buffer, reservation);
  }
  // Watched from now on: its signal reaches OnSignaled, which takes the
  // entry out. (Outside this lock: the table calls OnSignaled under its
  // own.)
  if (fences_->Watch(fence_id)) {
    if (added != nullptr) *added = seq;
    return absl::OkStatus();
  }
  // Signalled meanwhile, and no hook will ever come for this attachment
  // (one may have come for the fence, and taken it out already): take it
  // back, counting it as failed if it was (a waiter may have been told of
  // it).
  const std::optional<FenceView> now = fences_->Peek(fence_id);
  const bool failed = !now.has_value() || now->status != v1::FENCE_STATUS_OK;
  absl::MutexLock lock(&mu_);
  watched_.erase(fence_id);
  auto it = buffers_.find(buffer);
  if (it == buffers_.end()) return absl::OkStatus();
  const size_t removed = std::erase_if(it->second.attached, [&](const Attached& entry) {
    return entry.fence_id == fence_id && entry.seq == seq;
  });
  if (removed > 0 && waited && failed) {
    // What it was is known (Peek above) unless it is gone already.
    RecordFailureLocked(it->second, fence_id,
                        now.has_value() ? now->status : v1::FENCE_STATUS_UNSPECIFIED,
                        now.has_value() ? now->message : "signalled before it was attached",
                        now.has_value() ? now->signaled_at : absl::Now());
  }
  PublishLocked(buffer, it->second);
  EraseIfUnusedLocked(buffer);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<ReservationTable::Attached>> ReservationTable::Pending(
    uint64_t buffer, v1::FenceUsage for_access, Snapshot* snapshot, uint64_t arm) {
  RETURN_IF_ERROR(CheckAccess(for_access));
  absl::MutexLock lock(&mu_);
  std::vector<Attached> out;
  auto it = buffers_.find(buffer);
  if (snapshot != nullptr) *snapshot = {};
  if (it == buffers_.end()) return out;
  if (snapshot != nullptr) *snapshot = {it->second.last_seq, it->second.failures};
  for (Reservation::Subscriber& subscriber : it->second.subscribers) {
    if (arm != 0 && subscriber.session == arm) subscriber.armed = true;
  }
  for (const Attached& entry : it->second.attached) {
    if (!AccessWaitsFor(for_access, entry.usage)) continue;
    const bool listed = std::any_of(out.begin(), out.end(), [&](const Attached& other) {
      return other.fence_id == entry.fence_id;
    });
    if (!listed) out.push_back(entry);
  }
  EraseIfUnusedLocked(buffer);
  return out;
}

void ReservationTable::EraseIfUnusedLocked(uint64_t buffer) {
  auto it = buffers_.find(buffer);
  if (it != buffers_.end() && it->second.attached.empty() && it->second.subscribers.empty()) {
    buffers_.erase(it);
  }
}

bool ReservationTable::PublishLocked(uint64_t buffer, Reservation& reservation) {
  if (reservation.subscribers.empty()) return false;
  reservation::SlotState state;
  state.buffer_id = buffer;
  state.failures = reservation.failures;
  auto lower = [](uint64_t& low, uint64_t seq) {
    if (low == 0 || seq < low) low = seq;
  };
  for (const Attached& entry : reservation.attached) {
    if (WriterSide(entry.usage)) {
      lower(state.writers_low, entry.seq);
    } else if (entry.usage == v1::FENCE_USAGE_READ) {
      lower(state.readers_low, entry.seq);
    }
  }
  bool woke = false;
  const bool idle = state.writers_low == 0 && state.readers_low == 0;
  for (Reservation::Subscriber& subscriber : reservation.subscribers) {
    auto page = pages_.find(subscriber.session);
    if (page == pages_.end()) continue;
    reservation::Slot& slot = page->second.slot(subscriber.slot);
    const reservation::SlotState before{0, reservation::LoadRelaxed(slot.failures),
                                        reservation::LoadRelaxed(slot.buffer_id),
                                        reservation::LoadRelaxed(slot.writers_low),
                                        reservation::LoadRelaxed(slot.readers_low)};
    if (before.failures == state.failures && before.buffer_id == state.buffer_id &&
        before.writers_low == state.writers_low && before.readers_low == state.readers_low) {
      continue;
    }
    reservation::Write(slot, state);
    // Only a slot someone asked about since it was last idle can have a
    // sleeper (an access asks before it sleeps, and one that finds the slot
    // idle returns).
    if (subscriber.armed) woke |= timeline::WakeAll(slot.seq) > 0;
    if (idle) subscriber.armed = false;
  }
  return woke;
}

void ReservationTable::RecordFailureLocked(Reservation& reservation, uint64_t fence_id,
                                           v1::FenceStatus status, std::string message,
                                           absl::Time signaled_at) {
  reservation.failed.push_back(
      {++reservation.failures, fence_id, status, std::move(message), signaled_at});
  if (reservation.failed.size() > kFailuresKept) reservation.failed.pop_front();
}

bool ReservationTable::OnSignaled(const FenceView& signalled) {
  const uint64_t fence_id = signalled.id;
  absl::MutexLock lock(&mu_);
  auto it = watched_.find(fence_id);
  if (it == watched_.end()) return false;
  const auto buffers = std::move(it->second);
  watched_.erase(it);
  bool woke = false;
  for (const auto& [buffer, waited] : buffers) {
    auto reservation = buffers_.find(buffer);
    if (reservation == buffers_.end()) continue;
    std::erase_if(reservation->second.attached,
                  [&](const Attached& entry) { return entry.fence_id == fence_id; });
    if (waited && signalled.status != v1::FENCE_STATUS_OK) {
      RecordFailureLocked(reservation->second, fence_id, signalled.status, signalled.message,
                          signalled.signaled_at);
    }
    woke |= PublishLocked(buffer, reservation->second);
    EraseIfUnusedLocked(buffer);
  }
  return woke;
}

absl::StatusOr<ReservationTable::StatusPage> ReservationTable::NewPage(UniqueFd* read_only) {
  ASSIGN_OR_RETURN(SealedPage sealed, CreateSealedPage("bufferd-reservations", reservation::kPageSize,
                                                       "a reservation status page"));
  StatusPage status;
  status.map = std::move(sealed.writable);
  auto& header = *reinterpret_cast<reservation::Header*>(status.map.data());
  header.slots = reservation::kSlots;
  header.version = reservation::kVersion;
  std::atomic_ref<uint32_t>(header.magic).store(reservation::kMagic, std::memory_order_release);
  for (uint32_t slot = reservation::kSlots - 1; slot >= 1; --slot) status.free.push_back(slot);
  *read_only = std::move(sealed.read_only);
  return status;
}

absl::StatusOr<ReservationTable::Subscription> ReservationTable::Subscribe(uint64_t session,
                                                                           uint64_t buffer,
                                                                           bool new_page) {
  Subscription out;
  bool have_page;
  {
    absl::MutexLock lock(&mu_);
    have_page = pages_.contains(session);
  }
  // Made without the lock (every signal of an attached fence takes it).
  std::optional<StatusPage> made;
  if (!have_page || new_page) {
    ASSIGN_OR_RETURN(made, NewPage(&out.page));
  }
  absl::MutexLock lock(&mu_);
  if (made.has_value()) {
    if (new_page) DropPageLocked(session);
    if (!pages_.contains(session)) {
      pages_.emplace(session, *std::move(made));
    } else {
      out.page = UniqueFd();  // another call made it first
    }
  }
  auto page = pages_.find(session);
  if (page == pages_.end()) return absl::UnavailableError("the session's status page went");
  StatusPage& status = page->second;
  Reservation& reservation = buffers_[buffer];
  if (auto known = status.slots.find(buffer); known != status.slots.end()) {
    out.slot = known->second;
    for (Reservation::Subscriber& subscriber : reservation.subscribers) {
      if (subscriber.session == session) subscriber.armed = true;
    }
    return out;
  }
  if (status.free.empty()) {  // full: the session asks the daemon
    EraseIfUnusedLocked(buffer);
    return out;
  }
  out.slot = status.free.back();
  status.free.pop_back();
  status.slots[buffer] = out.slot;
  reservation.subscribers.push_back({session, out.slot, /*armed=*/true});
  // The slot's first state: written even if nothing is attached.
  reservation::Slot& slot = status.slot(out.slot);
  reservation::Write(slot, {0, reservation.failures, buffer, 0, 0});
  PublishLocked(buffer, reservation);
  return out;
}

void ReservationTable::UnsubscribeLocked(uint64_t session, StatusPage& page, uint64_t buffer) {
  auto known = page.slots.find(buffer);
  if (known == page.slots.end()) return;
  const uint32_t index = known->second;
  page.slots.erase(known);
  reservation::Slot& slot = page.slot(index);
  reservation::Write(slot, {});
  timeline::WakeAll(slot.seq);
  page.free.push_back(index);
  auto it = buffers_.find(buffer);
  if (it == buffers_.end()) return;
  auto& subscribers = it->second.subscribers;
  subscribers.erase(std::remove_if(subscribers.begin(), subscribers.end(),
                                   [&](const auto& entry) { return entry.session == session; }),
                    subscribers.end());
  EraseIfUnusedLocked(buffer);
}

void ReservationTable::Unsubscribe(uint64_t session, uint64_t buffer) {
  absl::MutexLock lock(&mu_);
  auto page = pages_.find(session);
  if (page != pages_.end()) UnsubscribeLocked(session, page->second, buffer);
}

void ReservationTable::DropPageLocked(uint64_t session) {
  auto page = pages_.find(session);
  if (page == pages_.end()) return;
  // Every slot cleared and woken first: a waiter sleeping on one looks
  // again, sees its buffer gone from the page, and asks the daemon.
  std::vector<uint64_t> buffers;
  for (const auto& [buffer, slot] : page->second.slots) buffers.push_back(buffer);
  for (uint64_t buffer : buffers) UnsubscribeLocked(session, page->second, buffer);
  pages_.erase(page);
}

void ReservationTable::CloseSession(uint64_t session) {
  absl::MutexLock lock(&mu_);
  DropPageLocked(session);
}

std::vector<ReservationTable::Failure> ReservationTable::FailuresSince(uint64_t buffer,
                                                                      uint32_t since) const {
  absl::MutexLock lock(&mu_);
  std::vector<Failure> out;
  auto it = buffers_.find(buffer);
  if (it == buffers_.end()) return out;
  for (const Failure& failure : it->second.failed) {
    if (failure.number > since) out.push_back(failure);
  }
  return out;
}

size_t ReservationTable::pages() const {
  absl::MutexLock lock(&mu_);
  return pages_.size();
}

void ReservationTable::DropBuffer(uint64_t buffer) {
  absl::MutexLock lock(&mu_);
  if (auto it = buffers_.find(buffer); it != buffers_.end()) {
    // Its slots are free again.
    std::vector<uint64_t> sessions;
    for (const Reservation::Subscriber& subscriber : it->second.subscribers) {
      sessions.push_back(subscriber.session);
    }
    for (uint64_t session : sessions) {
      if (auto page = pages_.find(session); page != pages_.end()) {
        UnsubscribeLocked(session, page->second, buffer);
      }
    }
    buffers_.erase(buffer);
  }
  absl::erase_if(merges_, [&](const auto& entry) { return std::get<0>(entry.first) == buffer; });
}

std::optional<uint64_t> ReservationTable::CachedMerge(uint64_t buffer, uint64_t session,
                                                      v1::FenceUsage for_access,
                                                      const std::vector<uint64_t>& ids) {
  const MergeKey key{buffer, session, for_access};
  uint64_t merged_id = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = merges_.find(key);
    if (it == merges_.end() || it->second.ids != ids) return std::nullopt;
    merged_id = it->second.merged;
  }
  // Never the FenceTable under this lock (it calls OnSignaled under its own).
  std::optional<FenceView> merged = fences_->Peek(merged_id);
  if (merged.has_value() && !merged->signaled) return merged_id;
  absl::MutexLock lock(&mu_);
  if (auto it = merges_.find(key); it != merges_.end() && it->second.merged == merged_id) {
    merges_.erase(it);
  }
  return std::nullopt;
}

void ReservationTable::CacheMerge(uint64_t buffer, uint64_t session, v1::FenceUsage for_access,
                                  std::vector<uint64_t> ids, uint64_t merged) {
  absl::MutexLock lock(&mu_);
  merges_[MergeKey{buffer, session, for_access}] = Merge{std::move(ids), merged};
}

void ReservationTable::Detach(uint64_t buffer, uint64_t seq) {
  if (seq == 0) return;
  absl::MutexLock lock(&mu_);
  auto it = buffers_.find(buffer);
  if (it == buffers_.end()) return;
  uint64_t fence_id = 0;
  std::erase_if(it->second.attached, [&](const Attached& entry) {
    if (entry.seq != seq) return false;
    fence_id = entry.fence_id;
    return true;
  });
  // Its signal is no business of this buffer's any more (unless the fence
  // is attached to it otherwise too): no failure counted here for it.
  const bool still = std::any_of(it->second.attached.begin(), it->second.attached.end(),
                                 [&](const Attached& entry) { return entry.fence_id == fence_id; });
  if (auto watched = watched_.find(fence_id); fence_id != 0 && !still && watched != watched_.end()) {
    auto& buffers = watched->second;
    buffers.erase(std::remove_if(buffers.begin(), buffers.end(),
                                 [&](const auto& entry) { return entry.first == buffer; }),
                  buffers.end());
    if (buffers.empty()) watched_.erase(watched);
  }
  PublishLocked(buffer, it->second);
  EraseIfUnusedLocked(buffer);
}

absl::flat_hash_map<uint64_t, std::vector<ReservationTable::Attached>> ReservationTable::List()
    const {
  absl::MutexLock lock(&mu_);
  absl::flat_hash_map<uint64_t, std::vector<Attached>> out;
  for (const auto& [buffer, reservation] : buffers_) {
    if (!reservation.attached.empty()) out[buffer] = reservation.attached;
  }
  return out;
}

std::vector<ReservationTable::Attached> ReservationTable::AttachedTo(uint64_t buffer) const {
  absl::MutexLock lock(&mu_);
  auto it = buffers_.find(buffer);
  return it == buffers_.end() ? std::vector<Attached>{} : it->second.attached;
}

}  // namespace bufferd
