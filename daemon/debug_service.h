// DebugService: the Debug gRPC service (views, see daemon/debug_views.h,
// and EndSession). Who may call is DebugAccess (config debug_access): by
// default operators only (the daemon's uid, root, debug_uids,
// debug_groups), judged by the credentials of the caller's session; a
// session's call still applies the releases it carries. EndSession is
// stricter: root and the daemon's uid only, with a session, whatever
// debug_access lets read; it ends the session on the fd channel's loop,
// exactly as the client's disconnect would.
// ListHeaps and GetMetrics (sysfs reads, heap residency) run on the work
// queue; ListClients, ListBuffers, ListFences and ListTokens inline
// (ListBuffers fstats each listed buffer under DaemonState's mutex).
#ifndef BUFFERD_DAEMON_DEBUG_SERVICE_H_
#define BUFFERD_DAEMON_DEBUG_SERVICE_H_

#include <set>
#include <string>

#include "base/unix_socket.h"
#include "bufferd/v1/config.pb.h"
#include "bufferd/v1/debug.grpc.pb.h"
#include "daemon/fd_channel.h"
#include "daemon/session_hub.h"
#include "daemon/sessions.h"
#include "daemon/state.h"
#include "daemon/work_queue.h"
#include "fences/reservations.h"

namespace bufferd {

// Who may make Debug calls.
struct DebugAccess {
  v1::DebugAccess mode = v1::DEBUG_ACCESS_OPERATORS;
  // DEBUG_ACCESS_OPERATORS: the daemon's own uid (root always may), listed
  // uids and groups, and the groups' names for the refusal message.
  uid_t daemon_uid = 0;
  std::set<uid_t> uids;
  std::set<gid_t> groups;
  std::string group_names;

  // From the config; INVALID_ARGUMENT naming a debug_groups entry that does
  // not exist.
  static absl::StatusOr<DebugAccess> FromConfig(const v1::Config& config, uid_t daemon_uid);
  // OK, or PERMISSION_DENIED saying who may.
  absl::Status Allows(const PeerCredentials& peer) const;
};

class DebugService final : public v1::Debug::CallbackService {
 public:
  struct Deps {
    const SessionTable* sessions;
    SessionHub* hub;
    const DaemonState* state;
    FdChannel* channel;
    const FenceTable* fences;
    const TimelineTable* timelines;
    const ReservationTable* reservations;
    WorkQueue* work;
    DebugAccess access;
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
  grpc::ServerUnaryReactor* ListTokens(grpc::CallbackServerContext* context,
                                       const v1::ListTokensRequest* request,
                                       v1::ListTokensResponse* response) override;
  grpc::ServerUnaryReactor* EndSession(grpc::CallbackServerContext* context,
                                       const v1::EndSessionRequest* request,
                                       v1::EndSessionResponse* response) override;

 private:
  absl::Status Check(grpc::CallbackServerContext* context) const;
  // EndSession's rule: the caller's session is root's or the daemon's uid's.
  absl::StatusOr<SessionTable::Identity> CheckOperator(grpc::CallbackServerContext* context) const;

  const Deps d_;
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_DEBUG_SERVICE_H_
