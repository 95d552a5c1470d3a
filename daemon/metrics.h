// Prometheus text exposition of the daemon's heaps, sessions and fds.
#ifndef BUFFERD_DAEMON_METRICS_H_
#define BUFFERD_DAEMON_METRICS_H_

#include <cstdint>
#include <string>

#include "bufferd/v1/debug.pb.h"

namespace bufferd {

// `heaps` as HeapsView returns it; `sessions` connected now.
std::string MetricsText(const v1::ListHeapsResponse& heaps, uint64_t sessions);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_METRICS_H_
