// QuotaLedger: the bytes each session and each uid hold, per heap, checked
// against the config's quotas (QuotaConfig, with per-heap overrides).
//
// A session is charged a buffer's size once per buffer it holds (per heap);
// a uid is charged the sum over its sessions. Charge checks every quota and
// charges in one step, or charges nothing and names the quota it hit.
//
// Thread-compatible: DaemonState guards it with its own mutex, so a quota
// check and the handle it pays for are one critical section.
#ifndef BUFFERD_DAEMON_QUOTA_LEDGER_H_
#define BUFFERD_DAEMON_QUOTA_LEDGER_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "bufferd/v1/config.pb.h"

namespace bufferd {

class QuotaLedger {
 public:
  explicit QuotaLedger(v1::QuotaConfig quotas) : quotas_(std::move(quotas)) {}

  // Per-heap overrides of the byte quotas (0 = the global value).
  void SetHeapQuotas(const std::string& heap, uint64_t per_session, uint64_t per_uid);
  const v1::QuotaConfig& quotas() const { return quotas_; }
  // New global quotas (a reload); charges held stay, only new ones meet them.
  void SetQuotas(v1::QuotaConfig quotas) { quotas_ = std::move(quotas); }

  // Charges `bytes` of `heap` to the session and its uid. RESOURCE_EXHAUSTED
  // naming the quota (and the holder) if either would go over.
  absl::Status Charge(uint64_t session_id, uid_t uid, const std::string& heap, uint64_t bytes);
  // What Charge would answer, charging nothing.
  absl::Status Check(uint64_t session_id, uid_t uid, const std::string& heap, uint64_t bytes) const;
  // Gives back what Charge took. A session already forgotten gives back to
  // its uid only.
  void Uncharge(uint64_t session_id, uid_t uid, const std::string& heap, uint64_t bytes);
  // Drops the session's own counts (its uid keeps what in-flight charges
  // still hold until they are uncharged).
  void ForgetSession(uint64_t session_id) { sessions_.erase(session_id); }

  // heap -> bytes the session holds (empty if none).
  const std::map<std::string, uint64_t>& SessionBytes(uint64_t session_id) const;

 private:
  uint64_t SessionQuota(const std::string& heap) const;
  uint64_t UidQuota(const std::string& heap) const;

  v1::QuotaConfig quotas_;
  // heap -> (per session, per uid) overrides.
  std::map<std::string, std::pair<uint64_t, uint64_t>> heap_quotas_;
  // session -> heap -> bytes.
  std::map<uint64_t, std::map<std::string, uint64_t>> sessions_;
  // (uid, heap) -> bytes.
  std::map<std::pair<uid_t, std::string>, uint64_t> uids_;
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_QUOTA_LEDGER_H_
