#include "daemon/debug_service.h"

#include "daemon/call.h"
#include "daemon/debug_views.h"
#include "daemon/metrics.h"

namespace bufferd {

absl::Status DebugService::Check(grpc::CallbackServerContext* context) const {
  // A session's call carries its releases even where anyone may ask.
  absl::Status session = AuthenticateCall(*d_.sessions, *d_.hub, context).status();
  return d_.allow_anyone ? absl::OkStatus() : session;
}

grpc::ServerUnaryReactor* DebugService::ListHeaps(grpc::CallbackServerContext* context,
                                                  const v1::ListHeapsRequest*,
                                                  v1::ListHeapsResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return FinishCall(context, s);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  d_.work->Post([this, reactor, response] {
    *response = HeapsView(*d_.state);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* DebugService::ListClients(grpc::CallbackServerContext* context,
                                                    const v1::ListClientsRequest*,
                                                    v1::ListClientsResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return FinishCall(context, s);
  for (v1::ClientInfo& client : ClientsView(*d_.sessions, *d_.state, *d_.fences)) {
    client.set_queued_deliveries(
        static_cast<uint32_t>(d_.channel->QueuedDeliveries(client.session_id())));
    *response->add_clients() = std::move(client);
  }
  return FinishCall(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* DebugService::ListBuffers(grpc::CallbackServerContext* context,
                                                    const v1::ListBuffersRequest* request,
                                                    v1::ListBuffersResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return FinishCall(context, s);
  *response = BuffersView(*d_.sessions, *d_.state, *d_.fences, *d_.reservations, *request);
  return FinishCall(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* DebugService::ListFences(grpc::CallbackServerContext* context,
                                                   const v1::ListFencesRequest* request,
                                                   v1::ListFencesResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return FinishCall(context, s);
  *response = FencesView(*d_.sessions, *d_.fences, *d_.timelines, *request);
  return FinishCall(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* DebugService::GetMetrics(grpc::CallbackServerContext* context,
                                                   const v1::GetMetricsRequest*,
                                                   v1::GetMetricsResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return FinishCall(context, s);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  d_.work->Post([this, reactor, response] {
    response->set_text(MetricsText(HeapsView(*d_.state), d_.sessions->size(),
                                   d_.fences->counts(), d_.fences->wait_latency()));
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

}  // namespace bufferd
