#include "daemon/requests.h"

#include "absl/strings/str_cat.h"
#include "base/client_text.h"
#include "base/errno_status.h"

namespace bufferd {
namespace {

// Configured heap names are [a-z0-9_-]{1,32}: a longer request names none.
constexpr size_t kMaxHeapNameBytes = 32;

}  // namespace

absl::StatusOr<AllocationPlan> CheckAllocateRequest(const HeapRegistry& heaps,
                                                    const v1::QuotaConfig& quotas,
                                                    const v1::AllocateRequest& request) {
  if (request.heap().size() > kMaxHeapNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("heap name is ", request.heap().size(),
                                                   " bytes; heap names are at most ",
                                                   kMaxHeapNameBytes));
  }
  AllocationPlan plan;
  ASSIGN_OR_RETURN(plan.heap, heaps.Get(request.heap()));
  if (request.size() == 0) return absl::InvalidArgumentError("size must be greater than 0");
  RETURN_IF_ERROR(CheckClientText("name", request.name()));
  if (request.size() > (uint64_t{1} << 62)) {
    return absl::InvalidArgumentError(absl::StrCat("size ", request.size(), " is too large"));
  }
  const uint64_t page = plan.heap->page_size();
  plan.rounded = (request.size() + page - 1) / page * page;
  const uint64_t max_allocation = quotas.max_allocation_bytes();
  if (max_allocation != 0 && plan.rounded > max_allocation) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "quota max_allocation_bytes: asked for ", FormatBytes(plan.rounded), " on heap '",
        plan.heap->name(), "', the largest allowed allocation is ", FormatBytes(max_allocation)));
  }
  return plan;
}

absl::StatusOr<absl::Duration> CheckExportTtl(const v1::ExportRequest& request,
                                              absl::Duration default_ttl, absl::Duration max_ttl) {
  const absl::Duration ttl =
      request.ttl_ms() == 0 ? default_ttl : absl::Milliseconds(request.ttl_ms());
  if (ttl > max_ttl) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ttl_ms ", request.ttl_ms(), " is above the maximum of ",
        absl::ToInt64Milliseconds(max_ttl), " (", absl::ToInt64Minutes(max_ttl), " minutes)"));
  }
  return ttl;
}

}  // namespace bufferd
