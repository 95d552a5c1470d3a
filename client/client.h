// bufferd client library: allocate, share and map buffers through the daemon.
//
//   absl::StatusOr<bufferd::Client> client = bufferd::Client::Connect();
//   absl::StatusOr<bufferd::Buffer> buffer =
//       client->Allocate({.heap = "system", .size = 1 << 20, .name = "frame"});
//   absl::StatusOr<bufferd::Mapping> bytes = buffer->Map();
//   absl::StatusOr<std::string> token = buffer->Export(bufferd::Access::kReadOnly);
//   // ... in another process:
//   absl::StatusOr<bufferd::Buffer> shared = other_client->Import(*token);
//
// Errors are absl::Status carrying the daemon's gRPC code and message. The
// library reads fd.sock itself and pairs each delivered fd with its RPC; users
// never see transfer ids. Every received fd's access mode and size are checked.
//
// Thread-safety: a Client may be used from many threads at once. A Buffer is
// a value owned by one thread at a time (like std::unique_ptr); different
// Buffers may be used concurrently. Buffers keep their connection alive, so
// they may outlive the Client they came from.
#ifndef BUFFERD_CLIENT_CLIENT_H_
#define BUFFERD_CLIENT_CLIENT_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "base/frame_format.h"
#include "base/mapping.h"
#include "base/unique_fd.h"
#include "bufferd/v1/buffer.pb.h"
#include "bufferd/v1/debug.pb.h"
#include "bufferd/v1/fence.pb.h"

namespace bufferd {

namespace internal {
class BufferStore;
class Connection;
struct Waker;

// A pending fence's doorbell (CreateFenceRequest.doorbell_upload_id): a
// pipe whose read end goes to the daemon and whose write end its owner's
// Fence keeps, counted against Connection::kMaxDoorbells while it does.
class Doorbell {
 public:
  Doorbell() = default;
  Doorbell(Doorbell&& other) noexcept;
  Doorbell& operator=(Doorbell&& other) noexcept;
  ~Doorbell();
  // A new one, or an invalid one if the session holds its most already (or
  // no pipe could be made).
  static Doorbell Make(Connection& connection);
  bool valid() const { return write_end_.valid(); }
  // The end to upload; let go of once uploaded.
  const UniqueFd& read_end() const { return read_end_; }
  void DropReadEnd() { read_end_.Reset(); }
  // Closes the write end (which rings it, unless a copy is held) and gives
  // back its count; false if it had none. Destroying it does the same.
  bool Ring();

 private:
  UniqueFd write_end_;
  UniqueFd read_end_;
  std::atomic<int>* count_ = nullptr;
};
}  // namespace internal

// How the holder of a buffer may use it.
enum class Access { kReadWrite, kReadOnly };

struct ExportOptions {
  // Zero means the daemon's default (30 s).
  absl::Duration ttl = absl::ZeroDuration();
  // Needed for a read-write export of a hugetlb- or carveout-backed buffer:
  // a read-write importer could punch holes that make this process's
  // mappings SIGBUS (see Buffer::Read). Only for importers you trust.
  bool accept_sigbus_risk = false;
};

// A frame to allocate (AllocateOptions::frame): the daemon lays out its
// planes (base/frame_format.h says how) and allocates one buffer for all.
struct FrameRequest {
  uint32_t width = 0;
  uint32_t height = 0;
  // DRM fourcc from <libdrm/drm_fourcc.h> (DRM_FORMAT_NV12, ...).
  uint32_t fourcc = 0;
  // DRM_FORMAT_MOD_LINEAR (0) is the only one a CPU heap honours.
  uint64_t modifier = 0;
  // Row stride (and plane offset) alignment: a power of two up to 4096;
  // 0 means 64.
  uint32_t stride_alignment = 0;
};

struct Rect {
  uint32_t x = 0;
  uint32_t y = 0;
  uint32_t width = 0;
  uint32_t height = 0;
  bool operator==(const Rect&) const = default;
};

// What every holder of a buffer reads, and a read-write holder may change
// (Buffer::SetMetadata).
struct FrameMetadata {
  // The part of a frame holding the picture (none: all of it).
  std::optional<Rect> crop;
  v1::ColorSpace color_space = v1::COLOR_SPACE_UNSPECIFIED;
  v1::ColorRange color_range = v1::COLOR_RANGE_UNSPECIFIED;
  // At most 64 bytes, free-form.
  std::string tag;
  // How many times it was changed: 0 as allocated. Buffer::SetMetadata
  // applies a change only if the buffer is still at this generation.
  uint64_t generation = 0;
  bool operator==(const FrameMetadata&) const = default;
};

struct AllocateOptions {
  // Where from: one heap, heaps to try in order, or a usage the daemon's
  // config defines ("camera_frame"); set one. None set means "system".
  std::string heap;
  std::vector<std::string> heaps;
  std::string usage;
  // Bytes; leave 0 for a frame.
  uint64_t size = 0;
  // A frame instead of a byte count.
  std::optional<FrameRequest> frame;
  // The buffer's first metadata.
  std::optional<FrameMetadata> metadata;
  // Debug name (shown by bufctl and in /proc/<pid>/maps).
  std::string name;
  // May be frozen later (Buffer::Freeze). Until then, any read-write holder
  // could add seals to it.
  bool freezable = false;
};

class Fence;
class Timeline;

// What a CPU access to a buffer does (Buffer::BeginCpuAccess).
enum class Cpu { kRead, kWrite };

// One handle on a buffer, with this process's own fd for it. Release() drops
// the handle with a round trip and returns the daemon's answer; destroying a
// Buffer drops it without one: the session's next RPC carries the release
// in its metadata (applied before that RPC runs), or, if no RPC comes within
// 2 ms, it goes one-way as a record on fd.sock. Either way the fd closes at
// once; mappings made with Map() stay valid until they are destroyed.
class Buffer {
 public:
  Buffer(Buffer&&) noexcept;
  Buffer& operator=(Buffer&&) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();

  uint64_t id() const { return fields().buffer_id(); }
  uint64_t handle() const { return handle_; }
  // Bytes, rounded up to the heap's page size.
  uint64_t size() const { return fields().size(); }
  const std::string& heap() const { return fields().heap(); }
  const std::string& name() const { return fields().name(); }
  Access access() const { return access_; }
  // What really backs the pages ("base_pages", "thp", "hugetlb_2m", ...).
  // This and the strings above stay valid until SetMetadata, Refresh or
  // Freeze (which replace the description) or the Buffer's end.
  const v1::BufferInfo& info() const;
  // Borrowed; O_RDWR for kReadWrite, O_RDONLY for kReadOnly.
  int fd() const { return fd_.get(); }
  // The frame's format and planes, for a buffer allocated as a frame (by
  // any holder). The library lays out the frames it allocates itself, with
  // the daemon's code; empty if it cannot (a daemon of another release,
  // which the protocol version check at connect rules out).
  std::optional<FrameFormat> frame() const;
  // As of the last call that returned it (allocation, import, Refresh,
  // SetMetadata).
  FrameMetadata metadata() const;
  // Replaces the metadata (read-write holders; PERMISSION_DENIED from a
  // read-only handle), only if it is still at `metadata.generation` (the
  // generation it was read at: change what metadata() returned), else
  // FAILED_PRECONDITION: another holder changed it; Refresh() and retry.
  // `overwrite` applies it whatever the generation.
  absl::Status SetMetadata(const FrameMetadata& metadata, bool overwrite = false);
  // Asks the daemon for the buffer's current description (metadata another
  // holder set since).
  absl::Status Refresh();
  // Heaps tried before the one that served this buffer, and why each could
  // not (empty for an imported buffer).
  const std::vector<v1::HeapSkip>& skipped() const { return skipped_; }

  // Maps the whole buffer: read-write if access() allows, else read-only.
  absl::StatusOr<Mapping> Map() const;
  absl::StatusOr<Mapping> MapReadOnly() const;

  // A single-use share token another session redeems with Client::Import.
  // `ttl` zero means the daemon's default (30 s).
  absl::StatusOr<std::string> Export(Access access,
                                     absl::Duration ttl = absl::ZeroDuration()) const;
  absl::StatusOr<std::string> Export(Access access, const ExportOptions& options) const;

  // Copies `out.size()` bytes at `offset` with pread, never through a
  // mapping: a SIGBUS-safe read of a buffer another holder may have broken
  // (a hugetlb page punched out and taken by someone else reads as zeros
  // here, where touching a mapping of it kills the process). OUT_OF_RANGE
  // past the end.
  absl::Status Read(uint64_t offset, std::span<uint8_t> out) const;

  // Seals a buffer allocated freezable against all writes, for everyone,
  // root included: publish once, then share with many readers. Unmap every
  // writable Mapping first (FAILED_PRECONDITION while one exists anywhere).
  // info().frozen() is true afterwards.
  absl::Status Freeze();

  // Drops the handle now (returns the daemon's answer) and closes the fd.
  absl::Status Release();

  // The buffer's reservation object (the kernel's dma_resv with its 2021
  // usages), shared by every holder of the buffer. AttachFence hands
  // `fence` (held by this Client's session) to every holder: WRITE for a
  // producer's "frame done", READ for a consumer's "done reading", KERNEL
  // for work everyone waits for, BOOKKEEP for what nobody waits for
  // implicitly. A read-only handle attaches READ and BOOKKEEP only
  // (PERMISSION_DENIED). Signalled fences are pruned; a fence of a session
  // that ends fails OWNER_DIED, so no buffer stays blocked.
  absl::Status AttachFence(const Fence& fence, v1::FenceUsage usage) const;
  // The same for a point of a timeline this session holds.
  absl::Status AttachPoint(const Timeline& timeline, uint64_t point, v1::FenceUsage usage) const;
  // The unsignalled fences an access waits for (a read: KERNEL + WRITE; a
  // write: KERNEL + WRITE + READ), oldest first, each held by this session
  // until dropped; info().usage() says how each is attached.
  absl::StatusOr<std::vector<Fence>> Fences(Cpu access) const;
  // One fd for an event loop: polls readable once every fence Fences()
  // would return has signalled; an invalid fd (-1) when none is pending.
  absl::StatusOr<UniqueFd> FencesFd(Cpu access) const;
  // Implicit sync: waits until the access may start (every fence it waits
  // for has signalled); returns them as they ended (a fence's error does
  // not fail the access, as with dma_resv: look at their status).
  // DEADLINE_EXCEEDED naming the fences still pending if `timeout` passes.
  // The first call on a buffer asks the daemon (one round trip) and
  // subscribes the session to the buffer's reservation state; from then
  // on, when nothing is pending the call reads the session's status page
  // and makes no syscall at all, and when something is pending it asks
  // once (the fences are listed, not held) and sleeps on the page until
  // the daemon publishes the signal (a fence that failed costs one more
  // round trip, for its status). Fences attached after it asked never hold
  // it. Fences it waited for that ended OK have no signaled_at.
  absl::StatusOr<std::vector<v1::FenceInfo>> BeginCpuAccess(Cpu access,
                                                            absl::Duration timeout) const;
  // Ends it. bufferd's memory is coherent for the CPU (memfd pages), so
  // nothing is flushed; kept so code written for DMA_BUF_IOCTL_SYNC keeps
  // its shape.
  absl::Status EndCpuAccess() const;
  // The scoped form: BeginCpuAccess now, EndCpuAccess when it goes (the
  // Buffer must outlive it, unmoved).
  class ScopedCpuAccess {
   public:
    ScopedCpuAccess(ScopedCpuAccess&& other) noexcept
        : buffer_(other.buffer_), waited_(std::move(other.waited_)) {
      other.buffer_ = nullptr;
    }
    ScopedCpuAccess& operator=(ScopedCpuAccess&&) = delete;
    ~ScopedCpuAccess() {
      if (buffer_ != nullptr) (void)buffer_->EndCpuAccess();
    }
    // The fences the access waited for.
    const std::vector<v1::FenceInfo>& waited() const { return waited_; }

   private:
    friend class Buffer;
    ScopedCpuAccess(const Buffer* buffer, std::vector<v1::FenceInfo> waited)
        : buffer_(buffer), waited_(std::move(waited)) {}
    const Buffer* buffer_;
    std::vector<v1::FenceInfo> waited_;
  };
  absl::StatusOr<ScopedCpuAccess> CpuAccess(Cpu access, absl::Duration timeout) const;

 private:
  friend class Client;
  absl::StatusOr<v1::GetBufferFencesResponse> GetFences(Cpu access, bool as_fd) const;
  // BeginCpuAccess when the page does not say "clear": asks (subscribing,
  // and taking the page when it comes), then sleeps on the page; Settle
  // when the page has no room or is gone.
  absl::StatusOr<std::vector<v1::FenceInfo>> WaitForAccess(Cpu access, absl::Duration timeout) const;
  // WaitForAccess when every fence `asked` lists is a timeline point: waits
  // on the timelines themselves (each opened once per session through this
  // buffer, then kept), so the owner's Signal wakes this thread directly,
  // with no daemon in between. nullopt if it cannot (a fence of another
  // kind, a timeline that could not be opened): wait on the page instead.
  std::optional<absl::StatusOr<std::vector<v1::FenceInfo>>> WaitOnTimelines(
      const v1::GetBufferFencesResponse& asked, absl::Duration left) const;
  absl::StatusOr<v1::GetBufferFencesResponse> AskFences(
      Cpu access, std::optional<uint32_t> failures_since) const;
  // What became of `waited` (as `asked` listed them): asks the daemon how
  // they ended (failures since `asked`), and with `wait` first waits through
  // the daemon for those still pending, for `left` of the caller's
  // `timeout` (which errors name).
  absl::StatusOr<std::vector<v1::FenceInfo>> Settle(Cpu access, std::vector<v1::FenceInfo> waited,
                                                    const v1::GetBufferFencesResponse& asked,
                                                    bool wait, absl::Duration left,
                                                    absl::Duration timeout) const;
  Buffer(std::shared_ptr<internal::Connection> connection, uint64_t handle,
         std::unique_ptr<internal::BufferStore> store, Access access, UniqueFd fd);
  // info() but for a frame not laid out yet: what id(), size(), heap() and
  // name() read, without laying one out.
  const v1::BufferInfo& fields() const;
  // Closes the fd and releases the handle one-way.
  void Drop();
  // Lets go of the timelines this buffer's accesses opened (before its
  // handle goes).
  void ForgetKeptTimelines();

  std::shared_ptr<internal::Connection> connection_;
  uint64_t handle_ = 0;
  // The description, on an arena of its own (null once moved from).
  std::unique_ptr<internal::BufferStore> store_;
  Access access_ = Access::kReadWrite;
  UniqueFd fd_;
  std::vector<v1::HeapSkip> skipped_;
  // The buffer's slot in the session's reservation status page (0: none
  // yet).
  mutable std::atomic<uint32_t> status_slot_{0};
  // Its accesses opened timelines (Connection::KeepTimeline): they go with
  // it.
  mutable std::atomic<bool> kept_timelines_{false};
};

struct FenceOptions {
  // Debug name and timeline label (bufctl fences shows them).
  std::string name;
  std::string timeline;
  // When the daemon signals DEADLINE_EXCEEDED if the owner has not
  // signalled (zero: the daemon's default, 10 s). Fences are never
  // indefinite.
  absl::Duration deadline = absl::ZeroDuration();
};

// One fence this session holds (dma_fence / sync_file semantics): created
// here, merged, or imported from an fd. Move-only. Destroying it tells the
// daemon one-way that this session is done with it; a pending fence this
// session created is then signalled CANCELLED (nobody else could signal
// it), so keep it until you have signalled it.
class Fence {
 public:
  Fence(Fence&&) noexcept;
  Fence& operator=(Fence&&) noexcept;
  Fence(const Fence&) = delete;
  Fence& operator=(const Fence&) = delete;
  ~Fence();

  uint64_t id() const { return info_.fence_id(); }
  // As of the last call that returned it (Wait, Info, SignalAndConfirm).
  const v1::FenceInfo& info() const { return info_; }

  // Signals without a round trip: OK, ERROR (with `message`, at most 200
  // printable ASCII bytes) or CANCELLED. OK on a fence with a watched
  // doorbell is its fence-page word and the doorbell's close alone (later
  // calls carry the id); anything else is a record on fd.sock. Applied
  // before any later call of this session. What the daemon would refuse
  // (another status, a bad message, a fence this session did not create)
  // is refused here, INVALID_ARGUMENT / PERMISSION_DENIED, and so is a
  // second signal of this Fence, FAILED_PRECONDITION (one the daemon has
  // not seen yet is only logged by it: use SignalAndConfirm for its answer).
  absl::Status Signal(v1::FenceStatus status = v1::FENCE_STATUS_OK,
                      absl::string_view message = "") const;
  // The same with a round trip: FAILED_PRECONDITION if it was signalled
  // already, PERMISSION_DENIED if this session is not its owner.
  absl::StatusOr<v1::FenceInfo> SignalAndConfirm(v1::FenceStatus status = v1::FENCE_STATUS_OK,
                                                 absl::string_view message = "");
  // Waits until it is signalled (whatever the status: look at
  // info().status()); DEADLINE_EXCEEDED if `timeout` passes first. Zero
  // polls.
  absl::StatusOr<v1::FenceInfo> Wait(absl::Duration timeout);
  // Asks the daemon for the fence's state now.
  absl::StatusOr<v1::FenceInfo> Info();
  // An fd that polls readable once the fence is signalled and stays so:
  // poll/epoll/io_uring report POLLHUP (whatever events were asked for; not
  // POLLIN: nothing is ever written). Pass it to any process (which may
  // import it with Client::ImportSyncFd). Read-only: no holder can signal
  // it or change what the others see.
  absl::StatusOr<UniqueFd> ExportFd() const;

 private:
  friend class Client;
  friend class Timeline;
  friend class Buffer;
  Fence(std::shared_ptr<internal::Connection> connection, v1::FenceInfo info);
  // The owner writes `status` into the fence's word of its fence page (if
  // it has one), before telling the daemon: readers sleeping on the word
  // (of a fence attached through this Fence) wake at once.
  // True if it wrote it.
  bool PublishInPage(v1::FenceStatus status) const;

  std::shared_ptr<internal::Connection> connection_;
  v1::FenceInfo info_;
  // The owner's end of the fence's doorbell (CreateFenceRequest's
  // doorbell_upload_id): closed by an OK Signal after the word is written,
  // which has the daemon read the word and signal the fence (no record).
  mutable internal::Doorbell doorbell_;
  // What this Fence signalled (Signal, or a SignalAndConfirm the daemon
  // answered): another signal is refused here, FAILED_PRECONDITION.
  mutable std::optional<v1::FenceStatus> signalled_;
  // Attached to a buffer through this Fence (Buffer::AttachFence): a
  // holder of the buffer may sleep on its fence-page word, which the signal
  // then wakes. Any other signal skips the FUTEX_WAKE (1-2 us); a fence
  // another session attached wakes its sleepers through the daemon.
  mutable std::atomic<bool> attached_{false};
};

struct TimelineOptions {
  // Debug name (bufctl fences shows it).
  std::string name;
  // A waited-on point fails DEADLINE_EXCEEDED this long after the daemon
  // first sees it waited on (zero: the daemon's default fence deadline,
  // 10 s). Waits are never indefinite.
  absl::Duration deadline = absl::ZeroDuration();
};

// How a timeline point came out.
struct PointResult {
  uint64_t point = 0;
  // OK; ERROR (the owner's Fail, with its message); DEADLINE_EXCEEDED (the
  // daemon failed it: nobody reached it within the deadline); OWNER_DIED
  // (the owner's session ended first) or CANCELLED (the owner dropped the
  // timeline first).
  v1::FenceStatus status = v1::FENCE_STATUS_UNSPECIFIED;
  std::string message;
};

class Timeline;
// One point of one timeline, for Client::WaitTimelines.
struct TimelinePoint {
  const Timeline* timeline = nullptr;
  uint64_t point = 0;
};

// What a timeline wait waits for: the point reached (or failed), or only
// available: reached, or with a fence standing behind it (the owner's
// Timeline::ImportFence / ImportSyncFd), like
// DRM_SYNCOBJ_WAIT_FLAGS_WAIT_AVAILABLE.
enum class TimelineWait { kReached, kAvailable };

// A drm_syncobj-style timeline: a 64-bit counter that only moves forward;
// point N is reached when it reaches N. Created by one session (its owner,
// the only one that signals it) and shared by token (Export /
// Client::ImportTimeline) with sessions that wait and query.
//
// The hot path has no daemon in it: Signal is a store to shared memory and
// one futex wake; Wait blocks on that futex; Query is a load. The daemon
// bounds every wait (a waited-on point fails DEADLINE_EXCEEDED after the
// deadline) and fails every later point OWNER_DIED the moment the owner's
// session ends. Move-only and thread-safe; destroying it tells the daemon
// one-way that this session is done with it (an owner's timeline then ends:
// its later points fail CANCELLED).
class Timeline {
 public:
  Timeline(Timeline&&) noexcept;
  Timeline& operator=(Timeline&&) noexcept;
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;
  ~Timeline();

  uint64_t id() const { return info_.timeline_id(); }
  // As the daemon described it when it was created or imported.
  const v1::TimelineInfo& info() const { return info_; }
  // This session created it (and so may signal it).
  bool owned() const;

  // Owner only: reaches `point` (OK), or reaches it failed with `message`
  // (every point since the last signal fails ERROR with it: like a
  // dma_fence error). `point` must be after the last point reached, and
  // before any point a fence stands behind that has not signalled yet:
  // FAILED_PRECONDITION otherwise (also once the timeline has ended);
  // INVALID_ARGUMENT for 0 and UINT64_MAX; PERMISSION_DENIED for an
  // importer.
  absl::Status Signal(uint64_t point);
  absl::Status Fail(uint64_t point, absl::string_view message);
  // Blocks until `point` is reached or failed (look at the result's status);
  // DEADLINE_EXCEEDED if `timeout` passes first (zero polls); UNAVAILABLE if
  // this Client's session ends while it waits (the daemon no longer bounds
  // the wait then). `need_by` (from now) tells the owner when this waiter
  // needs it (WaitedOn).
  absl::StatusOr<PointResult> Wait(uint64_t point, absl::Duration timeout,
                                   absl::Duration need_by = absl::ZeroDuration()) const;
  // Blocks until `point` is available (TimelineWait::kAvailable): OK once it is
  // reached or a fence stands behind it, or the point's failure if it fails
  // first. A wait like Wait: its deadline runs.
  absl::StatusOr<PointResult> WaitAvailable(uint64_t point, absl::Duration timeout) const;
  // The last point reached (a load: no syscall, no daemon). Never goes
  // backwards for this object, whatever the owner writes.
  uint64_t Query() const;
  // The earliest point someone waits for, and the earliest time a waiter
  // said it needs one (InfiniteFuture: none), as of the daemon's last look
  // at the waits (every scan interval). A load.
  struct Waited {
    uint64_t point = 0;
    absl::Time need_by = absl::InfiniteFuture();
  };
  Waited WaitedOn() const;

  // For event loops: an fd (a datagram socket's read end, shared by this
  // session's Timeline objects of the timeline) that polls readable when the
  // point last armed is reached or failed, and at the daemon's deadline
  // marks and the timeline's end. The first call registers it (one round trip); the owner
  // writes a byte to its pipe when it signals, with no daemon in the path.
  // One per session and timeline (this session's Timeline objects of it
  // share it).
  absl::StatusOr<int> NotifyFd() const;
  // Drains the notify fd and arms it for `point`: the result if the point is
  // reached or failed already (do not wait for the fd then; nothing stays
  // armed), else nullopt (poll the fd, then Arm again or Wait(point, 0)).
  // Not a round trip: a store. Arm(0) disarms (an armed point counts as
  // waited on: its deadline runs). One event loop per session and timeline.
  absl::StatusOr<std::optional<PointResult>> Arm(uint64_t point) const;
  // The same for availability: the fd polls readable once `point` is
  // available (reached, or a fence behind it); the result (OK) at once if it
  // is already.
  absl::StatusOr<std::optional<PointResult>> ArmAvailable(uint64_t point) const;

  // sync_file interop (any holder). A fence this session holds, signalled
  // by the daemon when `point` is reached (OK) or fails (the point's status
  // and message): wait on it, merge it, ExportFd it. A point not reached yet
  // counts as waited on (its deadline runs). One round trip.
  absl::StatusOr<Fence> ExportPoint(uint64_t point) const;
  // The fd of such a fence (a pipe's read end that polls POLLHUP once the
  // point is reached or failed) in one round trip, with no Fence to keep.
  // With kMinusOne and the point reached already, no round trip and an
  // invalid fd (-1): the Vulkan SYNC_FD convention for "already signalled".
  enum class IfReached { kReadableFd, kMinusOne };
  absl::StatusOr<UniqueFd> ExportPointFd(uint64_t point,
                                         IfReached if_reached = IfReached::kReadableFd) const;
  // Owner only (like DRM_IOCTL_SYNCOBJ_TRANSFER): `point` is reached when
  // `fence` (held by this Client's session) signals OK, and fails with its
  // status and message otherwise. The point is available at once. It must be
  // after the last point reached and every point a fence stands behind
  // (FAILED_PRECONDITION); points settle in order; until it has settled,
  // Signal takes only points before it.
  absl::Status ImportFence(uint64_t point, const Fence& fence) const;
  // The same for a pollable fd (a kernel sync_file, an eventfd, a timerfd, a
  // pipe's read end, a fence fd bufferd exported; only borrowed), with no
  // Fence to manage. `deadline`: when the fd counts as failed
  // (DEADLINE_EXCEEDED) if it has not polled readable (zero: the daemon's
  // default fence deadline).
  absl::Status ImportSyncFd(uint64_t point, int fd,
                            absl::Duration deadline = absl::ZeroDuration()) const;

  // A single-use token another session redeems with Client::ImportTimeline
  // (it may wait and query, never signal). `ttl` zero: 30 s.
  absl::StatusOr<std::string> Export(absl::Duration ttl = absl::ZeroDuration()) const;
  // The daemon's view now (who owns it, the waits whose deadlines run).
  absl::StatusOr<v1::TimelineInfo> Info() const;

 private:
  friend class Client;
  friend class Buffer;
  struct Shared;
  Timeline(std::shared_ptr<internal::Connection> connection, v1::TimelineInfo info,
           std::unique_ptr<Shared> shared);
  absl::Status SignalWith(uint64_t point, absl::string_view message, bool failed);
  // The daemon has ended it (its owner's session is over, or it dropped it).
  bool ended() const;
  void WakeWakers(uint64_t point);
  absl::StatusOr<std::shared_ptr<internal::Waker>> EnsureWaker(bool with_notify) const;
  // This session's waker for a wait: EnsureWaker(false), without its lock
  // once registered. The Timeline keeps it alive.
  absl::StatusOr<internal::Waker*> WaitWaker() const;
  absl::StatusOr<std::optional<PointResult>> ArmFor(uint64_t point, TimelineWait what) const;
  static absl::StatusOr<std::vector<PointResult>> WaitPoints(
      const std::shared_ptr<internal::Connection>& connection,
      std::span<const TimelinePoint> points, bool all, absl::Duration timeout,
      absl::Duration need_by, TimelineWait what);
  // The same into `results` (one per point, each as PointResult{} makes
  // it: a status still UNSPECIFIED is a point not done): a single point's
  // wait, the hot path, allocates nothing.
  static absl::Status WaitPoints(const std::shared_ptr<internal::Connection>& connection,
                                 std::span<const TimelinePoint> points, bool all,
                                 absl::Duration timeout, absl::Duration need_by, TimelineWait what,
                                 std::span<PointResult> results);
  // ImportTimeline's call and pages, on the Connection `holder` points to,
  // which the Timeline keeps (owned, or not: an aliasing pointer).
  static absl::StatusOr<Timeline> Import(std::shared_ptr<internal::Connection> holder,
                                         v1::ImportTimelineRequest request);

  std::shared_ptr<internal::Connection> connection_;
  v1::TimelineInfo info_;
  std::unique_ptr<Shared> shared_;
};

struct WaitResult {
  // The fences waited on, as they were when the wait ended.
  std::vector<v1::FenceInfo> fences;
};

class Client {
 public:
  struct Options {
    // How long to wait for the daemon's hello and for each delivered fd.
    absl::Duration timeout = absl::Seconds(10);
    // Whether this session's gRPC calls go over the control.sock connection
    // this process already has to the same daemon (one per process, shared
    // by its sessions: gRPC's state for a connection costs the daemon ~22
    // KB). False: a connection of its own, which a cap may refuse.
    bool share_control_connection = true;
  };

  // Opens a session: connects fd.sock (reads the hello) and, unless this
  // process has one to that daemon already, control.sock.
  static absl::StatusOr<Client> Connect(const std::string& socket_dir, Options options);
  static absl::StatusOr<Client> Connect(const std::string& socket_dir);
  // $BUFFERD_SOCKET_DIR if set, else the default socket dir
  // ($XDG_RUNTIME_DIR/bufferd, or /run/bufferd as root).
  static absl::StatusOr<Client> Connect();

  Client(Client&&) noexcept;
  Client& operator=(Client&&) noexcept;
  ~Client();

  absl::StatusOr<Buffer> Allocate(const AllocateOptions& options) const;
  // `count` buffers in one round trip, all from one heap (a swapchain, a
  // camera's frame ring), or none: if one cannot be had, nothing is left
  // behind and the quotas are exactly as before.
  absl::StatusOr<std::vector<Buffer>> AllocateSet(uint32_t count,
                                                  const AllocateOptions& options) const;
  // Whether Allocate (count 1) or AllocateSet would succeed now, on which
  // heap, with which layout, or every reason why not; allocates nothing.
  absl::StatusOr<v1::CanAllocateResponse> CanAllocate(const AllocateOptions& options,
                                                      uint32_t count = 1) const;
  absl::StatusOr<Buffer> Import(absl::string_view token) const;

  uint64_t session_id() const;

  // Fences. A pending fence this session creates is its to signal.
  absl::StatusOr<Fence> CreateFence(const FenceOptions& options = {}) const;
  // Wait until all (or any) of `fences` are signalled; DEADLINE_EXCEEDED if
  // `timeout` passes first (zero polls). At most 1,024 fences.
  absl::StatusOr<WaitResult> WaitAll(std::span<const Fence* const> fences,
                                     absl::Duration timeout) const;
  absl::StatusOr<WaitResult> WaitAny(std::span<const Fence* const> fences,
                                     absl::Duration timeout) const;
  // A fence signalled when all of `fences` are, with the first error (by
  // signal time) or OK. At most 256.
  absl::StatusOr<Fence> Merge(std::span<const Fence* const> fences,
                              absl::string_view name = "") const;
  // A fence the daemon signals when `fd` polls readable: a kernel sync_file
  // (its error status is read), an eventfd, a timerfd, a pipe's read end, or
  // an fd bufferd exported (which gives back that very fence). `fd` is only
  // borrowed (a copy goes to the daemon). INVALID_ARGUMENT for anything
  // else (a file, a directory, a socket, a pipe's write end).
  absl::StatusOr<Fence> ImportSyncFd(int fd, const FenceOptions& options = {}) const;

  // Timelines. CreateTimeline makes one this session owns; ImportTimeline
  // redeems a token another session's Timeline::Export made.
  absl::StatusOr<Timeline> CreateTimeline(const TimelineOptions& options = {}) const;
  absl::StatusOr<Timeline> ImportTimeline(absl::string_view token) const;
  // Waits until all (or any) of `points` are reached or failed, in one
  // futex wait; DEADLINE_EXCEEDED if `timeout` passes first. At most 64
  // points, of timelines of this Client; the results in the order given.
  absl::StatusOr<std::vector<PointResult>> WaitTimelines(std::span<const TimelinePoint> points,
                                                         bool all, absl::Duration timeout,
                                                         TimelineWait what = TimelineWait::kReached) const;

  // Debug service (what bufctl shows).
  absl::StatusOr<v1::ListHeapsResponse> ListHeaps() const;
  absl::StatusOr<v1::ListClientsResponse> ListClients() const;
  // One page (request.page_size, page_token; the first 1,000 by default).
  absl::StatusOr<v1::ListBuffersResponse> ListBuffers(
      const v1::ListBuffersRequest& request = {}) const;
  // Every page from request.page_token on, in one response (one RPC per
  // page; next_page_token empty).
  absl::StatusOr<v1::ListBuffersResponse> ListAllBuffers(v1::ListBuffersRequest request = {}) const;
  absl::StatusOr<v1::ListFencesResponse> ListFences(
      const v1::ListFencesRequest& request = {}) const;
  absl::StatusOr<std::string> Metrics() const;
  // Pending share tokens (never the tokens themselves).
  absl::StatusOr<v1::ListTokensResponse> ListTokens() const;
  // Ends another session as its disconnect would (root and the daemon's
  // uid only; see debug.proto).
  absl::StatusOr<v1::EndSessionResponse> EndSession(uint64_t session_id) const;

  // Ends the session now (the daemon releases every handle of it). Buffers
  // still alive keep their fds but their Release() will fail.
  void Close();

 private:
  // A Buffer for one allocated buffer: its handle, skips and fd, its
  // description (`response`'s own when `store` holds `response`, else a
  // copy in a store of its own), and the metadata `request` set (the daemon
  // does not echo it), moved out of `request` when this is its `last`
  // buffer.
  absl::StatusOr<Buffer> TakeAllocated(v1::AllocateRequest& request, v1::AllocateResponse& response,
                                       std::unique_ptr<internal::BufferStore> store,
                                       bool last) const;
  explicit Client(std::shared_ptr<internal::Connection> connection);
  absl::StatusOr<WaitResult> WaitFor(std::span<const Fence* const> fences, bool all,
                                     absl::Duration timeout) const;
  std::shared_ptr<internal::Connection> connection_;
};

}  // namespace bufferd

#endif  // BUFFERD_CLIENT_CLIENT_H_
