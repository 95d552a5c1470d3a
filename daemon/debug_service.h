// DebugService: the Debug gRPC service (read-only views; see
// daemon/debug_views.h). Calls need a live session unless the config lets
// anyone ask; a session's call still applies the releases it carries.
// ListHeaps and GetMetrics (sysfs reads, heap residency) run on the work
// queue; ListClients, ListBuffers and ListFences inline (ListBuffers fstats each listed
// buffer under DaemonState's mutex).
#ifndef BUFFERD_DAEMON_DEBUG_SERVICE_H_
#define BUFFERD_DAEMON_DEBUG_SERVICE_H_

#include "bufferd/v1/debug.grpc.pb.h"
#include "daemon/fd_channel.h"
#include "daemon/session_hub.h"
#include "daemon/sessions.h"
#include "fences/reservations.h"
#include "daemon/state.h"
#include "daemon/work_queue.h"

namespace bufferd {

class DebugService final : public v1::Debug::CallbackService {
 public:
  struct Deps {
    const SessionTable* sessions;
    SessionHub* hub;
    const DaemonState* state;
    const FdChannel* channel;
    const FenceTable* fences;
    const TimelineTable* timelines;
    const ReservationTable* reservations;
    WorkQueue* work;
    // DEBUG_ACCESS_ANYONE.
    bool allow_anyone = false;
  };
  explicit DebugService(Deps deps) : d_(deps) {}

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

  const Deps d_;
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_DEBUG_SERVICE_H_
