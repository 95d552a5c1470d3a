// SessionTable: who is connected, and who may call.
//
// A session is born on fd.sock (SessionHub opens it here with the peer's
// SO_PEERCRED and comm) and gets a random secret; every gRPC call presents
// "<id>:<hex secret>" (base/protocol.h) and Authenticate maps it back to the
// session. Sessions are capped in total and per uid. A detached session (its
// client left, fds it was sent still unread) answers no calls; a closed one
// is gone. Ids are never reused.
//
// What a session holds (handles, bytes) is DaemonState's; this table is
// identity only, behind its own lock, so authenticating a call never waits
// for buffer work.
//
// Thread-safe.
#ifndef BUFFERD_DAEMON_SESSIONS_H_
#define BUFFERD_DAEMON_SESSIONS_H_

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/protocol.h"
#include "base/unix_socket.h"

namespace bufferd {

class SessionTable {
 public:
  struct Options {
    uint32_t max_sessions = 4096;
    uint32_t max_sessions_per_uid = 1024;
  };

  // Who a session is.
  struct Identity {
    uint64_t id = 0;
    PeerCredentials peer;
    // Escaped (base/client_text.h).
    std::string comm;
    absl::Time connected;
  };

  struct NewSession {
    uint64_t id = 0;
    std::string secret;  // kSessionSecretBytes random bytes
  };

  explicit SessionTable(Options options) : options_(options) {}

  // RESOURCE_EXHAUSTED at Options::max_sessions or max_sessions_per_uid,
  // naming the cap.
  absl::StatusOr<NewSession> Open(const PeerCredentials& peer, std::string comm);
  // No more calls (UNAUTHENTICATED); the session still counts until Close.
  void Detach(uint64_t id);
  // Idempotent.
  void Close(uint64_t id);

  // The session a credential names; UNAUTHENTICATED with a reason otherwise.
  absl::StatusOr<uint64_t> Authenticate(absl::string_view credential) const;

  std::vector<Identity> List() const;
  // Who a session is, while it is open.
  std::optional<Identity> Lookup(uint64_t id) const;
  size_t size() const;

 private:
  // By session id (sessions_' key): an Identity but its id.
  struct Entry {
    PeerCredentials peer;
    std::string comm;
    absl::Time connected;
    // Inline: a std::string of 16 bytes would be one more allocation.
    std::array<char, kSessionSecretBytes> secret;
    bool detached = false;
  };
  static Identity IdentityOf(uint64_t id, const Entry& entry);

  const Options options_;
  mutable absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<uint64_t, Entry> sessions_ ABSL_GUARDED_BY(mu_);
  std::map<uid_t, uint32_t> per_uid_ ABSL_GUARDED_BY(mu_);
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_SESSIONS_H_
