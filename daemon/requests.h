// Checks of what a client asks for, before any state changes: the sizes,
// names and lifetimes in a request, each refused with INVALID_ARGUMENT (or
// RESOURCE_EXHAUSTED for a configured limit) naming what was wrong, never
// echoing a client's string at length.
//
// Pure functions; thread-safe.
#ifndef BUFFERD_DAEMON_REQUESTS_H_
#define BUFFERD_DAEMON_REQUESTS_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bufferd/v1/buffer.pb.h"
#include "bufferd/v1/config.pb.h"
#include "heaps/heap_registry.h"

namespace bufferd {

// An Allocate request that may go ahead: its heap and its size rounded to
// the heap's page (the most a quota is charged before the heap says what
// the buffer really got).
struct AllocationPlan {
  Heap* heap = nullptr;
  uint64_t rounded = 0;
};
absl::StatusOr<AllocationPlan> CheckAllocateRequest(const HeapRegistry& heaps,
                                                    const v1::QuotaConfig& quotas,
                                                    const v1::AllocateRequest& request);

// How long an Export's token lives: its ttl_ms, or `default_ttl`; at most
// `max_ttl`.
absl::StatusOr<absl::Duration> CheckExportTtl(const v1::ExportRequest& request,
                                              absl::Duration default_ttl, absl::Duration max_ttl);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_REQUESTS_H_
