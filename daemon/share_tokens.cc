#include "daemon/share_tokens.h"

#include <algorithm>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "base/protocol.h"

namespace bufferd {

absl::StatusOr<std::string> ShareTokens::Create(uint64_t exporter, uint64_t buffer,
                                                v1::Access access, absl::Time expires, LeasedFd fd,
                                                ProcessRef exporter_process) {
  uint32_t& unredeemed = unredeemed_[exporter];
  if (unredeemed >= kMaxUnredeemed) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "session ", exporter, " has ", unredeemed, " share tokens out that nobody imported (max ",
        kMaxUnredeemed, "); they are forgotten 10 minutes after they expire"));
  }
  ++unredeemed;
  std::string token = absl::BytesToHexString(RandomBytes(16));
  tokens_[token] = Token{buffer, access, expires, exporter, std::move(exporter_process), 0};
  by_forget_time_.emplace(expires + kTombstoneGrace, token);
  by_buffer_[buffer].insert(token);
  if (fd.fd.valid()) {
    fds_[token] = std::move(fd);
    by_expiry_.emplace(expires, token);
  }
  return token;
}

absl::StatusOr<ShareTokens::Token> ShareTokens::Find(absl::string_view token,
                                                     absl::Time now) const {
  auto it = tokens_.find(std::string(token));
  if (it == tokens_.end()) return absl::NotFoundError("unknown share token");
  const Token& entry = it->second;
  if (entry.used_by != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("share token was already used (by session ", entry.used_by, ")"));
  }
  if (now >= entry.expires) {
    return absl::FailedPreconditionError(absl::StrCat(
        "share token expired ",
        absl::FormatDuration(absl::Trunc(now - entry.expires, absl::Milliseconds(1))), " ago"));
  }
  return entry;
}

int ShareTokens::fd(absl::string_view token) const {
  auto it = fds_.find(std::string(token));
  return it == fds_.end() ? -1 : it->second.fd.get();
}

LeasedFd ShareTokens::Redeem(absl::string_view token, uint64_t importer) {
  auto it = tokens_.find(std::string(token));
  if (it == tokens_.end() || it->second.used_by != 0) return {};
  it->second.used_by = importer;
  ForgetUnredeemed(it->second.exporter);
  return TakeFdAndExpiry(it->first, it->second.expires);
}

void ShareTokens::Unredeem(absl::string_view token, LeasedFd fd) {
  auto it = tokens_.find(std::string(token));
  if (it == tokens_.end() || it->second.used_by == 0) return;
  it->second.used_by = 0;
  ++unredeemed_[it->second.exporter];
  if (fd.fd.valid()) {
    fds_[it->first] = std::move(fd);
    by_expiry_.emplace(it->second.expires, it->first);
  }
}

std::vector<LeasedFd> ShareTokens::ForgetBuffer(uint64_t buffer) {
  std::vector<LeasedFd> fds;
  auto it = by_buffer_.find(buffer);
  if (it == by_buffer_.end()) return fds;
  const std::set<std::string> tokens = std::move(it->second);
  by_buffer_.erase(it);
  for (const std::string& token : tokens) {
    if (auto t = tokens_.find(token); t != tokens_.end()) {
      if (LeasedFd fd = TakeFdAndExpiry(t->first, t->second.expires); fd.fd.valid()) {
        fds.push_back(std::move(fd));
      }
      Erase(t);
    }
  }
  return fds;
}

LeasedFd ShareTokens::TakeFd(const std::string& token) {
  auto fd = fds_.find(token);
  if (fd == fds_.end()) return {};
  LeasedFd taken = std::move(fd->second);
  fds_.erase(fd);
  return taken;
}

LeasedFd ShareTokens::TakeFdAndExpiry(const std::string& token, absl::Time expires) {
  LeasedFd taken = TakeFd(token);
  if (!taken.fd.valid()) return taken;
  auto [first, last] = by_expiry_.equal_range(expires);
  for (auto it = first; it != last; ++it) {
    if (it->second == token) {
      by_expiry_.erase(it);
      break;
    }
  }
  return taken;
}

std::vector<LeasedFd> ShareTokens::Expire(absl::Time now) {
  std::vector<LeasedFd> fds;
  while (!by_expiry_.empty() && by_expiry_.begin()->first <= now) {
    auto first = by_expiry_.begin();
    const std::string token = first->second;
    by_expiry_.erase(first);
    if (LeasedFd fd = TakeFd(token); fd.fd.valid()) fds.push_back(std::move(fd));
  }
  while (!by_forget_time_.empty() && by_forget_time_.begin()->first < now) {
    auto t = tokens_.find(by_forget_time_.begin()->second);
    if (t != tokens_.end()) {
      Erase(t);  // also drops this index entry
    } else {
      by_forget_time_.erase(by_forget_time_.begin());
    }
  }
  return fds;
}

uint64_t ShareTokens::Pending(absl::Time now) const {
  uint64_t pending = 0;
  for (const auto& [token, entry] : tokens_) pending += entry.used_by == 0 && now < entry.expires;
  return pending;
}

std::vector<ShareTokens::Token> ShareTokens::ListPending(absl::Time now) const {
  std::vector<Token> pending;
  for (const auto& [token, entry] : tokens_) {
    if (entry.used_by == 0 && now < entry.expires) pending.push_back(entry);
  }
  std::sort(pending.begin(), pending.end(),
            [](const Token& a, const Token& b) { return a.expires < b.expires; });
  return pending;
}

void ShareTokens::Erase(std::map<std::string, Token>::iterator token) {
  const Token& entry = token->second;
  // An fd still here (a tombstone has none) closes with its token.
  fds_.erase(token->first);
  if (entry.used_by == 0) ForgetUnredeemed(entry.exporter);
  auto [first, last] = by_forget_time_.equal_range(entry.expires + kTombstoneGrace);
  for (auto it = first; it != last; ++it) {
    if (it->second == token->first) {
      by_forget_time_.erase(it);
      break;
    }
  }
  if (auto b = by_buffer_.find(entry.buffer); b != by_buffer_.end()) {
    b->second.erase(token->first);
    if (b->second.empty()) by_buffer_.erase(b);
  }
  tokens_.erase(token);
}

void ShareTokens::ForgetUnredeemed(uint64_t exporter) {
  auto it = unredeemed_.find(exporter);
  if (it != unredeemed_.end() && --it->second == 0) unredeemed_.erase(it);
}

}  // namespace bufferd
