#include "daemon/metrics.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace bufferd {

std::string MetricsText(const v1::ListHeapsResponse& heaps, uint64_t sessions) {
  std::string out;
  auto family = [&out](absl::string_view name, absl::string_view type, absl::string_view help) {
    absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
  };
  struct Metric {
    const char* name;
    const char* type;
    const char* help;
    uint64_t (v1::HeapInfo::*get)() const;
  };
  static const Metric kHeapMetrics[] = {
      {"bufferd_heap_capacity_bytes", "gauge", "Heap capacity (0 = unbounded).",
       &v1::HeapInfo::capacity},
      {"bufferd_heap_used_bytes", "gauge", "Bytes in live buffers.", &v1::HeapInfo::used},
      {"bufferd_heap_free_bytes", "gauge", "Capacity minus used (0 = unbounded heap).",
       &v1::HeapInfo::free},
      {"bufferd_heap_peak_bytes", "gauge", "Highest used bytes since start.", &v1::HeapInfo::peak},
      {"bufferd_heap_buffers", "gauge", "Live buffers.", &v1::HeapInfo::buffer_count},
      {"bufferd_heap_allocations_total", "counter", "Successful allocations.",
       &v1::HeapInfo::allocations},
      {"bufferd_heap_allocation_failures_total", "counter", "Failed allocations.",
       &v1::HeapInfo::failures},
  };
  for (const Metric& metric : kHeapMetrics) {
    family(metric.name, metric.type, metric.help);
    for (const v1::HeapInfo& heap : heaps.heaps()) {
      absl::StrAppend(&out, metric.name, "{heap=\"", heap.name(), "\"} ", (heap.*metric.get)(),
                      "\n");
    }
  }
  family("bufferd_sessions", "gauge", "Connected client sessions.");
  absl::StrAppend(&out, "bufferd_sessions ", sessions, "\n");
  family("bufferd_buffers", "gauge", "Live buffers in all heaps.");
  absl::StrAppend(&out, "bufferd_buffers ", heaps.live_buffers(), "\n");
  family("bufferd_handles", "gauge", "Live buffer handles.");
  absl::StrAppend(&out, "bufferd_handles ", heaps.live_handles(), "\n");
  family("bufferd_fds_in_use", "gauge", "fds held on clients' behalf, by use.");
  const v1::FdUsage& fds = heaps.fds();
  for (const auto& [use, count] : {std::pair<const char*, uint64_t>{"buffers", fds.buffers()},
                                   {"sessions", fds.sessions()},
                                   {"control_connections", fds.control_connections()},
                                   {"deliveries", fds.deliveries()},
                                   {"freeing", fds.freeing()}}) {
    absl::StrAppend(&out, "bufferd_fds_in_use{use=\"", use, "\"} ", count, "\n");
  }
  family("bufferd_fd_budget", "gauge", "Configured fd budget.");
  absl::StrAppend(&out, "bufferd_fd_budget ", heaps.fd_budget(), "\n");
  return out;
}

}  // namespace bufferd
