// chaos: the daemon under client churn, for as long as you like.
//
//   tools/chaos --seconds 600        (builds //tests:chaos -c opt and runs it)
//
// N client processes (--clients, 32) each run random operations through the
// real client library: allocate on every heap, as sets and as frames by
// usage (checking the pages are zero), write a pattern, map, export
// read-only and read-write, import and verify (by mapping and by pread),
// freeze, change metadata, release; create, signal, wait on (by RPC and by
// polling fds), merge, export and import fences, and fences of eventfds and
// pipes; attach fences and timeline points to buffers and wait for CPU
// access; create, signal, fail, share and wait on timelines (also as an
// event loop: Arm and the notify fd), and put fences behind their points.
// Every --kill-every-ms (100) one client is killed with SIGKILL and a new one
// takes its place; every --end-session-every-ms (1000) the controller ends
// one client's session as `bufctl end-session` would, while its process
// lives on (it connects again). What must hold:
//   * every word an importer maps is the pattern its exporter published,
//     and every allocation is zero-filled (no cross-talk between buffers);
//   * every wait returns before its timeout, which is set well past the
//     moment what it waits on must have ended (deadlines; OWNER_DIED when
//     the owner was killed): no waiter hangs on the dead;
//   * no call fails but for the races chaos makes on purpose (a token whose
//     buffer died with its exporter: NOT_FOUND / FAILED_PRECONDITION; a call
//     of a session that was ended) and refusals (RESOURCE_EXHAUSTED: a full
//     carveout), each counted apart;
//   * three open problems are counted apart and printed, not failed:
//     record_race (a client library race, see Lane::Check), stuck_after_end
//     (a wait of a session the daemon ended that nothing releases) and
//     observer_unimplemented (see Controller::Observe);
//   * at the end, every client killed: the daemon is alive; no heap byte,
//     buffer, handle, share token, fence or timeline is left; no session but
//     the observer's, no uid charged; the daemon's fd count and its own
//     threads are back at the baseline taken before the clients started
//     (gRPC's executor and timer pools keep their high-water mark, within
//     their bounds); and (when this started it) it stops cleanly with exit 0
//     (under ASan: no leak).
// One summary line says what was done and PASS or FAIL (exit 1).
//
// Processes. This one (the controller) forks the churner first, while it has
// no thread and no Client, then starts bufferd (or uses --socket-dir) and
// keeps one observer Client, which reads every Debug view while the run goes
// and checks the baseline at the end. The churner never has a Client, so it
// may fork the clients at any time; it does the killing. A client process
// runs --lanes threads on its one Client (1 by default; 2 makes the record
// race above common, and tests one Client from two threads). Clients hand share
// tokens, timeline tokens and fence fds to each other through the mailbox, a
// SOCK_SEQPACKET pair made before the first fork: any client posts a note
// (with the fence's fd) on one end, and any client takes the next from the
// other. Counters live in one shared anonymous mapping.
//
// --seed (printed first and in the summary) seeds the churner, the
// controller and every client (client k from the seed and k), so a failing
// run's operations can be replayed up to the timing of the kills.
#include <fcntl.h>
#include <libdrm/drm_fourcc.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/fd_count.h"
#include "base/mapping.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "client/client.h"
#include "testing/child_process.h"
#include "testing/daemon_process.h"

namespace bufferd::chaos {
namespace {

using ::bufferd::testing::ChildProcess;
using ::bufferd::testing::DaemonProcess;

// The daemon chaos starts: every heap type, a small carveout (so it fills),
// and fence deadlines short enough that a waiter on a killed owner's fence is
// released by OWNER_DIED or the deadline within the run.
constexpr char kConfig[] = R"(
heaps { name: "system" type: HEAP_TYPE_SYSTEM }
heaps { name: "contiguous" type: HEAP_TYPE_CONTIGUOUS hugepage_size: HUGEPAGE_SIZE_2M
        fallback: FALLBACK_THP fallback: FALLBACK_BASE_PAGES }
heaps { name: "carveout" type: HEAP_TYPE_CARVEOUT capacity_bytes: 67108864
        hugepage_size: HUGEPAGE_SIZE_2M }
usages { name: "camera_frame" heaps: [ "carveout", "contiguous", "system" ] }
default_token_ttl_ms: 10000
default_fence_deadline_ms: 2000
timeline_scan_ms: 100
)";
const char* const kHeaps[] = {"system", "contiguous", "carveout"};

// Fences chaos creates live at most this long; timelines fail a point waited
// on this long (plus two scans).
constexpr absl::Duration kMaxFenceDeadline = absl::Milliseconds(1500);
constexpr absl::Duration kTimelineDeadline = absl::Seconds(1);
// The latest anything pending now must have ended: a fence created now, or a
// timeline point waited on from now (failed within two scans of the
// deadline) behind a fence created now.
constexpr absl::Duration kLongestBound = absl::Milliseconds(1500 + 1000 + 3 * 100);
// How far past that bound a wait's timeout is set: a wait that reaches its
// timeout was not released when it should have been (a hang).
constexpr absl::Duration kWaitMargin = absl::Seconds(5);
// How long past its timeout a blocking call may take to return.
constexpr absl::Duration kCallSlack = absl::Seconds(3);

// What the clients count, in shared memory.
enum Counter : int {
  kAllocate,
  kAllocateSet,
  kAllocateFrame,
  kZeroChecked,
  kRewrite,
  kFreeze,
  kMetadata,
  kExportRo,
  kExportRw,
  kImportRo,
  kImportRw,
  kImportVerified,
  kVerify,
  kRelease,
  kFenceCreate,
  kFenceSignal,
  kFenceCancel,
  kFenceExport,
  kFenceImport,
  kFenceImportFd,
  kFenceWait,
  kFencePoll,
  kFenceMerge,
  kAttach,
  kCpuAccess,
  kFencesFd,
  kTimelineCreate,
  kTimelineSignal,
  kTimelineExport,
  kTimelineImport,
  kTimelineWait,
  kTimelineArm,
  kPointExport,
  kPointAttach,
  kPointBehindFence,
  kTimelineDrop,
  kReconnect,
  // Outcomes.
  kGone,
  kRefused,
  // A call of a session that ended on purpose (a Reconnect's Close, the
  // controller's EndSession).
  kAfterEnd,
  kMailboxFull,
  // The client library's record-count race (see Lane::Check): reported,
  // not failed.
  kRecordRace,
  kUnexpected,
  kMismatch,
  kHang,
  // What the waits saw end (fences and timeline points): their owner's
  // death, their deadline.
  kSawOwnerDied,
  kSawDeadline,
  // A wait still blocked when its session ended on purpose, until its
  // timeout (reported, not a failure: nothing signals a dead session).
  kStuckAfterEnd,
  kCounterCount,
};
// The operations (every counter before kGone).
constexpr int kOperationCount = kGone;
constexpr const char* kCounterNames[] = {
    "allocate",
    "allocate_set",
    "allocate_frame",
    "zero_checked",
    "rewrite",
    "freeze",
    "metadata",
    "export_ro",
    "export_rw",
    "import_ro",
    "import_rw",
    "import_verified",
    "verify",
    "release",
    "fence_create",
    "fence_signal",
    "fence_cancel",
    "fence_export",
    "fence_import",
    "fence_import_fd",
    "fence_wait",
    "fence_poll",
    "fence_merge",
    "attach",
    "cpu_access",
    "fences_fd",
    "timeline_create",
    "timeline_signal",
    "timeline_export",
    "timeline_import",
    "timeline_wait",
    "timeline_arm",
    "point_export",
    "point_attach",
    "point_behind_fence",
    "timeline_drop",
    "reconnect",
    "gone",
    "refused",
    "after_end",
    "mailbox_full",
    "record_race",
    "unexpected",
    "mismatch",
    "hang",
    "saw_owner_died",
    "saw_deadline",
    "stuck_after_end",
};
static_assert(std::size(kCounterNames) == kCounterCount);

enum Phase : uint32_t { kWaiting, kRunning, kStopping };

// Shared by every process of a run: one anonymous MAP_SHARED mapping made
// before the first fork. Lock-free atomics only (a process may die anywhere).
struct Shared {
  std::atomic<uint32_t> phase;
  char socket_dir[512];
  std::atomic<uint64_t> counts[kCounterCount];
  // The churner's: clients forked, killed by it, and ended otherwise (a
  // crash, or an exit after an error it printed).
  std::atomic<uint64_t> spawned;
  std::atomic<uint64_t> killed;
  std::atomic<uint64_t> died;
  // The latest a fence wait returned after the fence's bound (its deadline),
  // in ns: how long a waiter on a dead owner's fence may wait.
  std::atomic<int64_t> max_late_ns;
  // Sessions the controller ended (EndSession), the latest 4,096, each written
  // before the call: a client whose session ends finds out it was on
  // purpose.
  std::atomic<uint64_t> ended_sessions[4096];
  std::atomic<uint64_t> ended_next;
};
static_assert(std::atomic<uint64_t>::is_always_lock_free);

Shared* MapShared() {
  void* memory =
      ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return nullptr;
  return new (memory) Shared();  // zeroed pages: every count 0, kWaiting
}

struct Flags {
  double seconds = 10;
  int clients = 32;
  int kill_every_ms = 100;
  int lanes = 1;
  int end_session_every_ms = 1000;
  int observe_every_ms = 250;
  uint64_t seed = 0;
  std::string socket_dir;
  std::string log_level = "info";
  // Empty: this workspace's daemon/bufferd.
  std::string bufferd;
  double progress_seconds = 30;
};

// What one client hands another through the mailbox.
struct Note {
  enum Kind : uint32_t { kBuffer = 1, kTimeline = 2, kFence = 3 };
  uint32_t kind = 0;
  uint32_t read_only = 0;
  // kBuffer: what the importer must find.
  uint64_t buffer_id = 0;
  uint64_t size = 0;
  uint64_t seed = 0;
  // kFence: the fence the attached fd polls, and when it must have
  // signalled at the latest (Unix ns).
  uint64_t fence_id = 0;
  int64_t bound_ns = 0;
  int32_t from_pid = 0;
  uint32_t token_size = 0;
  char token[96] = {};

  absl::string_view Token() const {
    return absl::string_view(token, std::min<size_t>(token_size, sizeof(token)));
  }
};

// Any process posts on one end of a SOCK_SEQPACKET pair, any process takes
// from the other; records are whole, each taken by one process. Never
// blocks: Post on a full pair and Take on an empty one return at once.
class Mailbox {
 public:
  static absl::StatusOr<Mailbox> Create() {
    absl::StatusOr<std::pair<UnixSocket, UnixSocket>> pair = UnixSocket::SeqPacketPair();
    if (!pair.ok()) return pair.status();
    Mailbox mailbox;
    mailbox.post_ = std::move(pair->first);
    mailbox.take_ = std::move(pair->second);
    return mailbox;
  }

  // False if the mailbox is full.
  bool Post(const Note& note, int fd = -1) const {
    const int fds[] = {fd};
    return post_
        .Send(absl::string_view(reinterpret_cast<const char*>(&note), sizeof(note)),
              fd >= 0 ? std::span<const int>(fds) : std::span<const int>(), /*dont_wait=*/true)
        .ok();
  }

  // The next note and its fd (invalid for tokens), if any.
  std::optional<std::pair<Note, UniqueFd>> Take() const {
    absl::StatusOr<UnixSocket::Received> got =
        take_.RecvWithFds(sizeof(Note), /*dont_wait=*/true, /*max_fds=*/1);
    if (!got.ok() || got->bytes.size() != sizeof(Note)) return std::nullopt;
    Note note;
    std::memcpy(&note, got->bytes.data(), sizeof(note));
    UniqueFd fd = got->fds.empty() ? UniqueFd() : std::move(got->fds[0]);
    return std::make_pair(note, std::move(fd));
  }

  void Close() {
    post_ = UnixSocket();
    take_ = UnixSocket();
  }

 private:
  UnixSocket post_;
  UnixSocket take_;
};

uint64_t Mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Word `index` of the pattern of buffer `buffer_id` written with `seed`.
uint64_t PatternKey(uint64_t buffer_id, uint64_t seed) { return Mix(Mix(buffer_id) ^ seed); }
uint64_t PatternWord(uint64_t key, uint64_t index) { return Mix(key + index); }

void WritePattern(const Mapping& mapping, uint64_t buffer_id, uint64_t seed) {
  const uint64_t key = PatternKey(buffer_id, seed);
  uint64_t* words = reinterpret_cast<uint64_t*>(mapping.data());
  for (size_t i = 0; i < mapping.size() / 8; ++i) words[i] = PatternWord(key, i);
}

// What a verify found wrong: empty if every word is as expected.
struct Mismatch {
  size_t bad_words = 0;
  size_t first_offset = 0;
  uint64_t expected = 0;
  uint64_t got = 0;
};

Mismatch CheckPattern(const uint8_t* data, size_t size, uint64_t buffer_id, uint64_t seed) {
  const uint64_t key = PatternKey(buffer_id, seed);
  const uint64_t* words = reinterpret_cast<const uint64_t*>(data);
  Mismatch found;
  for (size_t i = 0; i < size / 8; ++i) {
    const uint64_t expected = PatternWord(key, i);
    if (words[i] != expected) {
      if (found.bad_words++ == 0) {
        found.first_offset = i * 8;
        found.expected = expected;
        found.got = words[i];
      }
    }
  }
  return found;
}

Mismatch CheckZero(const Mapping& mapping) {
  const uint64_t* words = reinterpret_cast<const uint64_t*>(mapping.data());
  Mismatch found;
  for (size_t i = 0; i < mapping.size() / 8; ++i) {
    if (words[i] != 0 && found.bad_words++ == 0) {
      found.first_offset = i * 8;
      found.got = words[i];
    }
  }
  return found;
}

absl::Time FromTimestamp(const google::protobuf::Timestamp& at) {
  return absl::FromUnixSeconds(at.seconds()) + absl::Nanoseconds(at.nanos());
}

// What the lanes of one client process share: its Client (one session), and
// whether that session is over (a lane's Reconnect closed it, or the
// controller ended it). Thread-safe.
class Session {
 public:
  Session(Shared& shared, Client client) : shared_(shared), client_(std::move(client)) {}

  const Client& client() const { return client_; }
  Client& client() { return client_; }
  uint64_t id() const { return client_.session_id(); }

  bool over() const { return over_.load(); }
  void End() { over_.store(true); }
  // Over for good: the process exits (an error it could not explain).
  bool fatal() const { return fatal_.load(); }
  void Fatal() {
    fatal_.store(true);
    over_.store(true);
  }
  // Whether the controller ended this session (it says so before it does).
  bool EndedByController() const {
    for (const std::atomic<uint64_t>& ended : shared_.ended_sessions) {
      if (ended.load() == id()) return true;
    }
    return false;
  }

  // One event loop per session and timeline (Timeline::Arm's contract):
  // a lane claims a timeline's notify fd before it polls it.
  bool ClaimNotify(uint64_t timeline_id) {
    std::lock_guard<std::mutex> lock(mutex_);
    return notify_claims_.insert(timeline_id).second;
  }

 private:
  Shared& shared_;
  Client client_;
  std::atomic<bool> over_{false};
  std::atomic<bool> fatal_{false};
  std::mutex mutex_;
  std::set<uint64_t> notify_claims_;
};

// One lane of a client process: a thread running random operations on the
// process's session until the session is over. Lanes of one process share
// the session (and so the Client, from several threads at once) but nothing
// else: each holds its own buffers, fences and timelines.
class Lane {
 public:
  Lane(Shared& shared, const Mailbox& mailbox, Session& session, uint64_t index, uint64_t seed)
      : shared_(shared), mailbox_(mailbox), session_(session), index_(index), random_(seed) {}

  void Run() {
    while (!session_.over()) {
      SignalDue();
      RunOne();
    }
  }

 private:
  struct OwnBuffer {
    Buffer buffer;
    Mapping mapping;
    uint64_t seed = 0;
    // Exported at least once: its pattern may no longer change.
    bool published = false;
    bool freezable = false;
    bool frozen = false;
  };
  struct ImportedBuffer {
    Buffer buffer;
    uint64_t seed = 0;
  };
  struct HeldFence {
    Fence fence;
    // When it must have signalled at the latest.
    absl::Time bound;
    // Ours to signal and not signalled yet: when to signal it.
    bool own_pending = false;
    absl::Time signal_at;
    // How it came here, for reports.
    std::string origin;
    // An imported eventfd (written to signal) or a pipe's write end (closed
    // to signal); invalid for a fence of the daemon's.
    UniqueFd trigger;
  };
  struct HeldTimeline {
    Timeline timeline;
    // Owner: the next point to signal, and the highest point a fence stands
    // behind (0: none).
    uint64_t next = 1;
    uint64_t fence_point = 0;
  };
  // An eventfd or pipe behind a timeline point, to signal at `at`.
  struct Trigger {
    UniqueFd fd;
    absl::Time at;
  };

  // -- Bookkeeping ---------------------------------------------------------

  const Client& client() const { return session_.client(); }

  void Count(Counter counter, uint64_t n = 1) {
    shared_.counts[counter].fetch_add(n, std::memory_order_relaxed);
  }

  uint64_t Uniform(uint64_t low, uint64_t high) {
    return std::uniform_int_distribution<uint64_t>(low, high)(random_);
  }
  bool Chance(double p) { return std::bernoulli_distribution(p)(random_); }
  template <typename T>
  size_t Pick(const std::vector<T>& v) {
    return Uniform(0, v.size() - 1);
  }

  template <typename... Args>
  void Report(Counter counter, const Args&... args) {
    Count(counter);
    if (printed_++ < 20) {
      std::fprintf(stderr, "chaos: client #%llu (pid %d, session %llu): %s %s\n",
                   static_cast<unsigned long long>(index_), ::getpid(),
                   static_cast<unsigned long long>(session_.id()), kCounterNames[counter],
                   absl::StrCat(args...).c_str());
    }
  }

  // A call failed after (or because) the session ended on purpose: nothing
  // to count. True if so.
  bool SessionOver() {
    if (session_.over()) return true;
    if (session_.EndedByController()) {
      session_.End();
      return true;
    }
    return false;
  }

  enum class Race { kNone, kGone };
  // Counts a failed call: a refusal (RESOURCE_EXHAUSTED), a race chaos makes
  // on purpose (NOT_FOUND / FAILED_PRECONDITION where `race` allows), a call
  // of a session that ended on purpose, or an unexpected error (printed).
  // Returns status.ok().
  bool Check(const absl::Status& status, absl::string_view what, Race race = Race::kNone) {
    if (status.ok()) return true;
    if (SessionOver()) {
      Count(kAfterEnd);
      return false;
    }
    const absl::StatusCode code = status.code();
    if (code == absl::StatusCode::kResourceExhausted) {
      Count(kRefused);
      if (refusals_printed_ < 3 && !absl::StrContains(status.message(), "heap")) {
        ++refusals_printed_;
        std::fprintf(stderr, "chaos: client #%llu: refused %s: %s\n",
                     static_cast<unsigned long long>(index_), std::string(what).c_str(),
                     status.ToString().c_str());
      }
      return false;
    }
    if (race == Race::kGone &&
        (code == absl::StatusCode::kNotFound || code == absl::StatusCode::kFailedPrecondition)) {
      Count(kGone);
      return false;
    }
    if (code == absl::StatusCode::kNotFound &&
        absl::StrContains(status.message(), "not found: send the fd in an FdUpload record")) {
      // A known client library race, counted apart: RecordSender counts a
      // record after sending it, so a call can say fewer records came
      // before it than did (another thread's record, or the one-way
      // release flusher's, sent first and counted later), and the daemon
      // runs it before reading this thread's FdUpload.
      Report(kRecordRace, what, ": ", status.ToString());
      return false;
    }
    Report(kUnexpected, what, ": ", status.ToString());
    // A session lost for no reason this run gave it: the process can only
    // spam. It exits (the churner reports it).
    if (code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kUnauthenticated) {
      session_.Fatal();
    }
    return false;
  }

  // A wait of `timeout` that took `elapsed` and returned `status`: a
  // DEADLINE_EXCEEDED (everything it waits on had to end well before) or a
  // call that overran its timeout is a hang.
  bool CheckWait(const absl::Status& status, absl::string_view what, absl::Duration timeout,
                 absl::Duration elapsed) {
    if (elapsed > timeout + kCallSlack) {
      Report(kHang, what, ": took ", absl::FormatDuration(elapsed), " with a timeout of ",
             absl::FormatDuration(timeout), " (", status.ToString(), ")",
             session_.over() ? " (its session ended meanwhile)" : "");
      return false;
    }
    if (status.code() == absl::StatusCode::kDeadlineExceeded) {
      if (session_.over() || session_.EndedByController()) {
        // Ended with the session: nothing signals a dead session's waits.
        Report(kStuckAfterEnd, what, ": timed out after ", absl::FormatDuration(elapsed),
               " (its session ended meanwhile): ", status.ToString());
        session_.End();
        return false;
      }
      Report(kHang, what, ": not released within ", absl::FormatDuration(timeout),
             " though everything it waits for had to end ", absl::FormatDuration(kWaitMargin),
             " before: ", status.ToString());
      return false;
    }
    return Check(status, what);
  }

  // A fence or point ended with `status`.
  void Saw(v1::FenceStatus status) {
    if (status == v1::FENCE_STATUS_OWNER_DIED) Count(kSawOwnerDied);
    if (status == v1::FENCE_STATUS_DEADLINE_EXCEEDED) Count(kSawDeadline);
  }

  // A wait that started at `start` on what had to end by `bound` returned
  // now: how late past the later of the two (a wait on a fence long
  // signalled answers at once).
  absl::Duration Returned(absl::Time start, absl::Time bound) {
    const absl::Duration late = absl::Now() - std::max(start, bound);
    const int64_t late_ns = absl::ToInt64Nanoseconds(late);
    int64_t most = shared_.max_late_ns.load(std::memory_order_relaxed);
    while (late_ns > most && !shared_.max_late_ns.compare_exchange_weak(most, late_ns)) {
    }
    return late;
  }

  absl::Duration TimeoutFor(absl::Time bound) const {
    return std::max(bound - absl::Now(), absl::ZeroDuration()) + kWaitMargin;
  }

  // Polls `fd` until it is readable (POLLHUP for a fence fd) or `timeout`
  // passes: false then.
  static bool PollReadable(int fd, absl::Duration timeout, short* revents) {
    pollfd ready{fd, POLLIN, 0};
    const int n = ::poll(&ready, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
    *revents = ready.revents;
    return n == 1;
  }

  // -- The operations ------------------------------------------------------

  void RunOne() {
    // Weights: what a client does most is allocate, share and wait.
    static constexpr struct {
      void (Lane::*op)();
      int weight;
    } kOps[] = {
        {&Lane::Allocate, 11},        {&Lane::AllocateSet, 2},    {&Lane::AllocateFrame, 2},
        {&Lane::Rewrite, 4},          {&Lane::Freeze, 1},         {&Lane::SetMetadata, 2},
        {&Lane::Export, 10},          {&Lane::TakeNote, 18},      {&Lane::Verify, 5},
        {&Lane::ReleaseOne, 9},       {&Lane::CreateFence, 8},    {&Lane::ImportFdFence, 2},
        {&Lane::WaitFence, 5},        {&Lane::WaitSeveral, 2},    {&Lane::MergeFences, 3},
        {&Lane::PublishFence, 2},     {&Lane::DropFence, 4},      {&Lane::AttachFence, 5},
        {&Lane::CpuAccess, 4},        {&Lane::CreateTimeline, 2}, {&Lane::SignalTimeline, 6},
        {&Lane::WaitTimeline, 3},     {&Lane::ExportPoint, 2},    {&Lane::AttachPoint, 2},
        {&Lane::PointBehindFence, 1}, {&Lane::DropTimeline, 1},   {&Lane::Nap, 3},
    };
    // Reconnect: 1 in 1,000.
    if (Chance(0.001)) return Reconnect();
    int total = 0;
    for (const auto& op : kOps) total += op.weight;
    int pick = static_cast<int>(Uniform(0, total - 1));
    for (const auto& op : kOps) {
      if (pick < op.weight) return (this->*op.op)();
      pick -= op.weight;
    }
  }

  void Nap() { absl::SleepFor(absl::Milliseconds(Uniform(1, 5))); }

  uint64_t RandomSize(const std::string& heap) {
    const uint64_t pages = heap == "system" ? Uniform(1, 256) : Uniform(1, 512);
    // Sometimes not a page multiple: the daemon rounds it up.
    return pages * 4096 - (Chance(0.3) ? Uniform(0, 4095) : 0);
  }

  // A new buffer of ours: zero-filled, then patterned.
  void Adopt(Buffer buffer, bool freezable = false) {
    absl::StatusOr<Mapping> mapping = buffer.Map();
    if (!Check(mapping.status(), "Map")) return;
    const Mismatch zero = CheckZero(*mapping);
    Count(kZeroChecked);
    if (zero.bad_words != 0) {
      Report(kMismatch, "buffer ", buffer.id(), " (heap ", buffer.heap(), ", ", buffer.size(),
             " bytes, backing ", v1::Backing_Name(buffer.info().backing()),
             ") is not zero-filled on allocate: ", zero.bad_words, " words, first at offset ",
             zero.first_offset, " = 0x", absl::Hex(zero.got));
    }
    const uint64_t seed = random_();
    WritePattern(*mapping, buffer.id(), seed);
    own_.push_back({std::move(buffer), *std::move(mapping), seed, false, freezable, false});
  }

  void Allocate() {
    if (own_.size() >= 8) return ReleaseOne();
    const std::string heap = kHeaps[Uniform(0, 2)];
    // Freezable: system buffers only (a seal on hugetlb is not a thing).
    const bool freezable = heap == "system" && Chance(0.2);
    absl::StatusOr<Buffer> buffer = client().Allocate(
        {.heap = heap, .size = RandomSize(heap), .name = "chaos", .freezable = freezable});
    if (!Check(buffer.status(), absl::StrCat("Allocate on ", heap))) return;
    Count(kAllocate);
    Adopt(*std::move(buffer), freezable);
  }

  void AllocateSet() {
    if (own_.size() >= 6) return ReleaseOne();
    const std::string heap = kHeaps[Uniform(0, 2)];
    const uint32_t count = static_cast<uint32_t>(Uniform(2, 3));
    absl::StatusOr<std::vector<Buffer>> set =
        client().AllocateSet(count, {.heap = heap, .size = RandomSize(heap), .name = "chaos-set"});
    if (!Check(set.status(), absl::StrCat("AllocateSet on ", heap))) return;
    Count(kAllocateSet);
    for (Buffer& buffer : *set) Adopt(std::move(buffer));
  }

  // An NV12 frame by usage or by a list of heaps, the carveout first (each
  // heap skipped counted by the daemon when the carveout is full). The
  // embedded default config has the usage too (contiguous first).
  void AllocateFrame() {
    if (own_.size() >= 8) return ReleaseOne();
    FrameRequest frame{.width = static_cast<uint32_t>(Uniform(8, 512) * 2),
                       .height = static_cast<uint32_t>(Uniform(8, 256) * 2),
                       .fourcc = DRM_FORMAT_NV12};
    AllocateOptions options{.frame = frame, .name = "chaos-frame"};
    if (Chance(0.5)) {
      options.usage = "camera_frame";
    } else {
      options.heaps = {"carveout", "contiguous", "system"};
    }
    if (Chance(0.2)) {
      absl::StatusOr<v1::CanAllocateResponse> can = client().CanAllocate(options);
      if (!Check(can.status(), "CanAllocate")) return;
    }
    absl::StatusOr<Buffer> buffer = client().Allocate(options);
    if (!Check(buffer.status(), "Allocate a frame")) return;
    Count(kAllocateFrame);
    Adopt(*std::move(buffer));
  }

  // A buffer nobody else has seen yet gets a new pattern.
  void Rewrite() {
    std::vector<size_t> unpublished;
    for (size_t i = 0; i < own_.size(); ++i) {
      if (!own_[i].published && !own_[i].frozen) unpublished.push_back(i);
    }
    if (unpublished.empty()) return;
    OwnBuffer& own = own_[unpublished[Pick(unpublished)]];
    const Mismatch before =
        CheckPattern(own.mapping.data(), own.mapping.size(), own.buffer.id(), own.seed);
    if (before.bad_words != 0) {
      return ReportMismatch("before a rewrite, own", own.buffer, own.seed, before);
    }
    own.seed = random_();
    WritePattern(own.mapping, own.buffer.id(), own.seed);
    Count(kRewrite);
  }

  // Seals a buffer nobody else has seen against every write, then maps it
  // back read-only.
  void Freeze() {
    std::vector<size_t> candidates;
    for (size_t i = 0; i < own_.size(); ++i) {
      if (own_[i].freezable && !own_[i].frozen && !own_[i].published) candidates.push_back(i);
    }
    if (candidates.empty()) return;
    OwnBuffer& own = own_[candidates[Pick(candidates)]];
    own.mapping.Reset();
    const absl::Status frozen = own.buffer.Freeze();
    absl::StatusOr<Mapping> mapping = frozen.ok() ? own.buffer.MapReadOnly() : own.buffer.Map();
    if (!Check(mapping.status(), "Map after Freeze")) {
      own_.erase(own_.begin() + (&own - own_.data()));  // without a mapping it cannot stay
      return;
    }
    own.mapping = *std::move(mapping);
    if (!Check(frozen, "Freeze")) return;
    own.frozen = true;
    Count(kFreeze);
    if (!own.buffer.info().frozen())
      Report(kUnexpected, "buffer ", own.buffer.id(), " is not frozen after Freeze");
    // Nobody may write it now: not even its creator.
    absl::StatusOr<Mapping> writable =
        Mapping::Create(own.buffer.fd(), own.buffer.size(), Mapping::Protection::kReadWrite);
    if (writable.ok()) Report(kMismatch, "frozen buffer ", own.buffer.id(), " maps writable");
    const Mismatch found =
        CheckPattern(own.mapping.data(), own.mapping.size(), own.buffer.id(), own.seed);
    if (found.bad_words != 0) ReportMismatch("after Freeze,", own.buffer, own.seed, found);
  }

  // A read-write holder changes the metadata every holder reads; another
  // holder changing it first is the race a generation settles.
  void SetMetadata() {
    std::vector<Buffer*> writable;
    for (OwnBuffer& own : own_) writable.push_back(&own.buffer);
    for (ImportedBuffer& imported : imported_) {
      if (imported.buffer.access() == Access::kReadWrite) writable.push_back(&imported.buffer);
    }
    if (writable.empty()) return;
    Buffer& buffer = *writable[Pick(writable)];
    if (Chance(0.3) && !Check(buffer.Refresh(), "Refresh")) return;
    FrameMetadata metadata = buffer.metadata();
    metadata.tag = absl::StrCat("chaos ", random_() % 1000);
    if (!Check(buffer.SetMetadata(metadata), "SetMetadata", Race::kGone)) return;
    Count(kMetadata);
    if (buffer.metadata().tag != metadata.tag) {
      Report(kMismatch, "buffer ", buffer.id(), "'s tag is '", buffer.metadata().tag,
             "' after SetMetadata of '", metadata.tag, "'");
    }
  }

  void ReportMismatch(absl::string_view what, const Buffer& buffer, uint64_t seed,
                      const Mismatch& found) {
    Report(kMismatch, what, " buffer ", buffer.id(), " (heap ", buffer.heap(), ", ", buffer.size(),
           " bytes, ", buffer.access() == Access::kReadOnly ? "ro" : "rw", ", seed ", seed,
           "): ", found.bad_words, " words differ, first at offset ", found.first_offset,
           ": expected 0x", absl::Hex(found.expected), ", got 0x", absl::Hex(found.got));
  }

  // Publishes a token of a buffer we hold (ours, or one we imported: a
  // read-only holder exports read-only only; a frozen buffer read-only).
  void Export() {
    const size_t holdings = own_.size() + imported_.size();
    if (holdings == 0) return;
    const size_t pick = Uniform(0, holdings - 1);
    const Buffer* buffer;
    uint64_t seed;
    bool read_only = Chance(0.5);
    if (pick < own_.size()) {
      own_[pick].published = true;
      buffer = &own_[pick].buffer;
      seed = own_[pick].seed;
      read_only = read_only || own_[pick].frozen;
    } else {
      buffer = &imported_[pick - own_.size()].buffer;
      seed = imported_[pick - own_.size()].seed;
    }
    read_only = read_only || buffer->access() == Access::kReadOnly;
    absl::StatusOr<std::string> token =
        buffer->Export(read_only ? Access::kReadOnly : Access::kReadWrite,
                       ExportOptions{.ttl = absl::Seconds(10), .accept_sigbus_risk = true});
    if (!Check(token.status(), "Export")) return;
    Count(read_only ? kExportRo : kExportRw);
    Note note{.kind = Note::kBuffer,
              .read_only = read_only,
              .buffer_id = buffer->id(),
              .size = buffer->size(),
              .seed = seed,
              .from_pid = ::getpid()};
    Post(note, *token);
  }

  void Post(Note note, absl::string_view token, int fd = -1) {
    note.token_size = static_cast<uint32_t>(std::min(token.size(), sizeof(note.token)));
    std::memcpy(note.token, token.data(), note.token_size);
    if (!mailbox_.Post(note, fd)) Count(kMailboxFull);
  }

  void TakeNote() {
    std::optional<std::pair<Note, UniqueFd>> taken = mailbox_.Take();
    if (!taken) return;
    const Note& note = taken->first;
    switch (note.kind) {
      case Note::kBuffer:
        return ImportBuffer(note);
      case Note::kTimeline:
        return ImportTimeline(note);
      case Note::kFence:
        return ImportFence(note, std::move(taken->second));
      default:
        Report(kUnexpected, "a note of unknown kind ", note.kind);
    }
  }

  void ImportBuffer(const Note& note) {
    if (imported_.size() >= 8) {
      imported_.erase(imported_.begin() + Pick(imported_));
      Count(kRelease);
    }
    // The exporter may have been killed (its buffer gone with it), or the
    // token may be older than its ttl.
    absl::StatusOr<Buffer> buffer = client().Import(note.Token());
    if (!Check(buffer.status(), "Import", Race::kGone)) return;
    Count(note.read_only ? kImportRo : kImportRw);
    const Access access = note.read_only ? Access::kReadOnly : Access::kReadWrite;
    if (buffer->id() != note.buffer_id || buffer->size() != note.size ||
        buffer->access() != access) {
      Report(kMismatch, "import of a token of buffer ", note.buffer_id, " (", note.size, " bytes, ",
             note.read_only ? "ro" : "rw", ", from pid ", note.from_pid, ") gave buffer ",
             buffer->id(), " (", buffer->size(), " bytes, ",
             buffer->access() == Access::kReadOnly ? "ro" : "rw", ")");
      return;
    }
    absl::StatusOr<Mapping> mapping = buffer->Map();
    if (!Check(mapping.status(), "Map of an import")) return;
    if (mapping->writable() == note.read_only) {
      Report(kMismatch, "an import's mapping is ", mapping->writable() ? "writable" : "read-only",
             " for a ", note.read_only ? "read-only" : "read-write", " token");
    }
    if (note.read_only && Chance(0.1)) {
      // A read-only fd never maps writable.
      absl::StatusOr<Mapping> writable =
          Mapping::Create(buffer->fd(), buffer->size(), Mapping::Protection::kReadWrite);
      if (writable.ok()) {
        Report(kMismatch, "a read-only import of buffer ", buffer->id(), " maps writable");
      }
    }
    const Mismatch found =
        CheckPattern(mapping->data(), mapping->size(), note.buffer_id, note.seed);
    if (found.bad_words != 0) {
      return ReportMismatch(absl::StrCat("import (from pid ", note.from_pid, ") of"), *buffer,
                            note.seed, found);
    }
    Count(kImportVerified);
    imported_.push_back({*std::move(buffer), note.seed});
  }

  // Checks a buffer we hold still has its pattern: through our mapping, a
  // new read-only one, or pread (Buffer::Read).
  void Verify() {
    const size_t holdings = own_.size() + imported_.size();
    if (holdings == 0) return;
    const size_t pick = Uniform(0, holdings - 1);
    const bool own = pick < own_.size();
    const Buffer& buffer = own ? own_[pick].buffer : imported_[pick - own_.size()].buffer;
    const uint64_t seed = own ? own_[pick].seed : imported_[pick - own_.size()].seed;
    Mismatch found;
    if (Chance(0.3)) {
      std::vector<uint8_t> bytes(buffer.size());
      if (!Check(buffer.Read(0, bytes), "Read")) return;
      found = CheckPattern(bytes.data(), bytes.size(), buffer.id(), seed);
    } else if (own) {
      found = CheckPattern(own_[pick].mapping.data(), own_[pick].mapping.size(), buffer.id(), seed);
    } else {
      absl::StatusOr<Mapping> mapping = buffer.MapReadOnly();
      if (!Check(mapping.status(), "MapReadOnly")) return;
      found = CheckPattern(mapping->data(), mapping->size(), buffer.id(), seed);
    }
    if (found.bad_words != 0) return ReportMismatch(own ? "own" : "imported", buffer, seed, found);
    Count(kVerify);
  }

  void ReleaseOne() {
    const size_t holdings = own_.size() + imported_.size();
    if (holdings == 0) return;
    const size_t pick = Uniform(0, holdings - 1);
    Buffer* buffer =
        pick < own_.size() ? &own_[pick].buffer : &imported_[pick - own_.size()].buffer;
    // Half the time with the daemon's answer, else one-way (the drop).
    if (Chance(0.5)) Check(buffer->Release(), "Release");
    if (pick < own_.size()) {
      own_.erase(own_.begin() + pick);
    } else {
      imported_.erase(imported_.begin() + (pick - own_.size()));
    }
    Count(kRelease);
  }

  // -- Fences ---------------------------------------------------------------

  absl::Duration RandomDeadline() {
    return absl::Milliseconds(Uniform(50, absl::ToInt64Milliseconds(kMaxFenceDeadline)));
  }

  void CreateFence() {
    if (fences_.size() >= 12) return DropFence();
    const absl::Duration deadline = RandomDeadline();
    absl::StatusOr<Fence> fence =
        client().CreateFence({.name = "chaos", .timeline = "chaos", .deadline = deadline});
    if (!Check(fence.status(), "CreateFence")) return;
    Count(kFenceCreate);
    const absl::Time bound = FromTimestamp(fence->info().deadline());
    // Some come after the deadline: the daemon was first.
    const absl::Time signal_at =
        absl::Now() + absl::Milliseconds(Uniform(0, absl::ToInt64Milliseconds(deadline) * 13 / 10));
    fences_.push_back({*std::move(fence), bound, true, signal_at, "created"});
    if (Chance(0.5)) PublishFence(fences_.back());
  }

  // A fence of an eventfd or a pipe of ours, which we signal later (or
  // never: then its deadline or our death ends it).
  void ImportFdFence() {
    if (fences_.size() >= 12) return DropFence();
    absl::StatusOr<std::pair<UniqueFd, UniqueFd>> fds = MakeTrigger();
    if (!fds.ok()) return Report(kUnexpected, fds.status().ToString());
    const absl::Duration deadline = RandomDeadline();
    absl::StatusOr<Fence> fence =
        client().ImportSyncFd(fds->first.get(), {.name = "chaos-fd", .deadline = deadline});
    if (!Check(fence.status(), "ImportSyncFd of our own fd")) return;
    Count(kFenceImportFd);
    const absl::Time bound = FromTimestamp(fence->info().deadline());
    const absl::Time signal_at =
        absl::Now() + absl::Milliseconds(Uniform(0, absl::ToInt64Milliseconds(deadline) * 13 / 10));
    fences_.push_back(
        {*std::move(fence), bound, true, signal_at, "an fd of ours", std::move(fds->second)});
    if (Chance(0.3)) PublishFence(fences_.back());
  }

  // An fd to import (first) and what signals it (second): an eventfd (the
  // same one: write to it) or a pipe (its write end: close it).
  absl::StatusOr<std::pair<UniqueFd, UniqueFd>> MakeTrigger() {
    if (Chance(0.5)) {
      const int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      if (fd < 0) return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
      UniqueFd event(fd);
      UniqueFd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
      return std::make_pair(std::move(event), std::move(copy));
    }
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0) {
      return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
    }
    return std::make_pair(UniqueFd(ends[0]), UniqueFd(ends[1]));
  }

  // Signals through a trigger fd: an eventfd is written, a pipe's write end
  // closed (the kind of fd tells which).
  void Fire(UniqueFd& trigger) {
    struct stat st {};
    if (::fstat(trigger.get(), &st) == 0 && S_ISFIFO(st.st_mode)) {
      trigger.Reset();
      return;
    }
    const uint64_t one = 1;
    if (::write(trigger.get(), &one, sizeof(one)) != sizeof(one)) {
      Report(kUnexpected, "write to an eventfd: ", std::strerror(errno));
    }
  }

  void PublishFence() {
    if (!fences_.empty()) PublishFence(fences_[Pick(fences_)]);
  }

  void PublishFence(const HeldFence& held) {
    absl::StatusOr<UniqueFd> fd = held.fence.ExportFd();
    if (!Check(fd.status(), "ExportFd")) return;
    Count(kFenceExport);
    Note note{.kind = Note::kFence,
              .fence_id = held.fence.id(),
              .bound_ns = absl::ToUnixNanos(held.bound),
              .from_pid = ::getpid()};
    Post(note, "", fd->get());
  }

  // Signals our fences and triggers whose time has come (some after their
  // deadline: the daemon was first, and a confirmed signal is refused).
  void SignalDue() {
    const absl::Time now = absl::Now();
    for (Trigger& trigger : triggers_) {
      if (trigger.fd.valid() && trigger.at <= now) {
        Fire(trigger.fd);
        trigger.fd.Reset();
      }
    }
    std::erase_if(triggers_, [](const Trigger& trigger) { return !trigger.fd.valid(); });
    for (HeldFence& held : fences_) {
      if (!held.own_pending || held.signal_at > now) continue;
      held.own_pending = false;
      if (held.trigger.valid()) {
        Fire(held.trigger);
        held.trigger.Reset();
        Count(kFenceSignal);
        continue;
      }
      const uint64_t roll = Uniform(0, 99);
      if (roll < 15) {
        absl::StatusOr<v1::FenceInfo> info = held.fence.SignalAndConfirm(v1::FENCE_STATUS_OK);
        // Refused only if the deadline came first.
        if (!info.ok() && info.status().code() == absl::StatusCode::kFailedPrecondition &&
            absl::StrContains(info.status().message(), "DEADLINE_EXCEEDED")) {
          Count(kGone);
          continue;
        }
        if (!Check(info.status(), "SignalAndConfirm")) continue;
      } else {
        const v1::FenceStatus status = roll < 85   ? v1::FENCE_STATUS_OK
                                       : roll < 95 ? v1::FENCE_STATUS_ERROR
                                                   : v1::FENCE_STATUS_CANCELLED;
        if (!Check(held.fence.Signal(status, status == v1::FENCE_STATUS_ERROR ? "chaos" : ""),
                   "Signal")) {
          continue;
        }
      }
      Count(kFenceSignal);
    }
  }

  // Drops a fence; one of ours still pending is cancelled by the drop.
  void DropFence() {
    if (fences_.empty()) return;
    const size_t pick = Pick(fences_);
    if (fences_[pick].own_pending) Count(kFenceCancel);
    fences_.erase(fences_.begin() + pick);
  }

  void ImportFence(const Note& note, UniqueFd fd) {
    if (!fd.valid()) return Report(kUnexpected, "a fence note without its fd");
    const absl::Time bound = absl::FromUnixNanos(note.bound_ns);
    if (Chance(0.3)) {
      // Wait on the fd itself, as an event loop would: it polls POLLHUP once
      // the fence has signalled (whoever signals it, the daemon included).
      const absl::Duration timeout = TimeoutFor(bound);
      const absl::Time start = absl::Now();
      short revents = 0;
      const bool readable = PollReadable(fd.get(), timeout, &revents);
      const absl::Duration elapsed = absl::Now() - start;
      if (!readable) {
        Report(kHang, "poll on fence ", note.fence_id, "'s fd (from pid ", note.from_pid,
               "): not readable within ", absl::FormatDuration(timeout),
               " though it had to signal by ", absl::FormatTime(bound));
      } else if ((revents & POLLHUP) == 0 || elapsed > timeout + kCallSlack) {
        Report(kUnexpected, "poll on fence ", note.fence_id, "'s fd: revents 0x",
               absl::Hex(revents), " after ", absl::FormatDuration(elapsed));
      } else {
        Returned(start, bound);
        Count(kFencePoll);
      }
    }
    if (fences_.size() >= 12) DropFence();
    absl::StatusOr<Fence> fence =
        client().ImportSyncFd(fd.get(), {.name = "chaos-import", .deadline = kMaxFenceDeadline});
    if (!Check(fence.status(), "ImportSyncFd")) return;
    Count(kFenceImport);
    // A fence still pending is the very fence that was exported (a gone one
    // comes back as a new fence, signalled with its status).
    if (fence->info().state() == v1::FENCE_STATE_PENDING && fence->id() != note.fence_id) {
      Report(kMismatch, "the fd of fence ", note.fence_id, " imported as pending fence ",
             fence->id());
    }
    fences_.push_back(
        {*std::move(fence), bound, false, absl::InfiniteFuture(),
         absl::StrCat("imported from pid ", note.from_pid, " as fence ", note.fence_id)});
  }

  // Fences nobody here is about to signal (waiting on one of our own pending
  // ones would only wait for our own next turn).
  std::vector<size_t> Waitable() const {
    std::vector<size_t> waitable;
    for (size_t i = 0; i < fences_.size(); ++i) {
      if (!fences_[i].own_pending) waitable.push_back(i);
    }
    return waitable;
  }

  void WaitFence() {
    const std::vector<size_t> waitable = Waitable();
    if (waitable.empty()) return;
    HeldFence& held = fences_[waitable[Pick(waitable)]];
    const absl::Duration timeout = TimeoutFor(held.bound);
    const absl::Time start = absl::Now();
    absl::StatusOr<v1::FenceInfo> info = held.fence.Wait(timeout);
    if (!CheckWait(info.status(),
                   absl::StrCat("Wait on fence ", held.fence.id(), " (", held.origin, ")"), timeout,
                   absl::Now() - start)) {
      return;
    }
    Count(kFenceWait);
    const absl::Duration late = Returned(start, held.bound);
    Saw(info->status());
    if (late > absl::Seconds(1)) {
      std::fprintf(
          stderr,
          "chaos: LATE wait on fence %llu (%s): returned %s late (started %s, bound %s): %s\n",
          static_cast<unsigned long long>(held.fence.id()), held.origin.c_str(),
          absl::FormatDuration(late).c_str(), absl::FormatTime(start).c_str(),
          absl::FormatTime(held.bound).c_str(), info->ShortDebugString().c_str());
    }
    if (info->state() != v1::FENCE_STATE_SIGNALED) {
      Report(kUnexpected, "Wait on fence ", held.fence.id(), " returned it ",
             v1::FenceState_Name(info->state()));
    }
  }

  // WaitAll or WaitAny on up to four fences.
  void WaitSeveral() {
    std::vector<size_t> waitable = Waitable();
    if (waitable.size() < 2) return;
    std::shuffle(waitable.begin(), waitable.end(), random_);
    waitable.resize(std::min<size_t>(waitable.size(), 4));
    const bool all = Chance(0.5);
    std::vector<const Fence*> fences;
    absl::Time bound = all ? absl::InfinitePast() : absl::InfiniteFuture();
    for (size_t i : waitable) {
      fences.push_back(&fences_[i].fence);
      bound = all ? std::max(bound, fences_[i].bound) : std::min(bound, fences_[i].bound);
    }
    const absl::Duration timeout = TimeoutFor(bound);
    const absl::Time start = absl::Now();
    absl::StatusOr<WaitResult> result =
        all ? client().WaitAll(fences, timeout) : client().WaitAny(fences, timeout);
    if (!CheckWait(result.status(), all ? "WaitAll" : "WaitAny", timeout, absl::Now() - start)) {
      return;
    }
    Returned(start, bound);
    for (const v1::FenceInfo& fence : result->fences) Saw(fence.status());
    Count(kFenceWait);
  }

  void MergeFences() {
    if (fences_.size() < 2) return;
    if (fences_.size() >= 12) DropFence();
    std::vector<const Fence*> inputs;
    absl::Time bound = absl::InfinitePast();
    const size_t count = Uniform(2, std::min<size_t>(4, fences_.size()));
    for (size_t i = 0; i < count; ++i) {
      const HeldFence& held = fences_[Pick(fences_)];  // duplicates are fine
      inputs.push_back(&held.fence);
      bound = std::max(bound, held.bound);
    }
    absl::StatusOr<Fence> merged = client().Merge(inputs, "chaos-merge");
    if (!Check(merged.status(), "Merge")) return;
    Count(kFenceMerge);
    fences_.push_back({*std::move(merged), bound, false, absl::InfiniteFuture(), "merged"});
  }

  // A buffer we hold, ours or imported, and its pattern's seed.
  std::pair<const Buffer*, uint64_t> AnyBuffer() {
    const size_t holdings = own_.size() + imported_.size();
    if (holdings == 0) return {nullptr, 0};
    const size_t pick = Uniform(0, holdings - 1);
    if (pick < own_.size()) return {&own_[pick].buffer, own_[pick].seed};
    return {&imported_[pick - own_.size()].buffer, imported_[pick - own_.size()].seed};
  }

  v1::FenceUsage AnyUsage(const Buffer& buffer) {
    if (buffer.access() == Access::kReadOnly) {
      return Chance(0.8) ? v1::FENCE_USAGE_READ : v1::FENCE_USAGE_BOOKKEEP;
    }
    static constexpr v1::FenceUsage kUsages[] = {v1::FENCE_USAGE_WRITE, v1::FENCE_USAGE_WRITE,
                                                 v1::FENCE_USAGE_READ, v1::FENCE_USAGE_KERNEL,
                                                 v1::FENCE_USAGE_BOOKKEEP};
    return kUsages[Uniform(0, std::size(kUsages) - 1)];
  }

  void AttachFence() {
    const Buffer* buffer = AnyBuffer().first;
    if (buffer == nullptr || fences_.empty()) return;
    const HeldFence& held = fences_[Pick(fences_)];
    if (!Check(buffer->AttachFence(held.fence, AnyUsage(*buffer)), "AttachFence")) return;
    Count(kAttach);
  }

  // Implicit sync: every fence attached to a buffer ends by its deadline (or
  // its owner's death), so an access set to wait past that never times out;
  // nor does a poll of the buffer's FencesFd.
  void CpuAccess() {
    const auto [buffer, seed] = AnyBuffer();
    if (buffer == nullptr) return;
    const Cpu access =
        buffer->access() == Access::kReadOnly || Chance(0.5) ? Cpu::kRead : Cpu::kWrite;
    const std::string what =
        absl::StrCat(access == Cpu::kRead ? "read" : "write", " access to buffer ", buffer->id());
    const absl::Duration timeout = kLongestBound + kWaitMargin;
    const absl::Time start = absl::Now();
    if (Chance(0.3)) {
      absl::StatusOr<UniqueFd> fd = buffer->FencesFd(access);
      if (!Check(fd.status(), "FencesFd")) return;
      Count(kFencesFd);
      if (!fd->valid()) return;  // nothing pending
      short revents = 0;
      if (!PollReadable(fd->get(), timeout, &revents)) {
        Report(SessionOver() ? kStuckAfterEnd : kHang, "poll on the FencesFd of a ", what,
               ": not readable within ", absl::FormatDuration(timeout));
      }
      return;
    }
    absl::StatusOr<Buffer::ScopedCpuAccess> scoped = buffer->CpuAccess(access, timeout);
    if (!CheckWait(scoped.status(), absl::StrCat("CpuAccess: ", what), timeout,
                   absl::Now() - start)) {
      return;
    }
    Count(kCpuAccess);
    for (const v1::FenceInfo& fence : scoped->waited()) Saw(fence.status());
    absl::StatusOr<Mapping> mapping = buffer->MapReadOnly();
    if (!Check(mapping.status(), "MapReadOnly")) return;
    const Mismatch found = CheckPattern(mapping->data(), mapping->size(), buffer->id(), seed);
    if (found.bad_words != 0) ReportMismatch("during a CPU access,", *buffer, seed, found);
  }

  // -- Timelines ------------------------------------------------------------

  void CreateTimeline() {
    if (timelines_.size() >= 6) return DropTimeline();
    absl::StatusOr<Timeline> timeline =
        client().CreateTimeline({.name = "chaos", .deadline = kTimelineDeadline});
    if (!Check(timeline.status(), "CreateTimeline")) return;
    Count(kTimelineCreate);
    timelines_.push_back({*std::move(timeline)});
    if (Chance(0.7)) {
      absl::StatusOr<std::string> token = timelines_.back().timeline.Export(absl::Seconds(10));
      if (!Check(token.status(), "Timeline::Export")) return;
      Count(kTimelineExport);
      Post(Note{.kind = Note::kTimeline, .from_pid = ::getpid()}, *token);
    }
  }

  void ImportTimeline(const Note& note) {
    if (timelines_.size() >= 6) DropTimeline();
    absl::StatusOr<Timeline> timeline = client().ImportTimeline(note.Token());
    if (!Check(timeline.status(), "ImportTimeline", Race::kGone)) return;
    Count(kTimelineImport);
    timelines_.push_back({*std::move(timeline)});
  }

  std::vector<size_t> Timelines(bool owned) const {
    std::vector<size_t> found;
    for (size_t i = 0; i < timelines_.size(); ++i) {
      if (timelines_[i].timeline.owned() == owned) found.push_back(i);
    }
    return found;
  }

  void SignalTimeline() {
    const std::vector<size_t> owned = Timelines(true);
    if (owned.empty()) return;
    HeldTimeline& held = timelines_[owned[Pick(owned)]];
    const uint64_t point = held.next + (Chance(0.2) ? Uniform(1, 3) : 0);
    const bool fail = Chance(0.15);
    const absl::Status status =
        fail ? held.timeline.Fail(point, "chaos") : held.timeline.Signal(point);
    // A signal past a point a fence stands behind waits for that fence.
    if (status.code() == absl::StatusCode::kFailedPrecondition && held.fence_point != 0 &&
        point > held.fence_point && absl::StrContains(status.message(), "behind a fence")) {
      Count(kGone);
      return;
    }
    if (!Check(status, fail ? "Timeline::Fail" : "Timeline::Signal")) return;
    held.next = point + 1;
    Count(kTimelineSignal);
  }

  // Waits on points of timelines we imported (one of ours would wait on this
  // very thread): the owner's signal, its death, its drop or the deadline
  // ends every such wait. By Wait, WaitAvailable, WaitTimelines, or as an
  // event loop would: Arm, then poll the notify fd.
  void WaitTimeline() {
    const std::vector<size_t> imported = Timelines(false);
    if (imported.empty()) return;
    const absl::Duration timeout = kLongestBound + kWaitMargin;
    const absl::Time start = absl::Now();
    const uint64_t roll = Uniform(0, 99);
    if (imported.size() >= 2 && roll < 25) {
      std::vector<TimelinePoint> points;
      for (size_t i : imported) {
        const Timeline& timeline = timelines_[i].timeline;
        points.push_back({&timeline, timeline.Query() + Uniform(1, 3)});
      }
      const bool all = Chance(0.5);
      absl::StatusOr<std::vector<PointResult>> results =
          client().WaitTimelines(points, all, timeout);
      if (!CheckWait(results.status(), all ? "WaitTimelines(all)" : "WaitTimelines(any)", timeout,
                     absl::Now() - start)) {
        return;
      }
      for (const PointResult& result : *results) Saw(result.status);
      Count(kTimelineWait);
      return;
    }
    const Timeline& timeline = timelines_[imported[Pick(imported)]].timeline;
    const uint64_t point = timeline.Query() + Uniform(1, 3);
    const std::string what = absl::StrCat("point ", point, " of timeline ", timeline.id());
    if (roll < 50 && session_.ClaimNotify(timeline.id())) {
      return ArmAndPoll(timeline, point, what, timeout);
    }
    absl::StatusOr<PointResult> result =
        roll < 65 ? timeline.WaitAvailable(point, timeout) : timeline.Wait(point, timeout);
    if (!CheckWait(result.status(), absl::StrCat("Wait on ", what), timeout, absl::Now() - start)) {
      return;
    }
    Saw(result->status);
    Count(kTimelineWait);
  }

  // The event-loop way (this lane owns the session's notify fd of this
  // timeline): Arm, poll, Arm again until the point's result comes.
  void ArmAndPoll(const Timeline& timeline, uint64_t point, const std::string& what,
                  absl::Duration timeout) {
    absl::StatusOr<int> fd = timeline.NotifyFd();
    if (!Check(fd.status(), "NotifyFd")) return;
    const absl::Time give_up = absl::Now() + timeout;
    while (true) {
      absl::StatusOr<std::optional<PointResult>> armed = timeline.Arm(point);
      if (!Check(armed.status(), "Arm")) return;
      if (armed->has_value()) {
        Saw((*armed)->status);
        Count(kTimelineArm);
        return;
      }
      short revents = 0;
      if (!PollReadable(*fd, std::max(give_up - absl::Now(), absl::ZeroDuration()), &revents)) {
        Report(SessionOver() ? kStuckAfterEnd : kHang, "notify fd of ", what,
               ": not readable within ", absl::FormatDuration(timeout));
        (void)timeline.Arm(0);
        return;
      }
    }
  }

  void ExportPoint() {
    if (timelines_.empty()) return;
    if (fences_.size() >= 12) DropFence();
    const Timeline& timeline = timelines_[Pick(timelines_)].timeline;
    absl::StatusOr<Fence> fence = timeline.ExportPoint(timeline.Query() + Uniform(0, 3) + 1);
    if (!Check(fence.status(), "ExportPoint")) return;
    Count(kPointExport);
    fences_.push_back({*std::move(fence), absl::Now() + kLongestBound, false,
                       absl::InfiniteFuture(), "a timeline point"});
    if (Chance(0.5)) PublishFence(fences_.back());
  }

  void AttachPoint() {
    const Buffer* buffer = AnyBuffer().first;
    if (buffer == nullptr || timelines_.empty()) return;
    const Timeline& timeline = timelines_[Pick(timelines_)].timeline;
    if (!Check(buffer->AttachPoint(timeline, timeline.Query() + Uniform(1, 3), AnyUsage(*buffer)),
               "AttachPoint")) {
      return;
    }
    Count(kPointAttach);
  }

  // The owner puts a fence (or an eventfd / pipe of ours) behind its next
  // point: a created or imported one, never a merged one or a timeline
  // point's. Through those a point could come to wait for itself (a cycle
  // the daemon does not detect), and a point behind a fence waits for as
  // long as that fence's deadline: a point fence's is max_fence_deadline
  // (5 min), so its waiters would too.
  void PointBehindFence() {
    const std::vector<size_t> owned = Timelines(true);
    if (owned.empty()) return;
    HeldTimeline& held = timelines_[owned[Pick(owned)]];
    const uint64_t point = held.next;
    std::vector<size_t> plain;
    for (size_t i = 0; i < fences_.size(); ++i) {
      const v1::FenceKind kind = fences_[i].fence.info().kind();
      if (kind == v1::FENCE_KIND_CREATED || kind == v1::FENCE_KIND_IMPORTED) plain.push_back(i);
    }
    absl::Status status;
    if (plain.empty() || Chance(0.3)) {
      absl::StatusOr<std::pair<UniqueFd, UniqueFd>> fds = MakeTrigger();
      if (!fds.ok()) return Report(kUnexpected, fds.status().ToString());
      const absl::Duration deadline = RandomDeadline();
      status = held.timeline.ImportSyncFd(point, fds->first.get(), deadline);
      if (status.ok()) {
        triggers_.push_back({std::move(fds->second),
                             absl::Now() + absl::Milliseconds(Uniform(
                                               0, absl::ToInt64Milliseconds(deadline) * 13 / 10))});
      }
    } else {
      status = held.timeline.ImportFence(point, fences_[plain[Pick(plain)]].fence);
    }
    if (!Check(status, "Timeline::ImportFence / ImportSyncFd")) return;
    Count(kPointBehindFence);
    held.fence_point = point;
    held.next = point + 1;
  }

  void DropTimeline() {
    if (timelines_.empty()) return;
    timelines_.erase(timelines_.begin() + Pick(timelines_));
    Count(kTimelineDrop);
  }

  // Ends the session with everything still held, in every lane (the
  // objects go after the Close); the process connects again.
  void Reconnect() {
    session_.End();
    session_.client().Close();
    Count(kReconnect);
  }

  Shared& shared_;
  const Mailbox& mailbox_;
  Session& session_;
  const uint64_t index_;
  std::mt19937_64 random_;
  int printed_ = 0;
  int refusals_printed_ = 0;
  std::vector<OwnBuffer> own_;
  std::vector<ImportedBuffer> imported_;
  std::vector<HeldTimeline> timelines_;
  std::vector<HeldFence> fences_;
  std::vector<Trigger> triggers_;
};

// A client process: connects a Client and runs `lanes` lanes on it (one on
// this thread), until it is killed. When a lane ends the session on purpose
// (Reconnect) or the controller does, the lanes end, drop what they held,
// and the process connects again. Returns only when it cannot go on (it
// printed why).
int RunClient(Shared& shared, const Mailbox& mailbox, uint64_t index, uint64_t seed, int lanes) {
  for (uint64_t generation = 0;; ++generation) {
    absl::StatusOr<Client> client = Client::Connect(shared.socket_dir);
    if (!client.ok()) {
      shared.counts[kUnexpected].fetch_add(1);
      std::fprintf(stderr, "chaos: client #%llu (pid %d): Connect: %s\n",
                   static_cast<unsigned long long>(index), ::getpid(),
                   client.status().ToString().c_str());
      return 3;
    }
    Session session(shared, *std::move(client));
    std::vector<std::unique_ptr<Lane>> running;
    for (int lane = 0; lane < lanes; ++lane) {
      running.push_back(std::make_unique<Lane>(
          shared, mailbox, session, index,
          Mix(seed ^ Mix(index ^ Mix(generation * 1000 + static_cast<uint64_t>(lane))))));
    }
    std::vector<std::thread> threads;
    for (int lane = 1; lane < lanes; ++lane) {
      threads.emplace_back([&running, lane] { running[lane]->Run(); });
    }
    running[0]->Run();
    for (std::thread& thread : threads) thread.join();
    if (session.fatal()) return 4;
    // The lanes' objects go after their session ended, then the Client.
    running.clear();
  }
}

// -- The churner --------------------------------------------------------------

// Forks the clients and kills one with SIGKILL every kill_every_ms, forking a
// new one in its place, until the controller says stop; then kills them all.
// Runs in a process without threads or Clients, forked before the controller
// had either.
int RunChurner(const Flags& flags, Shared& shared, Mailbox& mailbox) {
  ::prctl(PR_SET_NAME, "chaos-churner");
  while (shared.phase.load() == kWaiting) absl::SleepFor(absl::Milliseconds(1));
  if (shared.phase.load() != kRunning) return 0;
  std::mt19937_64 random(Mix(flags.seed));
  struct Running {
    ChildProcess process;
    uint64_t index;
  };
  std::vector<Running> running;
  uint64_t next_index = 0;
  bool failed = false;
  auto spawn = [&]() {
    const uint64_t index = next_index++;
    absl::StatusOr<ChildProcess> child = ChildProcess::Fork([&shared, &mailbox, &flags, index] {
      ::prctl(PR_SET_NAME, "chaos-client");
      return RunClient(shared, mailbox, index, flags.seed, flags.lanes);
    });
    if (!child.ok()) {
      std::fprintf(stderr, "chaos: churner: fork: %s\n", child.status().ToString().c_str());
      failed = true;
      return;
    }
    shared.spawned.fetch_add(1);
    running.push_back({*std::move(child), index});
  };
  // A client that ended before we killed it.
  auto died = [&](const Running& client, int code) {
    shared.died.fetch_add(1);
    std::fprintf(stderr, "chaos: client #%llu (pid %d) ended by itself: %s\n",
                 static_cast<unsigned long long>(client.index), client.process.pid(),
                 code > 128
                     ? absl::StrCat("signal ", code - 128, " (", strsignal(code - 128), ")").c_str()
                     : absl::StrCat("exit ", code).c_str());
  };
  for (int i = 0; i < flags.clients; ++i) spawn();
  const absl::Duration tick =
      flags.kill_every_ms > 0 ? absl::Milliseconds(flags.kill_every_ms) : absl::Milliseconds(50);
  while (shared.phase.load() == kRunning && !failed) {
    absl::SleepFor(tick);
    for (size_t i = 0; i < running.size();) {
      std::optional<int> code = running[i].process.WaitFor(absl::ZeroDuration());
      if (code.has_value()) {
        died(running[i], *code);
        running.erase(running.begin() + i);
      } else {
        ++i;
      }
    }
    if (flags.kill_every_ms > 0 && !running.empty()) {
      const size_t victim = std::uniform_int_distribution<size_t>(0, running.size() - 1)(random);
      running[victim].process.Kill(SIGKILL);
      const int code = running[victim].process.Wait();
      if (code == 128 + SIGKILL) {
        shared.killed.fetch_add(1);
      } else {
        died(running[victim], code);
      }
      running.erase(running.begin() + victim);
    }
    while (static_cast<int>(running.size()) < flags.clients && !failed) spawn();
  }
  for (Running& client : running) client.process.Kill(SIGKILL);
  for (Running& client : running) {
    const int code = client.process.Wait();
    if (code == 128 + SIGKILL) {
      shared.killed.fetch_add(1);
    } else {
      died(client, code);
    }
  }
  return failed ? 1 : 0;
}

// -- The controller -----------------------------------------------------------

int CountEntries(const std::string& dir) {
  std::error_code error;
  int count = 0;
  for (std::filesystem::directory_iterator it(dir, error), end; !error && it != end;
       it.increment(error)) {
    ++count;
  }
  return error ? -1 : count;
}

int CountThreads(pid_t pid) { return CountEntries(absl::StrCat("/proc/", pid, "/task")); }

// The daemon's threads by name ("grpcpp_sync_ser" x2, ...).
std::map<std::string, int> ThreadNames(pid_t pid) {
  std::map<std::string, int> names;
  std::error_code error;
  for (std::filesystem::directory_iterator it(absl::StrCat("/proc/", pid, "/task"), error), end;
       !error && it != end; it.increment(error)) {
    std::ifstream comm(it->path() / "comm");
    std::string name;
    std::getline(comm, name);
    ++names[name];
  }
  return names;
}

// gRPC's pools of threads that grow and never shrink (their names as
// /proc/<pid>/task/*/comm cuts them).
constexpr char kGrpcExecutorThread[] = "default-executo";
constexpr char kGrpcTimerThread[] = "grpc_global_tim";

std::string Describe(const std::map<std::string, int>& names) {
  std::vector<std::string> parts;
  for (const auto& [name, count] : names) parts.push_back(absl::StrCat(name, " x", count));
  return absl::StrJoin(parts, ", ");
}

// A field of /proc/<pid>/status in KiB (VmHWM, VmRSS); 0 if unreadable.
uint64_t StatusKib(pid_t pid, const std::string& field) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0)
      return std::strtoull(line.c_str() + field.size() + 1, nullptr, 10);
  }
  return 0;
}

// Alive: exists and is no zombie.
bool Alive(pid_t pid) {
  std::ifstream stat(absl::StrCat("/proc/", pid, "/stat"));
  std::string line;
  if (!std::getline(stat, line)) return false;
  const size_t paren = line.rfind(')');
  return paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] != 'Z' &&
         line[paren + 2] != 'X';
}

// The daemon's figures the end must come back to.
struct Baseline {
  int fds = 0;
  int threads = 0;
  uint64_t fds_in_use = 0;
  uint64_t control_connections = 0;
  uint64_t sessions = 0;
  // Sessions there before the clients (the observer's; more on a daemon
  // others use).
  std::set<uint64_t> session_ids;
  std::map<std::string, int> thread_names;
};

class Controller {
 public:
  Controller(const Flags& flags, Shared& shared)
      : flags_(flags), shared_(shared), random_(Mix(flags.seed ^ 0xc0ffee)) {}

  // Starts (or finds) the daemon, connects the observer and takes the
  // baseline.
  absl::Status Start() {
    if (flags_.socket_dir.empty()) {
      DaemonProcess::Options options{
          .config = kConfig, .log_level = flags_.log_level, .binary = flags_.bufferd};
      absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = DaemonProcess::Start(options);
      if (!daemon.ok()) return daemon.status();
      daemon_ = *std::move(daemon);
      socket_dir_ = daemon_->socket_dir();
    } else {
      socket_dir_ = flags_.socket_dir;
    }
    absl::StatusOr<Client> observer = Client::Connect(socket_dir_);
    if (!observer.ok()) return observer.status();
    observer_.emplace(*std::move(observer));
    v1::ListBuffersRequest one;
    one.set_page_size(1);
    absl::StatusOr<v1::ListBuffersResponse> buffers = observer_->ListBuffers(one);
    if (!buffers.ok()) return buffers.status();
    pid_ = daemon_ ? daemon_->pid() : static_cast<pid_t>(buffers->daemon_pid());
    return TakeBaseline();
  }

  const std::string& socket_dir() const { return socket_dir_; }
  pid_t pid() const { return pid_; }

  // While the clients run: reads every Debug view (they must answer while
  // sessions die under them), now and then ends a client's session as
  // `bufctl end-session` would, and checks the daemon is alive.
  void Observe() {
    ++observations_;
    if (!Alive(pid_)) {
      if (!daemon_dead_) std::fprintf(stderr, "chaos: the daemon (pid %d) is gone\n", pid_);
      daemon_dead_ = true;
      return;
    }
    auto fail = [&](absl::string_view what, const absl::Status& status) {
      // Not understood yet: now and then a Debug call on this long-lived
      // connection comes back UNIMPLEMENTED with no message (the client sent
      // the right method; so far only ListBuffers and ListTokens, under
      // client churn). Counted apart, printed, not failed.
      const bool unimplemented =
          status.code() == absl::StatusCode::kUnimplemented && status.message().empty();
      if (unimplemented) ++observer_unimplemented_;
      if (!unimplemented) ++observer_errors_;
      if (observer_errors_ + observer_unimplemented_ <= 10) {
        // Once more at once: says whether what failed stays failed.
        absl::StatusOr<v1::ListHeapsResponse> again = observer_->ListHeaps();
        std::fprintf(stderr, "chaos: observer: %s at %s: %s (a ListHeaps right after: %s)\n",
                     std::string(what).c_str(), absl::FormatTime(absl::Now()).c_str(),
                     status.ToString().c_str(), again.status().ToString().c_str());
      }
    };
    absl::StatusOr<v1::ListHeapsResponse> heaps = observer_->ListHeaps();
    if (!heaps.ok()) return fail("ListHeaps", heaps.status());
    for (const v1::HeapInfo& heap : heaps->heaps()) {
      if (heap.capacity() != 0 && heap.used() > heap.capacity()) {
        fail("ListHeaps", absl::InternalError(absl::StrCat("heap ", heap.name(), " uses ",
                                                           heap.used(), " of ", heap.capacity())));
      }
    }
    max_buffers_ = std::max(max_buffers_, heaps->live_buffers());
    max_sessions_ = std::max(max_sessions_, heaps->fds().sessions());
    absl::StatusOr<v1::ListClientsResponse> clients = observer_->ListClients();
    if (!clients.ok()) fail("ListClients", clients.status());
    absl::StatusOr<v1::ListBuffersResponse> buffers = observer_->ListAllBuffers();
    if (!buffers.ok()) fail("ListAllBuffers", buffers.status());
    absl::StatusOr<v1::ListTokensResponse> tokens = observer_->ListTokens();
    if (!tokens.ok()) fail("ListTokens", tokens.status());
    absl::StatusOr<v1::ListFencesResponse> fences = observer_->ListFences();
    if (!fences.ok()) fail("ListFences", fences.status());
    if (fences.ok()) max_fences_ = std::max<uint64_t>(max_fences_, fences->fences_size());
    if (clients.ok()) MaybeEndSession(*clients);
  }

  // Ends one client's session (the daemon's side of a session's end, while
  // the process lives on and keeps calling), every end_session_every_ms.
  void MaybeEndSession(const v1::ListClientsResponse& clients) {
    if (flags_.end_session_every_ms <= 0 || absl::Now() < next_end_) return;
    next_end_ = absl::Now() + absl::Milliseconds(flags_.end_session_every_ms);
    std::vector<uint64_t> candidates;
    for (const v1::ClientInfo& client : clients.clients()) {
      if (!baseline_.session_ids.contains(client.session_id())) {
        candidates.push_back(client.session_id());
      }
    }
    if (candidates.empty()) return;
    const uint64_t session =
        candidates[std::uniform_int_distribution<size_t>(0, candidates.size() - 1)(random_)];
    // Said before it is done: the client may see its session end first.
    shared_.ended_sessions[shared_.ended_next.fetch_add(1) % std::size(shared_.ended_sessions)]
        .store(session);
    absl::StatusOr<v1::EndSessionResponse> ended = observer_->EndSession(session);
    // NOT_FOUND: its process was killed meanwhile; FAILED_PRECONDITION: it
    // ended already and lingers (fds it was sent still unread).
    if (ended.ok()) {
      ++sessions_ended_;
    } else if (ended.status().code() != absl::StatusCode::kNotFound &&
               ended.status().code() != absl::StatusCode::kFailedPrecondition) {
      if (observer_errors_++ < 10) {
        std::fprintf(stderr, "chaos: observer: EndSession %llu: %s\n",
                     static_cast<unsigned long long>(session), ended.status().ToString().c_str());
      }
    }
  }
  uint64_t sessions_ended() const { return sessions_ended_; }

  std::string Progress(absl::Duration elapsed) const {
    uint64_t ops = 0;
    for (int i = 0; i < kOperationCount; ++i) ops += shared_.counts[i].load();
    return absl::StrFormat(
        "chaos: %.0f s: ops=%d kills=%d unexpected=%d mismatches=%d hangs=%d daemon rss=%.1fMiB "
        "fds=%d threads=%d",
        absl::ToDoubleSeconds(elapsed), ops, shared_.killed.load(),
        shared_.counts[kUnexpected].load(), shared_.counts[kMismatch].load(),
        shared_.counts[kHang].load(), StatusKib(pid_, "VmRSS") / 1024.0, CountOpenFds(pid_),
        CountThreads(pid_));
  }

  bool daemon_dead() const { return daemon_dead_; }
  int observer_errors() const { return observer_errors_; }
  int observer_unimplemented() const { return observer_unimplemented_; }

  // Waits (up to 10 s: releases of killed sessions are asynchronous) for the
  // daemon to be back at its baseline; returns what is still off (empty:
  // all is).
  std::vector<std::string> AwaitBaseline(absl::Duration* settled_in) {
    const absl::Time start = absl::Now();
    std::vector<std::string> off;
    while (true) {
      off = Leftovers();
      if (off.empty() || absl::Now() - start > absl::Seconds(10)) break;
      absl::SleepFor(absl::Milliseconds(50));
    }
    *settled_in = absl::Now() - start;
    return off;
  }

  // The daemon's peak RSS, and its fds and threads now against the
  // baseline (with gRPC's pool threads, which may stay above it).
  std::string Figures() const {
    std::map<std::string, int> threads = ThreadNames(pid_);
    return absl::StrFormat(
        "daemon_max_rss=%.1fMiB daemon_fds=%d/%d daemon_threads=%d/%d "
        "(grpc executor %d/%d, timer %d/%d)",
        StatusKib(pid_, "VmHWM") / 1024.0, CountOpenFds(pid_), baseline_.fds, CountThreads(pid_),
        baseline_.threads, threads[kGrpcExecutorThread],
        Get(baseline_.thread_names, kGrpcExecutorThread), threads[kGrpcTimerThread],
        Get(baseline_.thread_names, kGrpcTimerThread));
  }
  static int Get(const std::map<std::string, int>& names, const std::string& name) {
    auto it = names.find(name);
    return it == names.end() ? 0 : it->second;
  }
  uint64_t max_buffers() const { return max_buffers_; }
  uint64_t max_sessions() const { return max_sessions_; }
  uint64_t max_fences() const { return max_fences_; }

  // Refusals by heap and reason, from ListHeaps.
  std::string Refusals() const {
    absl::StatusOr<v1::ListHeapsResponse> heaps = observer_->ListHeaps();
    if (!heaps.ok()) return "?";
    std::vector<std::string> parts;
    for (const v1::HeapInfo& heap : heaps->heaps()) {
      for (const auto& [reason, count] : heap.failures_by_reason()) {
        parts.push_back(absl::StrCat(heap.name(), ":", reason, "=", count));
      }
    }
    return parts.empty() ? "none" : absl::StrJoin(parts, ",");
  }

  // Ends the observer's session and, if this started the daemon, stops it:
  // its exit code (0: a clean stop), else 0.
  int Stop() {
    observer_.reset();
    if (!daemon_) return 0;
    return daemon_->Stop();
  }

  // The daemon's log lines at warning level and above (at most `limit`),
  // and where a copy of the whole log is kept, if this started it.
  void PrintLog(bool failed) {
    if (!daemon_) return;
    std::ifstream log(daemon_->log_path());
    std::string line;
    std::vector<std::string> notable;
    std::vector<std::string> tail;
    size_t warnings = 0;
    while (std::getline(log, line)) {
      const bool is_notable =
          absl::StrContains(line, " warning ") || absl::StrContains(line, " error ") ||
          absl::StrContains(line, " critical ") || absl::StrContains(line, "Sanitizer") ||
          absl::StrContains(line, "runtime error");
      if (is_notable && notable.size() < 40) notable.push_back(line);
      warnings += is_notable;
      tail.push_back(line);
      if (tail.size() > 30) tail.erase(tail.begin());
    }
    std::printf("chaos: daemon log: %zu lines at warning or above\n", warnings);
    for (const std::string& l : notable) std::printf("  %s\n", l.c_str());
    if (!failed) return;
    std::printf("chaos: the daemon log's last lines:\n");
    for (const std::string& l : tail) std::printf("  %s\n", l.c_str());
    const char* outputs = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR");
    const std::string copy =
        absl::StrCat(outputs != nullptr ? outputs : "/tmp", "/chaos-", flags_.seed, "-bufferd.log");
    std::error_code error;
    std::filesystem::copy_file(daemon_->log_path(), copy,
                               std::filesystem::copy_options::overwrite_existing, error);
    std::printf("chaos: the daemon's whole log: %s\n",
                error ? error.message().c_str() : copy.c_str());
  }

 private:
  absl::Status TakeBaseline() {
    const absl::Time give_up = absl::Now() + absl::Seconds(10);
    // DaemonProcess's startup probe session ends asynchronously.
    while (true) {
      absl::StatusOr<v1::ListClientsResponse> clients = observer_->ListClients();
      if (!clients.ok()) return clients.status();
      absl::StatusOr<v1::ListHeapsResponse> heaps = observer_->ListHeaps();
      if (!heaps.ok()) return heaps.status();
      const bool settled =
          !daemon_ || (clients->clients_size() == 1 && heaps->fds().control_connections() == 1);
      if (settled) {
        for (const v1::ClientInfo& client : clients->clients()) {
          baseline_.session_ids.insert(client.session_id());
        }
        baseline_.fds_in_use = heaps->fds_in_use();
        baseline_.control_connections = heaps->fds().control_connections();
        baseline_.sessions = heaps->fds().sessions();
        break;
      }
      if (absl::Now() > give_up) return absl::DeadlineExceededError("the daemon never settled");
      absl::SleepFor(absl::Milliseconds(10));
    }
    // The same fd and thread counts 5 times in a row (50 ms).
    int same = 0;
    int fds = -1;
    int threads = -1;
    while (same < 5) {
      const int now_fds = CountOpenFds(pid_);
      const int now_threads = CountThreads(pid_);
      same = now_fds == fds && now_threads == threads ? same + 1 : 0;
      fds = now_fds;
      threads = now_threads;
      if (absl::Now() > give_up)
        return absl::DeadlineExceededError("the daemon's fds never settled");
      absl::SleepFor(absl::Milliseconds(10));
    }
    baseline_.fds = fds;
    baseline_.threads = threads;
    baseline_.thread_names = ThreadNames(pid_);
    if (!daemon_) return absl::OkStatus();
    // A fresh daemon holds nothing.
    std::vector<std::string> off = Leftovers();
    if (!off.empty()) {
      return absl::InternalError(absl::StrCat("a fresh daemon: ", absl::StrJoin(off, "; ")));
    }
    return absl::OkStatus();
  }

  // What differs from the baseline now.
  std::vector<std::string> Leftovers() const {
    std::vector<std::string> off;
    auto expect = [&](absl::string_view what, uint64_t got, uint64_t want) {
      if (got != want) off.push_back(absl::StrCat(what, " ", got, " (want ", want, ")"));
    };
    if (!Alive(pid_)) return {"the daemon is gone"};
    absl::StatusOr<v1::ListHeapsResponse> heaps = observer_->ListHeaps();
    if (!heaps.ok()) return {absl::StrCat("ListHeaps: ", heaps.status().ToString())};
    for (const v1::HeapInfo& heap : heaps->heaps()) {
      expect(absl::StrCat("heap ", heap.name(), " used"), heap.used(), 0);
      expect(absl::StrCat("heap ", heap.name(), " buffers"), heap.buffer_count(), 0);
    }
    expect("live_buffers", heaps->live_buffers(), 0);
    expect("live_handles", heaps->live_handles(), 0);
    expect("pending_tokens", heaps->pending_tokens(), 0);
    expect("fds_in_use", heaps->fds_in_use(), baseline_.fds_in_use);
    expect("fds.exports", heaps->fds().exports(), 0);
    expect("fds.fences", heaps->fds().fences(), 0);
    expect("fds.deliveries", heaps->fds().deliveries(), 0);
    expect("fds.sessions", heaps->fds().sessions(), baseline_.sessions);
    expect("fds.control_connections", heaps->fds().control_connections(),
           baseline_.control_connections);

    absl::StatusOr<v1::ListClientsResponse> clients = observer_->ListClients();
    if (!clients.ok()) return {absl::StrCat("ListClients: ", clients.status().ToString())};
    for (const v1::ClientInfo& client : clients->clients()) {
      if (!baseline_.session_ids.contains(client.session_id())) {
        off.push_back(absl::StrCat("session ", client.session_id(), " (", client.comm(), "[",
                                   client.pid(), "], handles ", client.handles(), ", fences ",
                                   client.fences(), ", held ", client.fences_held(), ")"));
        continue;
      }
      const std::string who = absl::StrCat("session ", client.session_id());
      expect(who + " handles", client.handles(), 0);
      expect(who + " fences", client.fences(), 0);
      expect(who + " fences_held", client.fences_held(), 0);
      expect(who + " queued_deliveries", client.queued_deliveries(), 0);
      for (const v1::HeapBytes& bytes : client.bytes()) {
        expect(absl::StrCat(who, " charged on ", bytes.heap()), bytes.bytes(), 0);
      }
      for (const v1::HeapBytes& bytes : client.held()) {
        expect(absl::StrCat(who, " held on ", bytes.heap()), bytes.bytes(), 0);
      }
    }
    for (const v1::UidBytes& uid : clients->uids()) {
      expect(absl::StrCat("uid ", uid.uid(), " charged"), uid.charged(), 0);
      expect(absl::StrCat("uid ", uid.uid(), " held"), uid.held(), 0);
    }

    absl::StatusOr<v1::ListBuffersResponse> buffers = observer_->ListAllBuffers();
    if (!buffers.ok()) return {absl::StrCat("ListAllBuffers: ", buffers.status().ToString())};
    for (int i = 0; i < buffers->buffers_size() && i < 5; ++i) {
      const v1::BufferDebugInfo& buffer = buffers->buffers(i);
      off.push_back(absl::StrCat("buffer ", buffer.ShortDebugString().substr(0, 300)));
    }
    absl::StatusOr<v1::ListTokensResponse> tokens = observer_->ListTokens();
    if (!tokens.ok()) return {absl::StrCat("ListTokens: ", tokens.status().ToString())};
    expect("tokens", tokens->tokens_size(), 0);
    absl::StatusOr<v1::ListFencesResponse> fences = observer_->ListFences();
    if (!fences.ok()) return {absl::StrCat("ListFences: ", fences.status().ToString())};
    expect("fences", fences->fences_size(), 0);
    expect("timelines", fences->timelines_size(), 0);
    for (int i = 0; i < fences->fences_size() && i < 3; ++i) {
      off.push_back(absl::StrCat("fence ", fences->fences(i).ShortDebugString().substr(0, 300)));
    }
    for (int i = 0; i < fences->timelines_size() && i < 3; ++i) {
      off.push_back(
          absl::StrCat("timeline ", fences->timelines(i).ShortDebugString().substr(0, 300)));
    }
    expect("daemon fds (/proc)", CountOpenFds(pid_), baseline_.fds);
    CheckThreads(off);
    return off;
  }

  // The daemon's threads, by name, against the baseline: its own exactly;
  // gRPC's two pools that only ever grow (they keep their high-water mark
  // until the library shuts down) up to their bounds: the default executor
  // to 2 threads a core (grpc_core::Executor's max_threads_), the timer
  // manager to 2 a core more than at the baseline.
  void CheckThreads(std::vector<std::string>& off) const {
    const std::map<std::string, int> now = ThreadNames(pid_);
    std::set<std::string> names;
    for (const auto& [name, count] : now) names.insert(name);
    for (const auto& [name, count] : baseline_.thread_names) names.insert(name);
    const int cores = static_cast<int>(::sysconf(_SC_NPROCESSORS_ONLN));
    bool differs = false;
    for (const std::string& name : names) {
      const int got = now.contains(name) ? now.at(name) : 0;
      const int want = baseline_.thread_names.contains(name) ? baseline_.thread_names.at(name) : 0;
      int most = want;
      if (name == kGrpcExecutorThread) most = std::max(want, 2 * cores);
      if (name == kGrpcTimerThread) most = want + 2 * cores;
      if (got > most || (got < want && most == want)) {
        differs = true;
        off.push_back(absl::StrCat("daemon threads named '", name, "': ", got, " (want ", want,
                                   most != want ? absl::StrCat(" to ", most) : "", ")"));
      }
    }
    if (differs) {
      off.push_back(absl::StrCat("daemon threads now: ", Describe(now),
                                 "; at the baseline: ", Describe(baseline_.thread_names)));
    }
  }

  const Flags& flags_;
  Shared& shared_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::string socket_dir_;
  pid_t pid_ = -1;
  std::optional<Client> observer_;
  Baseline baseline_;
  bool daemon_dead_ = false;
  int observer_errors_ = 0;
  int observer_unimplemented_ = 0;
  uint64_t observations_ = 0;
  uint64_t max_buffers_ = 0;
  uint64_t max_sessions_ = 0;
  uint64_t max_fences_ = 0;
  std::mt19937_64 random_;
  absl::Time next_end_ = absl::InfinitePast();
  uint64_t sessions_ended_ = 0;
};

int Main(int argc, char** argv) {
  Flags flags;
  flags.seed = static_cast<uint64_t>(absl::ToUnixNanos(absl::Now()));
  CLI::App app{
      "chaos: bufferd under client processes killed with -9 (tests/chaos.cc says what it checks)"};
  app.add_option("--seconds", flags.seconds, "how long the clients run")->capture_default_str();
  app.add_option("--clients", flags.clients, "client processes at once")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--kill-every-ms", flags.kill_every_ms,
                 "kill a random client with SIGKILL (and start another) this often; 0: never")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--lanes", flags.lanes,
                 "threads per client process, sharing its Client (its session)")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  app.add_option("--end-session-every-ms", flags.end_session_every_ms,
                 "end a random client's session (as bufctl end-session) this often; 0: never")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--observe-every-ms", flags.observe_every_ms,
                 "read every Debug view (ListHeaps, ListClients, ListBuffers, ListTokens, "
                 "ListFences) this often")
      ->check(CLI::Range(1, 10000))
      ->capture_default_str();
  app.add_option("--seed", flags.seed, "random seed (default: the time; always printed)");
  app.add_option("--socket-dir", flags.socket_dir,
                 "use the daemon serving this dir (default: start one on a temp dir); the end "
                 "check expects nobody else to use it");
  app.add_option("--log-level", flags.log_level, "the started daemon's log level")
      ->capture_default_str();
  app.add_option("--bufferd", flags.bufferd,
                 "the daemon binary to start (default: this workspace's daemon/bufferd)");
  app.add_option("--progress-seconds", flags.progress_seconds,
                 "print a progress line this often; 0: never")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);

  std::printf(
      "chaos: seed=%llu seconds=%g clients=%d lanes=%d kill_every_ms=%d end_session_every_ms=%d "
      "(replay: --seed %llu)\n",
      static_cast<unsigned long long>(flags.seed), flags.seconds, flags.clients, flags.lanes,
      flags.kill_every_ms, flags.end_session_every_ms, static_cast<unsigned long long>(flags.seed));

  // Before any thread or Client exists in this process: the shared state,
  // the mailbox and the churner.
  Shared* shared = MapShared();
  if (shared == nullptr) {
    std::perror("chaos: mmap");
    return 1;
  }
  absl::StatusOr<Mailbox> mailbox = Mailbox::Create();
  if (!mailbox.ok()) {
    std::fprintf(stderr, "chaos: %s\n", mailbox.status().ToString().c_str());
    return 1;
  }
  absl::StatusOr<ChildProcess> churner =
      ChildProcess::Fork([&] { return RunChurner(flags, *shared, *mailbox); });
  if (!churner.ok()) {
    std::fprintf(stderr, "chaos: %s\n", churner.status().ToString().c_str());
    return 1;
  }

  Controller controller(flags, *shared);
  absl::Status started = controller.Start();
  if (!started.ok()) {
    std::fprintf(stderr, "chaos: FAIL: %s\n", started.ToString().c_str());
    shared->phase.store(kStopping);
    churner->Wait();
    controller.PrintLog(true);
    return 1;
  }
  std::printf("chaos: bufferd pid %d on %s\n", controller.pid(), controller.socket_dir().c_str());
  std::snprintf(shared->socket_dir, sizeof(shared->socket_dir), "%s",
                controller.socket_dir().c_str());
  const absl::Time start = absl::Now();
  shared->phase.store(kRunning);

  absl::Time next_progress = start + absl::Seconds(flags.progress_seconds);
  const absl::Time end = start + absl::Seconds(flags.seconds);
  while (absl::Now() < end && !controller.daemon_dead()) {
    absl::SleepFor(std::min(absl::Milliseconds(flags.observe_every_ms), end - absl::Now()));
    if (churner->WaitFor(absl::ZeroDuration()).has_value()) {
      std::fprintf(stderr, "chaos: the churner ended early\n");
      break;
    }
    controller.Observe();
    if (flags.progress_seconds > 0 && absl::Now() >= next_progress) {
      std::printf("%s\n", controller.Progress(absl::Now() - start).c_str());
      next_progress += absl::Seconds(flags.progress_seconds);
    }
  }
  const absl::Duration ran = absl::Now() - start;
  shared->phase.store(kStopping);
  std::optional<int> churned = churner->WaitFor(absl::Seconds(30));
  if (!churned.has_value()) std::fprintf(stderr, "chaos: the churner did not stop within 30 s\n");
  // Fence fds still in the mailbox go with it.
  mailbox->Close();

  std::vector<std::string> failures;
  absl::Duration settled_in;
  std::vector<std::string> leftovers;
  if (controller.daemon_dead()) {
    failures.push_back("the daemon died");
  } else {
    leftovers = controller.AwaitBaseline(&settled_in);
    for (const std::string& off : leftovers) {
      std::printf("chaos: not back at the baseline after %s: %s\n",
                  absl::FormatDuration(settled_in).c_str(), off.c_str());
    }
    if (!leftovers.empty()) failures.push_back("not back at the baseline");
  }
  if (churned != std::optional<int>(0)) failures.push_back("the churner failed");
  const char* const kMustBeZero[] = {"unexpected", "mismatch", "hang"};
  for (Counter counter : {kUnexpected, kMismatch, kHang}) {
    if (shared->counts[counter].load() != 0) failures.push_back(kMustBeZero[counter - kUnexpected]);
  }
  if (shared->died.load() != 0) failures.push_back("clients died by themselves");
  if (controller.observer_errors() != 0) failures.push_back("observer calls failed");
  if (shared->counts[kImportVerified].load() == 0) failures.push_back("no import was verified");

  const std::string figures = controller.daemon_dead() ? "" : controller.Figures();
  const std::string refusals = controller.daemon_dead() ? "" : controller.Refusals();
  const int stopped = controller.Stop();
  if (stopped != 0) failures.push_back(absl::StrCat("the daemon exited ", stopped, " on SIGTERM"));
  controller.PrintLog(!failures.empty());

  uint64_t ops = 0;
  std::vector<std::string> by_kind;
  for (int i = 0; i < kCounterCount; ++i) {
    const uint64_t count = shared->counts[i].load();
    if (i < kOperationCount) ops += count;
    by_kind.push_back(absl::StrCat(kCounterNames[i], "=", count));
  }
  auto count = [&](Counter counter) { return shared->counts[counter].load(); };
  const uint64_t waits = count(kFenceWait) + count(kFencePoll) + count(kTimelineWait) +
                         count(kTimelineArm) + count(kCpuAccess) + count(kFencesFd);
  std::printf(
      "%s\n",
      absl::StrFormat(
          "chaos: %s seed=%d seconds=%.1f clients=%d lanes=%d kill_every_ms=%d ops=%d "
          "kills=%d sessions_ended=%d spawned=%d imports_verified=%d waits=%d refused=%d "
          "gone=%d record_race=%d stuck_after_end=%d observer_unimplemented=%d unexpected=%d "
          "mismatches=%d hangs=%d died=%d max_late_wait=%s max_buffers=%d max_sessions=%d "
          "settled_in=%s %s refusals=%s | %s%s%s",
          failures.empty() ? "PASS" : "FAIL", flags.seed, absl::ToDoubleSeconds(ran), flags.clients,
          flags.lanes, flags.kill_every_ms, ops, shared->killed.load(), controller.sessions_ended(),
          shared->spawned.load(), count(kImportVerified), waits, count(kRefused), count(kGone),
          count(kRecordRace), count(kStuckAfterEnd), controller.observer_unimplemented(),
          count(kUnexpected), count(kMismatch), count(kHang), shared->died.load(),
          absl::FormatDuration(absl::Nanoseconds(shared->max_late_ns.load())),
          controller.max_buffers(), controller.max_sessions(), absl::FormatDuration(settled_in),
          figures, refusals, absl::StrJoin(by_kind, " "),
          failures.empty() ? "" : " | FAIL: ", absl::StrJoin(failures, "; "))
          .c_str());
  return failures.empty() ? 0 : 1;
}

}  // namespace
}  // namespace bufferd::chaos

int main(int argc, char** argv) { return bufferd::chaos::Main(argc, argv); }
