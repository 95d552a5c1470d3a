// ShareTokens: the share tokens sessions export buffers with.
//
// A token is 128 random bits (hex), single use, and expires (Export's ttl,
// at most an hour). Redeeming one marks it used; a redeemed or expired token
// is kept as a tombstone, so a second use says what happened, until
// kTombstoneGrace after it would have expired. A session may have at most
// kMaxUnredeemed tokens out that nobody redeemed. Tokens never keep a buffer
// alive: a destroyed buffer's tokens are forgotten (ForgetBuffer).
//
// A token holds the buffer's fd the exporter uploaded (the daemon keeps no
// fd per buffer, only per token): from Create until it is redeemed (the fd
// goes to the import), expires or is forgotten. Whatever gives fds back
// returns them, so the caller closes them outside its lock.
//
// Thread-compatible: DaemonState guards it with its mutex, so a token and
// the handle it becomes are one critical section.
#ifndef BUFFERD_DAEMON_SHARE_TOKENS_H_
#define BUFFERD_DAEMON_SHARE_TOKENS_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "base/fd_budget.h"
#include "bufferd/v1/buffer.pb.h"
#include "daemon/process_ref.h"

namespace bufferd {

class ShareTokens {
 public:
  static constexpr absl::Duration kMaxTtl = absl::Hours(1);
  static constexpr absl::Duration kTombstoneGrace = absl::Minutes(10);
  // Tokens a session may have out that nobody redeemed (an expired one
  // counts until it is forgotten).
  static constexpr uint32_t kMaxUnredeemed = 4096;

  struct Token {
    uint64_t buffer = 0;
    v1::Access access = v1::ACCESS_READ_WRITE;
    absl::Time expires;
    uint64_t exporter = 0;
    // The exporter's process, for debug views.
    ProcessRef exporter_process;
    // Set once redeemed.
    uint64_t used_by = 0;
  };

  // A new token for `buffer`. RESOURCE_EXHAUSTED at kMaxUnredeemed for the
  // exporter. `ttl` must be at most kMaxTtl (the caller checks).
  absl::StatusOr<std::string> Create(uint64_t exporter, uint64_t buffer, v1::Access access,
                                     absl::Time expires, LeasedFd fd = {},
                                     ProcessRef exporter_process = {});
  // The live, unredeemed token `token` at `now`: NOT_FOUND if unknown,
  // FAILED_PRECONDITION if used or expired, saying so.
  absl::StatusOr<Token> Find(absl::string_view token, absl::Time now) const;
  // The fd of a token Find returned, borrowed (the import makes its own).
  int fd(absl::string_view token) const;
  // Marks a token Find returned as used by `importer`; returns its fd.
  LeasedFd Redeem(absl::string_view token, uint64_t importer);
  // Makes a redeemed token redeemable again (its Import was undone), with
  // the fd Redeem returned.
  void Unredeem(absl::string_view token, LeasedFd fd = {});
  // Forgets every token of a destroyed buffer; returns their fds.
  std::vector<LeasedFd> ForgetBuffer(uint64_t buffer);
  // Drops the fds of tokens expired at `now` (returned) and forgets tokens
  // kTombstoneGrace past their expiry.
  std::vector<LeasedFd> Expire(absl::Time now);

  // Tokens live and not redeemed at `now`.
  uint64_t Pending(absl::Time now) const;
  // Those tokens themselves, oldest expiry first, without the token strings
  // (for debug views: a token is a capability).
  std::vector<Token> ListPending(absl::Time now) const;
  size_t size() const { return tokens_.size(); }

 private:
  void Erase(std::map<std::string, Token>::iterator token);
  void ForgetUnredeemed(uint64_t exporter);

  std::map<std::string, Token> tokens_;
  // Indexes of tokens_: by the time each is forgotten, and by buffer.
  std::multimap<absl::Time, std::string> by_forget_time_;
  std::map<uint64_t, std::set<std::string>> by_buffer_;
  // Exporter session -> its tokens in tokens_ not redeemed (used_by == 0).
  std::map<uint64_t, uint32_t> unredeemed_;
  // The fds of live, unredeemed tokens, and the same tokens by expiry.
  std::map<std::string, LeasedFd> fds_;
  std::multimap<absl::Time, std::string> by_expiry_;
  // Takes `token`'s fd out of fds_ (an invalid LeasedFd if it has none).
  LeasedFd TakeFd(const std::string& token);
  // The same, and its by_expiry_ entry (`expires` is the token's).
  LeasedFd TakeFdAndExpiry(const std::string& token, absl::Time expires);
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_SHARE_TOKENS_H_
