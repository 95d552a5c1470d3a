// Fuzzes what sessions do to the daemon's tables, from the inside: each
// input is a sequence of up to 64 operations on a fresh DaemonState,
// FenceTable, ReservationTable and TimelineTable (the daemon's), made by
// up to 6 sessions of 2 uids. Operations: open, detach and close sessions;
// allocate (sizes, heap lists, frames with any fourcc and dimensions, sets);
// release; export with the right fd, another buffer's, a read-only one or
// none; import good and garbage tokens; freeze; expire tokens; create,
// signal, merge, export, import (pipes, eventfds), hold, forget and wait on
// fences; attach fences to buffers, ask what an access waits for, subscribe
// to a buffer's status page; create timelines (counter pages sealed right
// or not), write their counters (forwards, backwards), hold, forget, register
// wakers, watch points, put fences behind points and settle them.
//
// After every operation the accounting must add up, counted two ways:
// buffers listed = totals; each heap's used bytes = its live buffers' sizes;
// each session's charged bytes = the buffers it holds; handles listed =
// totals = the handles the sessions hold; each live buffer has a holder;
// each live token keeps its fd in the budget; every handle a session was
// given and did not release still answers (and no other does); fences
// pending = listed pending; fences are attached only to live buffers, at
// most the limit on each side. At the end every session closes and
// everything must be zero: buffers, handles, tokens, heap bytes, fences,
// waits, reservations, status pages, timelines, the fd budget, and the
// process's open fds are back where they were; no watched point answered
// twice.
#include <fcntl.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <libdrm/drm_fourcc.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/event_loop.h"
#include "base/fd_budget.h"
#include "base/fd_count.h"
#include "base/mapping.h"
#include "base/unique_fd.h"
#include "daemon/state.h"
#include "fences/fence_table.h"
#include "fences/reservations.h"
#include "fences/timeline_shm.h"
#include "fences/timeline_table.h"
#include "heaps/system_heap.h"
#include "testing/fake_heap.h"
#include "tests/fuzz/check.h"

namespace bufferd {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint32_t kFencesPerBuffer = 4;

// The heaps: made once per process (a heap's reservation is its for good,
// as in the daemon).
struct Fixture {
  Fixture() {
    FUZZ_CHECK(heaps.Add(std::make_unique<SystemHeap>("system", 64 * kMiB)).ok());
    FUZZ_CHECK(heaps
                   .Add(std::make_unique<testing::FakeHeap>(testing::FakeHeap::Options{
                       .name = "carveout", .kind = HeapKind::kCarveout, .capacity = 4 * kMiB}))
                   .ok());
    FUZZ_CHECK(heaps
                   .Add(std::make_unique<testing::FakeHeap>(testing::FakeHeap::Options{
                       .name = "pool", .capacity = 1 * kMiB, .pool_buffers = 3}))
                   .ok());
  }
  HeapRegistry heaps;
};

// A handle a session was given, with the fd it was given.
struct Held {
  uint64_t session = 0;
  uint64_t handle = 0;
  uint64_t buffer = 0;
  UniqueFd fd;
};

class Run {
 public:
  Run(Fixture& fixture, FuzzedDataProvider& input)
      : fixture_(fixture),
        input_(input),
        fences_(&loop_, &budget_, Limits()),
        reservations_(&fences_, ReservationLimits{.max_fences_per_buffer = kFencesPerBuffer}),
        timelines_(&loop_, &budget_, TimelineLimitsForFuzz()) {
    FUZZ_CHECK(loop_.Init().ok());
    loop_.Start();
    DaemonState::Options options;
    options.quotas.set_max_bytes_per_session(6 * kMiB);
    options.quotas.set_max_bytes_per_uid(10 * kMiB);
    options.quotas.set_max_buffers_per_session(24);
    options.usages["frames"] = {"carveout", "pool", "system"};
    options.max_buffers_per_call = 8;
    options.fd_budget = &budget_;
    options.default_token_ttl = absl::Seconds(30);
    state_ = std::make_unique<DaemonState>(&fixture.heaps, options);
  }

  void Go() {
    for (int step = 0; step < 64 && input_.remaining_bytes() > 0; ++step) {
      Step();
      Check();
      if (trace_) {
        const DaemonState::Totals totals = state_->totals();
        std::fprintf(stderr,
                     " -> %lu buffers, %lu handles, %lu tokens (%lu export fds), %lu pending "
                     "fences, %zu timelines\n",
                     totals.buffers, totals.handles, totals.pending_tokens,
                     budget_.usage().of(FdUse::kExport), fences_.counts().pending,
                     timelines_.size());
      }
    }
    End();
  }

 private:
  // What each operation number does (Step), for the trace.
  static constexpr const char* kOpNames[] = {
      "open session",
      "close session",
      "detach session",
      "allocate",
      "allocate",
      "allocate",
      "allocate set",
      "release",
      "release",
      "export",
      "export",
      "import",
      "import",
      "freeze",
      "expire tokens",
      "create fence",
      "signal fence",
      "merge fences",
      "export or import a fence fd",
      "forget fence",
      "hold fence",
      "wait",
      "attach fence",
      "reservation: pending, subscribe, unsubscribe",
      "wait",
      "create timeline",
      "write timeline counter",
      "timeline: hold, forget, waker, wakers, info, wait page + scan",
      "watch timeline point",
      "fence behind a timeline point"};
  static_assert(std::size(kOpNames) == 30, "a name for each operation of Step");

  static TimelineLimits TimelineLimitsForFuzz() {
    TimelineLimits limits;
    limits.max_deadline = absl::Seconds(20);
    limits.scan_interval = absl::Milliseconds(1);
    limits.max_per_session = 4;
    limits.max_per_uid = 6;
    limits.max_timelines = 8;
    limits.max_points_behind_fences = 4;
    return limits;
  }
  static FenceLimits Limits() {
    FenceLimits limits;
    limits.default_deadline = absl::Seconds(10);
    limits.max_deadline = absl::Seconds(20);
    limits.max_pending_per_session = 6;
    limits.max_held_per_session = 12;
    limits.max_fences = 40;
    limits.max_fences_per_uid = 24;
    limits.max_waits_per_session = 8;
    limits.max_merge_ids = 6;
    limits.max_wait_ids = 6;
    return limits;
  }

  // A session id: mostly a live one, sometimes any (unknown, closed).
  uint64_t PickSession() {
    if (sessions_.empty() || input_.ConsumeIntegralInRange(0, 7) == 0) {
      return input_.ConsumeIntegralInRange<uint64_t>(0, next_session_ + 1);
    }
    auto it = sessions_.begin();
    std::advance(it, input_.ConsumeIntegralInRange<size_t>(0, sessions_.size() - 1));
    return it->first;
  }
  // A held handle's index, or -1 (then an arbitrary handle id is used).
  int PickHeld() {
    if (held_.empty() || input_.ConsumeIntegralInRange(0, 7) == 0) return -1;
    return input_.ConsumeIntegralInRange<int>(0, static_cast<int>(held_.size()) - 1);
  }
  uint64_t PickTimeline() {
    if (timeline_ids_.empty() || input_.ConsumeIntegralInRange(0, 7) == 0) {
      return input_.ConsumeIntegralInRange<uint64_t>(0, 16);
    }
    return timeline_ids_[input_.ConsumeIntegralInRange<size_t>(0, timeline_ids_.size() - 1)];
  }
  // A timeline's counter page as a client makes it (a memfd mapped
  // writable, then sealed against writes by new mappings), or made wrong:
  // unsealed, the wrong size, or a pipe.
  struct CounterPage {
    UniqueFd fd;
    Mapping map;
  };
  CounterPage NewCounterPage() {
    CounterPage page;
    const int kind = input_.ConsumeIntegralInRange(0, 7);
    if (kind == 0) {
      page.fd = ReadEndOfClosedPipe();
      return page;
    }
    page.fd = UniqueFd(::memfd_create("fuzz-counters", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    FUZZ_CHECK(page.fd.valid());
    const off_t size = kind == 1 ? 100 : timeline::kPageSize;
    FUZZ_CHECK(::ftruncate(page.fd.get(), size) == 0);
    auto map = Mapping::Create(page.fd.get(), size, Mapping::Protection::kReadWrite);
    FUZZ_CHECK(map.ok(), map.status().ToString());
    page.map = *std::move(map);
    if (kind != 2) {
      FUZZ_CHECK(::fcntl(page.fd.get(), F_ADD_SEALS,
                         F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) == 0);
    }
    return page;
  }
  uint64_t PickFence() {
    if (fence_ids_.empty() || input_.ConsumeIntegralInRange(0, 7) == 0) {
      return input_.ConsumeIntegralInRange<uint64_t>(0, 64);
    }
    return fence_ids_[input_.ConsumeIntegralInRange<size_t>(0, fence_ids_.size() - 1)];
  }
  std::string PickName() { return input_.ConsumeRandomLengthString(40); }

  v1::AllocateRequest PickRequest() {
    static const char* const kHeaps[] = {"system", "carveout", "pool", "nope", ""};
    v1::AllocateRequest request;
    request.set_name(PickName());
    switch (input_.ConsumeIntegralInRange(0, 3)) {
      case 0:
        request.set_heap(kHeaps[input_.ConsumeIntegralInRange(0, 4)]);
        break;
      case 1:
        for (int i = input_.ConsumeIntegralInRange(0, 4); i > 0; --i) {
          request.add_heaps(kHeaps[input_.ConsumeIntegralInRange(0, 4)]);
        }
        break;
      case 2:
        request.set_usage(input_.ConsumeBool() ? "frames" : "unknown");
        break;
      default:
        break;  // neither: an error
    }
    if (input_.ConsumeIntegralInRange(0, 3) == 0) {
      static const uint32_t kFourccs[] = {
          DRM_FORMAT_XRGB8888, DRM_FORMAT_ARGB8888, DRM_FORMAT_ABGR8888, DRM_FORMAT_RGB565,
          DRM_FORMAT_NV12,     DRM_FORMAT_NV21,     DRM_FORMAT_YUV420,   DRM_FORMAT_P010};
      v1::FrameRequest* frame = request.mutable_frame();
      const bool small = input_.ConsumeBool();
      frame->set_width(small ? input_.ConsumeIntegralInRange<uint32_t>(0, 700)
                             : input_.ConsumeIntegral<uint32_t>());
      frame->set_height(small ? input_.ConsumeIntegralInRange<uint32_t>(0, 700)
                              : input_.ConsumeIntegral<uint32_t>());
      frame->set_fourcc(input_.ConsumeBool() ? kFourccs[input_.ConsumeIntegralInRange(0, 7)]
                                             : input_.ConsumeIntegral<uint32_t>());
      if (input_.ConsumeIntegralInRange(0, 7) == 0) {
        frame->set_modifier(input_.ConsumeIntegral<uint64_t>());
      }
      frame->set_stride_alignment(input_.ConsumeBool() ? 0 : input_.ConsumeIntegral<uint32_t>());
      if (input_.ConsumeIntegralInRange(0, 3) == 0) request.set_size(4096);  // contradictory
    } else {
      static const uint64_t kSizes[] = {0, 1, 4096, 4097, 65536, kMiB, 3 * kMiB, 5 * kMiB};
      request.set_size(input_.ConsumeBool() ? kSizes[input_.ConsumeIntegralInRange(0, 7)]
                                            : input_.ConsumeIntegralInRange<uint64_t>(0, 9 * kMiB));
    }
    request.set_freezable(input_.ConsumeBool());
    // The library lays frames out itself (and, lying, without a frame).
    request.set_caller_lays_out_frame(input_.ConsumeIntegralInRange(0, 3) == 0);
    if (input_.ConsumeIntegralInRange(0, 5) == 0) {
      v1::FrameMetadata* metadata = request.mutable_metadata();
      metadata->set_tag(input_.ConsumeRandomLengthString(80));
      metadata->mutable_crop()->set_width(input_.ConsumeIntegralInRange<uint32_t>(0, 800));
      metadata->mutable_crop()->set_height(input_.ConsumeIntegralInRange<uint32_t>(0, 800));
      metadata->set_color_space(static_cast<v1::ColorSpace>(input_.ConsumeIntegralInRange(0, 5)));
    }
    return request;
  }

  // A frame is in the answer unless the caller lays it out; the buffer
  // keeps it either way (what every later holder is told).
  void CheckFrameAnswer(uint64_t session, const v1::AllocateRequest& request,
                        const DaemonState::Grant& grant) {
    if (!request.has_frame()) return;
    FUZZ_CHECK(grant.buffer->has_frame() == !request.caller_lays_out_frame(),
               "frame in the answer: ", grant.buffer->has_frame());
    auto kept = state_->GetBuffer(session, grant.handle);
    FUZZ_CHECK(kept.ok() && kept->buffer().has_frame() &&
                   kept->buffer().frame().planes_size() > 0 &&
                   kept->buffer().frame().fourcc() == request.frame().fourcc(),
               "the buffer keeps its frame: ", kept.status().ToString());
  }

  void Keep(uint64_t session, DaemonState::PendingGrant grant) {
    // Half the time the grant is undone (a delivery that failed).
    if (input_.ConsumeIntegralInRange(0, 5) == 0) return;
    DaemonState::Grant committed = std::move(grant).Commit();
    held_.push_back(
        Held{session, committed.handle, committed.buffer->buffer_id(), std::move(committed.fd.fd)});
  }

  // The fd an Export or Freeze uploads: the handle's own, another
  // buffer's, a read-only reopen of it, a pipe, or none.
  absl::StatusOr<UniqueFd> PickUpload(int held) {
    switch (input_.ConsumeIntegralInRange(0, 5)) {
      case 0:
        return absl::NotFoundError("no upload");
      case 1:
        return ReadEndOfClosedPipe();
      case 2:
        if (!held_.empty()) {
          const Held& other = held_[input_.ConsumeIntegralInRange<size_t>(0, held_.size() - 1)];
          if (other.fd.valid()) return UniqueFd(::fcntl(other.fd.get(), F_DUPFD_CLOEXEC, 0));
        }
        return absl::NotFoundError("no other buffer");
      case 3:
        if (held >= 0 && held_[held].fd.valid()) {
          const std::string path = absl::StrCat("/proc/self/fd/", held_[held].fd.get());
          return UniqueFd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
        }
        return absl::NotFoundError("no fd");
      default:
        if (held >= 0 && held_[held].fd.valid()) {
          return UniqueFd(::fcntl(held_[held].fd.get(), F_DUPFD_CLOEXEC, 0));
        }
        return absl::NotFoundError("no fd");
    }
  }

  void Step() {
    const int op = input_.ConsumeIntegralInRange(0, 29);
    if (trace_) std::fprintf(stderr, "%s", kOpNames[op]);
    switch (op) {
      case 0: {  // open
        if (sessions_.size() >= 6) break;
        const uint64_t session = ++next_session_;
        const uid_t uid = 1000 + input_.ConsumeIntegralInRange(0, 1);
        state_->AddSession(session, uid);
        fences_.AddSession(session, uid);
        timelines_.AddSession(session, uid);
        if (input_.ConsumeBool()) {  // the page its timeline waits are armed in
          UniqueFd page(::memfd_create("fuzz-waits", MFD_CLOEXEC | MFD_ALLOW_SEALING));
          FUZZ_CHECK(page.valid() && ::ftruncate(page.get(), timeline::kPageSize) == 0);
          (void)::fcntl(page.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
          // The session's own writable view, for op 27's writes.
          absl::StatusOr<Mapping> view =
              Mapping::Create(page.get(), timeline::kPageSize, Mapping::Protection::kReadWrite);
          FUZZ_CHECK(view.ok());
          if (timelines_.SetWaitPage(session, std::move(page)).ok()) {
            wait_pages_[session] = *std::move(view);
          }
        }
        sessions_[session] = uid;
        break;
      }
      case 1: {  // close: what it held goes, its fences fail, its waits end
        const uint64_t session = PickSession();
        Close(session);
        break;
      }
      case 2: {  // detach: no new handles; what it holds stays until close
        const uint64_t session = PickSession();
        state_->DetachSession(session);
        detached_.insert(session);
        break;
      }
      case 3:
      case 4:
      case 5: {  // allocate one
        const uint64_t session = PickSession();
        const v1::AllocateRequest request = PickRequest();
        auto grant = state_->Allocate(session, request);
        if (request.caller_lays_out_frame() && !request.has_frame()) {
          FUZZ_CHECK(!grant.ok(), "caller_lays_out_frame without a frame was served");
        }
        if (grant.ok()) {
          CheckFrameAnswer(session, request, **grant);
          Keep(session, *std::move(grant));
        }
        break;
      }
      case 6: {  // allocate a set: all or nothing
        const uint64_t session = PickSession();
        const uint32_t count = input_.ConsumeIntegralInRange<uint32_t>(0, 10);
        const DaemonState::Totals before = state_->totals();
        const v1::AllocateRequest request = PickRequest();
        auto made = state_->AllocateSet(session, request, count);
        FUZZ_CHECK(!made.ok() || !request.caller_lays_out_frame() || request.has_frame(),
                   "a set with caller_lays_out_frame and no frame was served");
        if (!made.ok()) {
          const DaemonState::Totals after = state_->totals();
          FUZZ_CHECK(after.buffers == before.buffers && after.handles == before.handles,
                     "a refused set left buffers: ", made.status().ToString());
          break;
        }
        FUZZ_CHECK(made->grants.size() == count, made->grants.size(), " of ", count);
        for (auto& grant : made->grants) {
          CheckFrameAnswer(session, request, *grant);
          Keep(session, std::move(grant));
        }
        break;
      }
      case 7:
      case 8: {  // release
        const int held = PickHeld();
        if (held < 0) {
          (void)state_->Release(PickSession(), input_.ConsumeIntegral<uint64_t>());
          break;
        }
        auto dead = state_->Release(held_[held].session, held_[held].handle);
        if (sessions_.count(held_[held].session) && !detached_.count(held_[held].session)) {
          FUZZ_CHECK(dead.ok(), "release of a live handle: ", dead.status().ToString());
        }
        if (dead.ok()) Bury(*std::move(dead));
        released_.push_back({held_[held].session, held_[held].handle});
        held_.erase(held_.begin() + held);
        break;
      }
      case 9:
      case 10: {  // export
        const int held = PickHeld();
        v1::ExportRequest request;
        request.set_handle(held >= 0 ? held_[held].handle : input_.ConsumeIntegral<uint64_t>());
        request.set_access(static_cast<v1::Access>(input_.ConsumeIntegralInRange(0, 3)));
        switch (input_.ConsumeIntegralInRange(0, 2)) {
          case 0:
            break;  // the default
          case 1:
            request.set_ttl_ms(input_.ConsumeIntegralInRange<uint32_t>(1, 20));
            break;
          default:
            request.set_ttl_ms(input_.ConsumeIntegral<uint32_t>());
            break;
        }
        request.set_accept_sigbus_risk(input_.ConsumeBool());
        const uint64_t session =
            held >= 0 && input_.ConsumeBool() ? held_[held].session : PickSession();
        auto exported = state_->Export(session, request, PickUpload(held));
        if (exported.ok()) tokens_.push_back(exported->token());
        break;
      }
      case 11:
      case 12: {  // import
        const uint64_t session = PickSession();
        std::string token;
        if (!tokens_.empty() && input_.ConsumeIntegralInRange(0, 5) != 0) {
          token = tokens_[input_.ConsumeIntegralInRange<size_t>(0, tokens_.size() - 1)];
          if (input_.ConsumeIntegralInRange(0, 7) == 0 && !token.empty()) {
            token[input_.ConsumeIntegralInRange<size_t>(0, token.size() - 1)] ^= 1;
          }
        } else {
          token = input_.ConsumeRandomLengthString(64);
        }
        auto grant = state_->Import(session, token);
        if (grant.ok()) Keep(session, *std::move(grant));
        break;
      }
      case 13: {  // freeze
        const int held = PickHeld();
        if (held < 0) break;
        (void)state_->Freeze(held_[held].session, held_[held].handle, PickUpload(held));
        break;
      }
      case 14:
        // As the daemon's timer does: at the time it is (a token's ttl may
        // be 1 ms).
        state_->ExpireTokens(absl::Now());
        break;
      case 15: {  // create a fence
        auto made =
            fences_.Create(PickSession(), PickName(), PickName(),
                           absl::Milliseconds(input_.ConsumeIntegralInRange<int64_t>(0, 30000)));
        if (made.ok()) fence_ids_.push_back(made->id);
        break;
      }
      case 16: {  // signal, by call or one-way
        static const v1::FenceStatus kStatuses[] = {
            v1::FENCE_STATUS_OK, v1::FENCE_STATUS_ERROR, v1::FENCE_STATUS_CANCELLED,
            v1::FENCE_STATUS_UNSPECIFIED, static_cast<v1::FenceStatus>(99)};
        const uint64_t session = PickSession();
        const uint64_t id = PickFence();
        const v1::FenceStatus status = kStatuses[input_.ConsumeIntegralInRange(0, 4)];
        const std::string message = input_.ConsumeRandomLengthString(300);
        if (input_.ConsumeBool()) {
          (void)fences_.Signal(session, id, status, message);
        } else {
          (void)fences_.SignalOneWay(session, id, status, message);
        }
        break;
      }
      case 17: {  // merge
        std::vector<uint64_t> ids;
        for (int i = input_.ConsumeIntegralInRange(0, 8); i > 0; --i) ids.push_back(PickFence());
        auto merged = fences_.Merge(PickSession(), ids, PickName());
        if (merged.ok()) fence_ids_.push_back(merged->id);
        break;
      }
      case 18: {  // export, and import an fd: ours, a pipe, an eventfd
        const uint64_t session = PickSession();
        UniqueFd fd;
        switch (input_.ConsumeIntegralInRange(0, 3)) {
          case 0: {
            auto exported = fences_.Export(session, PickFence());
            if (exported.ok()) fd = std::move(exported->fd);
            break;
          }
          case 1: {
            int pipe_fds[2];
            FUZZ_CHECK(::pipe2(pipe_fds, O_CLOEXEC) == 0);
            fd = UniqueFd(pipe_fds[0]);
            if (input_.ConsumeBool())
              ::close(pipe_fds[1]);  // readable: signalled
            else
              pipes_.emplace_back(pipe_fds[1]);
            break;
          }
          case 2:
            fd = UniqueFd(::eventfd(input_.ConsumeIntegralInRange(0, 1), EFD_CLOEXEC));
            break;
          default:
            fd = UniqueFd(::open("/proc/self/status", O_RDONLY | O_CLOEXEC));  // not pollable
            break;
        }
        if (!fd.valid() || input_.ConsumeBool()) break;
        auto imported =
            fences_.Import(session, std::move(fd), PickName(),
                           absl::Milliseconds(input_.ConsumeIntegralInRange<int64_t>(0, 30000)));
        if (imported.ok()) fence_ids_.push_back(imported->id);
        break;
      }
      case 19:
        fences_.Forget(PickSession(), PickFence());
        break;
      case 20: {  // hold another session's fence (reservation objects)
        (void)fences_.HoldFor(PickSession(), PickFence());
        break;
      }
      case 22: {  // attach a fence to a buffer the session holds (as the service checks)
        const int held = PickHeld();
        if (held < 0) break;
        const uint64_t session = input_.ConsumeBool() ? held_[held].session : PickSession();
        if (!state_->Holds(session, held_[held].buffer)) break;
        (void)reservations_.Attach(
            session, held_[held].buffer, PickFence(),
            static_cast<v1::FenceUsage>(input_.ConsumeIntegralInRange(0, 5)));
        break;
      }
      case 23: {  // what an access waits for; a status-page subscription
        const int held = PickHeld();
        if (held < 0) break;
        const uint64_t buffer = held_[held].buffer;
        const uint64_t session = held_[held].session;
        switch (input_.ConsumeIntegralInRange(0, 2)) {
          case 0:
            (void)reservations_.Pending(
                buffer, static_cast<v1::FenceUsage>(input_.ConsumeIntegralInRange(0, 5)), nullptr,
                input_.ConsumeBool() ? session : 0);
            break;
          case 1:
            (void)reservations_.Subscribe(session, buffer, input_.ConsumeBool());
            break;
          default:
            reservations_.Unsubscribe(session, buffer);
            break;
        }
        break;
      }
      case 25: {  // create a timeline: a counter page sealed right, or not, or no page at all
        const uint64_t session = PickSession();
        CounterPage page = NewCounterPage();
        auto made = timelines_.Create(session, std::move(page.fd), PickName(),
                                      absl::Milliseconds(input_.ConsumeIntegralInRange(0, 30000)));
        if (made.ok()) {
          timeline_ids_.push_back(made->view.id);
          counters_[made->view.id] = std::move(page.map);
        }
        break;
      }
      case 26: {  // the owner writes its counter: forwards, backwards, a failure
        if (counters_.empty()) break;
        auto it = counters_.begin();
        std::advance(it, input_.ConsumeIntegralInRange<size_t>(0, counters_.size() - 1));
        auto& page = *reinterpret_cast<timeline::CounterPage*>(it->second.data());
        timeline::Store(page.reached, input_.ConsumeBool()
                                          ? timeline::Load(page.reached) +
                                                input_.ConsumeIntegralInRange<uint64_t>(0, 3)
                                          : input_.ConsumeIntegral<uint64_t>());
        if (input_.ConsumeIntegralInRange(0, 3) == 0) {
          timeline::Store(page.failure_count, input_.ConsumeIntegral<uint64_t>());
        }
        timeline::Store(page.seq, timeline::Load(page.seq) + 1);
        break;
      }
      case 27: {  // hold, forget, a waker, the owner's wakers, info, a wait page written
        const uint64_t session = PickSession();
        const uint64_t id = PickTimeline();
        switch (input_.ConsumeIntegralInRange(0, 5)) {
          case 0:
            (void)timelines_.Hold(session, id);
            break;
          case 1:
            timelines_.Forget(session, id);
            break;
          case 2:
            (void)timelines_.RegisterWaker(session, id, input_.ConsumeBool());
            break;
          case 3:
            (void)timelines_.TakeWakers(session, id, {}, {});
            break;
          case 5: {
            // The session writes anything into its wait page (the slot
            // masks, one slot), then a scan reads it, at a later time.
            auto page = wait_pages_.find(session);
            if (page == wait_pages_.end()) break;
            auto& waits = *reinterpret_cast<timeline::WaitPage*>(page->second.data());
            timeline::Store(waits.armed[input_.ConsumeIntegralInRange(0, 1)],
                            input_.ConsumeIntegral<uint64_t>());
            timeline::WaitSlot& slot = waits.slots[input_.ConsumeIntegralInRange<size_t>(
                0, timeline::WaitPage::kSlots - 1)];
            timeline::Store(slot.gen, input_.ConsumeIntegral<uint32_t>());
            timeline::Store(slot.timeline,
                            input_.ConsumeBool() ? id : input_.ConsumeIntegral<uint64_t>());
            timeline::Store(slot.point, input_.ConsumeIntegral<uint64_t>());
            timeline::Store(slot.need_by_ns, input_.ConsumeIntegral<int64_t>());
            scan_time_ += absl::Milliseconds(input_.ConsumeIntegralInRange(0, 20000));
            timelines_.Scan(scan_time_);
            break;
          }
          default:
            (void)timelines_.Info(session, id);
            break;
        }
        break;
      }
      case 28: {  // watch a point (ExportPoint): done at most once
        auto done = std::make_shared<std::atomic<int>>(0);
        if (timelines_
                .WatchPoint(PickSession(), PickTimeline(), input_.ConsumeIntegral<uint8_t>(),
                            [done](timeline::PointState) { ++*done; })
                .ok()) {
          watches_.push_back(done);
        }
        break;
      }
      case 29: {  // a fence behind a point, settled now or never
        const uint64_t id = PickTimeline();
        const uint64_t point = input_.ConsumeIntegral<uint8_t>();
        if (timelines_.Promise(PickSession(), id, point).ok() && input_.ConsumeBool()) {
          timelines_.Settle(id, point,
                            static_cast<v1::FenceStatus>(input_.ConsumeIntegralInRange(0, 6)),
                            PickName());
        }
        break;
      }
      default: {  // wait: a poll, or one left to finish by signal, deadline or close
        FenceTable::WaitRequest request;
        for (int i = input_.ConsumeIntegralInRange(0, 7); i > 0; --i) {
          request.ids.push_back(PickFence());
        }
        request.all = input_.ConsumeBool();
        request.timeout = input_.ConsumeBool()
                              ? absl::ZeroDuration()
                              : absl::Milliseconds(input_.ConsumeIntegralInRange(1, 20000));
        const FenceTable::WaitId wait = fences_.NewWaitId();
        auto done = std::make_shared<std::atomic<int>>(0);
        auto answer = fences_.Wait(PickSession(), wait, request,
                                   [done](absl::StatusOr<FenceTable::WaitResult>) { ++*done; });
        if (answer.ok() && !answer->has_value()) {
          if (input_.ConsumeIntegralInRange(0, 3) == 0) {
            if (fences_.CancelWait(wait)) break;
          }
          waits_.push_back(done);
        } else {
          FUZZ_CHECK(*done == 0, "a wait answered at once also called back");
        }
        break;
      }
    }
  }

  // As the Reaper's on-dead hook does: a dead buffer's reservation goes.
  void Bury(std::vector<DeadBuffer> dead) {
    for (const DeadBuffer& buffer : dead) {
      if (buffer.buffer_id != 0) reservations_.DropBuffer(buffer.buffer_id);
    }
  }

  void Close(uint64_t session) {
    Bury(state_->CloseSession(session));
    fences_.CloseSession(session);
    timelines_.CloseSession(session);
    reservations_.CloseSession(session);
    sessions_.erase(session);
    wait_pages_.erase(session);
    for (size_t i = 0; i < held_.size();) {
      if (held_[i].session == session) {
        held_.erase(held_.begin() + i);
      } else {
        ++i;
      }
    }
  }

  void Check() {
    const DaemonState::Totals totals = state_->totals();
    const DaemonState::BufferPage page = state_->ListBuffers({});
    FUZZ_CHECK(page.views.size() == totals.buffers, page.views.size(), " listed, ", totals.buffers,
               " counted");
    std::map<std::string, uint64_t> heap_bytes;
    uint64_t handles = 0;
    for (const DaemonState::BufferView& view : page.views) {
      FUZZ_CHECK(!view.holders.empty(), "buffer ", view.info.buffer_id(), " has no holder");
      heap_bytes[view.info.heap()] += view.info.size();
      handles += view.holders.size();
    }
    FUZZ_CHECK(handles == totals.handles, handles, " holders listed, ", totals.handles,
               " handles counted");
    for (const auto& heap : fixture_.heaps.heaps()) {
      const uint64_t used = heap->Stats().used;
      FUZZ_CHECK(used == heap_bytes[heap->name()], "heap ", heap->name(), " uses ", used,
                 ", its buffers are ", heap_bytes[heap->name()]);
    }
    uint64_t session_handles = 0;
    for (const DaemonState::Holdings& holdings : state_->ListHoldings()) {
      session_handles += holdings.handles;
      std::map<std::string, uint64_t> held;
      for (const auto& [buffer, heap_and_size] : holdings.buffers) {
        held[heap_and_size.first] += heap_and_size.second;
      }
      for (const auto& [heap, bytes] : holdings.bytes) {
        FUZZ_CHECK(bytes == held[heap], "session ", holdings.session_id, " charged ", bytes, " on ",
                   heap, ", holds ", held[heap]);
      }
      for (const auto& [heap, bytes] : held) {
        FUZZ_CHECK(holdings.bytes.count(heap) && holdings.bytes.at(heap) == bytes, "session ",
                   holdings.session_id, " holds ", bytes, " on ", heap, " uncharged");
      }
    }
    FUZZ_CHECK(session_handles == totals.handles, session_handles, " vs ", totals.handles);
    // Listed a moment later: a 1 ms token may have expired since.
    FUZZ_CHECK(state_->ListTokens().size() <= totals.pending_tokens);
    const FdBudget::Usage usage = budget_.usage();
    // A live token keeps its fd; an expired one keeps it until the next
    // ExpireTokens.
    FUZZ_CHECK(usage.of(FdUse::kExport) >= totals.pending_tokens, usage.of(FdUse::kExport),
               " export fds, ", totals.pending_tokens, " tokens");
    FUZZ_CHECK(usage.of(FdUse::kDelivery) == 0, "a delivered fd still counted");
    for (const Held& held : held_) {
      if (detached_.count(held.session)) continue;  // it may no longer ask
      auto buffer = state_->GetBuffer(held.session, held.handle);
      FUZZ_CHECK(buffer.ok() && buffer->buffer().buffer_id() == held.buffer, "handle ", held.handle,
                 " of session ", held.session, " lost: ", buffer.status().ToString());
    }
    for (const auto& [session, handle] : released_) {
      FUZZ_CHECK(!state_->GetBuffer(session, handle).ok(), "released handle ", handle,
                 " of session ", session, " still answers");
    }
    std::set<uint64_t> live;
    for (const DaemonState::BufferView& view : page.views) live.insert(view.info.buffer_id());
    for (const auto& [buffer, attached] : reservations_.List()) {
      FUZZ_CHECK(live.count(buffer), "fences attached to dead buffer ", buffer);
      uint32_t writers = 0;
      uint32_t readers = 0;
      for (const ReservationTable::Attached& fence : attached) {
        const bool writer =
            fence.usage == v1::FENCE_USAGE_KERNEL || fence.usage == v1::FENCE_USAGE_WRITE;
        ++(writer ? writers : readers);
      }
      FUZZ_CHECK(writers <= kFencesPerBuffer && readers <= kFencesPerBuffer, "buffer ", buffer,
                 ": ", writers, " writers' and ", readers, " readers' fences");
    }
    FUZZ_CHECK(timelines_.List().size() == timelines_.size(), timelines_.List().size(),
               " timelines listed, ", timelines_.size(), " counted");
    const FenceTable::Counts counts = fences_.counts();
    FenceQuery pending;
    pending.pending = true;
    FUZZ_CHECK(fences_.List(pending).size() == counts.pending, fences_.List(pending).size(),
               " listed pending, ", counts.pending, " counted");
    for (const auto& [session, uid] : sessions_) {
      const FenceTable::SessionCounts mine = fences_.session_counts(session);
      FUZZ_CHECK(mine.pending <= Limits().max_pending_per_session, mine.pending);
      FUZZ_CHECK(mine.held <= Limits().max_held_per_session, mine.held);
    }
  }

  // Every session ends: nothing may be left.
  void End() {
    while (!sessions_.empty()) Close(sessions_.begin()->first);
    for (uint64_t session = 1; session <= next_session_; ++session) Close(session);
    state_->ExpireTokens(absl::InfiniteFuture());
    const DaemonState::Totals totals = state_->totals();
    FUZZ_CHECK(totals.buffers == 0 && totals.handles == 0 && totals.pending_tokens == 0,
               totals.buffers, " buffers, ", totals.handles, " handles, ", totals.pending_tokens,
               " tokens left");
    for (const auto& heap : fixture_.heaps.heaps()) {
      FUZZ_CHECK(heap->Stats().used == 0, "heap ", heap->name(), " still uses ",
                 heap->Stats().used);
    }
    FUZZ_CHECK(state_->ListHoldings().empty());
    FUZZ_CHECK(reservations_.List().empty() && reservations_.pages() == 0,
               reservations_.List().size(), " reservations, ", reservations_.pages(),
               " status pages left");
    const FenceTable::Counts counts = fences_.counts();
    FUZZ_CHECK(counts.pending == 0 && counts.signaled == 0 && counts.waits == 0, counts.pending,
               " pending, ", counts.signaled, " signalled, ", counts.waits, " waits left");
    for (const auto& done : waits_) {
      FUZZ_CHECK(*done == 1, "a wait finished ", done->load(), " times");
    }
    FUZZ_CHECK(timelines_.size() == 0, timelines_.size(), " timelines left");
    loop_.Stop();
    fences_.Stop();
    timelines_.Stop();
    for (const auto& done : watches_) {
      FUZZ_CHECK(*done <= 1, "a watched point was answered ", done->load(), " times");
    }
    counters_.clear();
    pipes_.clear();
    FUZZ_CHECK(budget_.usage().total == 0, budget_.usage().total, " fds still in the budget");
  }

  Fixture& fixture_;
  FuzzedDataProvider& input_;
  // BUFFERD_FUZZ_TRACE set: each operation is printed, with the totals
  // after it (to read a finding).
  const bool trace_ = std::getenv("BUFFERD_FUZZ_TRACE") != nullptr;
  FdBudget budget_;
  // The fences' deadlines, wait timeouts and imported fds (a loop per run,
  // stopped before the table, as in the daemon).
  EventLoop loop_;
  std::unique_ptr<DaemonState> state_;
  FenceTable fences_;
  // After the fence table: it sets the table's watch hook.
  ReservationTable reservations_;
  TimelineTable timelines_;
  uint64_t next_session_ = 0;
  std::map<uint64_t, uid_t> sessions_;
  std::set<uint64_t> detached_;
  std::vector<Held> held_;
  // (session, handle) released: never valid again (ids are not reused).
  std::vector<std::pair<uint64_t, uint64_t>> released_;
  std::vector<std::string> tokens_;
  std::vector<uint64_t> fence_ids_;
  std::vector<uint64_t> timeline_ids_;
  // The owner's writable mapping of each timeline's counter page.
  std::map<uint64_t, Mapping> counters_;
  // Each session's writable mapping of its timeline wait page, and the
  // clock its scans read (it only moves forward, as the daemon's does).
  std::map<uint64_t, Mapping> wait_pages_;
  absl::Duration scan_time_ = absl::Seconds(1);
  std::vector<std::shared_ptr<std::atomic<int>>> watches_;
  std::vector<UniqueFd> pipes_;
  std::vector<std::shared_ptr<std::atomic<int>>> waits_;
};

// The process's open fds and what each is, for a check that failed.
std::string OpenFdsText() {
  std::string text;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code error;
    absl::StrAppend(&text, entry.path().filename().string(), " -> ",
                    std::filesystem::read_symlink(entry.path(), error).string(), "; ");
  }
  return text;
}

}  // namespace
}  // namespace bufferd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace bufferd;
  static Fixture* fixture = new Fixture();
  const int fds_at_rest = CountOpenFds();
  {
    FuzzedDataProvider input(data, size);
    Run run(*fixture, input);
    run.Go();
  }
  FUZZ_CHECK(CountOpenFds() == fds_at_rest, CountOpenFds(), " fds open, ", fds_at_rest,
             " before: ", OpenFdsText());
  return 0;
}
