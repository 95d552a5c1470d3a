// AllocatorService: the Allocator gRPC service, on gRPC's callback API:
// handlers never block a callback thread. Allocations from heaps that never
// block (Heap::allocation_may_block) run inline; the rest (prefaulting huge
// pages, waiting for a carveout refill) on the work queue, which finishes
// the call. Every call is authenticated and applies the releases it carries
// first (daemon/call.h).
//
// A call that yields an fd reads grant -> deliver -> commit: the fd goes out
// on fd.sock before the response, and a grant that is not committed (the
// delivery failed, the client cancelled) undoes itself.
#ifndef BUFFERD_DAEMON_ALLOCATOR_SERVICE_H_
#define BUFFERD_DAEMON_ALLOCATOR_SERVICE_H_

#include <functional>
#include <vector>

#include "bufferd/v1/buffer.grpc.pb.h"
#include "daemon/arena_messages.h"
#include "daemon/fd_channel.h"
#include "daemon/reaper.h"
#include "daemon/session_hub.h"
#include "daemon/sessions.h"
#include "daemon/state.h"
#include "daemon/work_queue.h"

namespace bufferd {

class AllocatorService final : public v1::Allocator::CallbackService {
 public:
  struct Deps {
    const SessionTable* sessions;
    SessionHub* hub;
    DaemonState* state;
    FdChannel* channel;
    // Page work runs here.
    WorkQueue* work;
    // The Release RPC finishes once the buffer's memory is freed.
    Reaper* reaper;
  };
  explicit AllocatorService(Deps deps) : d_(deps) {
    SetMessageAllocatorFor_Allocate(&allocate_messages_);
    SetMessageAllocatorFor_AllocateSet(&allocate_set_messages_);
  }

  grpc::ServerUnaryReactor* Allocate(grpc::CallbackServerContext* context,
                                     const v1::AllocateRequest* request,
                                     v1::AllocateResponse* response) override;
  grpc::ServerUnaryReactor* AllocateSet(grpc::CallbackServerContext* context,
                                        const v1::AllocateSetRequest* request,
                                        v1::AllocateSetResponse* response) override;
  grpc::ServerUnaryReactor* CanAllocate(grpc::CallbackServerContext* context,
                                        const v1::CanAllocateRequest* request,
                                        v1::CanAllocateResponse* response) override;
  grpc::ServerUnaryReactor* SetMetadata(grpc::CallbackServerContext* context,
                                        const v1::SetMetadataRequest* request,
                                        v1::SetMetadataResponse* response) override;
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
  // Allocates `count` buffers, delivers their fds (one FdDelivery for one
  // buffer, FdDeliveries records for more) and commits; a call cancelled
  // before the commit is undone. Fills one AllocateResponse per buffer,
  // each from `add` (on `answers`, the response's arena, or null).
  absl::Status DoAllocate(uint64_t session, const AllocationPlan& plan,
                          const v1::AllocateRequest& request, google::protobuf::Arena* answers,
                          const std::function<v1::AllocateResponse*()>& add,
                          std::vector<v1::HeapSkip>& skipped, grpc::CallbackServerContext* context);
  // Authenticates, plans `count` buffers as `request` asks, then runs
  // `allocate` inline, or on the work queue if one of the plan's heaps may
  // block; finishes the call. First the whole RPC request is checked for
  // fields this daemon does not know: `whole`, or `request` itself when
  // null (Allocate's, checked without walking it by reflection).
  using AllocateFn = std::function<absl::Status(uint64_t session, const AllocationPlan& plan,
                                                grpc::CallbackServerContext* context)>;
  grpc::ServerUnaryReactor* RunAllocation(grpc::CallbackServerContext* context,
                                          const v1::AllocateRequest& request, uint32_t count,
                                          const google::protobuf::Message* whole,
                                          AllocateFn allocate);
  // Delivers the pending grant's fd.
  absl::Status Deliver(uint64_t session, DaemonState::PendingGrant& grant);
  // The buffer fd `call` (Export, Freeze) names by upload id.
  absl::StatusOr<UniqueFd> TakeBufferUpload(uint64_t session, uint64_t upload_id,
                                            absl::string_view call);

  const Deps d_;
  // The allocation calls' messages, on arenas (a frame's nested messages
  // would each cost a malloc and a free).
  ArenaMessages<v1::AllocateRequest, v1::AllocateResponse> allocate_messages_;
  ArenaMessages<v1::AllocateSetRequest, v1::AllocateSetResponse> allocate_set_messages_;
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_ALLOCATOR_SERVICE_H_
