#include "fences/reservations.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"

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

absl::Status ReservationTable::Attach(uint64_t session, uint64_t buffer, uint64_t fence_id,
                                      v1::FenceUsage usage) {
  RETURN_IF_ERROR(CheckUsage(usage, "usage"));
  // The fence first: one the session does not hold is NOT_FOUND, and one
  // signalled already has nothing to hold anyone back.
  ASSIGN_OR_RETURN(FenceView fence, fences_->Info(session, fence_id));
  if (fence.signaled) return absl::OkStatus();
  absl::MutexLock lock(&mu_);
  std::vector<Attached>& attached = buffers_[buffer];
  PruneLocked(attached);
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
  if (!counted && side.size() >= limits_.max_fences_per_buffer) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "buffer ", buffer, " has ", side.size(), " unsignalled ",
        WriterSide(usage) ? "KERNEL/WRITE" : "READ/BOOKKEEP",
        " fences attached, the limit (max_fences_per_buffer ", limits_.max_fences_per_buffer,
        "): signal some first"));
  }
  attached.push_back({fence_id, usage, session, absl::Now()});
  return absl::OkStatus();
}

absl::StatusOr<std::vector<ReservationTable::Attached>> ReservationTable::Pending(
    uint64_t buffer, v1::FenceUsage for_access) {
  if (for_access != v1::FENCE_USAGE_READ && for_access != v1::FENCE_USAGE_WRITE &&
      for_access != v1::FENCE_USAGE_BOOKKEEP) {
    return absl::InvalidArgumentError(absl::StrCat(
        "for_access ", static_cast<int>(for_access),
        " is not an access: READ or WRITE (or BOOKKEEP to list every fence)"));
  }
  absl::MutexLock lock(&mu_);
  std::vector<Attached> out;
  auto it = buffers_.find(buffer);
  if (it == buffers_.end()) return out;
  PruneLocked(it->second);
  for (const Attached& entry : it->second) {
    if (!AccessWaitsFor(for_access, entry.usage)) continue;
    const bool listed = std::any_of(out.begin(), out.end(), [&](const Attached& other) {
      return other.fence_id == entry.fence_id;
    });
    if (!listed) out.push_back(entry);
  }
  if (it->second.empty()) buffers_.erase(it);
  return out;
}

void ReservationTable::PruneLocked(std::vector<Attached>& attached) {
  std::erase_if(attached, [&](const Attached& entry) {
    std::optional<FenceView> fence = fences_->Peek(entry.fence_id);
    return !fence.has_value() || fence->signaled;
  });
}

void ReservationTable::DropBuffer(uint64_t buffer) {
  absl::MutexLock lock(&mu_);
  buffers_.erase(buffer);
  absl::erase_if(merges_, [&](const auto& entry) { return std::get<0>(entry.first) == buffer; });
}

std::optional<uint64_t> ReservationTable::CachedMerge(uint64_t buffer, uint64_t session,
                                                      v1::FenceUsage for_access,
                                                      const std::vector<uint64_t>& ids) {
  absl::MutexLock lock(&mu_);
  auto it = merges_.find(MergeKey{buffer, session, for_access});
  if (it == merges_.end() || it->second.ids != ids) return std::nullopt;
  std::optional<FenceView> merged = fences_->Peek(it->second.merged);
  if (!merged.has_value() || merged->signaled) {
    merges_.erase(it);
    return std::nullopt;
  }
  return it->second.merged;
}

void ReservationTable::CacheMerge(uint64_t buffer, uint64_t session, v1::FenceUsage for_access,
                                  std::vector<uint64_t> ids, uint64_t merged) {
  absl::MutexLock lock(&mu_);
  merges_[MergeKey{buffer, session, for_access}] = Merge{std::move(ids), merged};
}

void ReservationTable::Detach(uint64_t buffer, uint64_t fence_id, v1::FenceUsage usage) {
  absl::MutexLock lock(&mu_);
  auto it = buffers_.find(buffer);
  if (it == buffers_.end()) return;
  std::erase_if(it->second, [&](const Attached& entry) {
    return entry.fence_id == fence_id && entry.usage == usage;
  });
  if (it->second.empty()) buffers_.erase(it);
}

absl::flat_hash_map<uint64_t, std::vector<ReservationTable::Attached>> ReservationTable::List()
    const {
  absl::MutexLock lock(&mu_);
  return buffers_;
}

void ReservationTable::Clear() {
  absl::MutexLock lock(&mu_);
  buffers_.clear();
  merges_.clear();
}

}  // namespace bufferd
