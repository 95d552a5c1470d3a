#include "daemon/allocator_service.h"

#include "absl/strings/str_cat.h"
#include "base/client_text.h"
#include "base/errno_status.h"
#include "daemon/call.h"
#include "daemon/grpc_status.h"
#include "daemon/requests.h"
#include "spdlog/spdlog.h"

namespace bufferd {
namespace {

absl::Status Cancelled() { return absl::CancelledError("Allocate was cancelled by the client"); }

}  // namespace

absl::StatusOr<UniqueFd> AllocatorService::TakeBufferUpload(uint64_t session, uint64_t upload_id,
                                                            absl::string_view call) {
  if (upload_id == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        call,
        " needs upload_id: the daemon keeps no fd per buffer, so send the buffer's fd in "
        "an FdUpload record on fd.sock first and name it here (the client library does)"));
  }
  absl::StatusOr<UniqueFd> fd = d_.hub->TakeUpload(session, upload_id);
  if (fd.status().code() == absl::StatusCode::kInvalidArgument) {
    // Refused as it came, with a fence import's advice: say what this
    // call needs.
    return absl::InvalidArgumentError(absl::StrCat(call,
                                                   " takes the buffer's own memfd (its "
                                                   "Buffer::fd()); the upload was refused: ",
                                                   fd.status().message()));
  }
  return fd;
}

absl::Status AllocatorService::Deliver(uint64_t session, DaemonState::PendingGrant& grant) {
  return d_.channel->Deliver(session, grant->transfer_id, v1::FD_KIND_BUFFER,
                             grant->buffer->buffer_id(), std::move(grant->fd));
}

absl::Status AllocatorService::DoAllocate(uint64_t session, const AllocationPlan& plan,
                                          const v1::AllocateRequest& request,
                                          google::protobuf::Arena* answers,
                                          const std::function<v1::AllocateResponse*()>& add,
                                          std::vector<v1::HeapSkip>& skipped,
                                          grpc::CallbackServerContext* context) {
  absl::StatusOr<DaemonState::Allocation> allocation =
      d_.state->AllocatePlanned(session, plan, request, answers);
  if (!allocation.ok()) {
    spdlog::debug("session {}: Allocate of {} x {} bytes failed: {}: {}", session, plan.count,
                  plan.size, absl::StatusCodeToString(allocation.status().code()),
                  std::string(allocation.status().message()));
    return allocation.status();
  }
  std::vector<DaemonState::PendingGrant>& grants = allocation->grants;
  // The client gave up while the pages were prefaulted: it will never learn
  // the handles, so neither the handles nor the fds outlive this call.
  if (context != nullptr && context->IsCancelled()) return Cancelled();
  // The fds go out before the response, so the client finds them queued.
  if (grants.size() == 1) {
    RETURN_IF_ERROR(Deliver(session, grants.front()));
  } else {
    std::vector<FdChannel::Delivery> deliveries;
    deliveries.reserve(grants.size());
    for (DaemonState::PendingGrant& grant : grants) {
      deliveries.push_back(FdChannel::Delivery{grant->transfer_id, v1::FD_KIND_BUFFER,
                                               grant->buffer->buffer_id(), std::move(grant->fd)});
    }
    RETURN_IF_ERROR(d_.channel->DeliverAll(session, std::move(deliveries)));
  }
  // Cancelled after the fds went out: the handles go now rather than at
  // session end (the client closes the orphaned fds).
  if (context != nullptr && context->IsCancelled()) return Cancelled();
  for (size_t i = 0; i < grants.size(); ++i) {
    DaemonState::Grant grant = std::move(grants[i]).Commit();
    v1::AllocateResponse& response = *add();
    response.set_handle(grant.handle);
    response.set_transfer_id(grant.transfer_id);
    // Without the metadata: the allocator sent it (AllocateResponse.buffer).
    *response.mutable_buffer() = std::move(*grant.buffer);
  }
  skipped = std::move(allocation->skipped);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AllocatorService::RunAllocation(grpc::CallbackServerContext* context,
                                                          const v1::AllocateRequest& request,
                                                          uint32_t count,
                                                          const google::protobuf::Message* whole,
                                                          AllocateFn allocate) {
  absl::StatusOr<uint64_t> session = AuthenticateCall(*d_.sessions, *d_.hub, context);
  if (!session.ok()) return FinishCall(context, session.status());
  if (absl::Status known = whole == nullptr ? CheckNoUnknownFields(request)
                                            : CheckNoUnknownFields(*whole, "request");
      !known.ok()) {
    return FinishCall(context, known);
  }
  absl::StatusOr<AllocationPlan> plan = d_.state->Plan(request, count);
  if (!plan.ok()) return FinishCall(context, plan.status());
  if (!plan->may_block()) return FinishCall(context, allocate(*session, *plan, nullptr));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  d_.work->Post([context, reactor, session = *session, plan = *std::move(plan),
                 allocate = std::move(allocate)] {
    reactor->Finish(ToGrpcStatus(allocate(session, plan, context)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* AllocatorService::Allocate(grpc::CallbackServerContext* context,
                                                     const v1::AllocateRequest* request,
                                                     v1::AllocateResponse* response) {
  return RunAllocation(context, *request, 1, /*whole=*/nullptr,
                       [this, request, response](uint64_t session, const AllocationPlan& plan,
                                                 grpc::CallbackServerContext* context) {
                         std::vector<v1::HeapSkip> skipped;
                         RETURN_IF_ERROR(DoAllocate(
                             session, plan, *request, response->GetArena(),
                             [response] { return response; }, skipped, context));
                         for (v1::HeapSkip& skip : skipped) {
                           *response->add_skipped() = std::move(skip);
                         }
                         return absl::OkStatus();
                       });
}

grpc::ServerUnaryReactor* AllocatorService::AllocateSet(grpc::CallbackServerContext* context,
                                                        const v1::AllocateSetRequest* request,
                                                        v1::AllocateSetResponse* response) {
  return RunAllocation(
      context, request->request(), request->count(), /*whole=*/request,
      [this, request, response](uint64_t session, const AllocationPlan& plan,
                                grpc::CallbackServerContext* context) -> absl::Status {
        std::vector<v1::HeapSkip> skipped;
        absl::Status done = DoAllocate(
            session, plan, request->request(), response->GetArena(),
            [response] { return response->add_buffers(); }, skipped, context);
        if (!done.ok()) {
          response->Clear();
          return done;
        }
        for (v1::HeapSkip& skip : skipped) *response->add_skipped() = std::move(skip);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* AllocatorService::CanAllocate(grpc::CallbackServerContext* context,
                                                        const v1::CanAllocateRequest* request,
                                                        v1::CanAllocateResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) {
    RETURN_IF_ERROR(CheckNoUnknownFields(*request, "request"));
    absl::StatusOr<v1::CanAllocateResponse> answer = d_.state->CanAllocate(
        session, request->request(), request->count() == 0 ? 1 : request->count());
    if (answer.ok()) *response = *std::move(answer);
    return answer.status();
  });
}

grpc::ServerUnaryReactor* AllocatorService::SetMetadata(grpc::CallbackServerContext* context,
                                                        const v1::SetMetadataRequest* request,
                                                        v1::SetMetadataResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) {
    RETURN_IF_ERROR(CheckNoUnknownFields(*request, "request"));
    absl::StatusOr<v1::BufferInfo> buffer = d_.state->SetMetadata(
        session, request->handle(), request->metadata(),
        request->has_expected_generation() ? std::optional(request->expected_generation())
                                           : std::nullopt);
    if (buffer.ok()) *response->mutable_buffer() = *std::move(buffer);
    return buffer.status();
  });
}

grpc::ServerUnaryReactor* AllocatorService::Release(grpc::CallbackServerContext* context,
                                                    const v1::ReleaseRequest* request,
                                                    v1::ReleaseResponse* response) {
  absl::StatusOr<uint64_t> session = AuthenticateCall(*d_.sessions, *d_.hub, context);
  if (!session.ok()) return FinishCall(context, session.status());
  uint64_t let_go = 0;
  absl::StatusOr<std::vector<DeadBuffer>> dead =
      d_.state->Release(*session, request->handle(), &let_go);
  if (!dead.ok()) return FinishCall(context, dead.status());
  d_.hub->LetGo(*session, let_go);
  response->set_buffer_destroyed(!dead->empty());
  // The caller may rely on the memory being freed (a carveout's reservation
  // refilled) when this returns, so the call finishes only after the free.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  d_.reaper->Free(*std::move(dead), [reactor] { reactor->Finish(grpc::Status::OK); });
  return reactor;
}

grpc::ServerUnaryReactor* AllocatorService::Export(grpc::CallbackServerContext* context,
                                                   const v1::ExportRequest* request,
                                                   v1::ExportResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    ASSIGN_OR_RETURN(*response,
                     d_.state->Export(session, *request,
                                      TakeBufferUpload(session, request->upload_id(), "Export")));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* AllocatorService::Import(grpc::CallbackServerContext* context,
                                                   const v1::ImportRequest* request,
                                                   v1::ImportResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    ASSIGN_OR_RETURN(DaemonState::PendingGrant pending,
                     d_.state->Import(session, request->token()));
    // Not delivered: the grant undoes itself and the importer may retry.
    RETURN_IF_ERROR(Deliver(session, pending));
    DaemonState::Grant grant = std::move(pending).Commit();
    response->set_handle(grant.handle);
    response->set_transfer_id(grant.transfer_id);
    response->set_access(grant.access);
    *response->mutable_buffer() = std::move(*grant.buffer);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* AllocatorService::GetBuffer(grpc::CallbackServerContext* context,
                                                      const v1::GetBufferRequest* request,
                                                      v1::GetBufferResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) {
    absl::StatusOr<v1::GetBufferResponse> buffer = d_.state->GetBuffer(session, request->handle());
    if (buffer.ok()) *response = *std::move(buffer);
    return buffer.status();
  });
}

grpc::ServerUnaryReactor* AllocatorService::Freeze(grpc::CallbackServerContext* context,
                                                   const v1::FreezeRequest* request,
                                                   v1::FreezeResponse* response) {
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) -> absl::Status {
    ASSIGN_OR_RETURN(*response->mutable_buffer(),
                     d_.state->Freeze(session, request->handle(),
                                      TakeBufferUpload(session, request->upload_id(), "Freeze")));
    return absl::OkStatus();
  });
}

}  // namespace bufferd
