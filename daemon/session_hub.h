// SessionHub: where a session begins and ends, for everyone who cares.
//
// The fd channel's Delegate. A connection becomes a session here: the
// SessionTable opens it (caps, secret) and DaemonState learns its id and
// uid. Records the client sends one-way are dispatched from here (releases
// today; fence signals and uploads next). And a session's end fans out from
// here, once: the table forgets it, DaemonState drops its handles, and the
// buffers that died go to the Reaper (fences will hook in beside them).
//
// Thread-safe as its parts are; the channel calls it from its loop thread.
#ifndef BUFFERD_DAEMON_SESSION_HUB_H_
#define BUFFERD_DAEMON_SESSION_HUB_H_

#include <string>
#include <vector>

#include "base/unix_socket.h"
#include "daemon/fd_channel.h"
#include "daemon/reaper.h"
#include "daemon/sessions.h"
#include "daemon/state.h"

namespace bufferd {

class SessionHub final : public FdChannel::Delegate {
 public:
  // All must outlive this object.
  SessionHub(SessionTable* sessions, DaemonState* state, Reaper* reaper)
      : sessions_(sessions), state_(state), reaper_(reaper) {}

  absl::StatusOr<FdChannel::Admission> OnConnect(const PeerCredentials& peer) override;
  void OnRecord(uint64_t session_id, const v1::FdChannelMessage& message,
                std::vector<UniqueFd> fds) override;
  void OnDetach(uint64_t session_id) override;
  void OnDisconnect(uint64_t session_id) override;

  // Releases handles the session dropped: one-way records and the releases
  // a call carries. A handle unknown or already released is skipped (a
  // client re-sends after a failed call; ids are never reused).
  void ReleaseDropped(uint64_t session_id, const std::vector<uint64_t>& handles);

 private:
  SessionTable* const sessions_;
  DaemonState* const state_;
  Reaper* const reaper_;
};

// /proc/<pid>/comm, escaped (base/client_text.h): the name may hold any
// byte but NUL.
std::string ReadComm(pid_t pid);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_SESSION_HUB_H_
