// absl::Status -> grpc::Status, the daemon's one conversion point.
#ifndef BUFFERD_DAEMON_GRPC_STATUS_H_
#define BUFFERD_DAEMON_GRPC_STATUS_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/support/status.h"

namespace bufferd {

// A status message travels in response metadata, whose default limit on a
// client is 8 KiB; no message of ours comes near this cut, which only guards
// against client text that slipped past QuoteClientText.
inline constexpr size_t kMaxStatusMessageBytes = 1024;

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  absl::string_view message = status.message();
  if (message.size() > kMaxStatusMessageBytes) {
    return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                        absl::StrCat(message.substr(0, kMaxStatusMessageBytes), "... (cut)"));
  }
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(message));
}

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_GRPC_STATUS_H_
