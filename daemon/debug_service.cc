#include "daemon/debug_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/errno_status.h"
#include "daemon/call.h"
#include "daemon/config.h"
#include "daemon/debug_views.h"
#include "daemon/grpc_status.h"
#include "daemon/metrics.h"
#include "spdlog/spdlog.h"

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
  *response = ClientsView(*d_.sessions, *d_.state, *d_.fences);
  for (v1::ClientInfo& client : *response->mutable_clients()) {
    client.set_queued_deliveries(
        static_cast<uint32_t>(d_.channel->QueuedDeliveries(client.session_id())));
  }
  return FinishCall(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* DebugService::ListBuffers(grpc::CallbackServerContext* context,
                                                    const v1::ListBuffersRequest* request,
                                                    v1::ListBuffersResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return FinishCall(context, s);
  if (request->session_id() != 0 && !d_.sessions->Lookup(request->session_id()).has_value()) {
    return FinishCall(context,
                      absl::NotFoundError(absl::StrCat("no session ", request->session_id(),
                                                       " is open (bufctl clients lists them)")));
  }
  absl::StatusOr<v1::ListBuffersResponse> page =
      BuffersView(*d_.sessions, *d_.state, *d_.fences, *d_.reservations, *request);
  if (page.ok()) *response = *std::move(page);
  return FinishCall(context, page.status());
}

grpc::ServerUnaryReactor* DebugService::ListFences(grpc::CallbackServerContext* context,
                                                   const v1::ListFencesRequest* request,
                                                   v1::ListFencesResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return FinishCall(context, s);
  absl::StatusOr<v1::ListFencesResponse> page =
      FencesView(*d_.sessions, *d_.fences, *d_.timelines, *request);
  if (page.ok()) *response = *std::move(page);
  return FinishCall(context, page.status());
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

grpc::ServerUnaryReactor* DebugService::ListTokens(grpc::CallbackServerContext* context,
                                                   const v1::ListTokensRequest*,
                                                   v1::ListTokensResponse* response) {
  if (absl::Status s = Check(context); !s.ok()) return FinishCall(context, s);
  *response = TokensView(*d_.state);
  return FinishCall(context, absl::OkStatus());
}

absl::StatusOr<SessionTable::Identity> DebugService::CheckOperator(
    grpc::CallbackServerContext* context) const {
  ASSIGN_OR_RETURN(const uint64_t session, AuthenticateCall(*d_.sessions, *d_.hub, context));
  std::optional<SessionTable::Identity> who = d_.sessions->Lookup(session);
  if (!who.has_value()) return absl::UnauthenticatedError("the session has ended");
  if (who->peer.uid != 0 && who->peer.uid != d_.access.daemon_uid) {
    return absl::PermissionDeniedError(absl::StrCat(
        "ending a session is for root and the daemon's uid (", d_.access.daemon_uid, "); uid ",
        who->peer.uid, " is neither (debug_access may let it read, never end sessions)"));
  }
  return *who;
}

grpc::ServerUnaryReactor* DebugService::EndSession(grpc::CallbackServerContext* context,
                                                   const v1::EndSessionRequest* request,
                                                   v1::EndSessionResponse* response) {
  absl::StatusOr<SessionTable::Identity> caller = CheckOperator(context);
  if (!caller.ok()) return FinishCall(context, caller.status());
  const uint64_t victim = request->session_id();
  v1::ListClientsResponse clients = ClientsView(*d_.sessions, *d_.state, *d_.fences);
  for (const v1::ClientInfo& client : clients.clients()) {
    if (client.session_id() == victim) *response->mutable_session() = client;
  }
  if (!response->has_session()) {
    return FinishCall(context, absl::NotFoundError(absl::StrCat(
                                   "no session ", victim, " is open (bufctl clients lists them)")));
  }
  if (victim == caller->id) {
    return FinishCall(context, absl::InvalidArgumentError(absl::StrCat(
                                   "session ", victim, " is the caller's own session")));
  }
  const std::string why = absl::StrCat("ended by an operator (uid ", caller->peer.uid, ", pid ",
                                       caller->peer.pid, ", '", caller->comm, "')");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  d_.channel->EndSessionSoon(victim, why, [reactor, response, victim, why](FdChannel::Ended ended) {
    switch (ended) {
      case FdChannel::Ended::kEnded:
        spdlog::info("session {} {}", victim, why);
        reactor->Finish(grpc::Status::OK);
        return;
      case FdChannel::Ended::kEndedLingering:
        spdlog::info(
            "session {} {}; it lingers until its client reads or drops the fds it was sent", victim,
            why);
        response->set_lingering(true);
        reactor->Finish(grpc::Status::OK);
        return;
      case FdChannel::Ended::kLingering:
        reactor->Finish(ToGrpcStatus(absl::FailedPreconditionError(absl::StrCat(
            "session ", victim,
            " has ended already; it lingers until its client reads or drops the fds it was "
            "sent (kill the client to end it)"))));
        return;
      case FdChannel::Ended::kNotFound:
        reactor->Finish(ToGrpcStatus(absl::NotFoundError(
            absl::StrCat("no session ", victim, " is open (bufctl clients lists them)"))));
        return;
    }
  });
  return reactor;
}

}  // namespace bufferd
