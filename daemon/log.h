// Bounded logging: whatever clients do, the daemon's log grows by a bounded
// amount. Lines a client can cause (its session ending badly, a request the
// libraries refuse to parse) go through a LogLimiter; libprotobuf's and gRPC
// core's own lines are routed through spdlog and limited the same way.
#ifndef BUFFERD_DAEMON_LOG_H_
#define BUFFERD_DAEMON_LOG_H_

#include <cstdint>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "spdlog/spdlog.h"

namespace bufferd {

// At most `burst` lines per `period` for one kind of message; the first line
// let through after a pause says how many were dropped. Thread-safe.
class LogLimiter {
 public:
  explicit LogLimiter(uint64_t burst = 10, absl::Duration period = absl::Seconds(10))
      : burst_(burst), period_(period) {}

  // True if a line may be written now; then `*dropped` is how many were
  // refused since the last one written.
  bool Allow(uint64_t* dropped) { return Allow(absl::Now(), dropped); }
  bool Allow(absl::Time now, uint64_t* dropped);

 private:
  const uint64_t burst_;
  const absl::Duration period_;
  absl::Mutex mu_;
  absl::Time window_start_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  uint64_t in_window_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
};

// Logs through `limiter` (see LogLimiter).
template <typename... Args>
void LogLimited(LogLimiter& limiter, spdlog::level::level_enum level,
                fmt::format_string<Args...> format, Args&&... args) {
  if (!spdlog::should_log(level)) return;
  uint64_t dropped = 0;
  if (!limiter.Allow(&dropped)) return;
  std::string line = fmt::format(format, std::forward<Args>(args)...);
  if (dropped != 0) line += fmt::format(" ({} similar lines dropped)", dropped);
  spdlog::log(level, "{}", line);
}

// Routes libprotobuf's and gRPC core's log lines through spdlog, each
// library's limited by its own LogLimiter. Call once, before serving.
void InstallLibraryLogHandlers();

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_LOG_H_
