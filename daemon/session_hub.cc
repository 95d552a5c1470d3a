#include "daemon/session_hub.h"

#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/client_text.h"
#include "base/errno_status.h"
#include "daemon/log.h"
#include "spdlog/spdlog.h"

namespace bufferd {

namespace {
LogLimiter& SkippedReleaseLog() {
  static LogLimiter limiter;
  return limiter;
}
}  // namespace

std::string ReadComm(pid_t pid) {
  // The kernel ends comm with one '\n'. Escaped here, once, for every
  // table, log line and proto (whose string fields must be UTF-8).
  std::ifstream in(absl::StrCat("/proc/", pid, "/comm"));
  char buf[64] = {};
  in.read(buf, sizeof(buf) - 1);
  absl::string_view comm(buf, static_cast<size_t>(in.gcount()));
  if (absl::EndsWith(comm, "\n")) comm.remove_suffix(1);
  return EscapeClientText(comm);
}

absl::StatusOr<FdChannel::Admission> SessionHub::OnConnect(const PeerCredentials& peer) {
  const std::string comm = ReadComm(peer.pid);
  ASSIGN_OR_RETURN(SessionTable::NewSession session, sessions_->Open(peer, comm));
  state_->AddSession(session.id, peer.uid);
  spdlog::debug("session {} opened: pid {} uid {} comm '{}'", session.id, peer.pid, peer.uid, comm);
  return FdChannel::Admission{session.id, std::move(session.secret)};
}

void SessionHub::OnRecord(uint64_t session_id, const v1::FdChannelMessage& message,
                          std::vector<UniqueFd> fds) {
  if (message.has_release()) ReleaseDropped(session_id, {message.release().handle()});
  // FdUpload is reserved for Fence.ImportSyncFd; uploaded fds are closed
  // when `fds` goes out of scope.
}

void SessionHub::ReleaseDropped(uint64_t session_id, const std::vector<uint64_t>& handles) {
  std::vector<DeadBuffer> dead;
  for (uint64_t handle : handles) {
    absl::StatusOr<std::vector<DeadBuffer>> released = state_->Release(session_id, handle);
    if (!released.ok()) {
      // A client re-sends after a failed call, so some are expected; a
      // flood of bogus ones is its own business: rate-limited.
      LogLimited(SkippedReleaseLog(), spdlog::level::debug,
                 "session {}: release of dropped handle {}: {}", session_id, handle,
                 released.status().ToString());
      continue;
    }
    for (DeadBuffer& buffer : *released) dead.push_back(std::move(buffer));
  }
  reaper_->Free(std::move(dead));
}

void SessionHub::OnDetach(uint64_t session_id) {
  sessions_->Detach(session_id);
  state_->DetachSession(session_id);
}

void SessionHub::OnDisconnect(uint64_t session_id) {
  // What it holds first, then who it was: a debug view never shows a
  // holder without its pid and comm.
  reaper_->Free(state_->CloseSession(session_id));
  sessions_->Close(session_id);
}

}  // namespace bufferd
