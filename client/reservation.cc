// The client library's side of reservation objects: Buffer's fences and
// implicit sync (BeginCpuAccess / EndCpuAccess).
#include <fcntl.h>
#include <linux/futex.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/errno_status.h"
#include "client/client.h"
#include "client/connection.h"
#include "fences/fence_page.h"
#include "fences/reservation_page.h"
#include "fences/timeline_shm.h"

namespace bufferd {
namespace {

v1::FenceUsage ForAccess(Cpu access) {
  return access == Cpu::kRead ? v1::FENCE_USAGE_READ : v1::FENCE_USAGE_WRITE;
}

// The words of the waited fences in their owners' fence pages
// (fences/fence_page.h), and each word's value once its fence signalled OK.
struct PageWords {
  // Held while the words are read.
  absl::InlinedVector<std::shared_ptr<const Mapping>, 4> pages;
  absl::InlinedVector<const uint32_t*, 4> words;
  absl::InlinedVector<uint32_t, 4> signalled;
};

// PageWords for `waited`, each owner's page mapped through the buffer
// `handle` the first time (then kept by the Connection); nullopt unless
// every fence has a word (a session's own fences, merged, imported and
// point fences have none here): the status slot alone then says when they
// are done.
std::optional<PageWords> WatchFencePages(internal::Connection& connection, uint64_t handle,
                                         const std::vector<v1::FenceInfo>& waited) {
  // One futex_waitv word goes to the status slot.
  if (waited.empty() || waited.size() >= FUTEX_WAITV_MAX) return std::nullopt;
  PageWords out;
  for (const v1::FenceInfo& info : waited) {
    if (info.kind() != v1::FENCE_KIND_CREATED || info.page_slot() == 0 ||
        info.page_slot() >= fence_page::kSlots || info.page_generation() == 0 ||
        info.owner_session() == connection.session_id()) {
      return std::nullopt;
    }
    std::shared_ptr<const Mapping> page = connection.PeerFencePage(info.owner_session());
    if (page == nullptr && !connection.RoomForPeerFencePage()) return std::nullopt;
    if (page == nullptr) {
      v1::OpenFencePageRequest request;
      request.set_buffer_handle(handle);
      request.set_fence_id(info.fence_id());
      v1::OpenFencePageResponse response;
      internal::Call call = connection.NewCall();
      if (!connection
               .Finish(call,
                       connection.fence().OpenFencePage(call.context.get(), request, &response))
               .ok()) {
        return std::nullopt;  // signalled meanwhile, most likely
      }
      absl::StatusOr<UniqueFd> fd = connection.TakeFd(response.transfer_id());
      if (!fd.ok() || response.owner_session() != info.owner_session()) return std::nullopt;
      absl::StatusOr<Mapping> map = internal::MapDeliveredPage(
          *fd, fence_page::kPageSize, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL,
          "the delivered fence page");
      if (!map.ok()) return std::nullopt;
      page = std::make_shared<const Mapping>(*std::move(map));
      connection.KeepPeerFencePage(info.owner_session(), page);
    }
    out.words.push_back(reinterpret_cast<const uint32_t*>(page->data()) + info.page_slot());
    out.signalled.push_back(fence_page::Word(info.page_generation(), v1::FENCE_STATUS_OK));
    out.pages.push_back(std::move(page));
  }
  return out;
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
  // Before the call: a holder may sleep on the fence's word as soon as it
  // is attached, and its signal must wake it.
  fence.attached_.store(true, std::memory_order_release);
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
  const uint32_t slot = response.status_slot();
  if (slot != 0 && slot < reservation::kSlots) status_slot_.store(slot, std::memory_order_relaxed);
  std::vector<v1::FenceInfo> waited(response.fences().begin(), response.fences().end());
  if (waited.empty()) return waited;
  if (std::optional<absl::StatusOr<std::vector<v1::FenceInfo>>> direct =
          WaitOnTimelines(response, left());
      direct.has_value()) {
    if (direct->ok() || !absl::IsDeadlineExceeded(direct->status())) return *std::move(direct);
    // The caller's timeout: name what is still pending.
    return Settle(access, std::move(waited), response, /*wait=*/false, left(), timeout);
  }
  const reservation::Slot* slots = connection_->reservation_slots();
  if (slot == 0 || slot >= reservation::kSlots || slots == nullptr) {
    // No room in the page, or no page: wait through the daemon.
    return Settle(access, std::move(waited), response, /*wait=*/true, left(), timeout);
  }

  // Sleep on the slot until every fence listed (attached up to status_seq)
  // has signalled, as the daemon publishes it; and on the fences' words in
  // their owners' fence pages, where an owner's signal wakes this thread
  // itself (one wake, no daemon in between) when each one signalled OK.
  const reservation::Slot& watched = slots[slot];
  // (A poll opens no page: that would be a round trip.)
  const std::optional<PageWords> pages =
      timeout_ns > 0 ? WatchFencePages(*connection_, handle_, waited) : std::nullopt;
  absl::InlinedVector<const uint32_t*, 8> words = {&watched.seq};
  if (pages.has_value()) words.insert(words.end(), pages->words.begin(), pages->words.end());
  absl::InlinedVector<uint32_t, 8> expecting(words.size());
  // The words slept on: all of them, or the slot alone without futex_waitv,
  // or once more than kMaxIdleWakes + one per word woke this thread without
  // the slot moving or every word reading OK. An honest owner wakes its
  // word once per fence, after writing it; anyone mapping an owner's page
  // (the owner, or another of its readers) could wake it at will, flipping
  // it or not: then only the daemon, through the slot, wakes it.
  size_t sleep_on = words.size();
  constexpr size_t kMaxIdleWakes = 64;
  size_t idle_wakes = 0;
  for (;;) {
    reservation::SlotState state;
    uint32_t expected = 0;
    if (reservation::Read(watched, &state)) {
      if (state.buffer_id != id()) {
        // Not this buffer's slot: the page was made again (this one is
        // dead: the next access asks for the new one), or the session is
        // ending. Wait through the daemon.
        connection_->ForgetReservationPage(slots);
        return Settle(access, std::move(waited), response, /*wait=*/true, left(), timeout);
      }
      if (reservation::Clear(state, access == Cpu::kWrite, response.status_seq())) {
        if (state.failures != response.status_failures()) {
          // Something failed: ask how.
          return Settle(access, std::move(waited), response, /*wait=*/false, left(), timeout);
        }
        // Every one ended OK (the failure count did not move).
        for (v1::FenceInfo& info : waited) {
          info.set_state(v1::FENCE_STATE_SIGNALED);
          info.set_status(v1::FENCE_STATUS_OK);
        }
        return waited;
      }
      expected = state.seq;
    } else {
      // The daemon is mid-write (or died mid-write): sleep on the odd seq,
      // which its end of the write changes.
      expected = reservation::LoadRelaxed(watched.seq);
    }
    expecting[0] = expected;
    if (pages.has_value()) {
      bool all_ok = true;
      for (size_t i = 0; i < pages->words.size(); ++i) {
        expecting[i + 1] = fence_page::Load(*pages->words[i]);
        all_ok &= expecting[i + 1] == pages->signalled[i];
      }
      if (all_ok) {
        // Each owner wrote OK for its fence's generation: done, before the
        // daemon hears of it.
        for (v1::FenceInfo& info : waited) {
          info.set_state(v1::FENCE_STATE_SIGNALED);
          info.set_status(v1::FENCE_STATUS_OK);
        }
        return waited;
      }
    }
    if (timeline::MonotonicNs() >= until_ns) break;
    bool capped = false;
    absl::Status slept =
        timeline::WaitAny(words.data(), expecting.data(), sleep_on, until_ns, &capped);
    if (absl::IsDeadlineExceeded(slept)) break;
    if (!slept.ok() && sleep_on > 1) {
      // No futex_waitv here (before Linux 5.16, or a sandbox): sleep on the
      // status slot alone; the words are still looked at at each wake.
      sleep_on = 1;
      continue;
    }
    RETURN_IF_ERROR(slept);
    if (sleep_on > 1 && !capped && reservation::LoadRelaxed(watched.seq) == expected &&
        ++idle_wakes > kMaxIdleWakes + pages->words.size()) {
      sleep_on = 1;
    }
    // A wake that changed nothing (WaitAny looks again every 20 ms): the
    // session may have ended under it, with nobody left to write the slot.
    if (reservation::LoadRelaxed(watched.seq) == expected && connection_->Ended()) {
      return absl::UnavailableError(
          "the session ended while BeginCpuAccess waited (the daemon is gone, or fd.sock was "
          "shut)");
    }
  }
  // The deadline: name what is still pending.
  return Settle(access, std::move(waited), response, /*wait=*/false, left(), timeout);
}

std::optional<absl::StatusOr<std::vector<v1::FenceInfo>>> Buffer::WaitOnTimelines(
    const v1::GetBufferFencesResponse& asked, absl::Duration left) const {
  absl::InlinedVector<std::shared_ptr<const Timeline>, 4> timelines;
  absl::InlinedVector<TimelinePoint, 4> points;
  for (const v1::FenceInfo& info : asked.fences()) {
    if (info.kind() != v1::FENCE_KIND_TIMELINE_POINT || info.timeline_id() == 0 ||
        info.timeline_point() == 0) {
      return std::nullopt;
    }
    std::shared_ptr<const Timeline> timeline =
        connection_->KeptTimeline(handle_, info.timeline_id());
    if (timeline != nullptr && timeline->ended()) {
      // Over: nothing more of it will be attached. Opened again if listed.
      connection_->ForgetTimeline(handle_, info.timeline_id());
      timeline = nullptr;
    }
    if (timeline == nullptr) {
      v1::ImportTimelineRequest request;
      request.set_buffer_handle(handle_);
      request.set_timeline_id(info.timeline_id());
      // It holds the Connection without owning it: the Connection keeps it.
      absl::StatusOr<Timeline> opened = Timeline::Import(
          std::shared_ptr<internal::Connection>(std::shared_ptr<void>(), connection_.get()),
          std::move(request));
      // Signalled and pruned meanwhile (NOT_FOUND), or out of room: the page.
      if (!opened.ok()) return std::nullopt;
      timeline = std::make_shared<const Timeline>(*std::move(opened));
      if (connection_->KeepTimeline(handle_, info.timeline_id(), timeline)) {
        kept_timelines_.store(true);
      }
    }
    points.push_back({timeline.get(), info.timeline_point()});
    timelines.push_back(std::move(timeline));
  }
  absl::StatusOr<std::vector<PointResult>> results =
      Timeline::WaitPoints(connection_, std::span(points.data(), points.size()), /*all=*/true, left,
                           absl::ZeroDuration(), TimelineWait::kReached);
  if (!results.ok()) {
    // The caller's timeout, or the session's end: as a wait on the page.
    if (absl::IsDeadlineExceeded(results.status()) ||
        (absl::IsUnavailable(results.status()) && connection_->Ended())) {
      return results.status();
    }
    // No wait slot free, a waker the daemon said to try again for: the page.
    return std::nullopt;
  }
  std::vector<v1::FenceInfo> waited(asked.fences().begin(), asked.fences().end());
  for (size_t i = 0; i < waited.size(); ++i) {
    const v1::FenceStatus status = (*results)[i].status;
    waited[i].set_state(v1::FENCE_STATE_SIGNALED);
    waited[i].set_status(status);
    waited[i].set_message((*results)[i].message);
    // The timeline has ended: no later point of it will come.
    if (status == v1::FENCE_STATUS_OWNER_DIED || status == v1::FENCE_STATUS_CANCELLED) {
      connection_->ForgetTimeline(handle_, waited[i].timeline_id());
    }
  }
  return waited;
}

absl::StatusOr<std::vector<v1::FenceInfo>> Buffer::Settle(Cpu access,
                                                          std::vector<v1::FenceInfo> waited,
                                                          const v1::GetBufferFencesResponse& asked,
                                                          bool wait, absl::Duration left,
                                                          absl::Duration timeout) const {
  const uint32_t since = asked.status_failures();
  // Those of `waited` the daemon still lists as pending.
  auto still_pending = [&](const v1::GetBufferFencesResponse& now) {
    std::vector<uint64_t> ids;
    for (const v1::FenceInfo& info : waited) {
      for (const v1::FenceInfo& listed : now.fences()) {
        if (listed.fence_id() == info.fence_id() && listed.state() != v1::FENCE_STATE_SIGNALED) {
          ids.push_back(info.fence_id());
          break;
        }
      }
    }
    return ids;
  };
  ASSIGN_OR_RETURN(v1::GetBufferFencesResponse now, AskFences(access, since));
  std::vector<uint64_t> pending = still_pending(now);
  if (wait && !pending.empty()) {
    // Held now (the listing holds nothing), and waited for in the daemon.
    ASSIGN_OR_RETURN(std::vector<Fence> held, Fences(access));
    std::vector<uint64_t> ids;
    for (const Fence& fence : held) {
      if (std::find(pending.begin(), pending.end(), fence.id()) != pending.end()) {
        ids.push_back(fence.id());
      }
    }
    if (!ids.empty()) {
      RETURN_IF_ERROR(
          internal::WaitFences(*connection_, ids, /*all=*/true, left, timeout).status());
    }
    ASSIGN_OR_RETURN(now, AskFences(access, since));
    pending = still_pending(now);
  }
  // The daemon keeps the latest failures of a buffer only (and none once
  // nobody holds the buffer's record: the count starts again): a fence
  // missing from what it returned may have failed all the same.
  const uint32_t returned = static_cast<uint32_t>(now.failed_size());
  const bool restarted = now.status_failures() < since;
  const uint32_t not_kept = restarted ? 0
                            : now.status_failures() - since > returned
                                ? now.status_failures() - since - returned
                                : 0;
  const bool lost = restarted || not_kept > 0;
  for (v1::FenceInfo& info : waited) {
    if (std::find(pending.begin(), pending.end(), info.fence_id()) != pending.end()) continue;
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
      info.set_message(
          restarted ? std::string("signalled; how is no longer known (the buffer's failure "
                                  "record started again while this access waited)")
                    : absl::StrCat("signalled; how is no longer known (", not_kept,
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
  // No page here (never sent, lost on the way, or found dead): the daemon
  // makes it again.
  request.set_new_page(connection_->reservation_slots() == nullptr);
  if (failures_since.has_value()) request.set_failures_since(*failures_since);
  v1::GetBufferFencesResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->fence().GetBufferFences(call.context.get(), request, &response)));
  if (response.status_page_transfer_id() != 0) {
    // A page that cannot be had leaves the access as it was (it asks each
    // time; the next call asks for a new page).
    absl::StatusOr<UniqueFd> page = connection_->TakeFd(response.status_page_transfer_id());
    absl::Status mapped =
        page.ok() ? connection_->SetReservationPage(*std::move(page)) : page.status();
    if (!mapped.ok()) response.set_status_slot(0);
  }
  return response;
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
