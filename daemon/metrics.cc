#include "daemon/metrics.h"

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace bufferd {

std::string MetricsText(const v1::ListHeapsResponse& heaps, uint64_t sessions,
                        const FenceTable::Counts& fences, const FenceTable::WaitLatency& waits) {
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
      {"bufferd_heap_free_bytes", "gauge",
       "What the next allocations may take: capacity minus used, at most what the machine has.",
       &v1::HeapInfo::free},
      {"bufferd_heap_peak_bytes", "gauge", "Highest used bytes since start.", &v1::HeapInfo::peak},
      {"bufferd_heap_buffers", "gauge", "Live buffers.", &v1::HeapInfo::buffer_count},
      {"bufferd_heap_allocations_total", "counter", "Successful allocations.",
       &v1::HeapInfo::allocations},
      {"bufferd_heap_allocation_failures_total", "counter",
       "Refused allocations and imports (sum of bufferd_alloc_failures_total).",
       &v1::HeapInfo::failures},
  };
  for (const Metric& metric : kHeapMetrics) {
    family(metric.name, metric.type, metric.help);
    for (const v1::HeapInfo& heap : heaps.heaps()) {
      absl::StrAppend(&out, metric.name, "{heap=\"", heap.name(), "\"} ", (heap.*metric.get)(),
                      "\n");
    }
  }
  family("bufferd_alloc_failures_total", "counter",
         "Refused allocations and imports, by heap and reason (quota, heap_full, pool_empty, "
         "too_large, fd_budget, other).");
  for (const v1::HeapInfo& heap : heaps.heaps()) {
    for (const char* reason :
         {"quota", "heap_full", "pool_empty", "too_large", "fd_budget", "other"}) {
      auto it = heap.failures_by_reason().find(reason);
      absl::StrAppend(&out, "bufferd_alloc_failures_total{heap=\"", heap.name(), "\",reason=\"",
                      reason, "\"} ", it == heap.failures_by_reason().end() ? 0 : it->second, "\n");
    }
  }
  family("bufferd_heap_fallbacks_total", "counter",
         "Allocations a fallback backing served, by heap and backing.");
  for (const v1::HeapInfo& heap : heaps.heaps()) {
    for (const auto& [backing, count] : heap.fallbacks()) {
      absl::StrAppend(&out, "bufferd_heap_fallbacks_total{heap=\"", heap.name(), "\",backing=\"",
                      backing, "\"} ", count, "\n");
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
  for (const auto& [use, count] : {std::pair<const char*, uint64_t>{"exports", fds.exports()},
                                   {"sessions", fds.sessions()},
                                   {"control_connections", fds.control_connections()},
                                   {"deliveries", fds.deliveries()},
                                   {"fences", fds.fences()},
                                   {"fence_pages", fds.fence_pages()}}) {
    absl::StrAppend(&out, "bufferd_fds_in_use{use=\"", use, "\"} ", count, "\n");
  }
  family("bufferd_fd_budget", "gauge", "Configured fd budget.");
  absl::StrAppend(&out, "bufferd_fd_budget ", heaps.fd_budget(), "\n");

  family("bufferd_fences", "gauge", "Fences known to the daemon, by state.");
  absl::StrAppend(&out, "bufferd_fences{state=\"pending\"} ", fences.pending, "\n");
  absl::StrAppend(&out, "bufferd_fences{state=\"signaled\"} ", fences.signaled, "\n");
  family("bufferd_fence_signals_total", "counter", "Fences signalled, by status.");
  for (int status = v1::FENCE_STATUS_OK; status < v1::FenceStatus_ARRAYSIZE; ++status) {
    std::string name = v1::FenceStatus_Name(static_cast<v1::FenceStatus>(status));
    absl::AsciiStrToLower(&name);
    absl::StrAppend(&out, "bufferd_fence_signals_total{status=\"",
                    absl::StripPrefix(name, "fence_status_"), "\"} ", fences.signals[status], "\n");
  }
  family("bufferd_fence_waits", "gauge", "WaitFence calls blocked now.");
  absl::StrAppend(&out, "bufferd_fence_waits ", fences.waits, "\n");
  family("bufferd_fence_wait_seconds", "histogram",
         "How long satisfied WaitFence calls waited.");
  uint64_t cumulative = 0;
  for (size_t i = 0; i < waits.buckets.size(); ++i) {
    cumulative += waits.buckets[i];
    const std::string le = i < FenceTable::WaitLatency::kBounds.size()
                               ? absl::StrCat(absl::ToDoubleSeconds(FenceTable::WaitLatency::kBounds[i]))
                               : std::string("+Inf");
    absl::StrAppend(&out, "bufferd_fence_wait_seconds_bucket{le=\"", le, "\"} ", cumulative, "\n");
  }
  absl::StrAppend(&out, "bufferd_fence_wait_seconds_sum ", absl::ToDoubleSeconds(waits.sum), "\n");
  absl::StrAppend(&out, "bufferd_fence_wait_seconds_count ", waits.count, "\n");
  return out;
}

}  // namespace bufferd
