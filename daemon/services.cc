#include "daemon/services.h"

#include "absl/strings/str_cat.h"
#include "base/client_text.h"
#include "base/errno_status.h"
#include "base/protocol.h"
#include "daemon/grpc_status.h"
#include "spdlog/spdlog.h"

namespace bufferd {
namespace {

// Applies the releases a call carries (see kReleaseMetadataKey).
absl::Status ApplyCarriedReleases(DaemonState& state, uint64_t session,
                                  const grpc::CallbackServerContext* context) {
  const auto& metadata = context->client_metadata();
  auto it = metadata.find(kReleaseMetadataKey);
  if (it == metadata.end()) return absl::OkStatus();
  ASSIGN_OR_RETURN(const std::vector<uint64_t> handles,
                   ParseReleaseList(absl::string_view(it->second.data(), it->second.size())));
  for (uint64_t handle : handles) {
    absl::StatusOr<bool> released = state.Release(session, handle);
    if (!released.ok()) {
      spdlog::debug("session {}: carried release of handle {}: {}", session, handle,
                    released.status().ToString());
    }
  }
  return absl::OkStatus();
}

// The call's session, after applying the releases it carries.
absl::StatusOr<uint64_t> SessionOf(DaemonState& state, const grpc::CallbackServerContext* context) {
  const auto& metadata = context->client_metadata();
  auto it = metadata.find(kSessionMetadataKey);
  if (it == metadata.end()) return state.Authenticate("");
  ASSIGN_OR_RETURN(uint64_t session,
                   state.Authenticate(absl::string_view(it->second.data(), it->second.size())));
  RETURN_IF_ERROR(ApplyCarriedReleases(state, session, context));
  return session;
}

grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// Runs `body(session)` inline for an authenticated call and finishes it.
template <typename Body>
grpc::ServerUnaryReactor* Authenticated(DaemonState& state, grpc::CallbackServerContext* context,
                                        Body body) {
  absl::StatusOr<uint64_t> session = SessionOf(state, context);
  if (!session.ok()) return Finish(context, session.status());
  return Finish(context, body(*session));
}

}  // namespace

absl::Status AllocatorService::Deliver(uint64_t session, DaemonState::Grant& grant) {
  absl::Status status = channel_->Deliver(session, grant.transfer_id, v1::FD_KIND_BUFFER,
                                          grant.buffer.buffer_id(), std::move(grant.fd));
  if (!status.ok()) (void)state_->Release(session, grant.handle);
  return status;
}

absl::Status AllocatorService::DoAllocate(uint64_t session, const v1::AllocateRequest& request,
                                          v1::AllocateResponse& response,
                                          grpc::CallbackServerContext* context) {
  absl::StatusOr<DaemonState::Grant> grant = state_->Allocate(session, request);
  if (!grant.ok()) {
    spdlog::debug("session {}: Allocate({}, {}) failed: {}", session,
                  QuoteClientText(request.heap()), request.size(), grant.status().ToString());
    return grant.status();
  }
  if (context != nullptr && context->IsCancelled()) {
    // The client gave up while the pages were prefaulted: it will never learn
    // the handle, so neither the handle nor the fd should outlive this call.
    (void)state_->Release(session, grant->handle);
    return absl::CancelledError("Allocate was cancelled by the client");
  }
  // The fd goes out before the response, so the client finds it queued.
  RETURN_IF_ERROR(Deliver(session, *grant));
  response.set_handle(grant->handle);
  response.set_transfer_id(grant->transfer_id);
  *response.mutable_buffer() = std::move(grant->buffer);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AllocatorService::Allocate(grpc::CallbackServerContext* context,
                                                     const v1::AllocateRequest* request,
                                                     v1::AllocateResponse* response) {
  absl::StatusOr<uint64_t> session = SessionOf(*state_, context);
  if (!session.ok()) return Finish(context, session.status());
  Heap* heap = state_->heaps().Find(request->heap());
  if (heap == nullptr || !heap->allocation_may_block()) {
    // No page is touched: memfd_create + ftruncate + seals. Inline.
    return Finish(context, DoAllocate(*session, *request, *response, nullptr));
  }
  // Prefaulting (and zeroing) huge pages takes a while: off the callback thread.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  work_->Post([this, context, reactor, session = *session, request, response] {
    absl::Status status = DoAllocate(session, *request, *response, context);
    if (status.ok() && context->IsCancelled()) {
      // Cancelled after the fd went out: drop the handle now rather than at
      // session end (the client closes the orphaned fd).
      (void)state_->Release(session, response->handle());
      status = absl::CancelledError("Allocate was cancelled by the client");
    }
    reactor->Finish(ToGrpcStatus(status));
  });
  return reactor;
}

grpc::ServerUnaryReactor* AllocatorService::Release(grpc::CallbackServerContext* context,
                                                    const v1::ReleaseRequest* request,
                                                    v1::ReleaseResponse* response) {
  absl::StatusOr<uint64_t> session = SessionOf(*state_, context);
  if (!session.ok()) return Finish(context, session.status());
  auto expensive = std::make_shared<std::vector<std::unique_ptr<HeapBuffer>>>();
  absl::StatusOr<bool> destroyed = state_->Release(*session, request->handle(), expensive.get());
  if (!destroyed.ok()) return Finish(context, destroyed.status());
  response->set_buffer_destroyed(*destroyed);
  if (expensive->empty()) return Finish(context, absl::OkStatus());
  // The caller may rely on the memory being freed (a carveout's reservation
  // refilled) when this returns, so the call finishes only after the free,
  // which runs on the reaper after any frees queued before it.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reaper_->Post([reactor, expensive] {
    expensive->clear();
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* AllocatorService::Export(grpc::CallbackServerContext* context,
                                                   const v1::ExportRequest* request,
                                                   v1::ExportResponse* response) {
  return Authenticated(*state_, context, [&](uint64_t session) {
    absl::StatusOr<v1::ExportResponse> exported = state_->Export(session, *request);
    if (exported.ok()) *response = *std::move(exported);
    return exported.status();
  });
}

grpc::ServerUnaryReactor* AllocatorService::Import(grpc::CallbackServerContext* context,
                                                   const v1::ImportRequest* request,
                                                   v1::ImportResponse* response) {
  return Authenticated(*state_, context, [&](uint64_t session) -> absl::Status {
    absl::StatusOr<DaemonState::Grant> grant = state_->Import(session, request->token());
    if (!grant.ok()) return grant.status();
    if (absl::Status delivered = Deliver(session, *grant); !delivered.ok()) {
      state_->UnuseToken(request->token());  // the importer may retry
      return delivered;
    }
    response->set_handle(grant->handle);
    response->set_transfer_id(grant->transfer_id);
    response->set_access(grant->access);
    *response->mutable_buffer() = std::move(grant->buffer);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* AllocatorService::GetBuffer(grpc::CallbackServerContext* context,
                                                      const v1::GetBufferRequest* request,
                                                      v1::GetBufferResponse* response) {
  return Authenticated(*state_, context, [&](uint64_t session) {
    absl::StatusOr<v1::GetBufferResponse> buffer = state_->GetBuffer(session, request->handle());
    if (buffer.ok()) *response = *std::move(buffer);
    return buffer.status();
  });
}

grpc::ServerUnaryReactor* AllocatorService::Freeze(grpc::CallbackServerContext* context,
                                                   const v1::FreezeRequest* request,
                                                   v1::FreezeResponse* response) {
  return Authenticated(*state_, context, [&](uint64_t session) {
    absl::StatusOr<v1::BufferInfo> frozen = state_->Freeze(session, request->handle());
    if (frozen.ok()) *response->mutable_buffer() = *std::move(frozen);
    return frozen.status();
  });
}

absl::Status DebugService::Check(grpc::CallbackServerContext* context) const {
  // A session's call carries its releases even where anyone may ask.
  absl::Status session = SessionOf(*state_, context).status();
  return allow_anyone_ ? absl::OkStatus() : session;
}

grpc::ServerUnaryReactor* DebugService::ListHeaps(grpc::CallbackServerContext* context,
                                                  const v1::ListHeapsRequest*,
                                                  v1::ListHeapsResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return Finish(context, s);
  // Heap stats read sysfs and mincore the carveouts: off the callback thread.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  work_->Post([this, reactor, response] {
    *response = state_->ListHeaps();
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* DebugService::ListClients(grpc::CallbackServerContext* context,
                                                    const v1::ListClientsRequest*,
                                                    v1::ListClientsResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return Finish(context, s);
  for (v1::ClientInfo& client : state_->ListClients()) {
    client.set_queued_deliveries(
        static_cast<uint32_t>(channel_->QueuedDeliveries(client.session_id())));
    *response->add_clients() = std::move(client);
  }
  return Finish(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* DebugService::ListBuffers(grpc::CallbackServerContext* context,
                                                    const v1::ListBuffersRequest* request,
                                                    v1::ListBuffersResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return Finish(context, s);
  *response = state_->ListBuffers(*request);
  return Finish(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* DebugService::ListFences(grpc::CallbackServerContext* context,
                                                   const v1::ListFencesRequest*,
                                                   v1::ListFencesResponse*) {
  if (absl::Status s = Check(context); !s.ok()) return Finish(context, s);
  return Finish(context, absl::UnimplementedError("ListFences: fences are not implemented yet"));
}

grpc::ServerUnaryReactor* DebugService::GetMetrics(grpc::CallbackServerContext* context,
                                                   const v1::GetMetricsRequest*,
                                                   v1::GetMetricsResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return Finish(context, s);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  work_->Post([this, reactor, response] {
    response->set_text(state_->Metrics());
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

}  // namespace bufferd
