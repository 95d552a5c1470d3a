// FenceService: the Fence gRPC service over the FenceTable (fences/), on
// gRPC's callback API. Every call needs a session and applies what the
// client sent one-way before it (daemon/call.h). WaitFence takes no thread:
// its reactor is registered in the table and finished by whoever satisfies
// it (a signal, a timer, the session's end) or dropped when the client
// cancels. ExportFence sends the fence's pipe on fd.sock before its
// response; ImportSyncFd claims an fd the client uploaded there.
//
// Timelines: CreateTimeline takes the owner's counter page (and the
// session's wait page) from fd.sock uploads and sends back the state page;
// ImportTimeline redeems a token ExportTimeline made (or opens a timeline
// with a pending point attached to a buffer the caller holds) and sends both
// pages.
// sync_file interop: ExportPoint makes a timeline-point fence the
// TimelineTable signals when the point is reached or fails;
// ImportFenceAsPoint / ImportSyncFdAsPoint wait on a fence in the FenceTable
// and settle the point in the TimelineTable when it signals.
//
// Reservation objects: AttachFence resolves the caller's buffer handle
// (DaemonState) and attaches in the ReservationTable; GetBufferFences gives
// the session holds on the pending fences (or one merged fence's fd).
#ifndef BUFFERD_DAEMON_FENCE_SERVICE_H_
#define BUFFERD_DAEMON_FENCE_SERVICE_H_

#include <atomic>
#include <cstdint>

#include "bufferd/v1/fence.grpc.pb.h"
#include "daemon/fd_channel.h"
#include "daemon/session_hub.h"
#include "daemon/sessions.h"
#include "daemon/share_tokens.h"
#include "daemon/state.h"
#include "fences/fence_table.h"
#include "fences/reservations.h"
#include "fences/timeline_table.h"

namespace bufferd {

class FenceService final : public v1::Fence::CallbackService {
 public:
  struct Deps {
    const SessionTable* sessions;
    SessionHub* hub;
    FenceTable* fences;
    TimelineTable* timelines;
    FdChannel* channel;
    const DaemonState* state;
    ReservationTable* reservations;
    // A timeline token's ttl when ExportTimeline gives none.
    absl::Duration default_token_ttl = absl::Seconds(30);
  };
  explicit FenceService(Deps deps) : d_(deps) {}

  grpc::ServerUnaryReactor* CreateFence(grpc::CallbackServerContext* context,
                                        const v1::CreateFenceRequest* request,
                                        v1::CreateFenceResponse* response) override;
  grpc::ServerUnaryReactor* SignalFence(grpc::CallbackServerContext* context,
                                        const v1::SignalFenceRequest* request,
                                        v1::SignalFenceResponse* response) override;
  grpc::ServerUnaryReactor* WaitFence(grpc::CallbackServerContext* context,
                                      const v1::WaitFenceRequest* request,
                                      v1::WaitFenceResponse* response) override;
  grpc::ServerUnaryReactor* GetFenceInfo(grpc::CallbackServerContext* context,
                                         const v1::GetFenceInfoRequest* request,
                                         v1::GetFenceInfoResponse* response) override;
  grpc::ServerUnaryReactor* MergeFences(grpc::CallbackServerContext* context,
                                        const v1::MergeFencesRequest* request,
                                        v1::MergeFencesResponse* response) override;
  grpc::ServerUnaryReactor* ExportFence(grpc::CallbackServerContext* context,
                                        const v1::ExportFenceRequest* request,
                                        v1::ExportFenceResponse* response) override;
  grpc::ServerUnaryReactor* ImportSyncFd(grpc::CallbackServerContext* context,
                                         const v1::ImportSyncFdRequest* request,
                                         v1::ImportSyncFdResponse* response) override;
  grpc::ServerUnaryReactor* AttachFence(grpc::CallbackServerContext* context,
                                        const v1::AttachFenceRequest* request,
                                        v1::AttachFenceResponse* response) override;
  grpc::ServerUnaryReactor* GetBufferFences(grpc::CallbackServerContext* context,
                                            const v1::GetBufferFencesRequest* request,
                                            v1::GetBufferFencesResponse* response) override;
  grpc::ServerUnaryReactor* OpenFencePage(grpc::CallbackServerContext* context,
                                          const v1::OpenFencePageRequest* request,
                                          v1::OpenFencePageResponse* response) override;
  grpc::ServerUnaryReactor* CreateTimeline(grpc::CallbackServerContext* context,
                                           const v1::CreateTimelineRequest* request,
                                           v1::CreateTimelineResponse* response) override;
  grpc::ServerUnaryReactor* ExportTimeline(grpc::CallbackServerContext* context,
                                           const v1::ExportTimelineRequest* request,
                                           v1::ExportTimelineResponse* response) override;
  grpc::ServerUnaryReactor* ImportTimeline(grpc::CallbackServerContext* context,
                                           const v1::ImportTimelineRequest* request,
                                           v1::ImportTimelineResponse* response) override;
  grpc::ServerUnaryReactor* RegisterWaker(grpc::CallbackServerContext* context,
                                          const v1::RegisterWakerRequest* request,
                                          v1::RegisterWakerResponse* response) override;
  grpc::ServerUnaryReactor* TakeWakers(grpc::CallbackServerContext* context,
                                       const v1::TakeWakersRequest* request,
                                       v1::TakeWakersResponse* response) override;
  grpc::ServerUnaryReactor* GetTimelineInfo(grpc::CallbackServerContext* context,
                                            const v1::GetTimelineInfoRequest* request,
                                            v1::GetTimelineInfoResponse* response) override;
  grpc::ServerUnaryReactor* ExportPoint(grpc::CallbackServerContext* context,
                                        const v1::ExportPointRequest* request,
                                        v1::ExportPointResponse* response) override;
  grpc::ServerUnaryReactor* ImportFenceAsPoint(grpc::CallbackServerContext* context,
                                               const v1::ImportFenceAsPointRequest* request,
                                               v1::ImportFenceAsPointResponse* response) override;
  grpc::ServerUnaryReactor* ImportSyncFdAsPoint(grpc::CallbackServerContext* context,
                                                const v1::ImportSyncFdAsPointRequest* request,
                                                v1::ImportSyncFdAsPointResponse* response) override;

 private:
  v1::FenceInfo Info(const FenceView& view) const;
  v1::TimelineInfo Info(const TimelineView& view) const;
  // Takes the session's wait page from its uploads, if the call names one.
  absl::Status TakeWaitPage(uint64_t session, uint64_t upload_id);
  // Every fence pending on the buffer of `session`'s `handle` (the handle's
  // usual PERMISSION_DENIED / NOT_FOUND otherwise).
  absl::StatusOr<std::vector<ReservationTable::Attached>> AttachedTo(uint64_t session,
                                                                     uint64_t handle);
  // `timeline_id`, if a pending point of it is attached to the buffer
  // `handle` (of `session`) names: ImportTimeline by buffer.
  absl::StatusOr<uint64_t> AttachedTimeline(uint64_t session, uint64_t handle,
                                            uint64_t timeline_id);
  // A timeline-point fence for `session` (ExportPoint, AttachFence): made,
  // and signalled by the timeline when `point` is reached or fails. `call`
  // names the caller in the cancellation message if watching fails.
  absl::StatusOr<uint64_t> PointFence(uint64_t session, const TimelineView& timeline,
                                      uint64_t point, absl::string_view call);
  // Puts fence `fence_id` (held by `session`) behind `point` of timeline
  // `id`; with `forget`, the session's hold on the fence goes once it has
  // signalled (or now, if this fails).
  absl::Status StandBehind(uint64_t session, uint64_t id, uint64_t point, uint64_t fence_id,
                           bool forget);
  // Sends `fd` on fd.sock under a new transfer id, which it returns.
  absl::StatusOr<uint64_t> Deliver(uint64_t session, v1::FdKind kind, uint64_t object,
                                   LeasedFd fd);
  // GetBufferFences' subscribe: the slot, and the status page the first
  // time (or again with `new_page`); nothing when it cannot be had.
  void Subscribe(uint64_t session, uint64_t buffer_id, bool new_page,
                 v1::GetBufferFencesResponse& response);

  const Deps d_;
  // Transfer ids of exported fence fds: the upper half of the id space
  // (DaemonState numbers buffer deliveries from 1), so they never collide
  // in a client's mailbox.
  std::atomic<uint64_t> next_transfer_id_{uint64_t{1} << 63};
  // Timeline share tokens (their own: a buffer's token never redeems a
  // timeline); `buffer` holds the timeline id.
  absl::Mutex tokens_mu_;
  ShareTokens tokens_ ABSL_GUARDED_BY(tokens_mu_);
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_FENCE_SERVICE_H_
