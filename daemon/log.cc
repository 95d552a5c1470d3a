#include "daemon/log.h"

#include "google/protobuf/stubs/logging.h"
#include "grpc/support/log.h"

namespace bufferd {

bool LogLimiter::Allow(absl::Time now, uint64_t* dropped) {
  absl::MutexLock lock(&mu_);
  if (now - window_start_ >= period_) {
    window_start_ = now;
    in_window_ = 0;
  }
  if (in_window_ >= burst_) {
    ++dropped_;
    return false;
  }
  ++in_window_;
  *dropped = std::exchange(dropped_, 0);
  return true;
}

namespace {

// Parse failures of a client's request are logged by libprotobuf, once per
// call, before any authentication.
void ProtobufLogHandler(google::protobuf::LogLevel level, const char* file, int line,
                        const std::string& message) {
  static LogLimiter limiter;
  spdlog::level::level_enum spd = spdlog::level::info;
  switch (level) {
    case google::protobuf::LOGLEVEL_INFO:
      spd = spdlog::level::debug;
      break;
    case google::protobuf::LOGLEVEL_WARNING:
      spd = spdlog::level::warn;
      break;
    default:
      spd = spdlog::level::err;
      break;
  }
  LogLimited(limiter, spd, "libprotobuf {}:{}: {}", file, line, message);
}

void GrpcLogFunction(gpr_log_func_args* args) {
  static LogLimiter limiter;
  spdlog::level::level_enum level = spdlog::level::debug;
  if (args->severity == GPR_LOG_SEVERITY_ERROR) {
    level = spdlog::level::err;
  } else if (args->severity == GPR_LOG_SEVERITY_INFO) {
    level = spdlog::level::info;
  }
  LogLimited(limiter, level, "grpc {}:{}: {}", args->file, args->line, args->message);
}

}  // namespace

void InstallLibraryLogHandlers() {
  google::protobuf::SetLogHandler(&ProtobufLogHandler);
  gpr_set_log_function(&GrpcLogFunction);
}

}  // namespace bufferd
