#include "daemon/services.h"

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "daemon/grpc_status.h"
#include "spdlog/spdlog.h"

namespace bufferd {
namespace {

absl::StatusOr<uint64_t> SessionOf(const DaemonState& state, grpc::ServerContext* context) {
  const auto& metadata = context->client_metadata();
  auto it = metadata.find(kSessionMetadataKey);
  if (it == metadata.end()) return state.Authenticate("");
  return state.Authenticate(absl::string_view(it->second.data(), it->second.size()));
}

}  // namespace

absl::Status AllocatorService::Deliver(uint64_t session, DaemonState::Grant& grant) {
  absl::Status status = channel_->Deliver(session, grant.transfer_id, v1::FD_KIND_BUFFER,
                                          grant.buffer.buffer_id(), std::move(grant.fd));
  if (!status.ok()) (void)state_->Release(session, grant.handle);
  return status;
}

grpc::Status AllocatorService::Allocate(grpc::ServerContext* context,
                                        const v1::AllocateRequest* request,
                                        v1::AllocateResponse* response) {
  absl::StatusOr<uint64_t> session = SessionOf(*state_, context);
  if (!session.ok()) return ToGrpcStatus(session.status());
  absl::StatusOr<DaemonState::Grant> grant = state_->Allocate(*session, *request);
  if (!grant.ok()) {
    spdlog::debug("session {}: Allocate({}, {}) failed: {}", *session, request->heap(),
                  request->size(), grant.status().ToString());
    return ToGrpcStatus(grant.status());
  }
  absl::Status delivered = Deliver(*session, *grant);
  if (!delivered.ok()) return ToGrpcStatus(delivered);
  response->set_handle(grant->handle);
  response->set_transfer_id(grant->transfer_id);
  *response->mutable_buffer() = std::move(grant->buffer);
  return grpc::Status::OK;
}

grpc::Status AllocatorService::Release(grpc::ServerContext* context,
                                       const v1::ReleaseRequest* request,
                                       v1::ReleaseResponse* response) {
  absl::StatusOr<uint64_t> session = SessionOf(*state_, context);
  if (!session.ok()) return ToGrpcStatus(session.status());
  absl::StatusOr<bool> destroyed = state_->Release(*session, request->handle());
  if (!destroyed.ok()) return ToGrpcStatus(destroyed.status());
  response->set_buffer_destroyed(*destroyed);
  return grpc::Status::OK;
}

grpc::Status AllocatorService::Export(grpc::ServerContext* context,
                                      const v1::ExportRequest* request,
                                      v1::ExportResponse* response) {
  absl::StatusOr<uint64_t> session = SessionOf(*state_, context);
  if (!session.ok()) return ToGrpcStatus(session.status());
  absl::StatusOr<v1::ExportResponse> exported = state_->Export(*session, *request);
  if (!exported.ok()) return ToGrpcStatus(exported.status());
  *response = *std::move(exported);
  return grpc::Status::OK;
}

grpc::Status AllocatorService::Import(grpc::ServerContext* context,
                                      const v1::ImportRequest* request,
                                      v1::ImportResponse* response) {
  absl::StatusOr<uint64_t> session = SessionOf(*state_, context);
  if (!session.ok()) return ToGrpcStatus(session.status());
  absl::StatusOr<DaemonState::Grant> grant = state_->Import(*session, request->token());
  if (!grant.ok()) return ToGrpcStatus(grant.status());
  absl::Status delivered = Deliver(*session, *grant);
  if (!delivered.ok()) return ToGrpcStatus(delivered);
  response->set_handle(grant->handle);
  response->set_transfer_id(grant->transfer_id);
  response->set_access(grant->access);
  *response->mutable_buffer() = std::move(grant->buffer);
  return grpc::Status::OK;
}

grpc::Status AllocatorService::GetBuffer(grpc::ServerContext* context,
                                         const v1::GetBufferRequest* request,
                                         v1::GetBufferResponse* response) {
  absl::StatusOr<uint64_t> session = SessionOf(*state_, context);
  if (!session.ok()) return ToGrpcStatus(session.status());
  absl::StatusOr<v1::GetBufferResponse> buffer = state_->GetBuffer(*session, request->handle());
  if (!buffer.ok()) return ToGrpcStatus(buffer.status());
  *response = *std::move(buffer);
  return grpc::Status::OK;
}

absl::Status DebugService::Check(grpc::ServerContext* context) const {
  if (allow_anyone_) return absl::OkStatus();
  return SessionOf(*state_, context).status();
}

grpc::Status DebugService::ListHeaps(grpc::ServerContext* context, const v1::ListHeapsRequest*,
                                     v1::ListHeapsResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return ToGrpcStatus(s);
  *response = state_->ListHeaps();
  return grpc::Status::OK;
}

grpc::Status DebugService::ListClients(grpc::ServerContext* context,
                                       const v1::ListClientsRequest*,
                                       v1::ListClientsResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return ToGrpcStatus(s);
  for (v1::ClientInfo& client : state_->ListClients()) {
    client.set_queued_deliveries(
        static_cast<uint32_t>(channel_->QueuedDeliveries(client.session_id())));
    *response->add_clients() = std::move(client);
  }
  return grpc::Status::OK;
}

grpc::Status DebugService::ListBuffers(grpc::ServerContext* context,
                                       const v1::ListBuffersRequest* request,
                                       v1::ListBuffersResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return ToGrpcStatus(s);
  *response = state_->ListBuffers(*request);
  return grpc::Status::OK;
}

grpc::Status DebugService::ListFences(grpc::ServerContext* context, const v1::ListFencesRequest*,
                                      v1::ListFencesResponse*) {
  if (absl::Status s = Check(context); !s.ok()) return ToGrpcStatus(s);
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "ListFences: fences are not implemented yet");
}

grpc::Status DebugService::GetMetrics(grpc::ServerContext* context, const v1::GetMetricsRequest*,
                                      v1::GetMetricsResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return ToGrpcStatus(s);
  response->set_text(state_->Metrics());
  return grpc::Status::OK;
}

}  // namespace bufferd
