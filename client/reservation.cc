// The client library's side of reservation objects: Buffer's fences and
// implicit sync (BeginCpuAccess / EndCpuAccess).
#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "client/client.h"
#include "client/connection.h"

namespace bufferd {
namespace {

v1::FenceUsage ForAccess(Cpu access) {
  return access == Cpu::kRead ? v1::FENCE_USAGE_READ : v1::FENCE_USAGE_WRITE;
}

}  // namespace

absl::Status Buffer::AttachFence(const Fence& fence, v1::FenceUsage usage) const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Buffer");
  if (fence.connection_ != connection_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "fence ", fence.id(), " belongs to another Client's session (or was moved from)"));
  }
  v1::AttachFenceRequest request;
  request.set_buffer_handle(handle_);
  request.set_fence_id(fence.id());
  request.set_usage(usage);
  v1::AttachFenceResponse response;
  internal::Call call = connection_->NewCall();
  return connection_->Finish(
      call, connection_->fence().AttachFence(call.context.get(), request, &response));
}

absl::Status Buffer::AttachPoint(const Timeline& timeline, uint64_t point,
                                 v1::FenceUsage usage) const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Buffer");
  if (timeline.connection_ != connection_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "timeline ", timeline.id(), " belongs to another Client's session (or was moved from)"));
  }
  v1::AttachFenceRequest request;
  request.set_buffer_handle(handle_);
  request.set_timeline_id(timeline.id());
  request.set_point(point);
  request.set_usage(usage);
  v1::AttachFenceResponse response;
  internal::Call call = connection_->NewCall();
  return connection_->Finish(
      call, connection_->fence().AttachFence(call.context.get(), request, &response));
}

absl::StatusOr<v1::GetBufferFencesResponse> Buffer::GetFences(Cpu access, bool as_fd) const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Buffer");
  v1::GetBufferFencesRequest request;
  request.set_buffer_handle(handle_);
  request.set_for_access(ForAccess(access));
  request.set_as_fd(as_fd);
  v1::GetBufferFencesResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().GetBufferFences(call.context.get(), request, &response)));
  return response;
}

absl::StatusOr<std::vector<Fence>> Buffer::Fences(Cpu access) const {
  ASSIGN_OR_RETURN(v1::GetBufferFencesResponse response, GetFences(access, false));
  std::vector<Fence> fences;
  // Each is held by this session now: a Fence forgets it when dropped.
  for (const v1::FenceInfo& info : response.fences()) fences.push_back(Fence(connection_, info));
  return fences;
}

absl::StatusOr<UniqueFd> Buffer::FencesFd(Cpu access) const {
  ASSIGN_OR_RETURN(v1::GetBufferFencesResponse response, GetFences(access, true));
  if (response.transfer_id() == 0) return UniqueFd();
  ASSIGN_OR_RETURN(UniqueFd fd, connection_->TakeFd(response.transfer_id()));
  return internal::CheckFenceFd(std::move(fd));
}

absl::StatusOr<std::vector<v1::FenceInfo>> Buffer::BeginCpuAccess(Cpu access,
                                                                  absl::Duration timeout) const {
  ASSIGN_OR_RETURN(std::vector<Fence> fences, Fences(access));
  if (fences.empty()) return std::vector<v1::FenceInfo>();
  std::vector<uint64_t> ids;
  for (const Fence& fence : fences) ids.push_back(fence.id());
  ASSIGN_OR_RETURN(std::vector<v1::FenceInfo> ended,
                   internal::WaitFences(*connection_, ids, /*all=*/true, timeout));
  // What the wait says of each (its end), on what the listing said (name,
  // usage, owner).
  std::vector<v1::FenceInfo> waited;
  for (const Fence& fence : fences) {
    v1::FenceInfo info = fence.info();
    for (const v1::FenceInfo& end : ended) {
      if (end.fence_id() != info.fence_id()) continue;
      info.set_state(end.state());
      info.set_status(end.status());
      info.set_message(end.message());
      *info.mutable_signaled_at() = end.signaled_at();
    }
    waited.push_back(std::move(info));
  }
  return waited;
}

absl::Status Buffer::EndCpuAccess() const {
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Buffer");
  return absl::OkStatus();
}

absl::StatusOr<Buffer::ScopedCpuAccess> Buffer::CpuAccess(Cpu access,
                                                          absl::Duration timeout) const {
  ASSIGN_OR_RETURN(std::vector<v1::FenceInfo> waited, BeginCpuAccess(access, timeout));
  return ScopedCpuAccess(this, std::move(waited));
}

}  // namespace bufferd
