// The gRPC services: Allocator and Debug (sync API: their handlers do bounded
// work — memfd creation, prefaulting — on gRPC's sync thread pool, never an
// unbounded wait), and the Fence service, which answers UNIMPLEMENTED until the
// fence work lands. Every call is authenticated from `bufferd-session`
// metadata, except Debug when the config allows anyone.
#ifndef BUFFERD_DAEMON_SERVICES_H_
#define BUFFERD_DAEMON_SERVICES_H_

#include "bufferd/v1/buffer.grpc.pb.h"
#include "bufferd/v1/debug.grpc.pb.h"
#include "bufferd/v1/fence.grpc.pb.h"
#include "daemon/fd_channel.h"
#include "daemon/state.h"

namespace bufferd {

// The metadata key every call carries.
inline constexpr char kSessionMetadataKey[] = "bufferd-session";

class AllocatorService final : public v1::Allocator::Service {
 public:
  AllocatorService(DaemonState* state, FdChannel* channel) : state_(state), channel_(channel) {}

  grpc::Status Allocate(grpc::ServerContext* context, const v1::AllocateRequest* request,
                        v1::AllocateResponse* response) override;
  grpc::Status Release(grpc::ServerContext* context, const v1::ReleaseRequest* request,
                       v1::ReleaseResponse* response) override;
  grpc::Status Export(grpc::ServerContext* context, const v1::ExportRequest* request,
                      v1::ExportResponse* response) override;
  grpc::Status Import(grpc::ServerContext* context, const v1::ImportRequest* request,
                      v1::ImportResponse* response) override;
  grpc::Status GetBuffer(grpc::ServerContext* context, const v1::GetBufferRequest* request,
                         v1::GetBufferResponse* response) override;

 private:
  // Delivers the grant's fd; on failure drops the new handle again.
  absl::Status Deliver(uint64_t session, DaemonState::Grant& grant);

  DaemonState* const state_;
  FdChannel* const channel_;
};

class DebugService final : public v1::Debug::Service {
 public:
  DebugService(DaemonState* state, FdChannel* channel, bool allow_anyone)
      : state_(state), channel_(channel), allow_anyone_(allow_anyone) {}

  grpc::Status ListHeaps(grpc::ServerContext* context, const v1::ListHeapsRequest* request,
                         v1::ListHeapsResponse* response) override;
  grpc::Status ListClients(grpc::ServerContext* context, const v1::ListClientsRequest* request,
                           v1::ListClientsResponse* response) override;
  grpc::Status ListBuffers(grpc::ServerContext* context, const v1::ListBuffersRequest* request,
                           v1::ListBuffersResponse* response) override;
  grpc::Status ListFences(grpc::ServerContext* context, const v1::ListFencesRequest* request,
                          v1::ListFencesResponse* response) override;
  grpc::Status GetMetrics(grpc::ServerContext* context, const v1::GetMetricsRequest* request,
                          v1::GetMetricsResponse* response) override;

 private:
  absl::Status Check(grpc::ServerContext* context) const;

  DaemonState* const state_;
  FdChannel* const channel_;
  const bool allow_anyone_;
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_SERVICES_H_
