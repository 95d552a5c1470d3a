// tests/peer: the second process of integration tests. Talks to bufferd only
// through the client library and reports on stdout, one fact per line.
//
//   peer read  <dir> <token> <byte>   import, check every byte, try a writable map
//   peer write <dir> <token> <byte>   import, fill with <byte>
//   peer hold  <dir> <heap> <size> <count>  allocate, print "ready", wait to be killed
//   peer --comm <C-escaped name> <mode> ...: the same, under that process name
//   peer manager <dir> <bufferd>   play systemd as pid 1: bind both sockets,
//       start bufferd with them, connect and allocate ("allocated buffer=N")
//   peer flood <dir> sessions|control|both   below the library: open fd.sock sessions
//       until the daemon refuses one ("sessions=N refused=CODE:MESSAGE"), then
//       control.sock connections until one is closed unserved ("control=N"),
//       print "ready" and wait to be killed
//   peer records <dir> <threads>   below the library: one session whose
//       threads send one-way releases of bogus handles as fast as the daemon
//       takes them; prints "ready" once they run, until killed
//   peer frame-read <dir> <token>   import a frame: its layout, the first
//       byte of each plane's first rows, its metadata, and whether this
//       read-only holder may change it
//   peer fence-own <dir>   create a fence and export it: "ready fd=<n>", then
//       wait to be killed (other processes open /proc/<pid>/fd/<n>)
//   peer fence-wait <dir> <fd path>   import the fence fd at <fd path> and
//       wait for it by RPC; peer fence-poll <dir> <fd path> polls the fd.
//       Both print "ready", then "woke mono_ns=<CLOCK_MONOTONIC> status=<S>"
//   peer timeline-produce <dir> <interval_us>   create a timeline and export it:
//       "ready token=<t> token2=<t2> timeline=<id>"; once someone waits on it (WaitedOn),
//       signal 1, 2, 3, ... every interval until killed
//   peer timeline-consume <dir> <token>   import, print "ready", then wait for
//       1, 2, 3, ... in order until a point is not OK: "woke mono_ns=<ns>
//       point=<n> status=<S> order=<ok|bad>" (bad: Query() went back, or a
//       point before the one waited for did not read OK)
//   peer timeline-poll <dir> <token>   the same from an event loop: the
//       timeline's notify fd, armed for each point, polled
//   peer timeline-attack <dir> <token>   import, then try to write every byte
//       of the timeline's pages every way there is; one line per attempt
//       "attack <what>: <refused|WROTE>", then "done"
//   peer resv-write <dir> <token> <byte> <delay_ms>   import read-write,
//       attach a WRITE fence, print "ready", <delay_ms> later fill the buffer
//       with <byte> and signal the fence: "signalled", then exit
//   peer resv-read <dir> <token>   import read-only, attach a READ fence,
//       print "ready", wait to be killed (never signals it)
//   peer timeline-requeue <dir> <token> <ms>   import, print "ready", then for
//       <ms> FUTEX_CMP_REQUEUE every waiter off the timeline's futex words onto
//       a private one; "requeued=<n>"
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "client/client.h"

namespace {

int Fail(const std::string& what, const absl::Status& status) {
  std::printf("error %s: %s\n", what.c_str(), status.ToString().c_str());
  return 1;
}

bool Readable(int fd) {
  pollfd ready{fd, POLLIN, 0};
  return ::poll(&ready, 1, 10000) == 1;
}

// Sessions until the daemon refuses one (at most 100,000); they stay open.
void FloodSessions(const std::string& dir, std::vector<bufferd::UnixSocket>& held) {
  while (held.size() < 100000) {
    absl::StatusOr<bufferd::UnixSocket> socket =
        bufferd::UnixSocket::ConnectSeqPacket(bufferd::FdSocketPath(dir));
    if (!socket.ok()) {
      std::printf("sessions=%zu connect failed: %s\n", held.size(),
                  socket.status().ToString().c_str());
      return;
    }
    absl::StatusOr<bufferd::UnixSocket::Received> first =
        Readable(socket->fd()) ? socket->RecvWithFds() : absl::DeadlineExceededError("no record");
    bufferd::v1::FdChannelMessage message;
    if (!first.ok() || !message.ParseFromString(first->bytes)) {
      std::printf("sessions=%zu no record: %s\n", held.size(),
                  first.ok() ? "unparsable" : first.status().ToString().c_str());
      return;
    }
    if (message.has_refused()) {
      std::printf("sessions=%zu refused=%d:%s\n", held.size(), message.refused().code(),
                  message.refused().message().c_str());
      return;
    }
    held.push_back(*std::move(socket));
  }
}

// control.sock connections until one is closed before gRPC speaks on it
// (served ones get gRPC's SETTINGS frame first); they stay open.
void FloodControl(const std::string& dir, std::vector<int>& held) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  const std::string path = bufferd::ControlSocketPath(dir);
  std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
  while (held.size() < 100000) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
      std::printf("control=%zu connect failed: %s\n", held.size(), std::strerror(errno));
      return;
    }
    char byte;
    const ssize_t n = Readable(fd) ? ::recv(fd, &byte, 1, MSG_PEEK) : -1;
    if (n <= 0) {
      ::close(fd);
      std::printf("control=%zu%s\n", held.size(), n == 0 ? "" : " (no answer)");
      return;
    }
    held.push_back(fd);
  }
}

// One session, `threads` threads sending ReleaseHandle records of a handle
// that does not exist, without end.
void FloodRecords(const std::string& dir, int threads) {
  absl::StatusOr<bufferd::UnixSocket> socket =
      bufferd::UnixSocket::ConnectSeqPacket(bufferd::FdSocketPath(dir));
  if (!socket.ok() || !Readable(socket->fd()) || !socket->RecvWithFds().ok()) {
    std::printf("no session\n");
    return;
  }
  bufferd::v1::FdChannelMessage message;
  message.mutable_release()->set_handle(~uint64_t{0} - 1);
  const std::string record = message.SerializeAsString();
  for (int i = 0; i < threads; ++i) {
    std::thread([&socket, record] {
      while (socket->Send(record).ok()) {
      }
    }).detach();
  }
  std::printf("ready\n");
  while (true) ::pause();
}

int64_t MonotonicNs() {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  return int64_t{now.tv_sec} * 1000000000 + now.tv_nsec;
}

// fence-wait / fence-poll: the fence fd another process holds.
int WaitForFence(bufferd::Client& client, const std::string& mode, const std::string& path) {
  // O_NONBLOCK: opening a pipe whose writer is gone must not wait for one.
  bufferd::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (!fd.valid()) return Fail("open " + path, absl::ErrnoToStatus(errno, "open"));
  if (mode == "fence-poll") {
    std::printf("ready\n");
    pollfd ready{fd.get(), POLLIN, 0};
    if (::poll(&ready, 1, 60000) != 1) return Fail("poll", absl::DeadlineExceededError("60 s"));
    std::printf("woke mono_ns=%lld status=readable\n", static_cast<long long>(MonotonicNs()));
    return 0;
  }
  absl::StatusOr<bufferd::Fence> fence = client.ImportSyncFd(fd.get());
  if (!fence.ok()) return Fail("import", fence.status());
  std::printf("ready fence=%lu\n", static_cast<unsigned long>(fence->id()));
  absl::StatusOr<bufferd::v1::FenceInfo> info = fence->Wait(absl::Seconds(60));
  const int64_t woke = MonotonicNs();
  if (!info.ok()) return Fail("wait", info.status());
  std::printf("woke mono_ns=%lld status=%s\n", static_cast<long long>(woke),
              bufferd::v1::FenceStatus_Name(info->status()).c_str());
  return 0;
}

// timeline-produce
int Produce(bufferd::Client& client, int64_t interval_us) {
  absl::StatusOr<bufferd::Timeline> timeline =
      client.CreateTimeline({.name = "produced", .deadline = absl::Seconds(60)});
  if (!timeline.ok()) return Fail("create", timeline.status());
  absl::StatusOr<std::string> token = timeline->Export(absl::Seconds(60));
  absl::StatusOr<std::string> token2 = timeline->Export(absl::Seconds(60));
  if (!token.ok()) return Fail("export", token.status());
  if (!token2.ok()) return Fail("export", token2.status());
  std::printf("ready token=%s token2=%s timeline=%lu\n", token->c_str(), token2->c_str(),
              static_cast<unsigned long>(timeline->id()));
  while (timeline->WaitedOn().point == 0) ::usleep(1000);
  for (uint64_t point = 1;; ++point) {
    if (absl::Status signalled = timeline->Signal(point); !signalled.ok()) {
      return Fail("signal", signalled);
    }
    ::usleep(static_cast<useconds_t>(interval_us));
  }
}

// timeline-consume
int Consume(bufferd::Client& client, const std::string& token, bool poll) {
  absl::StatusOr<bufferd::Timeline> timeline = client.ImportTimeline(token);
  if (!timeline.ok()) return Fail("import", timeline.status());
  std::printf("ready\n");
  // In order: every point up to the one a wait returned for reads reached
  // OK, and Query() never goes back.
  bool in_order = true;
  uint64_t last_query = 0;
  absl::StatusOr<int> notify = poll ? timeline->NotifyFd() : absl::StatusOr<int>(-1);
  if (!notify.ok()) return Fail("notify fd", notify.status());
  for (uint64_t point = 1;; ++point) {
    absl::StatusOr<bufferd::PointResult> result;
    if (poll) {
      while (true) {
        absl::StatusOr<std::optional<bufferd::PointResult>> armed = timeline->Arm(point);
        if (!armed.ok()) return Fail("arm", armed.status());
        if (armed->has_value()) {
          result = **std::move(armed);
          break;
        }
        pollfd ready{*notify, POLLIN, 0};
        if (::poll(&ready, 1, 60000) != 1) return Fail("poll", absl::DeadlineExceededError("60 s"));
      }
    } else {
      result = timeline->Wait(point, absl::Seconds(60));
    }
    const int64_t woke = MonotonicNs();
    if (!result.ok()) return Fail("wait", result.status());
    const uint64_t query = timeline->Query();
    if (query < last_query) in_order = false;
    last_query = query;
    if (result->status == bufferd::v1::FENCE_STATUS_OK) {
      for (uint64_t before = point > 3 ? point - 3 : 1; before < point; ++before) {
        auto earlier = timeline->Wait(before, absl::ZeroDuration());
        if (!earlier.ok() || earlier->status != bufferd::v1::FENCE_STATUS_OK) in_order = false;
      }
    }
    if (result->status != bufferd::v1::FENCE_STATUS_OK) {
      std::printf("woke mono_ns=%lld point=%lu status=%s order=%s\n",
                  static_cast<long long>(woke), static_cast<unsigned long>(point),
                  bufferd::v1::FenceStatus_Name(result->status).c_str(), in_order ? "ok" : "bad");
      return 0;
    }
  }
}

// timeline-attack: every way an importer could try to write shared state.
int Attack(bufferd::Client& client, const std::string& token) {
  absl::StatusOr<bufferd::Timeline> timeline = client.ImportTimeline(token);
  if (!timeline.ok()) return Fail("import", timeline.status());
  std::FILE* maps = std::fopen("/proc/self/maps", "r");
  if (maps == nullptr) return Fail("maps", absl::ErrnoToStatus(errno, "fopen"));
  char line[512];
  std::vector<std::pair<uintptr_t, uintptr_t>> pages;
  while (std::fgets(line, sizeof(line), maps) != nullptr) {
    const std::string text = line;
    if (text.find("bufferd-timeline-counters") == std::string::npos &&
        text.find("bufferd-timeline-state") == std::string::npos) {
      continue;
    }
    unsigned long from = 0, to = 0;
    if (std::sscanf(line, "%lx-%lx", &from, &to) == 2) pages.emplace_back(from, to);
  }
  std::fclose(maps);
  std::printf("pages=%zu\n", pages.size());
  auto report = [](const std::string& what, bool wrote) {
    std::printf("attack %s: %s\n", what.c_str(), wrote ? "WROTE" : "refused");
  };
  for (const auto& [from, to] : pages) {
    void* at = reinterpret_cast<void*>(from);
    report("mprotect", ::mprotect(at, to - from, PROT_READ | PROT_WRITE) == 0);
    const std::string path = "/proc/self/map_files/" + [&] {
      char range[64];
      std::snprintf(range, sizeof(range), "%lx-%lx", static_cast<unsigned long>(from),
                    static_cast<unsigned long>(to));
      return std::string(range);
    }();
    bufferd::UniqueFd ro(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (ro.valid()) {
      void* map = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ro.get(), 0);
      report("mmap-shared-write-ro-fd", map != MAP_FAILED);
      if (map != MAP_FAILED) ::munmap(map, 4096);
      const std::string proc_fd = "/proc/self/fd/" + std::to_string(ro.get());
      bufferd::UniqueFd rw(::open(proc_fd.c_str(), O_RDWR | O_CLOEXEC));
      if (!rw.valid()) {
        report("reopen-rw", false);
        continue;
      }
      map = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, rw.get(), 0);
      report("mmap-shared-write-reopened", map != MAP_FAILED);
      if (map != MAP_FAILED) ::munmap(map, 4096);
      map = ::mmap(nullptr, 4096, PROT_READ, MAP_SHARED, rw.get(), 0);
      if (map != MAP_FAILED) {
        report("mprotect-reopened", ::mprotect(map, 4096, PROT_READ | PROT_WRITE) == 0);
        ::munmap(map, 4096);
      }
      const char byte = 1;
      report("pwrite", ::pwrite(rw.get(), &byte, 1, 0) == 1);
      report("ftruncate", ::ftruncate(rw.get(), 0) == 0);
      report("punch-hole", ::fallocate(rw.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                                       4096) == 0);
      // A seal would stop the owner (or the daemon) writing its own page.
      report("add-seal", ::fcntl(rw.get(), F_ADD_SEALS, F_SEAL_WRITE) == 0);
    } else {
      report("open-map-file", false);
    }
  }
  std::printf("done\n");
  return 0;
}

// The timeline pages this process maps (read-only: imported), by address.
std::vector<uintptr_t> TimelinePages() {
  std::vector<uintptr_t> pages;
  std::FILE* maps = std::fopen("/proc/self/maps", "r");
  if (maps == nullptr) return pages;
  char line[512];
  while (std::fgets(line, sizeof(line), maps) != nullptr) {
    const std::string text = line;
    if (text.find("bufferd-timeline-counters") == std::string::npos &&
        text.find("bufferd-timeline-state") == std::string::npos) {
      continue;
    }
    unsigned long from = 0;
    if (std::sscanf(line, "%lx-", &from) == 1) pages.push_back(from);
  }
  std::fclose(maps);
  return pages;
}

// timeline-requeue: steals other processes' futex waits (their wake then
// reaches a word nobody wakes).
int Requeue(bufferd::Client& client, const std::string& token, int64_t ms) {
  absl::StatusOr<bufferd::Timeline> timeline = client.ImportTimeline(token);
  if (!timeline.ok()) return Fail("import", timeline.status());
  const std::vector<uintptr_t> pages = TimelinePages();
  std::printf("ready pages=%zu\n", pages.size());
  static uint32_t elsewhere = 0;
  long requeued = 0;
  const int64_t until = MonotonicNs() + ms * 1'000'000;
  while (MonotonicNs() < until) {
    for (uintptr_t page : pages) {
      auto* word = reinterpret_cast<uint32_t*>(page);  // seq, first in both pages
      const long moved = ::syscall(SYS_futex, word, FUTEX_CMP_REQUEUE, 0, INT32_MAX, &elsewhere,
                                   __atomic_load_n(word, __ATOMIC_ACQUIRE));
      if (moved > 0) requeued += moved;
    }
  }
  std::printf("requeued=%ld\n", requeued);
  return 0;
}

// Plays systemd (run it as pid 1 of a pid namespace): binds control.sock
// and fd.sock in `dir`, starts `bufferd` with them (LISTEN_FDS), then
// connects a Client and allocates. The sockets carry this process's
// credentials, not the daemon's, as systemd's do.
int ServiceManager(const std::string& dir, const std::string& bufferd) {
  absl::StatusOr<bufferd::UnixSocket> control =
      bufferd::UnixSocket::ListenStream(bufferd::ControlSocketPath(dir));
  absl::StatusOr<bufferd::UnixSocket> fd =
      bufferd::UnixSocket::ListenSeqPacket(bufferd::FdSocketPath(dir));
  if (!control.ok() || !fd.ok())
    return Fail("listen", control.ok() ? fd.status() : control.status());
  const pid_t daemon = ::fork();
  if (daemon == 0) {
    // To 3 and 4 through fresh numbers: dup2 onto the same number would
    // keep close-on-exec, and one dup2 could clobber the other socket.
    const int c = ::dup(control->fd());
    const int f = ::dup(fd->fd());
    if (c < 0 || f < 0 || ::dup2(c, 3) < 0 || ::dup2(f, 4) < 0) _exit(125);
    ::setenv("LISTEN_FDS", "2", 1);
    ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
    ::execl(bufferd.c_str(), bufferd.c_str(), "--log-level", "warn", nullptr);
    _exit(127);
  }
  std::printf("manager pid=%d daemon pid=%d\n", ::getpid(), daemon);
  // The daemon goes with this process, whatever the outcome.
  auto stop = [daemon](int code) {
    ::kill(daemon, SIGTERM);
    int status = 0;
    ::waitpid(daemon, &status, 0);
    return code;
  };
  absl::StatusOr<bufferd::Client> client = bufferd::Client::Connect(dir);
  if (!client.ok()) return stop(Fail("connect", client.status()));
  absl::StatusOr<bufferd::Buffer> buffer = client->Allocate({.heap = "system", .size = 4096});
  if (!buffer.ok()) return stop(Fail("allocate", buffer.status()));
  std::printf("allocated buffer=%lu\n", static_cast<unsigned long>(buffer->id()));
  return stop(0);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc > 2 && std::string(argv[1]) == "--comm") {
    // A hostile process name (C-escaped on the command line), before any
    // connection: the daemon reads it at connect.
    std::string comm;
    if (!absl::CUnescape(argv[2], &comm)) return 2;
    ::prctl(PR_SET_NAME, comm.c_str());
    argc -= 2;
    argv += 2;
  }
  if (argc < 3) return 2;
  const std::string mode = argv[1];
  if (mode == "flood" && argc == 4) {
    const std::string what = argv[3];
    std::vector<bufferd::UnixSocket> sessions;
    std::vector<int> control;
    if (what == "sessions" || what == "both") FloodSessions(argv[2], sessions);
    if (what == "control" || what == "both") FloodControl(argv[2], control);
    std::printf("ready\n");
    while (true) ::pause();
  }
  if (mode == "manager" && argc == 4) return ServiceManager(argv[2], argv[3]);
  if (mode == "records" && argc == 4) {
    FloodRecords(argv[2], std::atoi(argv[3]));
    return 1;
  }
  absl::StatusOr<bufferd::Client> client = bufferd::Client::Connect(argv[2]);
  if (!client.ok()) return Fail("connect", client.status());

  if ((mode == "read" || mode == "write") && argc == 5) {
    const int byte = std::atoi(argv[4]);
    absl::StatusOr<bufferd::Buffer> buffer = client->Import(argv[3]);
    if (!buffer.ok()) return Fail("import", buffer.status());
    std::printf("imported size=%lu access=%s\n", static_cast<unsigned long>(buffer->size()),
                buffer->access() == bufferd::Access::kReadOnly ? "ro" : "rw");
    if (mode == "read") {
      absl::StatusOr<bufferd::Mapping> map = buffer->MapReadOnly();
      if (!map.ok()) return Fail("map", map.status());
      size_t bad = 0;
      for (uint8_t b : map->bytes()) bad += b != byte;
      std::printf("mismatched=%zu\n", bad);
      void* writable =
          ::mmap(nullptr, buffer->size(), PROT_READ | PROT_WRITE, MAP_SHARED, buffer->fd(), 0);
      std::printf("writable_map=%s\n", writable == MAP_FAILED
                                           ? (errno == EACCES ? "EACCES" : std::strerror(errno))
                                           : "ok");
      if (writable != MAP_FAILED) ::munmap(writable, buffer->size());
    } else {
      absl::StatusOr<bufferd::Mapping> map = buffer->Map();
      if (!map.ok()) return Fail("map", map.status());
      std::memset(map->data(), byte, map->size());
      std::printf("written\n");
    }
    return 0;
  }
  if (mode == "frame-read" && argc == 4) {
    absl::StatusOr<bufferd::Buffer> buffer = client->Import(argv[3]);
    if (!buffer.ok()) return Fail("import", buffer.status());
    const std::optional<bufferd::FrameFormat> frame = buffer->frame();
    if (!frame.has_value()) return Fail("frame", absl::NotFoundError("not a frame"));
    std::printf("frame %ux%u fourcc=%u planes=%zu size=%lu\n", frame->width, frame->height,
                frame->fourcc, frame->planes.size(), static_cast<unsigned long>(frame->size));
    absl::StatusOr<bufferd::Mapping> map = buffer->MapReadOnly();
    if (!map.ok()) return Fail("map", map.status());
    for (size_t p = 0; p < frame->planes.size(); ++p) {
      const bufferd::PlaneLayout& plane = frame->planes[p];
      // The first byte of every row of the plane, as the writer set it.
      std::string rows;
      for (uint64_t row = 0; row * plane.stride < plane.size && row < 4; ++row) {
        absl::StrAppend(&rows, rows.empty() ? "" : ",",
                        map->bytes()[plane.offset + row * plane.stride]);
      }
      std::printf("plane=%zu offset=%lu stride=%u size=%lu rows=%s\n", p,
                  static_cast<unsigned long>(plane.offset), plane.stride,
                  static_cast<unsigned long>(plane.size), rows.c_str());
    }
    const bufferd::FrameMetadata metadata = buffer->metadata();
    std::printf("tag=%s generation=%lu crop=%s\n", metadata.tag.c_str(),
                static_cast<unsigned long>(metadata.generation),
                metadata.crop.has_value()
                    ? absl::StrCat(metadata.crop->width, "x", metadata.crop->height).c_str()
                    : "none");
    // A read-only holder reads the metadata but cannot change it.
    bufferd::FrameMetadata changed = metadata;
    changed.tag = "from the reader";
    const absl::Status refused = buffer->SetMetadata(changed);
    std::printf("set_metadata=%s\n", absl::StatusCodeToString(refused.code()).c_str());
    return 0;
  }
  if (mode == "fence-own") {
    absl::StatusOr<bufferd::Fence> fence =
        client->CreateFence({.name = "owned", .deadline = absl::Seconds(60)});
    if (!fence.ok()) return Fail("create", fence.status());
    absl::StatusOr<bufferd::UniqueFd> fd = fence->ExportFd();
    if (!fd.ok()) return Fail("export", fd.status());
    std::printf("ready fd=%d fence=%lu\n", fd->get(), static_cast<unsigned long>(fence->id()));
    while (true) ::pause();
  }
  if ((mode == "fence-wait" || mode == "fence-poll") && argc == 4) {
    return WaitForFence(*client, mode, argv[3]);
  }
  if (mode == "resv-write" && argc == 6) {
    absl::StatusOr<bufferd::Buffer> buffer = client->Import(argv[3]);
    if (!buffer.ok()) return Fail("import", buffer.status());
    absl::StatusOr<bufferd::Fence> done = client->CreateFence({.name = "frame done"});
    if (!done.ok()) return Fail("create", done.status());
    if (absl::Status attached = buffer->AttachFence(*done, bufferd::v1::FENCE_USAGE_WRITE);
        !attached.ok()) {
      return Fail("attach", attached);
    }
    std::printf("ready fence=%lu\n", static_cast<unsigned long>(done->id()));
    ::usleep(static_cast<useconds_t>(std::atoi(argv[5]) * 1000));
    absl::StatusOr<bufferd::Mapping> map = buffer->Map();
    if (!map.ok()) return Fail("map", map.status());
    std::memset(map->data(), std::atoi(argv[4]), map->size());
    if (absl::Status signalled = done->Signal(); !signalled.ok()) return Fail("signal", signalled);
    (void)done->Info();  // the one-way signal is applied before this answers
    std::printf("signalled\n");
    return 0;
  }
  if (mode == "resv-read" && argc == 4) {
    absl::StatusOr<bufferd::Buffer> buffer = client->Import(argv[3]);
    if (!buffer.ok()) return Fail("import", buffer.status());
    absl::StatusOr<bufferd::Fence> reading =
        client->CreateFence({.name = "reading", .deadline = absl::Seconds(60)});
    if (!reading.ok()) return Fail("create", reading.status());
    if (absl::Status attached = buffer->AttachFence(*reading, bufferd::v1::FENCE_USAGE_READ);
        !attached.ok()) {
      return Fail("attach", attached);
    }
    std::printf("ready fence=%lu\n", static_cast<unsigned long>(reading->id()));
    while (true) ::pause();
  }
  if (mode == "timeline-produce" && argc == 4) return Produce(*client, std::atoll(argv[3]));
  if (mode == "timeline-consume" && argc == 4) return Consume(*client, argv[3], false);
  if (mode == "timeline-poll" && argc == 4) return Consume(*client, argv[3], true);
  if (mode == "timeline-attack" && argc == 4) return Attack(*client, argv[3]);
  if (mode == "timeline-requeue" && argc == 5) {
    return Requeue(*client, argv[3], std::atoll(argv[4]));
  }
  if (mode == "hold" && argc == 6) {
    std::vector<bufferd::Buffer> held;
    for (int i = 0; i < std::atoi(argv[5]); ++i) {
      absl::StatusOr<bufferd::Buffer> buffer = client->Allocate(
          {.heap = argv[3], .size = std::strtoull(argv[4], nullptr, 10), .name = "held"});
      if (!buffer.ok()) return Fail("allocate", buffer.status());
      held.push_back(*std::move(buffer));
    }
    std::printf("ready session=%lu\n", static_cast<unsigned long>(client->session_id()));
    while (true) ::pause();
  }
  // keep-map / keep-fd DIR HEAP SIZE: allocates a buffer, writes every
  // byte, then releases its handle and closes the client, keeping only a
  // mapping of it (or only a dup of its fd): memory the daemon no longer
  // counts (bufctl holders finds it).
  if ((mode == "keep-map" || mode == "keep-fd") && argc == 5) {
    absl::StatusOr<bufferd::Buffer> buffer = client->Allocate(
        {.heap = argv[3], .size = std::strtoull(argv[4], nullptr, 10), .name = "kept"});
    if (!buffer.ok()) return Fail("allocate", buffer.status());
    const uint64_t id = buffer->id();
    std::optional<bufferd::Mapping> kept_map;
    int kept_fd = -1;
    if (mode == "keep-map") {
      absl::StatusOr<bufferd::Mapping> map = buffer->Map();
      if (!map.ok()) return Fail("map", map.status());
      std::memset(map->data(), 0x5a, map->size());
      kept_map.emplace(*std::move(map));
    } else {
      kept_fd = ::fcntl(buffer->fd(), F_DUPFD_CLOEXEC, 0);
      if (kept_fd < 0) return 1;
    }
    if (absl::Status released = buffer->Release(); !released.ok()) {
      return Fail("release", released);
    }
    buffer = absl::CancelledError("released");
    client = absl::CancelledError("closed");  // the session ends
    std::printf("ready buffer=%lu fd=%d\n", static_cast<unsigned long>(id), kept_fd);
    std::fflush(stdout);
    while (true) ::pause();
  }
  // export DIR HEAP SIZE N: allocates a buffer and exports it read-only N
  // times; prints the tokens and holds the buffer until killed.
  if (mode == "export" && argc == 6) {
    absl::StatusOr<bufferd::Buffer> buffer = client->Allocate(
        {.heap = argv[3], .size = std::strtoull(argv[4], nullptr, 10), .name = "exported"});
    if (!buffer.ok()) return Fail("allocate", buffer.status());
    std::string tokens;
    for (int i = 0; i < std::atoi(argv[5]); ++i) {
      absl::StatusOr<std::string> token = buffer->Export(bufferd::Access::kReadOnly);
      if (!token.ok()) return Fail("export", token.status());
      absl::StrAppend(&tokens, i == 0 ? "" : ",", *token);
    }
    std::printf("ready buffer=%lu session=%lu tokens=%s\n",
                static_cast<unsigned long>(buffer->id()),
                static_cast<unsigned long>(client->session_id()), tokens.c_str());
    std::fflush(stdout);
    while (true) ::pause();
  }
  std::printf("usage error\n");
  return 2;
}
