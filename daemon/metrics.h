// Prometheus text exposition of the daemon's heaps, sessions, fds and fences.
#ifndef BUFFERD_DAEMON_METRICS_H_
#define BUFFERD_DAEMON_METRICS_H_

#include <cstdint>
#include <string>

#include "bufferd/v1/debug.pb.h"
#include "fences/fence_table.h"

namespace bufferd {

// `heaps` as HeapsView returns it; `sessions` connected now; the fence
// table's counters.
std::string MetricsText(const v1::ListHeapsResponse& heaps, uint64_t sessions,
                        const FenceTable::Counts& fences, const FenceTable::WaitLatency& waits);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_METRICS_H_
