#include "daemon/debug_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/errno_status.h"
#include "daemon/call.h"
#include "daemon/config.h"
#include "daemon/debug_views.h"
#include "daemon/metrics.h"

namespace bufferd {

absl::StatusOr<DebugAccess> DebugAccess::FromConfig(const v1::Config& config, uid_t daemon_uid) {
  DebugAccess access;
  access.mode = config.debug_access() == v1::DEBUG_ACCESS_UNSPECIFIED ? v1::DEBUG_ACCESS_OPERATORS
                                                                      : config.debug_access();
  access.daemon_uid = daemon_uid;
  access.uids.insert(config.debug_uids().begin(), config.debug_uids().end());
  for (const std::string& name : config.debug_groups()) {
    ASSIGN_OR_RETURN(const gid_t gid, ConfigGroup("debug_groups: group", name));
    access.groups.insert(gid);
  }
  access.group_names = absl::StrJoin(config.debug_groups(), ", ");
  return access;
}

absl::Status DebugAccess::Allows(const PeerCredentials& peer) const {
  if (mode != v1::DEBUG_ACCESS_OPERATORS) return absl::OkStatus();
  if (peer.uid == 0 || peer.uid == daemon_uid || uids.contains(peer.uid)) {
    return absl::OkStatus();
  }
  if (groups.contains(peer.gid) ||
      std::any_of(peer.groups.begin(), peer.groups.end(),
                  [this](gid_t gid) { return groups.contains(gid); })) {
    return absl::OkStatus();
  }
  return absl::PermissionDeniedError(absl::StrCat(
      "Debug calls are for operators: uid ", peer.uid, " is not the daemon's uid (", daemon_uid,
      ") or root, not in debug_uids, and not in ",
      group_names.empty() ? "any debug_groups (none configured)"
                          : absl::StrCat("a group of debug_groups (", group_names, ")"),
      "; see the README's \"Debug access\""));
}

absl::Status DebugService::Check(grpc::CallbackServerContext* context) const {
  // A session's call carries its releases even where anyone may ask.
  absl::StatusOr<uint64_t> session = AuthenticateCall(*d_.sessions, *d_.hub, context);
  if (d_.access.mode == v1::DEBUG_ACCESS_ANYONE) return absl::OkStatus();
  if (!session.ok()) return session.status();
  std::optional<SessionTable::Identity> who = d_.sessions->Lookup(*session);
  if (!who.has_value()) return absl::UnauthenticatedError("the session has ended");
  return d_.access.Allows(who->peer);
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
