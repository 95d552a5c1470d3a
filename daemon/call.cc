#include "daemon/call.h"

#include <vector>

#include "base/errno_status.h"
#include "base/protocol.h"
#include "daemon/grpc_status.h"

namespace bufferd {

absl::StatusOr<uint64_t> AuthenticateCall(const SessionTable& sessions, SessionHub& hub,
                                          const grpc::CallbackServerContext* context) {
  const auto& metadata = context->client_metadata();
  auto it = metadata.find(kSessionMetadataKey);
  ASSIGN_OR_RETURN(
      const uint64_t session,
      sessions.Authenticate(it == metadata.end()
                                ? absl::string_view()
                                : absl::string_view(it->second.data(), it->second.size())));
  auto records = metadata.find(kRecordsMetadataKey);
  if (records != metadata.end()) {
    ASSIGN_OR_RETURN(const uint64_t sent, ParseRecordCount(absl::string_view(
                                              records->second.data(), records->second.size())));
    RETURN_IF_ERROR(hub.DrainRecords(session, sent));
  }
  auto carried = metadata.find(kReleaseMetadataKey);
  if (carried != metadata.end()) {
    ASSIGN_OR_RETURN(
        const std::vector<uint64_t> handles,
        ParseReleaseList(absl::string_view(carried->second.data(), carried->second.size())));
    hub.ReleaseDropped(session, handles);
  }
  auto rung = metadata.find(kRungMetadataKey);
  if (rung != metadata.end()) {
    ASSIGN_OR_RETURN(const std::vector<uint64_t> fences,
                     ParseRungList(absl::string_view(rung->second.data(), rung->second.size())));
    hub.SignalRung(session, fences);
  }
  return session;
}

grpc::ServerUnaryReactor* FinishCall(grpc::CallbackServerContext* context,
                                     const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace bufferd
