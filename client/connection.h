// internal::Connection: one session's sockets, stubs and fd mailbox. Private to
// the client library.
#ifndef BUFFERD_CLIENT_CONNECTION_H_
#define BUFFERD_CLIENT_CONNECTION_H_

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "base/mapping.h"
#include "base/protocol.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "bufferd/v1/buffer.grpc.pb.h"
#include "bufferd/v1/debug.grpc.pb.h"
#include "bufferd/v1/fence.grpc.pb.h"
#include "client/fd_mailbox.h"
#include "client/one_way_queue.h"
#include "client/record_sender.h"
#include "fences/reservation_page.h"
#include "fences/timeline_shm.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/status.h"

namespace bufferd {
class Timeline;
}  // namespace bufferd

namespace bufferd::internal {

// grpc::Status -> absl::Status, the client's one conversion point.
absl::Status FromGrpcStatus(const grpc::Status& status);

// One RPC's context: the session metadata, and the releases and rung
// fences it carries.
struct Call {
  std::unique_ptr<grpc::ClientContext> context;
  std::vector<uint64_t> carried;
  std::vector<uint64_t> rung;
};

// This session's waker for one timeline (fences/timeline_shm.h WakePage),
// shared by its Timeline objects of that timeline.
struct Waker {
  uint64_t id = 0;
  Mapping page;
  // The notify channel's read end, once asked for (what NotifyFd gives).
  UniqueFd notify;
  std::mutex mu;  // registering the notify fds
  timeline::WakePage& wake() const { return *reinterpret_cast<timeline::WakePage*>(page.data()); }
};

// A control.sock connection's gRPC channel, which the sessions of one
// process on one daemon share unless told not to. It lives while a
// Connection (a Client, or a Buffer, Fence or Timeline of it) holds it.
struct ControlChannel {
  // A dup of the connection's socket, to poll: gRPC's channels on an fd
  // report no connectivity state. When the daemon hangs up, or gRPC ends
  // the transport (it shuts the socket down, not only its fd), the probe
  // sees it.
  UniqueFd probe;
  std::shared_ptr<grpc::Channel> channel;
  // Not hung up: a new session may use it. (A call that failed UNAVAILABLE
  // says nothing: the daemon answers "try again" with it on a healthy
  // connection.)
  bool Usable() const;
};

// Thread-safe. Its fd mailbox (FdMailbox) pairs delivered fds with the
// calls that asked for them; its one-way queue (OneWayQueue) carries dropped
// Buffers' releases on the next call's metadata, or on fd.sock.
class Connection {
 public:
  // `share_control`: use this process's control connection to that daemon
  // if it has one (SharedControlChannels in connection.cc).
  static absl::StatusOr<std::shared_ptr<Connection>> Open(const std::string& socket_dir,
                                                          absl::Duration timeout,
                                                          bool share_control);
  ~Connection();

  // An RPC's deadline is the connection's timeout plus this.
  static constexpr absl::Duration kCallSlack = absl::Seconds(50);

  // A context carrying the session metadata and the pending releases.
  Call NewCall();
  // Converts the call's status; if it failed, its releases are queued again
  // (the daemon may not have seen them; releasing twice is harmless because
  // handle ids are never reused).
  absl::Status Finish(Call& call, const grpc::Status& status);

  // Waits for the fd delivered under `transfer_id`.
  absl::StatusOr<UniqueFd> TakeFd(uint64_t transfer_id);

  // Releases `handle` without a round trip (see the class comment).
  void QueueRelease(uint64_t handle);

  // Sends a record on fd.sock now; every later call is applied after it.
  // UNAUTHENTICATED once fd.sock is gone (EPIPE, ECONNRESET, ENOTCONN: the
  // session has ended).
  absl::Status SendRecord(const v1::FdChannelMessage& message, std::span<const int> fds = {});
  // Sends `fd` in an FdUpload record under a new id, which it returns for
  // the call that claims it (hold a place from ReserveUploads until then).
  absl::StatusOr<uint64_t> Upload(int fd);
  // `n` of the session's kMaxUnclaimedUploads places, held from before the
  // uploads are sent until the call that claims them has returned: the
  // daemon keeps only that many unclaimed, so more calls in flight at once
  // (threads sharing a Client) wait here instead of losing their uploads.
  class UploadPlaces {
   public:
    UploadPlaces(UploadPlaces&& other) noexcept
        : connection_(std::exchange(other.connection_, nullptr)), n_(other.n_) {}
    UploadPlaces& operator=(UploadPlaces&&) = delete;
    ~UploadPlaces();

   private:
    friend class Connection;
    UploadPlaces(Connection* connection, size_t n) : connection_(connection), n_(n) {}
    Connection* connection_;
    size_t n_;
  };
  UploadPlaces ReserveUploads(size_t n);

  // Shuts fd.sock down: the daemon ends the session (and releases every
  // handle, pending ones included).
  void Close();

  uint64_t session_id() const { return session_id_; }
  // Whether fd.sock has hung up: the session is over (a poll, no read).
  bool Ended() const;
  // Ended, and not by this process's Close(): the daemon went or ended it.
  bool EndedByDaemon() const;
  // UNAVAILABLE for a call or signal that failed (`cause`) because the
  // session is gone: saying whether the daemon stopped or restarted or ended
  // the session itself, what survives, and to connect a new Client.
  absl::Status SessionGone(absl::string_view cause) const;
  v1::Allocator::Stub& allocator() const { return *allocator_; }
  v1::Debug::Stub& debug() const { return *debug_; }
  v1::Fence::Stub& fence() const { return *fence_; }

  // The session's timeline wait page (fences/timeline_shm.h), made at the
  // first timeline call. `given` once the daemon has it.
  struct WaitPage {
    std::mutex mu;
    UniqueFd fd;
    Mapping map;
    bool given = false;
    // map's page, published once mapped (it never changes after): what a
    // wait reads without `mu` (its slots are claimed in the page itself).
    std::atomic<timeline::WaitPage*> mapped{nullptr};
  };
  WaitPage& wait_page() { return wait_page_; }

  // The session's reservation status page (fences/reservation_page.h):
  // null until the daemon sends it. SetReservationPage checks and maps the
  // page the daemon delivered (a sealed, read-only memfd).
  const reservation::Slot* reservation_slots() const {
    return reservation_slots_.load(std::memory_order_acquire);
  }
  absl::Status SetReservationPage(UniqueFd fd);
  // `slots` turned out dead (the daemon made the page again): read no more
  // (it stays mapped: a reader may still be looking), ask for a new one.
  void ForgetReservationPage(const reservation::Slot* slots);

  // Timelines opened through a buffer to wait on points attached to it
  // (Buffer::BeginCpuAccess), by buffer handle and timeline id, kept for the
  // buffer's next frames until the Buffer goes (ForgetTimelinesOf), the
  // timeline is seen ended (ForgetTimeline), or room is needed: at most
  // kKeptTimelines, one nobody is waiting on making room. Each holds this
  // Connection without owning it (they go first when it goes).
  static constexpr size_t kKeptTimelines = 64;
  std::shared_ptr<const Timeline> KeptTimeline(uint64_t handle, uint64_t id);
  // False if there is no room (the caller uses it once and drops it).
  bool KeepTimeline(uint64_t handle, uint64_t id, std::shared_ptr<const Timeline> timeline);
  void ForgetTimeline(uint64_t handle, uint64_t id);
  void ForgetTimelinesOf(uint64_t handle);

  // The session's fence page (fences/fence_page.h), made and uploaded with
  // its first CreateFence: the words it writes when it signals its fences.
  // fence_words() is null before, and for good if the page could not be made
  // or was refused (its fences then reach readers through the daemon only).
  struct FencePage {
    static constexpr int kMaxOffers = 3;
    std::mutex mu;
    // Calls that offered it (a call that failed offered it in vain).
    int offers = 0;
    // Made and offered, not adopted yet: the same page goes again.
    std::optional<std::pair<UniqueFd, Mapping>> offered;
    Mapping map;
  };
  FencePage& fence_page() { return fence_page_; }
  uint32_t* fence_words() const { return fence_words_.load(std::memory_order_acquire); }
  void SetFenceWords(uint32_t* words) { fence_words_.store(words, std::memory_order_release); }
  // Doorbells (CreateFenceRequest.doorbell_upload_id) this session's Fences
  // hold the write ends of: at most kMaxDoorbells at once, so that a client
  // with many pending fences does not hold as many more fds (the others
  // signal through their record alone).
  static constexpr int kMaxDoorbells = 64;
  std::atomic<int>& doorbells() { return doorbells_; }
  // A fence this session signalled OK by its doorbell alone, with no record
  // (CreateFenceResponse.doorbell_watched): every call carries it
  // (kRungMetadataKey) until one succeeds, so the daemon has applied the
  // signal when the call runs. False, and not noted, when kMaxCarriedRung
  // are carried already: signal that one by record.
  bool NoteRung(uint64_t fence_id);
  // Other sessions' fence pages (read-only), mapped to wait on their fences
  // (Buffer::BeginCpuAccess), by owner session: at most kPeerFencePages; a
  // waiter holds the one it sleeps on. A full cache makes room only by
  // dropping a page unused for kPeerPageIdle: with more owners than that in
  // use, the others wait through the daemon rather than open a page at
  // every access.
  static constexpr size_t kPeerFencePages = 64;
  static constexpr absl::Duration kPeerPageIdle = absl::Seconds(5);
  std::shared_ptr<const Mapping> PeerFencePage(uint64_t owner);
  bool RoomForPeerFencePage();
  void KeepPeerFencePage(uint64_t owner, std::shared_ptr<const Mapping> page);

  std::mutex& wakers_mu() { return wakers_mu_; }
  std::map<uint64_t, std::weak_ptr<Waker>>& wakers() { return wakers_; }
  absl::Duration timeout() const { return timeout_; }

 private:
  Connection() = default;

  // Declared first: the mailbox and the queue use it until they are gone.
  UnixSocket fd_socket_;
  uint64_t session_id_ = 0;
  // Close() was called: the session's end is this process's doing.
  std::atomic<bool> closed_{false};
  std::string socket_dir_;
  // The daemon's pid as this process sees it (0 if it can't).
  pid_t daemon_pid_ = 0;
  std::string metadata_;
  absl::Duration timeout_;
  std::shared_ptr<ControlChannel> control_;
  std::unique_ptr<v1::Allocator::Stub> allocator_;
  std::unique_ptr<v1::Debug::Stub> debug_;
  std::unique_ptr<v1::Fence::Stub> fence_;
  std::unique_ptr<RecordSender> records_;
  std::atomic<uint64_t> next_upload_id_{1};
  absl::Mutex uploads_mu_;
  size_t uploads_in_flight_ ABSL_GUARDED_BY(uploads_mu_) = 0;
  std::unique_ptr<FdMailbox> mailbox_;
  std::unique_ptr<OneWayQueue> one_way_;
  WaitPage wait_page_;
  std::mutex wakers_mu_;
  std::map<uint64_t, std::weak_ptr<Waker>> wakers_;
  std::mutex reservation_mu_;
  // Pages mapped (a later one replaces an earlier one as the page read;
  // none is unmapped before the Connection goes, so a reader never faults).
  std::vector<Mapping> reservation_maps_;
  std::atomic<const reservation::Slot*> reservation_slots_{nullptr};
  std::mutex kept_mu_;
  std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<const Timeline>> kept_timelines_;
  FencePage fence_page_;
  std::atomic<int> doorbells_{0};
  std::mutex rung_mu_;
  std::vector<uint64_t> rung_;  // under rung_mu_
  // rung_'s size, for the calls that carry none (most): a Signal that
  // returned before a call began is counted when it begins.
  std::atomic<size_t> rung_count_{0};
  std::atomic<uint32_t*> fence_words_{nullptr};
  std::mutex peer_pages_mu_;
  struct PeerPage {
    uint64_t owner = 0;
    std::shared_ptr<const Mapping> page;
    absl::Time used;
  };
  // The least recently used first.
  std::deque<PeerPage> peer_pages_;
};

// A fence's deadline as the protocol takes it (fence.cc).
absl::StatusOr<uint32_t> DeadlineMs(absl::Duration deadline);
// WaitFence on `ids` (all or any): the fences as they were when it ended,
// DEADLINE_EXCEEDED naming the pending ones if `timeout` passed first.
// `said`: the timeout the DEADLINE_EXCEEDED message names (the caller's,
// when it waited elsewhere first and only polls here); `timeout` if
// infinite.
absl::StatusOr<std::vector<v1::FenceInfo>> WaitFences(
    Connection& connection, const std::vector<uint64_t>& ids, bool all, absl::Duration timeout,
    absl::Duration said = absl::InfiniteDuration());
// A page the daemon delivered, checked to be a read-only regular file of
// `size` bytes carrying at least `seals` (F_GET_SEALS), mapped read-only;
// INTERNAL naming `what` otherwise.
absl::StatusOr<Mapping> MapDeliveredPage(const UniqueFd& fd, size_t size, int seals,
                                         absl::string_view what);
// A sealed memfd page mapped writable here: the only writable mapping
// there will ever be (`seals` says what else is sealed).
absl::StatusOr<std::pair<UniqueFd, Mapping>> NewSealedPage(const char* name, size_t size,
                                                           int seals);
// A fence fd the daemon delivered, checked to be a read-only pipe.
absl::StatusOr<UniqueFd> CheckFenceFd(UniqueFd fd);

}  // namespace bufferd::internal

#endif  // BUFFERD_CLIENT_CONNECTION_H_
