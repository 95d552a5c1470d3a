#include "daemon/allocator_service.h"

#include "base/client_text.h"
#include "base/errno_status.h"
#include "daemon/call.h"
#include "daemon/grpc_status.h"
#include "spdlog/spdlog.h"

namespace bufferd {
namespace {

absl::Status Cancelled() { return absl::CancelledError("Allocate was cancelled by the client"); }

}  // namespace

absl::Status AllocatorService::Deliver(uint64_t session, DaemonState::PendingGrant& grant) {
  return d_.channel->Deliver(session, grant->transfer_id, v1::FD_KIND_BUFFER,
                             grant->buffer.buffer_id(), std::move(grant->fd));
}

absl::Status AllocatorService::DoAllocate(uint64_t session, const v1::AllocateRequest& request,
                                          v1::AllocateResponse& response,
                                          grpc::CallbackServerContext* context) {
  absl::StatusOr<DaemonState::PendingGrant> pending = d_.state->Allocate(session, request);
  if (!pending.ok()) {
    spdlog::debug("session {}: Allocate({}, {}) failed: {}", session,
                  QuoteClientText(request.heap()), request.size(), pending.status().ToString());
    return pending.status();
  }
  // The client gave up while the pages were prefaulted: it will never learn
  // the handle, so neither the handle nor the fd outlive this call.
  if (context != nullptr && context->IsCancelled()) return Cancelled();
  // The fd goes out before the response, so the client finds it queued.
  RETURN_IF_ERROR(Deliver(session, *pending));
  // Cancelled after the fd went out: the handle goes now rather than at
  // session end (the client closes the orphaned fd).
  if (context != nullptr && context->IsCancelled()) return Cancelled();
  DaemonState::Grant grant = std::move(*pending).Commit();
  response.set_handle(grant.handle);
  response.set_transfer_id(grant.transfer_id);
  *response.mutable_buffer() = std::move(grant.buffer);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AllocatorService::Allocate(grpc::CallbackServerContext* context,
                                                     const v1::AllocateRequest* request,
                                                     v1::AllocateResponse* response) {
  absl::StatusOr<uint64_t> session = AuthenticateCall(*d_.sessions, *d_.hub, context);
  if (!session.ok()) return FinishCall(context, session.status());
  Heap* heap = d_.state->heaps().Find(request->heap());
  if (heap == nullptr || !heap->allocation_may_block()) {
    return FinishCall(context, DoAllocate(*session, *request, *response, nullptr));
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  d_.work->Post([this, context, reactor, session = *session, request, response] {
    reactor->Finish(ToGrpcStatus(DoAllocate(session, *request, *response, context)));
  });
  return reactor;
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
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) {
    absl::StatusOr<v1::ExportResponse> exported = d_.state->Export(session, *request);
    if (exported.ok()) *response = *std::move(exported);
    return exported.status();
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
    *response->mutable_buffer() = std::move(grant.buffer);
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
  return FinishAuthenticated(*d_.sessions, *d_.hub, context, [&](uint64_t session) {
    absl::StatusOr<v1::BufferInfo> frozen = d_.state->Freeze(session, request->handle());
    if (frozen.ok()) *response->mutable_buffer() = *std::move(frozen);
    return frozen.status();
  });
}

}  // namespace bufferd
