#include "daemon/session_hub.h"

#include <fcntl.h>

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

absl::StatusOr<FdChannel::Admission> SessionHub::OnConnect(const PeerCredentials& peer) {
  const std::string comm = ReadComm(peer.pid);
  ASSIGN_OR_RETURN(SessionTable::NewSession session, sessions_->Open(peer, comm));
  state_->AddSession(session.id, peer.uid, ProcessRef{peer.pid, comm, ProcessStartTicks(peer.pid)});
  fences_->AddSession(session.id, peer.uid);
  timelines_->AddSession(session.id, peer.uid);
  {
    absl::MutexLock lock(&mu_);
    uploads_[session.id].uid = peer.uid;
  }
  spdlog::debug("session {} opened: pid {} uid {} comm '{}'", session.id, peer.pid, peer.uid, comm);
  return FdChannel::Admission{session.id, std::move(session.secret)};
}

absl::Status SessionHub::OnRecord(uint64_t session_id, const v1::FdChannelMessage& message,
                                  std::vector<UniqueFd> fds) {
  if (message.message_case() != v1::FdChannelMessage::kUpload && !fds.empty()) {
    return absl::InvalidArgumentError("only an FdUpload carries an fd");
  }
  switch (message.message_case()) {
    case v1::FdChannelMessage::kRelease:
      ReleaseDropped(session_id, {message.release().handle()});
      return absl::OkStatus();
    case v1::FdChannelMessage::kSignal:
      return OnSignal(session_id, message.signal());
    case v1::FdChannelMessage::kForget:
      for (uint64_t id : message.forget().fence_ids()) fences_->Forget(session_id, id);
      return absl::OkStatus();
    case v1::FdChannelMessage::kForgetTimelines:
      for (uint64_t id : message.forget_timelines().timeline_ids()) {
        timelines_->Forget(session_id, id, message.forget_timelines().by_owner());
      }
      return absl::OkStatus();
    case v1::FdChannelMessage::kUpload:
      return OnUpload(session_id, message.upload().upload_id(), std::move(fds));
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("record of kind ", static_cast<int>(message.message_case()),
                       " is not one a client sends"));
  }
}

absl::Status SessionHub::OnSignal(uint64_t session_id, const v1::FenceSignal& signal) {
  absl::Status signalled = fences_->SignalOneWay(
      session_id, signal.fence_id(), static_cast<v1::FenceStatus>(signal.status()),
      signal.message());
  // Its deadline may have come first: the owner could not know.
  if (signalled.code() == absl::StatusCode::kFailedPrecondition) {
    spdlog::debug("session {}: one-way signal: {}", session_id, StatusText(signalled));
    return absl::OkStatus();
  }
  return signalled;
}

absl::Status SessionHub::OnUpload(uint64_t session_id, uint64_t upload_id,
                                  std::vector<UniqueFd> fds) {
  if (fds.size() != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("FdUpload carries ", fds.size(), " fds; exactly one expected"));
  }
  uid_t uid;
  {
    absl::MutexLock lock(&mu_);
    auto it = uploads_.find(session_id);
    if (it == uploads_.end()) return absl::OkStatus();  // ending
    if (it->second.kept.Read().fds.contains(upload_id)) {
      return absl::InvalidArgumentError(absl::StrCat("upload id ", upload_id, " is in use"));
    }
    uid = it->second.uid;
  }
  // Only what could be imported or is a timeline page is kept: never a
  // socket (the client's own fd.sock end among them, which would keep its
  // session from ever ending). The call naming it gets the reason.
  absl::StatusOr<LeasedFd> upload;
  // A memfd (F_GET_SEALS works on nothing else) may be a timeline page; the
  // call naming it checks it.
  if (absl::Status importable = CheckImportable(fds[0].get());
      !importable.ok() && ::fcntl(fds[0].get(), F_GET_SEALS) < 0) {
    upload = absl::Status(
        importable.code(),
        absl::StrCat(
            importable.message(),
            "; nor is it a memfd, as an upload meant for a timeline's or a fence page would be"));
  } else if (absl::StatusOr<FdBudget::Lease> lease = budget_->Acquire(FdUse::kFence, uid);
             !lease.ok()) {
    // Leased without the hub's lock (the budget may run reclaimers).
    upload = lease.status();
  } else {
    upload = LeasedFd{std::move(fds[0]), *std::move(lease)};
  }
  fds.clear();
  // An unclaimed upload pushed out, closed once the lock is dropped, on the
  // reaper's thread (it may be the last fd of a big buffer).
  std::vector<LeasedFd> dropped;
  {
    absl::MutexLock lock(&mu_);
    auto it = uploads_.find(session_id);
    if (it == uploads_.end()) return absl::OkStatus();
    Kept& uploads = it->second.kept.Use();
    std::map<uint64_t, Upload>& kept = uploads.fds;
    // Unclaimed uploads (a call that never came): the oldest goes.
    if (kept.size() >= kMaxUploads) {
      auto oldest = std::min_element(kept.begin(), kept.end(), [](const auto& a, const auto& b) {
        return a.second.arrival < b.second.arrival;
      });
      if (oldest->second.fd.ok()) dropped.push_back(*std::move(oldest->second.fd));
      kept.erase(oldest);
    }
    kept.emplace(upload_id, Upload{std::move(upload), uploads.arrivals++});
  }
  if (!dropped.empty()) reaper_->Close(std::move(dropped));
  return absl::OkStatus();
}

absl::StatusOr<UniqueFd> SessionHub::TakeUpload(uint64_t session_id, uint64_t upload_id) {
  absl::StatusOr<LeasedFd> upload = absl::NotFoundError(absl::StrCat(
      "upload ", upload_id, " not found: send the fd in an FdUpload record on fd.sock first"));
  {
    absl::MutexLock lock(&mu_);
    auto it = uploads_.find(session_id);
    if (Kept* kept = it != uploads_.end() ? it->second.kept.get() : nullptr) {
      auto fd = kept->fds.find(upload_id);
      if (fd != kept->fds.end()) {
        upload = std::move(fd->second.fd);
        kept->fds.erase(fd);
      }
    }
  }
  if (!upload.ok()) return upload.status();
  return std::move(upload->fd);
}

absl::Status SessionHub::DrainRecords(uint64_t session_id, uint64_t sent) {
  if (channel_ == nullptr) return absl::OkStatus();
  switch (channel_->DrainSession(session_id, sent)) {
    case FdChannel::Drained::kApplied:
      return absl::OkStatus();
    case FdChannel::Drained::kEnded:
      return absl::UnauthenticatedError(absl::StrCat(
          "session ", session_id, " has ended (its fd.sock closed, or a record it sent ended it)"));
    case FdChannel::Drained::kBehind:
      break;
  }
  return absl::UnavailableError(absl::StrCat(
      "session ", session_id, ": more than 4096 records it sent on fd.sock before this call are "
      "still unread; try again"));
}

void SessionHub::ReleaseDropped(uint64_t session_id, const std::vector<uint64_t>& handles) {
  std::vector<DeadBuffer> dead;
  for (uint64_t handle : handles) {
    uint64_t let_go = 0;
    absl::StatusOr<std::vector<DeadBuffer>> released =
        state_->Release(session_id, handle, &let_go);
    LetGo(session_id, let_go);
    if (!released.ok()) {
      // A client re-sends after a failed call, so some are expected; a
      // flood of bogus ones is its own business: rate-limited.
      LogLimited(SkippedReleaseLog(), spdlog::level::debug,
                 "session {}: release of dropped handle {}: {}", session_id, handle,
                 StatusText(released.status()));
      continue;
    }
    for (DeadBuffer& buffer : *released) dead.push_back(std::move(buffer));
  }
  reaper_->Free(std::move(dead));
}

void SessionHub::LetGo(uint64_t session_id, uint64_t buffer) {
  if (buffer != 0) reservations_->Unsubscribe(session_id, buffer);
}

void SessionHub::OnDetach(uint64_t session_id) {
  // It can signal nothing any more: its fences and timelines fail now, not
  // when its unread fds are gone.
  fences_->CloseSession(session_id);
  timelines_->CloseSession(session_id);
  sessions_->Detach(session_id);
  state_->DetachSession(session_id);
}

void SessionHub::OnDisconnect(uint64_t session_id) {
  // Its fences first, so every waiter wakes at once; then what it holds,
  // then who it was: a debug view never shows a holder without its pid and
  // comm.
  fences_->CloseSession(session_id);
  timelines_->CloseSession(session_id);
  {
    absl::MutexLock lock(&mu_);
    uploads_.erase(session_id);
  }
  reaper_->Free(state_->CloseSession(session_id));
  reservations_->CloseSession(session_id);
  sessions_->Close(session_id);
}

}  // namespace bufferd
