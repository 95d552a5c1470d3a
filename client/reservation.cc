// The client library's side of reservation objects: Buffer's fences and
// implicit sync (BeginCpuAccess / EndCpuAccess).
#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/errno_status.h"
#include "fences/reservation_page.h"
#include "fences/timeline_shm.h"
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
  if (connection_ == nullptr) return absl::FailedPreconditionError("moved-from Buffer");
  // Nothing pending, as the status page says: no round trip, no syscall.
  const uint32_t slot = status_slot_.load(std::memory_order_relaxed);
  const reservation::Slot* slots = connection_->reservation_slots();
  reservation::SlotState state;
  if (slot != 0 && slot < reservation::kSlots && slots != nullptr &&
      reservation::Read(slots[slot], &state) && state.buffer_id == id() &&
      reservation::Clear(state, access == Cpu::kWrite, UINT64_MAX)) {
    return std::vector<v1::FenceInfo>();
  }
  return WaitForAccess(access, timeout);
}

absl::StatusOr<std::vector<v1::FenceInfo>> Buffer::WaitForAccess(Cpu access,
                                                                 absl::Duration timeout) const {
  // Saturating: a timeout past the clock's range is no timeout.
  const int64_t start_ns = timeline::MonotonicNs();
  const int64_t timeout_ns = absl::ToInt64Nanoseconds(std::max(timeout, absl::ZeroDuration()));
  const int64_t until_ns =
      timeout_ns >= INT64_MAX - start_ns ? INT64_MAX : start_ns + timeout_ns;
  auto left = [&] {
    return until_ns == INT64_MAX
               ? absl::InfiniteDuration()
               : std::max(absl::Nanoseconds(until_ns - timeline::MonotonicNs()),
                          absl::ZeroDuration());
  };
  ASSIGN_OR_RETURN(v1::GetBufferFencesResponse response, AskFences(access, std::nullopt));
  if (response.status_page_transfer_id() != 0) {
    ASSIGN_OR_RETURN(UniqueFd page, connection_->TakeFd(response.status_page_transfer_id()));
    RETURN_IF_ERROR(connection_->SetReservationPage(std::move(page)));
  }
  const uint32_t slot = response.status_slot();
  if (slot != 0 && slot < reservation::kSlots) status_slot_.store(slot, std::memory_order_relaxed);
  std::vector<v1::FenceInfo> waited(response.fences().begin(), response.fences().end());
  if (waited.empty()) return waited;
  const reservation::Slot* slots = connection_->reservation_slots();
  if (slot == 0 || slot >= reservation::kSlots || slots == nullptr) {
    // No room in the page: wait through the daemon.
    return WaitThroughDaemon(access, left(), timeout);
  }

  // Sleep on the slot until every fence listed (attached up to status_seq)
  // has signalled, as the daemon publishes it.
  const reservation::Slot& watched = slots[slot];
  bool clear = false;
  bool failed = true;
  for (;;) {
    reservation::SlotState state;
    uint32_t expected = 0;
    if (reservation::Read(watched, &state)) {
      // The buffer gone from the page (the page was made again, or the
      // session is ending): wait through the daemon for what is left.
      if (state.buffer_id != id()) return WaitThroughDaemon(access, left(), timeout);
      if (reservation::Clear(state, access == Cpu::kWrite, response.status_seq())) {
        clear = true;
        failed = state.failures != response.status_failures();
        break;
      }
      expected = state.seq;
    } else {
      // The daemon is mid-write (or died mid-write): sleep on the odd seq,
      // which its end of the write changes.
      expected = reservation::LoadRelaxed(watched.seq);
    }
    if (timeline::MonotonicNs() >= until_ns) break;
    const uint32_t* words[] = {&watched.seq};
    const uint32_t expecting[] = {expected};
    absl::Status slept = timeline::WaitAny(words, expecting, 1, until_ns);
    if (absl::IsDeadlineExceeded(slept)) break;
    RETURN_IF_ERROR(slept);
    // A wake that changed nothing (WaitAny looks again every 20 ms): the
    // session may have ended under it, with nobody left to write the slot.
    if (reservation::LoadRelaxed(watched.seq) == expected && connection_->Ended()) {
      return absl::UnavailableError(
          "the session ended while BeginCpuAccess waited (the daemon is gone, or fd.sock was "
          "shut)");
    }
  }
  if (clear && !failed) {
    // Every one ended OK (the failure count did not move).
    for (v1::FenceInfo& info : waited) {
      info.set_state(v1::FENCE_STATE_SIGNALED);
      info.set_status(v1::FENCE_STATUS_OK);
    }
    return waited;
  }
  // Ask what failed and what is still pending.
  ASSIGN_OR_RETURN(v1::GetBufferFencesResponse now,
                   AskFences(access, response.status_failures()));
  // The daemon keeps the latest failures of a buffer only: if more came
  // since this access asked than it returned, a fence missing from them may
  // have failed too.
  const uint32_t since = response.status_failures();
  const uint32_t not_kept =
      now.status_failures() - since > static_cast<uint32_t>(now.failed_size())
          ? now.status_failures() - since - static_cast<uint32_t>(now.failed_size())
          : 0;
  const bool lost = not_kept > 0;
  std::vector<uint64_t> pending;
  for (v1::FenceInfo& info : waited) {
    const bool still = std::any_of(now.fences().begin(), now.fences().end(),
                                   [&](const v1::FenceInfo& f) { return f.fence_id() == info.fence_id(); });
    if (still) {
      pending.push_back(info.fence_id());
      continue;
    }
    info.set_state(v1::FENCE_STATE_SIGNALED);
    info.set_status(v1::FENCE_STATUS_OK);
    bool found = false;
    for (const v1::FenceInfo& end : now.failed()) {
      if (end.fence_id() != info.fence_id()) continue;
      info.set_status(end.status());
      info.set_message(end.message());
      *info.mutable_signaled_at() = end.signaled_at();
      found = true;
    }
    if (!found && lost) {
      info.set_status(v1::FENCE_STATUS_UNSPECIFIED);
      info.set_message(absl::StrCat("signalled; how is no longer known (", not_kept,
                                    " failures on this buffer were not kept while this access "
                                    "waited)"));
    }
  }
  if (!pending.empty()) {
    return absl::DeadlineExceededError(
        absl::StrCat("fence ", absl::StrJoin(pending, ", "), " not signalled within ",
                     absl::FormatDuration(timeout)));
  }
  return waited;
}

absl::StatusOr<v1::GetBufferFencesResponse> Buffer::AskFences(
    Cpu access, std::optional<uint32_t> failures_since) const {
  v1::GetBufferFencesRequest request;
  request.set_buffer_handle(handle_);
  request.set_for_access(ForAccess(access));
  request.set_subscribe(true);
  // No page here (never sent, or lost on the way): the daemon makes it again.
  request.set_new_page(connection_->reservation_slots() == nullptr);
  if (failures_since.has_value()) request.set_failures_since(*failures_since);
  v1::GetBufferFencesResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().GetBufferFences(call.context.get(), request, &response)));
  return response;
}

absl::StatusOr<std::vector<v1::FenceInfo>> Buffer::WaitThroughDaemon(
    Cpu access, absl::Duration left, absl::Duration timeout) const {
  ASSIGN_OR_RETURN(std::vector<Fence> fences, Fences(access));
  if (fences.empty()) return std::vector<v1::FenceInfo>();
  std::vector<uint64_t> ids;
  for (const Fence& fence : fences) ids.push_back(fence.id());
  ASSIGN_OR_RETURN(std::vector<v1::FenceInfo> ended,
                   internal::WaitFences(*connection_, ids, /*all=*/true, left, timeout));
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
