#include "daemon/fence_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "daemon/call.h"
#include "daemon/debug_views.h"
#include "daemon/grpc_status.h"
#include "daemon/proto_convert.h"
#include "spdlog/spdlog.h"

namespace bufferd {
namespace {

// One WaitFence call: registered in the table until it is satisfied, times
// out, its session ends or the client cancels. Deletes itself when done.
class WaitReactor final : public grpc::ServerUnaryReactor {
 public:
  WaitReactor(FenceTable* fences, std::function<v1::FenceInfo(const FenceView&)> info,
              v1::WaitFenceResponse* response)
      : fences_(fences), info_(std::move(info)), response_(response), wait_(fences->NewWaitId()) {}

  void Start(uint64_t session, const v1::WaitFenceRequest& request) {
    FenceTable::WaitRequest wait;
    wait.ids.assign(request.fence_ids().begin(), request.fence_ids().end());
    wait.all = request.wait_all();
    wait.timeout = absl::Milliseconds(request.timeout_ms());
    if (request.need_by_ms() != 0)
      wait.need_by = absl::Now() + absl::Milliseconds(request.need_by_ms());
    absl::StatusOr<std::optional<FenceTable::WaitResult>> now = fences_->Wait(
        session, wait_, wait,
        [this](absl::StatusOr<FenceTable::WaitResult> result) { Complete(std::move(result)); });
    if (!now.ok()) {
      Finish(ToGrpcStatus(now.status()));
    } else if (now->has_value()) {
      Complete(**std::move(now));
    }
  }

  void OnCancel() override {
    // Finished here only if the table still had it (else it finishes, or
    // has finished, with its result).
    if (fences_->CancelWait(wait_)) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "WaitFence was cancelled by the client"));
    }
  }
  void OnDone() override { delete this; }

 private:
  void Complete(absl::StatusOr<FenceTable::WaitResult> result) {
    if (!result.ok()) {
      Finish(ToGrpcStatus(result.status()));
      return;
    }
    response_->set_satisfied(result->satisfied);
    for (const FenceView& view : result->fences) *response_->add_fences() = info_(view);
    Finish(grpc::Status::OK);  // last: OnDone may delete this at once
  }

  FenceTable* const fences_;
  const std::function<v1::FenceInfo(const FenceView&)> info_;
  v1::WaitFenceResponse* const response_;
  const FenceTable::WaitId wait_;
};

}  // namespace

v1::FenceInfo FenceService::Info(const FenceView& view) const {
  return FenceInfoOf(view, d_.sessions->Lookup(view.owner_session));
}

grpc::ServerUnaryReactor* FenceService::CreateFence(grpc::CallbackServerContext* context,
                                                    const v1::CreateFenceRequest* request,
                                                    v1::CreateFenceResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    // The session's fence page: a page that is not one is refused; one the
    // daemon cannot keep now (the fd budget) only leaves the session
    // without (its fences get no word: the library then stops offering it).
    // Kept whatever comes of the fence (its client offers it again).
    if (request->fence_page_upload_id() != 0) {
      ASSIGN_OR_RETURN(UniqueFd page, d_.hub->TakeUpload(session, request->fence_page_upload_id()));
      if (absl::Status set = d_.fences->SetPage(session, std::move(page));
          absl::IsInvalidArgument(set)) {
        return set;
      }
    }
    // Claimed whatever comes of the fence: an upload is never left over.
    UniqueFd doorbell;
    if (request->doorbell_upload_id() != 0) {
      ASSIGN_OR_RETURN(doorbell, d_.hub->TakeUpload(session, request->doorbell_upload_id()));
      RETURN_IF_ERROR(FenceTable::CheckDoorbell(doorbell.get()));
    }
    ASSIGN_OR_RETURN(FenceView fence,
                     d_.fences->Create(session, request->name(), request->timeline(),
                                       absl::Milliseconds(request->deadline_ms())));
    if (doorbell.valid()) {
      response->set_doorbell_watched(
          d_.fences->SetDoorbell(session, fence.id, std::move(doorbell)));
    }
    *response->mutable_fence() = Info(fence);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::OpenFencePage(grpc::CallbackServerContext* context,
                                                      const v1::OpenFencePageRequest* request,
                                                      v1::OpenFencePageResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    // Only a holder of a buffer the fence is pending on: what it may wait
    // for anyway (any other fence is NOT_FOUND, whether it exists or not).
    ASSIGN_OR_RETURN(std::vector<ReservationTable::Attached> attached,
                     AttachedTo(session, request->buffer_handle()));
    const bool pending_here =
        std::any_of(attached.begin(), attached.end(), [&](const ReservationTable::Attached& entry) {
          return entry.fence_id == request->fence_id();
        });
    if (!pending_here) {
      return absl::NotFoundError(absl::StrCat("fence ", request->fence_id(),
                                              " is not pending on buffer handle ",
                                              request->buffer_handle()));
    }
    ASSIGN_OR_RETURN(auto page, d_.fences->PageOf(session, request->fence_id()));
    ASSIGN_OR_RETURN(const uint64_t transfer,
                     Deliver(session, v1::FD_KIND_FENCE_PAGE, page.second, std::move(page.first)));
    response->set_transfer_id(transfer);
    response->set_owner_session(page.second);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::SignalFence(grpc::CallbackServerContext* context,
                                                    const v1::SignalFenceRequest* request,
                                                    v1::SignalFenceResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    ASSIGN_OR_RETURN(FenceView fence, d_.fences->Signal(session, request->fence_id(),
                                                        request->status(), request->message()));
    *response->mutable_fence() = Info(fence);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::WaitFence(grpc::CallbackServerContext* context,
                                                  const v1::WaitFenceRequest* request,
                                                  v1::WaitFenceResponse* response) {
  absl::StatusOr<uint64_t> session = AuthenticateCall(*d_.sessions, *d_.hub, context);
  if (!session.ok()) return FinishCall(context, session.status());
  // Only what a waiter needs, per fence: no owner lookups while thousands
  // of waits are answered at once (GetFenceInfo has the rest).
  auto* reactor = new WaitReactor(
      d_.fences, [](const FenceView& view) { return FenceInfoOf(view, std::nullopt); }, response);
  reactor->Start(*session, *request);
  return reactor;
}

grpc::ServerUnaryReactor* FenceService::GetFenceInfo(grpc::CallbackServerContext* context,
                                                     const v1::GetFenceInfoRequest* request,
                                                     v1::GetFenceInfoResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    ASSIGN_OR_RETURN(FenceView fence, d_.fences->Info(session, request->fence_id()));
    *response->mutable_fence() = Info(fence);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::MergeFences(grpc::CallbackServerContext* context,
                                                    const v1::MergeFencesRequest* request,
                                                    v1::MergeFencesResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    const std::vector<uint64_t> ids(request->fence_ids().begin(), request->fence_ids().end());
    ASSIGN_OR_RETURN(FenceView fence, d_.fences->Merge(session, ids, request->name()));
    *response->mutable_fence() = Info(fence);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::ExportFence(grpc::CallbackServerContext* context,
                                                    const v1::ExportFenceRequest* request,
                                                    v1::ExportFenceResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    ASSIGN_OR_RETURN(LeasedFd fd, d_.fences->Export(session, request->fence_id()));
    // The fd goes out before the response, so the client finds it queued.
    ASSIGN_OR_RETURN(uint64_t transfer_id,
                     Deliver(session, v1::FD_KIND_FENCE, request->fence_id(), std::move(fd)));
    response->set_transfer_id(transfer_id);
    ASSIGN_OR_RETURN(FenceView fence, d_.fences->Info(session, request->fence_id()));
    *response->mutable_fence() = Info(fence);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::ImportSyncFd(grpc::CallbackServerContext* context,
                                                     const v1::ImportSyncFdRequest* request,
                                                     v1::ImportSyncFdResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    ASSIGN_OR_RETURN(UniqueFd fd, d_.hub->TakeUpload(session, request->upload_id()));
    ASSIGN_OR_RETURN(FenceView fence,
                     d_.fences->Import(session, std::move(fd), request->name(),
                                       absl::Milliseconds(request->deadline_ms())));
    *response->mutable_fence() = Info(fence);
    return absl::OkStatus();
  });
}

v1::TimelineInfo FenceService::Info(const TimelineView& view) const {
  return TimelineInfoOf(view, d_.sessions->Lookup(view.owner_session));
}

absl::Status FenceService::TakeWaitPage(uint64_t session, uint64_t upload_id) {
  if (upload_id == 0) {
    if (d_.timelines->HasWaitPage(session)) return absl::OkStatus();
    return absl::InvalidArgumentError(
        "this session has no timeline wait page yet: upload one (a sealed memfd of 4096 bytes) "
        "and name it in wait_page_upload_id");
  }
  ASSIGN_OR_RETURN(UniqueFd page, d_.hub->TakeUpload(session, upload_id));
  return d_.timelines->SetWaitPage(session, std::move(page));
}

absl::StatusOr<uint64_t> FenceService::Deliver(uint64_t session, v1::FdKind kind, uint64_t object,
                                               LeasedFd fd) {
  const uint64_t transfer_id = next_transfer_id_.fetch_add(1);
  RETURN_IF_ERROR(d_.channel->Deliver(session, transfer_id, kind, object, std::move(fd)));
  return transfer_id;
}

grpc::ServerUnaryReactor* FenceService::CreateTimeline(grpc::CallbackServerContext* context,
                                                       const v1::CreateTimelineRequest* request,
                                                       v1::CreateTimelineResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    if (request->counters_upload_id() == 0) {
      return absl::InvalidArgumentError(
          "counters_upload_id is 0: upload the counter page on fd.sock first");
    }
    ASSIGN_OR_RETURN(UniqueFd counters, d_.hub->TakeUpload(session, request->counters_upload_id()));
    RETURN_IF_ERROR(TakeWaitPage(session, request->wait_page_upload_id()));
    ASSIGN_OR_RETURN(TimelineTable::Created created,
                     d_.timelines->Create(session, std::move(counters), request->name(),
                                          absl::Milliseconds(request->deadline_ms())));
    const uint64_t id = created.view.id;
    absl::StatusOr<uint64_t> transfer =
        Deliver(session, v1::FD_KIND_TIMELINE_STATE, id, std::move(created.state));
    if (!transfer.ok()) {
      d_.timelines->Forget(session, id);
      return transfer.status();
    }
    response->set_state_transfer_id(*transfer);
    *response->mutable_timeline() = Info(created.view);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::ExportTimeline(grpc::CallbackServerContext* context,
                                                       const v1::ExportTimelineRequest* request,
                                                       v1::ExportTimelineResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    RETURN_IF_ERROR(d_.timelines->CheckHeld(session, request->timeline_id(), /*to_share=*/true));
    const absl::Duration ttl = request->ttl_ms() == 0 ? d_.default_token_ttl
                                                      : absl::Milliseconds(request->ttl_ms());
    if (ttl > ShareTokens::kMaxTtl) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ttl_ms ", request->ttl_ms(), " is above the maximum of ",
          absl::ToInt64Milliseconds(ShareTokens::kMaxTtl), " (",
          absl::ToInt64Minutes(ShareTokens::kMaxTtl), " minutes)"));
    }
    const absl::Time now = absl::Now();
    absl::MutexLock lock(&tokens_mu_);
    tokens_.Expire(now);
    ASSIGN_OR_RETURN(std::string token, tokens_.Create(session, request->timeline_id(),
                                                       v1::ACCESS_READ_ONLY, now + ttl));
    response->set_token(std::move(token));
    *response->mutable_expires() = ToProto(now + ttl);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::ImportTimeline(grpc::CallbackServerContext* context,
                                                       const v1::ImportTimelineRequest* request,
                                                       v1::ImportTimelineResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    const bool by_buffer = request->buffer_handle() != 0 || request->timeline_id() != 0;
    if (by_buffer && !request->token().empty()) {
      return absl::InvalidArgumentError(
          "name a token, or a buffer_handle and a timeline_id, not both");
    }
    if (!by_buffer && (request->token().empty() || request->token().size() > 64)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token is ", request->token().size(), " bytes; a share token is 32 hex digits"));
    }
    // The wait page first, whatever comes of the rest (the library counts
    // on it).
    RETURN_IF_ERROR(TakeWaitPage(session, request->wait_page_upload_id()));
    uint64_t id;
    if (by_buffer) {
      ASSIGN_OR_RETURN(id,
                       AttachedTimeline(session, request->buffer_handle(), request->timeline_id()));
    } else {
      absl::MutexLock lock(&tokens_mu_);
      ASSIGN_OR_RETURN(ShareTokens::Token token, tokens_.Find(request->token(), absl::Now()));
      tokens_.Redeem(request->token(), session);
      id = token.buffer;
    }
    absl::StatusOr<TimelineTable::Handout> handout = d_.timelines->Hold(session, id, by_buffer);
    if (!handout.ok()) {
      if (!by_buffer) {
        absl::MutexLock lock(&tokens_mu_);
        tokens_.Unredeem(request->token());
      }
      return handout.status();
    }
    absl::StatusOr<uint64_t> counters =
        Deliver(session, v1::FD_KIND_TIMELINE_COUNTERS, id, std::move(handout->counters));
    absl::StatusOr<uint64_t> state =
        counters.ok() ? Deliver(session, v1::FD_KIND_TIMELINE_STATE, id, std::move(handout->state))
                      : counters.status();
    if (!state.ok()) {
      // The client never gets a Timeline to drop: the hold goes now.
      d_.timelines->Forget(session, id);
      return state.status();
    }
    response->set_counters_transfer_id(*counters);
    response->set_state_transfer_id(*state);
    *response->mutable_timeline() = Info(handout->view);
    return absl::OkStatus();
  });
}

absl::StatusOr<std::vector<ReservationTable::Attached>> FenceService::AttachedTo(uint64_t session,
                                                                                 uint64_t handle) {
  ASSIGN_OR_RETURN(v1::GetBufferResponse buffer, d_.state->GetBuffer(session, handle));
  return d_.reservations->Pending(buffer.buffer().buffer_id(), v1::FENCE_USAGE_BOOKKEEP);
}

absl::StatusOr<uint64_t> FenceService::AttachedTimeline(uint64_t session, uint64_t handle,
                                                        uint64_t timeline_id) {
  if (handle == 0 || timeline_id == 0) {
    return absl::InvalidArgumentError(
        "buffer_handle and timeline_id go together: name both (or a token instead)");
  }
  ASSIGN_OR_RETURN(std::vector<ReservationTable::Attached> attached, AttachedTo(session, handle));
  for (const ReservationTable::Attached& entry : attached) {
    std::optional<FenceView> fence = d_.fences->Peek(entry.fence_id);
    if (fence.has_value() && fence->kind == FenceKind::kTimelinePoint &&
        fence->timeline_id == timeline_id) {
      return timeline_id;
    }
  }
  return absl::NotFoundError(absl::StrCat(
      "timeline ", timeline_id, " has no pending point attached to buffer handle ", handle));
}

grpc::ServerUnaryReactor* FenceService::RegisterWaker(grpc::CallbackServerContext* context,
                                                      const v1::RegisterWakerRequest* request,
                                                      v1::RegisterWakerResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    const uint64_t id = request->timeline_id();
    ASSIGN_OR_RETURN(TimelineTable::Registered registered,
                     d_.timelines->RegisterWaker(session, id, request->notify()));
    response->set_waker_id(registered.waker_id);
    ASSIGN_OR_RETURN(uint64_t page, Deliver(session, v1::FD_KIND_TIMELINE_WAKER, id,
                                            std::move(registered.page)));
    response->set_page_transfer_id(page);
    if (registered.notify_read.has_value()) {
      ASSIGN_OR_RETURN(uint64_t notify, Deliver(session, v1::FD_KIND_TIMELINE_WAKER, id,
                                                *std::move(registered.notify_read)));
      response->set_notify_transfer_id(notify);
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::TakeWakers(grpc::CallbackServerContext* context,
                                                   const v1::TakeWakersRequest* request,
                                                   v1::TakeWakersResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    const std::vector<uint64_t> known(request->known_waker_ids().begin(),
                                      request->known_waker_ids().end());
    const std::vector<uint64_t> known_notify(request->notify_known_waker_ids().begin(),
                                             request->notify_known_waker_ids().end());
    ASSIGN_OR_RETURN(TimelineTable::Wakers wakers, d_.timelines->TakeWakers(
                                                       session, request->timeline_id(), known,
                                                       known_notify));
    response->set_wakers_gen(wakers.gen);
    for (TimelineTable::WakerHandout& handout : wakers.wakers) {
      v1::TakeWakersResponse::Waker* waker = response->add_wakers();
      waker->set_waker_id(handout.waker_id);
      ASSIGN_OR_RETURN(uint64_t page, Deliver(session, v1::FD_KIND_TIMELINE_WAKER,
                                              request->timeline_id(), std::move(handout.page)));
      waker->set_page_transfer_id(page);
      if (handout.notify.has_value()) {
        ASSIGN_OR_RETURN(uint64_t notify,
                         Deliver(session, v1::FD_KIND_TIMELINE_WAKER, request->timeline_id(),
                                 *std::move(handout.notify)));
        waker->set_notify_transfer_id(notify);
      }
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::GetTimelineInfo(grpc::CallbackServerContext* context,
                                                        const v1::GetTimelineInfoRequest* request,
                                                        v1::GetTimelineInfoResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    ASSIGN_OR_RETURN(TimelineView view, d_.timelines->Info(session, request->timeline_id()));
    *response->mutable_timeline() = Info(view);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::ExportPoint(grpc::CallbackServerContext* context,
                                                    const v1::ExportPointRequest* request,
                                                    v1::ExportPointResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    const uint64_t id = request->timeline_id();
    const uint64_t point = request->point();
    ASSIGN_OR_RETURN(TimelineView timeline, d_.timelines->Info(session, id));
    if (point == UINT64_MAX) {
      return absl::InvalidArgumentError(
          "point 18446744073709551615 (UINT64_MAX) is reserved: no point could follow it");
    }
    ASSIGN_OR_RETURN(const uint64_t fence_id, PointFence(session, timeline, point, "ExportPoint"));
    if (request->fd_only()) {
      absl::StatusOr<LeasedFd> fd = d_.fences->Export(session, fence_id);
      absl::StatusOr<uint64_t> transfer =
          fd.ok() ? Deliver(session, v1::FD_KIND_FENCE, fence_id, *std::move(fd)) : fd.status();
      absl::StatusOr<FenceView> view = d_.fences->Info(session, fence_id);
      if (!transfer.ok()) {
        d_.fences->Abandon(session, fence_id, "ExportPoint failed");
        return transfer.status();
      }
      // The caller never gets a Fence to drop: it only has the fd.
      d_.fences->Forget(session, fence_id);
      response->set_transfer_id(*transfer);
      if (view.ok()) *response->mutable_fence() = Info(*view);
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(FenceView view, d_.fences->Info(session, fence_id));
    *response->mutable_fence() = Info(view);
    return absl::OkStatus();
  });
}

absl::StatusOr<uint64_t> FenceService::PointFence(uint64_t session, const TimelineView& timeline,
                                                  uint64_t point, absl::string_view call) {
  // The timeline fails the point (at its deadline, or a fence's behind it);
  // the fence's own deadline only backs that up.
  const TimelineLimits& limits = d_.timelines->limits();
  ASSIGN_OR_RETURN(FenceView fence,
                   d_.fences->CreatePoint(session, timeline.name, timeline.id, point,
                                          std::max(timeline.deadline, limits.max_deadline) +
                                              3 * limits.scan_interval));
  const uint64_t fence_id = fence.id;
  FenceTable* fences = d_.fences;
  absl::Status watched = d_.timelines->WatchPoint(
      session, timeline.id, point, [fences, fence_id](timeline::PointState state) {
        fences->SignalPoint(fence_id, state.status, state.message);
      });
  if (!watched.ok()) {
    d_.fences->Abandon(session, fence_id, absl::StrCat(call, " failed"));
    return watched;
  }
  return fence_id;
}

absl::Status FenceService::StandBehind(uint64_t session, uint64_t id, uint64_t point,
                                       uint64_t fence_id, bool forget) {
  // The fence's wait is registered first (NOT_FOUND for a fence the session
  // does not hold), then the point promised: the wait may end in between,
  // so whichever comes second settles the point.
  struct Pending {
    absl::Mutex mu;
    bool promised ABSL_GUARDED_BY(mu) = false;
    std::optional<std::pair<v1::FenceStatus, std::string>> result ABSL_GUARDED_BY(mu);
  };
  auto pending = std::make_shared<Pending>();
  TimelineTable* timelines = d_.timelines;
  FenceTable* fences = d_.fences;
  auto settle = [=](const std::pair<v1::FenceStatus, std::string>& how) {
    timelines->Settle(id, point, how.first, how.second);
    if (forget) fences->Forget(session, fence_id);
  };
  // The root cause, as the fence tells it (like a merged fence's error).
  auto outcome = [=](const FenceTable::WaitResult& result) {
    if (!result.satisfied || result.fences.empty()) {
      return std::make_pair(v1::FENCE_STATUS_DEADLINE_EXCEEDED,
                            absl::StrCat("fence ", fence_id, " behind point ", point,
                                         " did not signal in time"));
    }
    const FenceView& fence = result.fences.front();
    if (fence.status == v1::FENCE_STATUS_OK) return std::make_pair(fence.status, std::string());
    return std::make_pair(fence.status,
                          fence.message.empty()
                              ? absl::StrCat("fence ", fence_id, " behind point ", point,
                                             " signalled ", v1::FenceStatus_Name(fence.status))
                              : fence.message);
  };
  // A point of this very timeline at or after `point` could only signal
  // once `point` is reached: a cycle, refused.
  if (absl::StatusOr<FenceView> fence = fences->Info(session, fence_id);
      fence.ok() && fence->kind == FenceKind::kTimelinePoint && fence->timeline_id == id &&
      fence->timeline_point >= point) {
    if (forget) fences->Forget(session, fence_id);
    return absl::FailedPreconditionError(absl::StrCat(
        "fence ", fence_id, " is point ", fence->timeline_point, " of timeline ", id,
        ": it signals only after point ", point, ", which would wait for it"));
  }
  const FenceTable::WaitId wait = fences->NewWaitId();
  FenceTable::WaitRequest request;
  request.ids = {fence_id};
  request.timeout = absl::InfiniteDuration();  // the fence's deadline ends it
  absl::StatusOr<std::optional<FenceTable::WaitResult>> now = fences->Wait(
      session, wait, request,
      [pending, settle, outcome](absl::StatusOr<FenceTable::WaitResult> result) {
        // Not ok: the session ended (its timelines end with it) or the
        // daemon is stopping.
        if (!result.ok()) return;
        std::pair<v1::FenceStatus, std::string> how = outcome(*result);
        {
          absl::MutexLock lock(&pending->mu);
          if (!pending->promised) {
            pending->result = std::move(how);
            return;
          }
        }
        settle(how);
      });
  // A fence this call imported is undone if the call fails.
  constexpr absl::string_view kFailed = "the import behind a timeline point failed";
  if (!now.ok()) {
    if (forget) fences->Abandon(session, fence_id, kFailed);
    return now.status();
  }
  // The timeline ending first: its points fail anyway; the wait stops, and
  // a fence this call imported is cancelled (nobody could release it).
  auto dropped = [fences, wait, session, fence_id, forget] {
    if (fences->CancelWait(wait) && forget) {
      fences->Abandon(session, fence_id, "the timeline ended before the fd signalled");
    }
  };
  if (absl::Status promised = timelines->Promise(session, id, point, dropped); !promised.ok()) {
    if (!now->has_value()) fences->CancelWait(wait);
    if (forget) fences->Abandon(session, fence_id, kFailed);
    return promised;
  }
  if (now->has_value()) {
    settle(outcome(**now));
    return absl::OkStatus();
  }
  std::optional<std::pair<v1::FenceStatus, std::string>> settled;
  {
    absl::MutexLock lock(&pending->mu);
    pending->promised = true;
    settled = pending->result;
  }
  if (settled) settle(*settled);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* FenceService::ImportFenceAsPoint(
    grpc::CallbackServerContext* context, const v1::ImportFenceAsPointRequest* request,
    v1::ImportFenceAsPointResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    RETURN_IF_ERROR(StandBehind(session, request->timeline_id(), request->point(),
                                request->fence_id(), /*forget=*/false));
    ASSIGN_OR_RETURN(TimelineView view, d_.timelines->Info(session, request->timeline_id()));
    *response->mutable_timeline() = Info(view);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::ImportSyncFdAsPoint(
    grpc::CallbackServerContext* context, const v1::ImportSyncFdAsPointRequest* request,
    v1::ImportSyncFdAsPointResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    const uint64_t id = request->timeline_id();
    ASSIGN_OR_RETURN(UniqueFd fd, d_.hub->TakeUpload(session, request->upload_id()));
    // Checked before the fd becomes a fence: a call refused here leaves
    // nothing behind.
    RETURN_IF_ERROR(d_.timelines->CheckPromise(session, id, request->point()));
    ASSIGN_OR_RETURN(FenceView fence,
                     d_.fences->Import(session, std::move(fd),
                                       absl::StrCat("behind point ", request->point()),
                                       absl::Milliseconds(request->deadline_ms())));
    RETURN_IF_ERROR(StandBehind(session, id, request->point(), fence.id, /*forget=*/true));
    ASSIGN_OR_RETURN(TimelineView view, d_.timelines->Info(session, id));
    *response->mutable_timeline() = Info(view);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FenceService::AttachFence(grpc::CallbackServerContext* context,
                                                    const v1::AttachFenceRequest* request,
                                                    v1::AttachFenceResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    const v1::FenceUsage usage = request->usage();
    if (usage == v1::FENCE_USAGE_UNSPECIFIED || !v1::FenceUsage_IsValid(usage)) {
      return absl::InvalidArgumentError(
          absl::StrCat("usage ", static_cast<int>(usage),
                       " is not a usage: KERNEL, WRITE, READ or BOOKKEEP (FENCE_USAGE_*)"));
    }
    if ((request->fence_id() != 0) == (request->timeline_id() != 0)) {
      return absl::InvalidArgumentError(
          "name exactly one of fence_id and timeline_id (with point)");
    }
    ASSIGN_OR_RETURN(v1::GetBufferResponse buffer,
                     d_.state->GetBuffer(session, request->buffer_handle()));
    if (buffer.access() == v1::ACCESS_READ_ONLY && usage != v1::FENCE_USAGE_READ &&
        usage != v1::FENCE_USAGE_BOOKKEEP) {
      return absl::PermissionDeniedError(absl::StrCat(
          "handle ", request->buffer_handle(), " is read-only: it attaches READ and BOOKKEEP "
          "fences only, not ", v1::FenceUsage_Name(usage)));
    }
    uint64_t fence_id = request->fence_id();
    bool made = false;
    if (request->timeline_id() != 0) {
      // A point of a timeline the session holds, as a fence of its own.
      const uint64_t id = request->timeline_id();
      const uint64_t point = request->point();
      ASSIGN_OR_RETURN(TimelineView timeline, d_.timelines->Info(session, id));
      if (point == 0 || point == UINT64_MAX) {
        return absl::InvalidArgumentError(
            absl::StrCat("point ", point, " cannot be attached: points 1 to 2^64-2"));
      }
      ASSIGN_OR_RETURN(fence_id, PointFence(session, timeline, point, "AttachFence"));
      made = true;
    }
    const uint64_t buffer_id = buffer.buffer().buffer_id();
    uint64_t added = 0;
    absl::Status attached = d_.reservations->Attach(session, buffer_id, fence_id, usage, &added);
    // The handle may have gone meanwhile (a release racing this call), and
    // with it maybe the buffer, whose reservation was dropped before this
    // attach came: take it back.
    if (absl::StatusOr<v1::GetBufferResponse> still =
            d_.state->GetBuffer(session, request->buffer_handle());
        attached.ok() && !still.ok()) {
      d_.reservations->Detach(buffer_id, added);
      attached = still.status();
    }
    absl::StatusOr<FenceView> view = d_.fences->Info(session, fence_id);
    // A fence made here is the reservation's only: the session lets go.
    if (made) {
      if (!attached.ok()) {
        d_.fences->Abandon(session, fence_id, "AttachFence failed");
      } else {
        d_.fences->Forget(session, fence_id);
      }
    }
    RETURN_IF_ERROR(attached);
    if (view.ok()) {
      *response->mutable_fence() = Info(*view);
      response->mutable_fence()->set_usage(usage);
    }
    return absl::OkStatus();
  });
}

void FenceService::Subscribe(uint64_t session, uint64_t buffer_id, bool new_page,
                             v1::GetBufferFencesResponse& response) {
  // Whatever goes wrong here, the access goes on without the page (slot
  // 0: the client asks each time).
  absl::StatusOr<ReservationTable::Subscription> subscription =
      d_.reservations->Subscribe(session, buffer_id, new_page);
  if (!subscription.ok()) {
    spdlog::debug("session {}: no reservation status page: {}", session,
                  StatusText(subscription.status()));
    return;
  }
  // The session may have let go of the buffer meanwhile (every handle on
  // it), and the buffer may be gone with it.
  if (!d_.state->Holds(session, buffer_id)) {
    d_.reservations->Unsubscribe(session, buffer_id);
    return;
  }
  if (subscription->page.valid()) {
    // The page, new: its copy in flight counts in the session's uid's
    // budget. If it cannot go, the session has no page: the next
    // subscription makes another.
    std::optional<SessionTable::Identity> who = d_.sessions->Lookup(session);
    absl::StatusOr<uint64_t> transfer =
        absl::UnauthenticatedError(absl::StrCat("session ", session, " has ended"));
    if (who.has_value()) {
      absl::StatusOr<FdBudget::Lease> lease =
          d_.state->fd_budget().Acquire(FdUse::kDelivery, who->peer.uid);
      transfer = lease.ok() ? Deliver(session, v1::FD_KIND_RESERVATION_STATUS, session,
                                      LeasedFd{std::move(subscription->page), *std::move(lease)})
                            : lease.status();
    }
    if (!transfer.ok()) {
      spdlog::debug("session {}: its reservation status page could not go: {}", session,
                    StatusText(transfer.status()));
      d_.reservations->CloseSession(session);
      return;
    }
    response.set_status_page_transfer_id(*transfer);
  }
  response.set_status_slot(subscription->slot);
}

grpc::ServerUnaryReactor* FenceService::GetBufferFences(grpc::CallbackServerContext* context,
                                                        const v1::GetBufferFencesRequest* request,
                                                        v1::GetBufferFencesResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    ASSIGN_OR_RETURN(v1::GetBufferResponse buffer,
                     d_.state->GetBuffer(session, request->buffer_handle()));
    const uint64_t buffer_id = buffer.buffer().buffer_id();
    // Checked before anything changes: a refused call leaves nothing behind.
    RETURN_IF_ERROR(CheckAccess(request->for_access()));
    if (request->subscribe() && request->as_fd()) {
      return absl::InvalidArgumentError(
          "subscribe lists the fences for a waiter on the status page; as_fd makes one fd of "
          "them: ask for one or the other");
    }
    if (request->subscribe()) {
      // Before the answer is made: anything attached after it reaches the
      // slot.
      Subscribe(session, buffer_id, request->new_page(), *response);
    }
    ReservationTable::Snapshot snapshot;
    ASSIGN_OR_RETURN(std::vector<ReservationTable::Attached> pending,
                     d_.reservations->Pending(buffer_id, request->for_access(), &snapshot,
                                              request->subscribe() ? session : 0));
    response->set_status_seq(snapshot.seq);
    response->set_status_failures(snapshot.failures);
    if (request->has_failures_since()) {
      for (const ReservationTable::Failure& failure :
           d_.reservations->FailuresSince(buffer_id, request->failures_since())) {
        v1::FenceInfo* info = response->add_failed();
        info->set_fence_id(failure.fence_id);
        info->set_state(v1::FENCE_STATE_SIGNALED);
        info->set_status(failure.status);
        info->set_message(failure.message);
        *info->mutable_signaled_at() = ToProto(failure.signaled_at);
      }
    }
    if (request->subscribe() && !request->as_fd()) {
      // Listed, not held: the status page says when they signal.
      for (const ReservationTable::Attached& entry : pending) {
        // Each as it is now; one signalled since is listed all the same (a
        // failure of it is in `failed` for the waiter that asks).
        std::optional<FenceView> fence = d_.fences->Peek(entry.fence_id);
        v1::FenceInfo* info = response->add_fences();
        if (fence.has_value()) {
          *info = Info(*fence);
        } else {
          info->set_fence_id(entry.fence_id);
          info->set_state(v1::FENCE_STATE_SIGNALED);
        }
        info->set_usage(entry.usage);
      }
      return absl::OkStatus();
    }
    // The session holds each from now on (it may wait on them).
    std::vector<uint64_t> held;
    auto forget_all = [&] {
      for (uint64_t id : held) d_.fences->Forget(session, id);
    };
    for (const ReservationTable::Attached& entry : pending) {
      absl::StatusOr<FenceView> fence = d_.fences->HoldFor(session, entry.fence_id);
      if (fence.status().code() == absl::StatusCode::kNotFound) continue;  // gone meanwhile
      if (!fence.ok()) {
        forget_all();
        return fence.status();
      }
      held.push_back(entry.fence_id);
      if (request->as_fd()) continue;  // only the fd goes back
      v1::FenceInfo* info = response->add_fences();
      *info = Info(*fence);
      info->set_usage(entry.usage);
    }
    if (!request->as_fd() || held.empty()) return absl::OkStatus();
    // One fd: the one fence's own, or a merged fence's — the same merged
    // fence again while the same fences are pending (an event loop asking
    // every frame makes no new fence each time).
    std::vector<uint64_t> ids = held;
    std::sort(ids.begin(), ids.end());
    absl::StatusOr<FenceView> merged = absl::UnknownError("unset");
    bool hold_merged = false;
    if (held.size() == 1) {
      merged = d_.fences->Info(session, held[0]);
    } else if (std::optional<uint64_t> cached = d_.reservations->CachedMerge(
                   buffer_id, session, request->for_access(), ids);
               cached.has_value() && (merged = d_.fences->HoldFor(session, *cached)).ok()) {
      hold_merged = true;
    } else {
      merged = d_.fences->Merge(session, held, "buffer fences");
      hold_merged = merged.ok();
      if (merged.ok()) {
        d_.reservations->CacheMerge(buffer_id, session, request->for_access(), ids, merged->id);
      }
    }
    absl::StatusOr<LeasedFd> fd =
        merged.ok() ? d_.fences->Export(session, merged->id) : merged.status();
    absl::StatusOr<uint64_t> transfer =
        fd.ok() ? Deliver(session, v1::FD_KIND_FENCE, merged->id, *std::move(fd)) : fd.status();
    if (hold_merged) d_.fences->Forget(session, merged->id);
    forget_all();
    RETURN_IF_ERROR(transfer.status());
    response->set_transfer_id(*transfer);
    return absl::OkStatus();
  });
}

}  // namespace bufferd
