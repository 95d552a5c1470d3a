#include "daemon/sessions.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "base/protocol.h"

namespace bufferd {
namespace {

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

absl::StatusOr<SessionTable::NewSession> SessionTable::Open(const PeerCredentials& peer,
                                                            std::string comm) {
  Entry entry;
  entry.peer = peer;
  entry.comm = std::move(comm);
  entry.connected = absl::Now();
  const std::string secret = RandomBytes(kSessionSecretBytes);
  std::copy(secret.begin(), secret.end(), entry.secret.begin());
  absl::MutexLock lock(&mu_);
  if (sessions_.size() >= options_.max_sessions) {
    return absl::ResourceExhaustedError(
        absl::StrCat("bufferd has ", sessions_.size(), " sessions open (limits.max_sessions)"));
  }
  uint32_t& of_uid = per_uid_[peer.uid];
  if (of_uid >= options_.max_sessions_per_uid) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "uid ", peer.uid, " has ", of_uid, " sessions open (limits.max_sessions_per_uid)"));
  }
  ++of_uid;
  NewSession result{next_id_++, secret};
  sessions_[result.id] = std::move(entry);
  return result;
}

void SessionTable::Detach(uint64_t id) {
  absl::MutexLock lock(&mu_);
  if (auto it = sessions_.find(id); it != sessions_.end()) it->second.detached = true;
}

void SessionTable::Close(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  auto of_uid = per_uid_.find(it->second.peer.uid);
  if (--of_uid->second == 0) per_uid_.erase(of_uid);
  sessions_.erase(it);
}

absl::StatusOr<uint64_t> SessionTable::Authenticate(absl::string_view credential) const {
  ASSIGN_OR_RETURN(const SessionCredential parsed, ParseSessionCredential(credential));
  const uint64_t id = parsed.session_id;
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end() || it->second.detached) {
    return absl::UnauthenticatedError(
        absl::StrCat("session ", id, " is not live (it ended or never existed)"));
  }
  if (!ConstantTimeEquals(absl::string_view(it->second.secret.data(), it->second.secret.size()),
                          parsed.secret)) {
    return absl::UnauthenticatedError(absl::StrCat("wrong secret for session ", id));
  }
  return id;
}

std::vector<SessionTable::Identity> SessionTable::List() const {
  std::vector<Identity> list;
  absl::MutexLock lock(&mu_);
  list.reserve(sessions_.size());
  for (const auto& [id, entry] : sessions_) list.push_back(IdentityOf(id, entry));
  return list;
}

std::optional<SessionTable::Identity> SessionTable::Lookup(uint64_t id) const {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return std::nullopt;
  return IdentityOf(id, it->second);
}

SessionTable::Identity SessionTable::IdentityOf(uint64_t id, const Entry& entry) {
  return Identity{id, entry.peer, entry.comm, entry.connected};
}

size_t SessionTable::size() const {
  absl::MutexLock lock(&mu_);
  return sessions_.size();
}

}  // namespace bufferd
