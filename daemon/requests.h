// Checks of what a client asks for, before any state changes: the sizes,
// names, frames and lifetimes in a request, each refused with
// INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for a configured limit) naming
// what was wrong, never echoing a client's string at length.
//
// Pure functions; thread-safe.
#ifndef BUFFERD_DAEMON_REQUESTS_H_
#define BUFFERD_DAEMON_REQUESTS_H_

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "base/frame_format.h"
#include "bufferd/v1/buffer.pb.h"
#include "bufferd/v1/config.pb.h"
#include "google/protobuf/message.h"
#include "heaps/heap_registry.h"

namespace bufferd {

// What the config says about allocations.
struct AllocationRules {
  v1::QuotaConfig quotas;
  // Usage name -> heaps to try, in order.
  std::map<std::string, std::vector<std::string>> usages;
  uint32_t max_buffers_per_call = 64;
  uint32_t max_frame_dimension = 16384;
};
// The rules a config sets (its usages, quotas and limits, with defaults).
AllocationRules RulesFromConfig(const v1::Config& config);

// Most bytes of a metadata tag.
inline constexpr size_t kMaxTagBytes = 64;

// A buffer's metadata as its record keeps it: a value, checked (by
// CheckMetadata), without the heap objects of its proto (a message per
// nested message, a string), which a frame Allocate cannot spare. Answers
// carry a proto of it (FillProto).
struct KeptMetadata {
  // x, y, width, height.
  std::optional<std::array<uint32_t, 4>> crop;
  v1::ColorSpace color_space = v1::COLOR_SPACE_UNSPECIFIED;
  v1::ColorRange color_range = v1::COLOR_RANGE_UNSPECIFIED;
  std::array<char, kMaxTagBytes> tag{};
  uint8_t tag_size = 0;
  uint64_t generation = 0;

  // `metadata` must have passed CheckMetadata (its tag fits).
  static KeptMetadata Of(const v1::FrameMetadata& metadata);
  void FillProto(v1::FrameMetadata& out) const;
};

// An Allocate (or AllocateSet) request that may go ahead.
struct AllocationPlan {
  // The heaps to try, in order (one for `heap`).
  std::vector<Heap*> heaps;
  // Bytes each buffer needs: the request's size, or its frame's.
  uint64_t size = 0;
  uint32_t count = 1;
  // The layout of a frame request (a value, not a proto: the buffer's
  // record keeps it so, and only answers carry a proto of it).
  std::optional<FrameFormat> frame;
  // The request's metadata, checked.
  std::optional<KeptMetadata> metadata;

  // Whether one of the heaps may block (prefaulting, waiting for a
  // refill): such allocations run off the RPC threads.
  bool may_block() const {
    for (const Heap* heap : heaps) {
      if (heap->allocation_may_block()) return true;
    }
    return false;
  }
};
absl::StatusOr<AllocationPlan> CheckAllocateRequest(const HeapRegistry& heaps,
                                                    const AllocationRules& rules,
                                                    const v1::AllocateRequest& request,
                                                    uint32_t count = 1);

// `size` rounded to the heap's page; RESOURCE_EXHAUSTED (a HeapRefused
// kTooLarge) above the quota max_allocation_bytes (0: none), or if `count`
// such buffers cannot be counted in 64 bits.
absl::StatusOr<uint64_t> RoundForHeap(const Heap& heap, uint64_t max_allocation_bytes,
                                      uint64_t size, uint32_t count = 1);

// Metadata a client sets (at Allocate or SetMetadata), for a buffer with
// `frame` (null: not a frame). `field` prefixes errors ("metadata").
absl::Status CheckMetadata(const v1::FrameMetadata& metadata, const FrameFormat* frame,
                           absl::string_view field);

// INVALID_ARGUMENT naming the first field of `message` (or of a message in
// it) that this daemon does not know: a newer client's field is refused,
// never silently ignored.
// Checked once per call, on the whole RPC request, by the services.
absl::Status CheckNoUnknownFields(const google::protobuf::Message& message, absl::string_view name);
// The same for an Allocate request ("request"), without walking its
// descriptors on the way to "none" (that walk cost as much as the rest of
// the checks): it asks each message it holds for its unknown fields through
// a reflection looked up once. It looks into frame, metadata and
// metadata.crop, the messages an AllocateRequest holds (allocation_test
// holds the proto to that list).
absl::Status CheckNoUnknownFields(const v1::AllocateRequest& request);

// How long an Export's token lives: its ttl_ms, or `default_ttl`; at most
// `max_ttl`.
absl::StatusOr<absl::Duration> CheckExportTtl(const v1::ExportRequest& request,
                                              absl::Duration default_ttl, absl::Duration max_ttl);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_REQUESTS_H_
