#include "daemon/quota_ledger.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"

namespace bufferd {

void QuotaLedger::SetHeapQuotas(const std::string& heap, uint64_t per_session, uint64_t per_uid) {
  heap_quotas_[heap] = {per_session, per_uid};
}

uint64_t QuotaLedger::SessionQuota(const std::string& heap) const {
  auto it = heap_quotas_.find(heap);
  if (it != heap_quotas_.end() && it->second.first != 0) return it->second.first;
  return quotas_.max_bytes_per_session();
}

uint64_t QuotaLedger::UidQuota(const std::string& heap) const {
  auto it = heap_quotas_.find(heap);
  if (it != heap_quotas_.end() && it->second.second != 0) return it->second.second;
  return quotas_.max_bytes_per_uid();
}

const std::map<std::string, uint64_t>& QuotaLedger::SessionBytes(uint64_t session_id) const {
  static const std::map<std::string, uint64_t> kNone;
  auto it = sessions_.find(session_id);
  return it == sessions_.end() ? kNone : it->second;
}

absl::Status QuotaLedger::Charge(uint64_t session_id, uid_t uid, const std::string& heap,
                                 uint64_t bytes) {
  RETURN_IF_ERROR(Check(session_id, uid, heap, bytes));
  sessions_[session_id][heap] += bytes;
  uids_[{uid, heap}] += bytes;
  return absl::OkStatus();
}

absl::Status QuotaLedger::Check(uint64_t session_id, uid_t uid, const std::string& heap,
                                uint64_t bytes) const {
  uint64_t session_held = 0;
  if (auto s = sessions_.find(session_id); s != sessions_.end()) {
    if (auto h = s->second.find(heap); h != s->second.end()) session_held = h->second;
  }
  const uint64_t session_max = SessionQuota(heap);
  if (session_max != 0 && bytes > session_max - std::min(session_max, session_held)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("quota max_bytes_per_session on heap '", heap, "': session ", session_id,
                     " holds ", FormatBytes(session_held), " of ", FormatBytes(session_max),
                     ", asked for ", FormatBytes(bytes)));
  }
  const auto uid_key = std::make_pair(uid, heap);
  uint64_t uid_held = 0;
  if (auto it = uids_.find(uid_key); it != uids_.end()) uid_held = it->second;
  const uint64_t uid_max = UidQuota(heap);
  if (uid_max != 0 && bytes > uid_max - std::min(uid_max, uid_held)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota max_bytes_per_uid on heap '", heap, "': uid ", uid, " holds ", FormatBytes(uid_held),
        " of ", FormatBytes(uid_max), ", asked for ", FormatBytes(bytes)));
  }
  // Sums never wrap (a heap caps one buffer far below this; this is the
  // guard if a caller did not).
  if (bytes > std::numeric_limits<uint64_t>::max() - std::max(session_held, uid_held)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("byte counts of session ", session_id, " on heap '", heap, "' would wrap"));
  }
  return absl::OkStatus();
}

void QuotaLedger::Uncharge(uint64_t session_id, uid_t uid, const std::string& heap,
                           uint64_t bytes) {
  if (auto s = sessions_.find(session_id); s != sessions_.end()) {
    auto b = s->second.find(heap);
    if (b != s->second.end() && (b->second -= bytes) == 0) s->second.erase(b);
    if (s->second.empty()) sessions_.erase(s);
  }
  auto u = uids_.find({uid, heap});
  if (u != uids_.end() && (u->second -= bytes) == 0) uids_.erase(u);
}

}  // namespace bufferd
