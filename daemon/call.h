// What every service does with a call: authenticate it (and apply the
// releases it carries), and finish it with a converted status.
#ifndef BUFFERD_DAEMON_CALL_H_
#define BUFFERD_DAEMON_CALL_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "daemon/session_hub.h"
#include "daemon/sessions.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/server_callback.h"

namespace bufferd {

// The call's session from its kSessionMetadataKey, after applying the
// releases it carries in kReleaseMetadataKey (base/protocol.h): handles
// released before the call runs, as if by one-way records.
absl::StatusOr<uint64_t> AuthenticateCall(const SessionTable& sessions, SessionHub& hub,
                                          const grpc::CallbackServerContext* context);

// Finishes the call inline with `status`.
grpc::ServerUnaryReactor* FinishCall(grpc::CallbackServerContext* context,
                                     const absl::Status& status);

// Authenticates the call, runs `body(session)` inline and finishes the call
// with what it returns (or with the authentication's error).
template <typename Body>
grpc::ServerUnaryReactor* FinishAuthenticated(const SessionTable& sessions, SessionHub& hub,
                                              grpc::CallbackServerContext* context, Body body) {
  absl::StatusOr<uint64_t> session = AuthenticateCall(sessions, hub, context);
  if (!session.ok()) return FinishCall(context, session.status());
  return FinishCall(context, body(*session));
}

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_CALL_H_
