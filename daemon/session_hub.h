// SessionHub: where a session begins and ends, for everyone who cares.
//
// The fd channel's Delegate. A connection becomes a session here: the
// SessionTable opens it (caps, secret) and DaemonState learns its id and
// uid, and so do the FenceTable and the TimelineTable. Records the client sends one-way are
// dispatched from here: releases, fence signals and forgets, and uploaded
// fds (kept, leased, until an ImportSyncFd claims them). And a session's end
// fans out from here, once: its fences fail (OWNER_DIED) so every waiter
// wakes, DaemonState drops its handles, the buffers that died go to the
// Reaper, and the session table forgets it.
//
// Thread-safe as its parts are; the channel calls it from its loop thread.
#ifndef BUFFERD_DAEMON_SESSION_HUB_H_
#define BUFFERD_DAEMON_SESSION_HUB_H_

#include <map>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "base/lazy.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "daemon/fd_channel.h"
#include "daemon/reaper.h"
#include "daemon/sessions.h"
#include "daemon/state.h"
#include "fences/fence_table.h"
#include "fences/reservations.h"
#include "fences/timeline_table.h"

namespace bufferd {

class SessionHub final : public FdChannel::Delegate {
 public:
  // Uploaded fds a session may leave unclaimed; one more closes the oldest.
  static constexpr size_t kMaxUploads = kMaxUnclaimedUploads;

  // All must outlive this object.
  SessionHub(SessionTable* sessions, DaemonState* state, Reaper* reaper, FenceTable* fences,
             TimelineTable* timelines, ReservationTable* reservations, FdBudget* budget)
      : sessions_(sessions),
        state_(state),
        reaper_(reaper),
        fences_(fences),
        timelines_(timelines),
        reservations_(reservations),
        budget_(budget) {}
  // The channel whose records DrainRecords applies (set once, before serving).
  void set_channel(FdChannel* channel) { channel_ = channel; }

  absl::StatusOr<FdChannel::Admission> OnConnect(const PeerCredentials& peer) override;
  absl::Status OnRecord(uint64_t session_id, const v1::FdChannelMessage& message,
                        std::vector<UniqueFd> fds) override;
  void OnDetach(uint64_t session_id) override;
  // The session released its last handle on `buffer` (0: none): it reads
  // the buffer's reservation state no more.
  void LetGo(uint64_t session_id, uint64_t buffer);
  void OnDisconnect(uint64_t session_id) override;

  // Releases handles the session dropped: one-way records and the releases
  // a call carries. A handle unknown or already released is skipped (a
  // client re-sends after a failed call; ids are never reused).
  void ReleaseDropped(uint64_t session_id, const std::vector<uint64_t>& handles);

  // Signals the fences a call says the session signalled OK by their
  // doorbells alone (FenceTable::SignalRung).
  void SignalRung(uint64_t session_id, const std::vector<uint64_t>& fences) {
    fences_->SignalRung(session_id, fences);
  }

  // Applies what the client sent one-way before a call (the call says how
  // many records: `sent`): OK, UNAUTHENTICATED if the session is over or
  // ending, UNAVAILABLE if too many records are still unread.
  absl::Status DrainRecords(uint64_t session_id, uint64_t sent);

  // The fd uploaded under `upload_id`, claimed (NOT_FOUND if none).
  absl::StatusOr<UniqueFd> TakeUpload(uint64_t session_id, uint64_t upload_id);

 private:
  absl::Status OnUpload(uint64_t session_id, uint64_t upload_id, std::vector<UniqueFd> fds);
  absl::Status OnSignal(uint64_t session_id, const v1::FenceSignal& signal);

  SessionTable* const sessions_;
  DaemonState* const state_;
  Reaper* const reaper_;
  FenceTable* const fences_;
  TimelineTable* const timelines_;
  ReservationTable* const reservations_;
  FdBudget* const budget_;
  FdChannel* channel_ = nullptr;

  struct Upload {
    // A failed lease is kept as its error, for the call naming it.
    absl::StatusOr<LeasedFd> fd;
    // When it came, in the session's uploads (the oldest goes first).
    uint64_t arrival = 0;
  };
  struct Kept {
    // At most kMaxUploads, by upload id.
    std::map<uint64_t, Upload> fds;
    uint64_t arrivals = 0;
  };
  struct Uploads {
    uid_t uid = 0;
    // Made at the first upload: a session that never uploads costs a
    // 24-byte slot of uploads_ and no allocation.
    Lazy<Kept> kept;
  };
  absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Uploads> uploads_ ABSL_GUARDED_BY(mu_);
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_SESSION_HUB_H_
