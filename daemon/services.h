// The gRPC services, on gRPC's callback API: handlers never block a callback
// thread. Cheap work (system-heap allocations: memfd_create + seals, lookups)
// runs inline; work that touches pages (prefaulting contiguous and carveout
// buffers) runs on the WorkQueue and finishes the call from there. The Fence
// service answers UNIMPLEMENTED until the fence work lands. Every call is
// authenticated from `bufferd-session` metadata, except Debug when the config
// allows anyone.
#ifndef BUFFERD_DAEMON_SERVICES_H_
#define BUFFERD_DAEMON_SERVICES_H_

#include "base/unix_socket.h"
#include "bufferd/v1/buffer.grpc.pb.h"
#include "bufferd/v1/debug.grpc.pb.h"
#include "bufferd/v1/fence.grpc.pb.h"
#include "daemon/fd_channel.h"
#include "daemon/state.h"
#include "daemon/work_queue.h"

namespace bufferd {

// Every call must carry kSessionMetadataKey. It may carry kReleaseMetadataKey
// (base/protocol.h): handles released before the call runs, as if by
// one-way ReleaseHandle records; a handle that is unknown or already released
// is skipped (the client re-sends after a failed call; ids are never reused).

class AllocatorService final : public v1::Allocator::CallbackService {
 public:
  // Page work runs on `work`; the Release RPC finishes on `reaper` (the
  // daemon's FIFO free thread) once the buffer's memory is freed.
  AllocatorService(DaemonState* state, FdChannel* channel, WorkQueue* work, WorkQueue* reaper)
      : state_(state), channel_(channel), work_(work), reaper_(reaper) {}

  grpc::ServerUnaryReactor* Allocate(grpc::CallbackServerContext* context,
                                     const v1::AllocateRequest* request,
                                     v1::AllocateResponse* response) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* context,
                                    const v1::ReleaseRequest* request,
                                    v1::ReleaseResponse* response) override;
  grpc::ServerUnaryReactor* Export(grpc::CallbackServerContext* context,
                                   const v1::ExportRequest* request,
                                   v1::ExportResponse* response) override;
  grpc::ServerUnaryReactor* Import(grpc::CallbackServerContext* context,
                                   const v1::ImportRequest* request,
                                   v1::ImportResponse* response) override;
  grpc::ServerUnaryReactor* GetBuffer(grpc::CallbackServerContext* context,
                                      const v1::GetBufferRequest* request,
                                      v1::GetBufferResponse* response) override;
  grpc::ServerUnaryReactor* Freeze(grpc::CallbackServerContext* context,
                                   const v1::FreezeRequest* request,
                                   v1::FreezeResponse* response) override;

 private:
  // Allocates and delivers the fd; with `context`, a call cancelled before
  // delivery is undone.
  absl::Status DoAllocate(uint64_t session, const v1::AllocateRequest& request,
                          v1::AllocateResponse& response, grpc::CallbackServerContext* context);
  // Delivers the grant's fd; on failure drops the new handle again.
  absl::Status Deliver(uint64_t session, DaemonState::Grant& grant);

  DaemonState* const state_;
  FdChannel* const channel_;
  WorkQueue* const work_;
  WorkQueue* const reaper_;
};

class DebugService final : public v1::Debug::CallbackService {
 public:
  DebugService(DaemonState* state, FdChannel* channel, WorkQueue* work, bool allow_anyone)
      : state_(state), channel_(channel), work_(work), allow_anyone_(allow_anyone) {}

  grpc::ServerUnaryReactor* ListHeaps(grpc::CallbackServerContext* context,
                                      const v1::ListHeapsRequest* request,
                                      v1::ListHeapsResponse* response) override;
  grpc::ServerUnaryReactor* ListClients(grpc::CallbackServerContext* context,
                                        const v1::ListClientsRequest* request,
                                        v1::ListClientsResponse* response) override;
  grpc::ServerUnaryReactor* ListBuffers(grpc::CallbackServerContext* context,
                                        const v1::ListBuffersRequest* request,
                                        v1::ListBuffersResponse* response) override;
  grpc::ServerUnaryReactor* ListFences(grpc::CallbackServerContext* context,
                                       const v1::ListFencesRequest* request,
                                       v1::ListFencesResponse* response) override;
  grpc::ServerUnaryReactor* GetMetrics(grpc::CallbackServerContext* context,
                                       const v1::GetMetricsRequest* request,
                                       v1::GetMetricsResponse* response) override;

 private:
  absl::Status Check(grpc::CallbackServerContext* context) const;

  DaemonState* const state_;
  FdChannel* const channel_;
  WorkQueue* const work_;
  const bool allow_anyone_;
};

// The Fence service, designed in fence.proto: until fences land, every call
// is UNIMPLEMENTED with a message naming the method.
class FenceService final : public v1::Fence::Service {
 public:
  grpc::Status CreateFence(grpc::ServerContext*, const v1::CreateFenceRequest*,
                           v1::CreateFenceResponse*) override {
    return Unimplemented("CreateFence");
  }
  grpc::Status SignalFence(grpc::ServerContext*, const v1::SignalFenceRequest*,
                           v1::SignalFenceResponse*) override {
    return Unimplemented("SignalFence");
  }
  grpc::Status WaitFence(grpc::ServerContext*, const v1::WaitFenceRequest*,
                         v1::WaitFenceResponse*) override {
    return Unimplemented("WaitFence");
  }
  grpc::Status GetFenceInfo(grpc::ServerContext*, const v1::GetFenceInfoRequest*,
                            v1::GetFenceInfoResponse*) override {
    return Unimplemented("GetFenceInfo");
  }
  grpc::Status MergeFences(grpc::ServerContext*, const v1::MergeFencesRequest*,
                           v1::MergeFencesResponse*) override {
    return Unimplemented("MergeFences");
  }
  grpc::Status ExportFence(grpc::ServerContext*, const v1::ExportFenceRequest*,
                           v1::ExportFenceResponse*) override {
    return Unimplemented("ExportFence");
  }
  grpc::Status ImportSyncFd(grpc::ServerContext*, const v1::ImportSyncFdRequest*,
                            v1::ImportSyncFdResponse*) override {
    return Unimplemented("ImportSyncFd");
  }
  grpc::Status AttachFence(grpc::ServerContext*, const v1::AttachFenceRequest*,
                           v1::AttachFenceResponse*) override {
    return Unimplemented("AttachFence");
  }
  grpc::Status GetBufferFences(grpc::ServerContext*, const v1::GetBufferFencesRequest*,
                               v1::GetBufferFencesResponse*) override {
    return Unimplemented("GetBufferFences");
  }

 private:
  static grpc::Status Unimplemented(const char* method) {
    return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                        std::string("Fence.") + method + ": fences are not implemented yet");
  }
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_SERVICES_H_
