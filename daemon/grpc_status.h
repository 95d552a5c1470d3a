// absl::Status -> grpc::Status, the daemon's one conversion point.
#ifndef BUFFERD_DAEMON_GRPC_STATUS_H_
#define BUFFERD_DAEMON_GRPC_STATUS_H_

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace bufferd {

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_GRPC_STATUS_H_
