// Local security: the socket dir no one else can tamper with, and clients
// that trust only the real daemon. Each test is an attack that worked before.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "testing/daemon_test.h"

namespace bufferd {
namespace {

using ::bufferd::testing::TestDaemon;
using ::bufferd::testing::ReadFile;

// A temp dir removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    char path[] = "/tmp/bufferd-sec-XXXXXX";
    path_ = ::mkdtemp(path) != nullptr ? path : "";
  }
  ~TempDir() {
    std::error_code error;
    std::filesystem::remove_all(path_, error);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Starts bufferd on `dir` and waits for it to exit (it must refuse to start);
// returns its exit code and, in `log`, what it printed.
int StartExpectingExit(const std::string& dir, const std::string& log_path, std::string* log,
                       std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"--socket-dir", dir};
  args.insert(args.end(), extra.begin(), extra.end());
  absl::StatusOr<testing::ChildProcess> daemon = testing::SpawnDaemon(args, log_path);
  if (!daemon.ok()) return -1;
  const std::optional<int> code = daemon->WaitFor(absl::Seconds(5));
  if (!code.has_value()) return -1;  // still serving: killed when `daemon` goes
  *log = ReadFile(log_path);
  return *code < 128 ? *code : -1;
}

// Tests that the daemon never follows a link planted at its lock file (as a
// group member of an old 0770 dir could): a symlink or a hard link to a
// root-only file stops startup, naming the path, and the file is untouched.
// (Before, the file was truncated and got the daemon's pid.)
TEST(SocketDirTest, PlantedLockLinksAreRefusedNotFollowed) {
  TempDir root;
  const std::string victim = absl::StrCat(root.path(), "/precious");
  std::ofstream(victim) << "precious\n";
  ASSERT_EQ(::chmod(victim.c_str(), 0644), 0);
  for (bool hard : {false, true}) {
    SCOPED_TRACE(hard ? "hard link" : "symlink");
    const std::string dir = absl::StrCat(root.path(), hard ? "/hard" : "/soft");
    ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
    const std::string lock = absl::StrCat(dir, "/bufferd.lock");
    ASSERT_EQ(hard ? ::link(victim.c_str(), lock.c_str()) : ::symlink(victim.c_str(), lock.c_str()),
              0);
    std::string log;
    EXPECT_EQ(StartExpectingExit(dir, absl::StrCat(dir, ".log"), &log), 1);
    EXPECT_TRUE(absl::StrContains(
        log, hard ? absl::StrCat(lock, " is not a regular file of uid ", ::geteuid(),
                                 " with one link (mode 0644, uid ", ::geteuid(), ", 2 links)")
                  : absl::StrCat(lock, " is a symlink; remove it")))
        << log;
    EXPECT_EQ(ReadFile(victim), "precious\n");
  }
}

// Tests that a socket dir that is itself a symlink is refused.
TEST(SocketDirTest, SymlinkedSocketDirIsRefused) {
  TempDir root;
  const std::string real = absl::StrCat(root.path(), "/real");
  const std::string link = absl::StrCat(root.path(), "/link");
  ASSERT_EQ(::mkdir(real.c_str(), 0700), 0);
  ASSERT_EQ(::symlink(real.c_str(), link.c_str()), 0);
  std::string log;
  EXPECT_EQ(StartExpectingExit(link, absl::StrCat(root.path(), "/log"), &log), 1);
  EXPECT_TRUE(absl::StrContains(log, absl::StrCat("socket dir ", link, " is a symlink")))
      << log;
}

// Tests that a member of the socket dir's group may connect but can no longer
// rename, replace or remove any entry (the dir is 0750, not 0770): the relay
// that took over fd.sock and the lock-file swap both fail with EACCES.
TEST(SocketDirTest, GroupMembersConnectButCannotReplaceEntries) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to drop to nobody";
  struct group* entry = ::getgrnam("daemon");
  if (entry == nullptr) GTEST_SKIP() << "no group 'daemon' on this machine";
  const gid_t gid = entry->gr_gid;
  auto daemon = TestDaemon::Start(R"pb(
    heaps { name: "system" type: HEAP_TYPE_SYSTEM }
    group: "daemon"
  )pb");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string dir = (*daemon)->socket_dir();
  ASSERT_EQ(::chmod((*daemon)->root().c_str(), 0711), 0);
  const std::string fd_sock = FdSocketPath(dir);
  EXPECT_EQ(testing::AsNobody({gid},
                     [&] {
                       auto socket = UnixSocket::ConnectSeqPacket(fd_sock);
                       return socket.ok() ? 0 : errno;
                     }),
            0)
      << "members connect";
  EXPECT_EQ(testing::AsNobody({gid},
                     [&] {
                       return ::rename(fd_sock.c_str(), absl::StrCat(dir, "/.x").c_str()) == 0
                                  ? 0
                                  : errno;
                     }),
            EACCES);
  EXPECT_EQ(testing::AsNobody({gid},
                     [&] {
                       return ::unlink(absl::StrCat(dir, "/bufferd.lock").c_str()) == 0 ? 0
                                                                                        : errno;
                     }),
            EACCES);
  EXPECT_EQ(testing::AsNobody({gid},
                     [&] {
                       return ::symlink("/etc/shadow", absl::StrCat(dir, "/x").c_str()) == 0
                                  ? 0
                                  : errno;
                     }),
            EACCES);
  EXPECT_TRUE((*daemon)->Connect().ok()) << "the daemon still serves";
}

// Tests that a client trusts only a socket dir nobody else can write: one
// owned by another uid (another user's squat, e.g. /tmp/bufferd-<uid>),
// one writable by others, and one that is a symlink are each refused with
// PERMISSION_DENIED saying why, before anything is sent.
TEST(ClientTrustTest, UntrustedSocketDirsAreRefused) {
  auto daemon = TestDaemon::Start();
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string dir = (*daemon)->socket_dir();
  TempDir root;

  const std::string link = absl::StrCat(root.path(), "/link");
  ASSERT_EQ(::symlink(dir.c_str(), link.c_str()), 0);
  auto via_link = Client::Connect(link);
  EXPECT_EQ(via_link.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(absl::StrContains(via_link.status().message(), "is a symlink; not trusted"))
      << via_link.status();

  ASSERT_EQ(::chmod(dir.c_str(), 0777), 0);
  auto writable = Client::Connect(dir);
  EXPECT_EQ(writable.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(absl::StrContains(writable.status().message(),
                                "has mode 0777: others may write it and replace its sockets"))
      << writable.status();
  ASSERT_EQ(::chmod(dir.c_str(), 0700), 0);

  if (::geteuid() == 0) {
    // Another user's dir right in /tmp (which anyone can write), as uid 1
    // squatting /tmp/bufferd-<uid> would make it.
    char squat[] = "/tmp/bufferd-squat-XXXXXX";
    ASSERT_NE(::mkdtemp(squat), nullptr);
    ASSERT_EQ(::chown(squat, 1, static_cast<gid_t>(-1)), 0);
    auto foreign = Client::Connect(squat);
    EXPECT_EQ(foreign.status().code(), absl::StatusCode::kPermissionDenied);
    EXPECT_TRUE(absl::StrContains(foreign.status().message(),
                                  "is owned by uid 1, neither you (uid 0) nor root, in a "
                                  "directory others can write"))
        << foreign.status();
    ::rmdir(squat);
  }
  EXPECT_TRUE(Client::Connect(dir).ok()) << "the real dir is trusted";
}

// Tests that a relay on fd.sock is caught: a process that forwards the real
// daemon's hello is not the pid that hello names, so the client refuses it
// (PERMISSION_DENIED) before it opens control.sock or sends anything.
TEST(ClientTrustTest, RelayForwardingTheHelloIsRefused) {
  auto daemon = TestDaemon::Start();
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  TempDir relay_dir;
  ASSERT_EQ(::chmod(relay_dir.path().c_str(), 0700), 0);
  auto listener = UnixSocket::ListenSeqPacket(FdSocketPath(relay_dir.path()));
  ASSERT_TRUE(listener.ok()) << listener.status();
  std::thread relay([&] {
    auto upstream = UnixSocket::ConnectSeqPacket(FdSocketPath((*daemon)->socket_dir()));
    auto hello = upstream.ok() ? upstream->RecvWithFds() : upstream.status();
    auto victim = listener->Accept(/*nonblocking=*/false);
    if (hello.ok() && victim.ok()) (void)victim->Send(hello->bytes);
    if (victim.ok()) (void)victim->RecvWithFds();  // until the client hangs up
  });
  auto client = Client::Connect(relay_dir.path());
  relay.join();
  EXPECT_EQ(client.status().code(), absl::StatusCode::kPermissionDenied) << client.status();
  EXPECT_TRUE(absl::StrContains(client.status().message(),
                                absl::StrCat("(pid ", ::getpid(),
                                             ") is not the daemon its hello names (pid ",
                                             (*daemon)->pid(), ")")))
      << client.status();
}

// Tests that byte counts cannot wrap: with every quota off (each written 0),
// five 4 EiB allocations on the system heap used to succeed and wrap the
// heap's used bytes, its peak and the metrics past 2^64. Now each is
// RESOURCE_EXHAUSTED naming the heap's limit on one buffer (half of this
// host's RAM), and nothing is counted.
TEST(ByteCountTest, HugeAllocationsAreRefusedNotWrapped) {
  auto daemon = TestDaemon::Start(R"pb(
    heaps { name: "system" type: HEAP_TYPE_SYSTEM }
    heaps {
      name: "small"
      type: HEAP_TYPE_CARVEOUT
      capacity_bytes: 4194304
      hugepage_size: HUGEPAGE_SIZE_2M
    }
    quotas {
      max_bytes_per_session: 0
      max_bytes_per_uid: 0
      max_buffers_per_session: 0
      max_fences_per_session: 0
      max_allocation_bytes: 0
    }
  )pb");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto client = (*daemon)->Connect();
  ASSERT_TRUE(client.ok()) << client.status();
  for (int i = 0; i < 5; ++i) {
    auto buffer = client->Allocate({.heap = "system", .size = uint64_t{1} << 62});
    EXPECT_EQ(buffer.status().code(), absl::StatusCode::kResourceExhausted) << buffer.status();
    EXPECT_TRUE(absl::StartsWith(buffer.status().message(), "heap 'system' allocates at most "))
        << buffer.status();
    EXPECT_TRUE(absl::StrContains(buffer.status().message(),
                                  " in one buffer (half of this host's RAM), asked for 4 EiB"))
        << buffer.status();
  }
  auto too_big = client->Allocate({.heap = "small", .size = 8 << 20});
  EXPECT_EQ(too_big.status().message(), "heap 'small' holds 4 MiB in all, asked for 8 MiB");
  auto heaps = client->ListHeaps();
  ASSERT_TRUE(heaps.ok());
  for (const auto& heap : heaps->heaps()) {
    EXPECT_EQ(heap.used(), 0u) << heap.name();
    EXPECT_EQ(heap.peak(), 0u) << heap.name();
  }
  EXPECT_EQ(heaps->heaps(0).failures(), 5u);

  // A set of buffers each under half of the host's RAM, but twice the RAM
  // together: refused before any is made, by the dry run alike.
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t total_kib = 0;
  ASSERT_TRUE(meminfo >> key >> total_kib && key == "MemTotal:");
  const uint64_t each = total_kib * 1024 / 32 / 4096 * 4096;
  const std::string why = " in one set (this host's RAM), asked for 64 x ";
  auto set = client->AllocateSet(64, {.heap = "system", .size = each});
  EXPECT_EQ(set.status().code(), absl::StatusCode::kResourceExhausted) << set.status();
  EXPECT_TRUE(absl::StartsWith(set.status().message(), "heap 'system' allocates at most "))
      << set.status();
  EXPECT_TRUE(absl::StrContains(set.status().message(), why)) << set.status();
  auto dry = client->CanAllocate({.heap = "system", .size = each}, 64);
  ASSERT_TRUE(dry.ok()) << dry.status();
  EXPECT_FALSE(dry->ok());
  EXPECT_TRUE(absl::StrContains(dry->message(), why)) << dry->message();
  EXPECT_TRUE(client->AllocateSet(2, {.heap = "system", .size = each}).ok());
  heaps = client->ListHeaps();
  ASSERT_TRUE(heaps.ok());
  EXPECT_EQ(heaps->heaps(0).used(), 0u);
}

// Tests that the daemon works where memfds must never be executable: in a
// pid namespace whose vm.memfd_noexec is 2 (the sysctl is per pid namespace,
// so the host's stays as it was) it serves every heap, carveout reservation
// included, and a client outside the namespace trusts it (the daemon's pid
// in its hello is the innermost of its NSpid as the client sees it).
TEST(NoexecTest, ServesUnderMemfdNoexec2InAPidNamespace) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root for a pid namespace and its sysctl";
  if (::access("/proc/sys/vm/memfd_noexec", W_OK) != 0) {
    GTEST_SKIP() << "this kernel has no vm.memfd_noexec (Linux < 6.3)";
  }
  if (::access("/usr/bin/unshare", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/unshare";
  const std::string host_setting = ReadFile("/proc/sys/vm/memfd_noexec");
  TempDir root;
  const std::string dir = absl::StrCat(root.path(), "/sock");
  const std::string log = absl::StrCat(root.path(), "/log");
  const std::string binary = testing::BinaryPath("daemon/bufferd");
  testing::ChildOptions options;
  options.output_path = log;
  absl::StatusOr<testing::ChildProcess> unshare = testing::ChildProcess::Spawn(
      "/usr/bin/unshare",
      {"--pid", "--fork", "--kill-child", "sh", "-c",
       "echo 2 > /proc/sys/vm/memfd_noexec && exec \"$0\" \"$@\"", binary, "--socket-dir", dir},
      options);
  ASSERT_TRUE(unshare.ok()) << unshare.status();
  absl::StatusOr<Client> client = absl::UnavailableError("not yet");
  for (int i = 0; i < 500 && !client.ok(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (std::filesystem::exists(FdSocketPath(dir))) client = Client::Connect(dir);
  }
  ASSERT_TRUE(client.ok()) << client.status() << "\n" << ReadFile(log);
  for (const char* heap : {"system", "contiguous", "carveout"}) {
    SCOPED_TRACE(heap);
    auto buffer = client->Allocate({.heap = heap, .size = 1 << 20});
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    auto map = buffer->Map();
    ASSERT_TRUE(map.ok()) << map.status();
    std::memset(map->data(), 7, map->size());
  }
  EXPECT_TRUE(absl::StrContains(ReadFile(log), "sealed non-executable")) << ReadFile(log);
  EXPECT_EQ(ReadFile("/proc/sys/vm/memfd_noexec"), host_setting) << "the host's setting";
  unshare->Kill(SIGKILL);  // unshare's --kill-child takes the daemon with it
  unshare->Wait();
}

// Runs bufctl `command` against `dir`; returns what it printed.
std::string Bufctl(const std::string& dir, const std::string& command) {
  const std::string line = absl::StrCat(testing::BinaryPath("tools/bufctl"), " --socket-dir ",
                                        dir, " ", command, " 2>&1");
  std::string out;
  if (FILE* pipe = ::popen(line.c_str(), "r")) {
    char chunk[4096];
    size_t n;
    while ((n = std::fread(chunk, 1, sizeof(chunk), pipe)) > 0) out.append(chunk, n);
    ::pclose(pipe);
  }
  return out;
}

bool HasControlBytes(const std::string& text) {
  for (char c : text) {
    const unsigned char u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\n') || u == 0x7f) return true;
  }
  return false;
}

// Runs a copy of bufctl (nobody may execute it) as nobody with `groups`
// against `dir`; returns its exit code, and its output in `out`.
int BufctlAsNobody(const TestDaemon& daemon, const std::vector<gid_t>& groups,
                   const std::vector<std::string>& args, std::string* out) {
  const std::string binary = absl::StrCat(daemon.root(), "/bufctl");
  if (!std::filesystem::exists(binary)) {
    std::filesystem::copy_file(testing::BinaryPath("tools/bufctl"), binary);
    ::chmod(binary.c_str(), 0755);
  }
  const std::string log = absl::StrCat(daemon.root(), "/bufctl.out");
  ::unlink(log.c_str());
  testing::ChildOptions options;
  options.uid = 65534;
  options.gid = 65534;
  options.groups = groups;
  options.output_path = log;
  std::vector<std::string> full = {"--socket-dir", daemon.socket_dir()};
  full.insert(full.end(), args.begin(), args.end());
  absl::StatusOr<testing::ChildProcess> child = testing::ChildProcess::Spawn(binary, full, options);
  if (!child.ok()) return -1;
  const int code = child->Wait();
  *out = ReadFile(log);
  return code;
}

// Tests Debug access: a session of another uid gets PERMISSION_DENIED naming
// who may call, on every Debug call, though it may allocate; the same uid
// in a debug_groups group may, judged by its process's own groups (not the
// group database: nobody is in no group there); the daemon's own uid may.
TEST(DebugAccessTest, OnlyOperatorsMayCallDebug) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run bufctl as nobody";
  // getgrnam's answer is overwritten by the next call: keep the gids.
  struct group* entry = ::getgrnam("daemon");
  if (entry == nullptr) GTEST_SKIP() << "needs group daemon";
  const gid_t dir_gid = entry->gr_gid;
  entry = ::getgrnam("video");
  if (entry == nullptr) GTEST_SKIP() << "needs group video";
  const gid_t video_gid = entry->gr_gid;
  auto daemon = TestDaemon::Start(R"pb(
    heaps { name: "system" type: HEAP_TYPE_SYSTEM }
    group: "daemon"
    debug_groups: "video"
  )pb");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  ASSERT_EQ(::chmod((*daemon)->root().c_str(), 0711), 0);
  std::string out;
  // The daemon's own counts: fds held for clients and live buffers.
  auto self = Client::Connect((*daemon)->socket_dir());
  ASSERT_TRUE(self.ok()) << self.status();
  auto counts = [&] {
    auto heaps = self->ListHeaps();
    return heaps.ok() ? std::make_pair(heaps->fds().in_use(), heaps->live_buffers())
                      : std::make_pair(uint64_t{0}, uint64_t{0});
  };
  // Settled first: the readiness probe's control connection (TestDaemon::
  // Start) is swept up to a second after it closed. This session's fd.sock
  // and control connection are what is left.
  ASSERT_TRUE(testing::Eventually([&] { return counts().first == 2; })) << counts().first;
  const auto before = counts();
  for (const char* command : {"heaps", "clients", "buffers", "fences", "metrics"}) {
    SCOPED_TRACE(command);
    EXPECT_EQ(BufctlAsNobody(**daemon, {dir_gid}, {command}, &out), 1) << out;
    EXPECT_TRUE(absl::StrContains(out, "PERMISSION_DENIED")) << out;
    EXPECT_TRUE(absl::StrContains(out, "uid 65534 is not the daemon's uid (0)")) << out;
    EXPECT_TRUE(absl::StrContains(out, "debug_groups (video)")) << out;
  }
  // The refused sessions leave nothing behind in the daemon.
  EXPECT_TRUE(testing::Eventually([&] { return counts() == before; }))
      << counts().first << " fds, " << counts().second << " buffers; before: " << before.first
      << ", " << before.second;
  EXPECT_EQ(BufctlAsNobody(**daemon, {dir_gid},
                           {"can-allocate", "--heap", "system", "--size", "4096"}, &out),
            0)
      << "not a Debug call: " << out;
  EXPECT_EQ(BufctlAsNobody(**daemon, {dir_gid, video_gid}, {"heaps"}, &out), 0) << out;
  EXPECT_TRUE(absl::StrContains(out, "system")) << out;
  EXPECT_TRUE(self->ListClients().ok()) << "the daemon's own uid";
}

// Tests that DEBUG_ACCESS_SESSION (any session) and debug_uids let another
// uid through, and that an unknown debug_groups entry stops startup.
TEST(DebugAccessTest, DebugUidsAndSessionMode) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run bufctl as nobody";
  struct group* daemon_group = ::getgrnam("daemon");
  if (daemon_group == nullptr) GTEST_SKIP() << "needs group daemon";
  for (const char* extra : {"debug_uids: 65534", "debug_access: DEBUG_ACCESS_SESSION"}) {
    SCOPED_TRACE(extra);
    auto daemon = TestDaemon::Start(absl::StrCat(R"pb(
                                                   heaps { name: "system" type: HEAP_TYPE_SYSTEM }
                                                   group: "daemon"
                                                 )pb",
                                                 extra));
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    ASSERT_EQ(::chmod((*daemon)->root().c_str(), 0711), 0);
    std::string out;
    EXPECT_EQ(BufctlAsNobody(**daemon, {daemon_group->gr_gid}, {"clients"}, &out), 0) << out;
    EXPECT_TRUE(absl::StrContains(out, "SESSION")) << out;
  }
  auto bad = TestDaemon::Start(R"pb(
    heaps { name: "system" type: HEAP_TYPE_SYSTEM }
    debug_groups: "no-such-group-bufferd"
  )pb");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(absl::StrContains(bad.status().message(),
                                "field 'debug_groups' names group 'no-such-group-bufferd', which "
                                "does not exist on this machine"))
      << bad.status();
}

// Tests that ending a session is for root and the daemon's uid only: nobody,
// whom debug_uids lets read every view, gets PERMISSION_DENIED and the
// session lives on; and that bufctl holders run by nobody says how many
// processes it could not inspect instead of pretending it saw them all.
TEST(DebugAccessTest, OnlyRootOrTheDaemonUidEndsSessions) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run bufctl as nobody";
  struct group* daemon_group = ::getgrnam("daemon");
  if (daemon_group == nullptr) GTEST_SKIP() << "needs group daemon";
  const gid_t dir_gid = daemon_group->gr_gid;
  auto daemon = TestDaemon::Start(R"pb(
    heaps { name: "system" type: HEAP_TYPE_SYSTEM }
    group: "daemon"
    debug_uids: 65534
  )pb");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  ASSERT_EQ(::chmod((*daemon)->root().c_str(), 0711), 0);
  auto victim = Client::Connect((*daemon)->socket_dir());
  ASSERT_TRUE(victim.ok()) << victim.status();
  auto buffer = victim->Allocate({.heap = "system", .size = 65536});
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  auto counts = [&] {
    auto heaps = victim->ListHeaps();
    return heaps.ok() ? std::make_pair(heaps->fds().in_use(), heaps->live_buffers())
                      : std::make_pair(uint64_t{0}, uint64_t{0});
  };
  // Settled first: the buffer's delivery leaves the budget once the daemon
  // sees it read, and a probe's control connection once the daemon's sweep
  // sees it closed; then only the victim's session and connection remain.
  ASSERT_TRUE(testing::Eventually([&] {
    auto heaps = victim->ListHeaps();
    return heaps.ok() && heaps->fds().deliveries() == 0 && heaps->fds().sessions() == 1 &&
           heaps->fds().control_connections() == 1;
  }));
  const auto before = counts();
  const int fds_before = (*daemon)->OpenFds();
  std::string out;
  EXPECT_EQ(BufctlAsNobody(**daemon, {dir_gid}, {"clients"}, &out), 0)
      << "nobody may read: " << out;
  EXPECT_EQ(BufctlAsNobody(**daemon, {dir_gid}, {"end-session", absl::StrCat(victim->session_id())},
                           &out),
            1)
      << out;
  EXPECT_TRUE(absl::StrContains(
      out, "PERMISSION_DENIED: ending a session is for root and the daemon's uid (0); uid 65534"))
      << out;
  EXPECT_TRUE(victim->ListHeaps().ok()) << "the session lives on";
  EXPECT_EQ(BufctlAsNobody(**daemon, {dir_gid}, {"holders"}, &out), 0) << out;
  EXPECT_TRUE(absl::StrContains(out, "processes could not be inspected: run as root to see them"))
      << out;
  EXPECT_TRUE(testing::Eventually([&] {
    return counts() == before && (*daemon)->OpenFds() == fds_before;
  })) << counts().first
      << " fds in use, " << counts().second << " buffers, " << (*daemon)->OpenFds()
      << " open; before: " << before.first << ", " << before.second << ", " << fds_before;
}

// Tests that no Debug view carries a share token or the session's secret:
// an operator sees who holds what, never a capability to take it.
TEST(DebugAccessTest, DebugNeverShowsTokensOrSecrets) {
  auto daemon = TestDaemon::Start();
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string dir = (*daemon)->socket_dir();
  auto client = Client::Connect(dir);
  ASSERT_TRUE(client.ok()) << client.status();
  auto buffer = client->Allocate({.heap = "system", .size = 4096, .name = "secret-holder"});
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  auto token = buffer->Export(Access::kReadOnly);
  ASSERT_TRUE(token.ok()) << token.status();
  std::string all;
  for (const char* command :
       {"heaps", "clients", "buffers", "fences", "metrics", "tokens", "holders"}) {
    absl::StrAppend(&all, Bufctl(dir, absl::StrCat("--json ", command)), Bufctl(dir, command));
  }
  EXPECT_TRUE(absl::StrContains(all, "secret-holder")) << "the buffer is listed";
  // The token (random hex) appears nowhere.
  ASSERT_GE(token->size(), 16u);
  EXPECT_FALSE(absl::StrContains(all, *token)) << all;
}

// Tests that a process name made of terminal escapes and bytes that are not
// UTF-8 reaches no operator's terminal or log raw: bufctl clients, buffers
// and --json, and the daemon's log, show it escaped. (Before, `bufctl
// clients` printed it raw: it could clear the screen and retitle the
// terminal, and its bytes made the JSON of ListClients unparsable.)
TEST(ClientTextTest, HostileProcessNamesAreEscapedEverywhere) {
  auto daemon = TestDaemon::Start();
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string dir = (*daemon)->socket_dir();
  auto peer = testing::SpawnPeer(
      {"--comm", "\\x1b[2J\\x1b]0;PWN\\x07\\xff", "hold", dir, "system", "4096", "1"});
  ASSERT_TRUE(peer.ok());
  ASSERT_TRUE(absl::StartsWith(peer->ReadLine(), "ready session=")) << "the peer holds a buffer";
  const std::string escaped = "\\x1b[2J\\x1b]0;PWN";  // comm keeps 15 bytes
  for (const std::string command : {"clients", "buffers", "--json clients", "--json buffers"}) {
    SCOPED_TRACE(command);
    const std::string out = Bufctl(dir, command);
    EXPECT_FALSE(HasControlBytes(out)) << out;
    EXPECT_TRUE(absl::StrContains(out, absl::StartsWith(command, "--json")
                                           ? "\\\\x1b[2J\\\\x1b]0;PWN"
                                           : escaped))
        << out;
  }
  (*daemon)->Stop();
  const std::string log = ReadFile((*daemon)->log_path());
  EXPECT_FALSE(HasControlBytes(log)) << log;
  EXPECT_TRUE(absl::StrContains(log, escaped)) << log;
}

// Tests that a read-write export of a carveout buffer needs consent: a
// read-write importer could punch its pages out and hand them back to the
// system behind the carveout's accounting (the hugetlb SIGBUS case is in
// sigbus_test). Read-only exports, and buffers of the system heap, need none.
TEST(ExportTest, ReadWriteCarveoutExportNeedsConsent) {
  auto daemon = TestDaemon::Start();
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto client = (*daemon)->Connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto carved = client->Allocate({.heap = "carveout", .size = 4096});
  ASSERT_TRUE(carved.ok()) << carved.status();
  auto refused = carved->Export(Access::kReadWrite);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StartsWith(refused.status().message(),
                               absl::StrCat("buffer ", carved->id(),
                                            " is carved from carveout 'carveout': a read-write "
                                            "importer could punch holes in it")))
      << refused.status();
  EXPECT_TRUE(carved->Export(Access::kReadOnly).ok());
  EXPECT_TRUE(carved->Export(Access::kReadWrite, ExportOptions{.accept_sigbus_risk = true}).ok());
  auto plain = client->Allocate({.heap = "system", .size = 4096});
  ASSERT_TRUE(plain.ok());
  EXPECT_TRUE(plain->Export(Access::kReadWrite).ok()) << "punched base pages read back as zeros";
}

// Tests Freeze: a buffer allocated freezable, once its writable mappings are
// gone, is sealed against every write by everyone, root and read-write
// importers included; ordinary buffers can never be sealed by a holder
// (F_SEAL_SEAL), and refusals name why.
TEST(FreezeTest, FrozenBufferRefusesEveryWrite) {
  auto daemon = TestDaemon::Start();
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto client = (*daemon)->Connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto plain = client->Allocate({.heap = "system", .size = 4096});
  ASSERT_TRUE(plain.ok());
  EXPECT_NE(::fcntl(plain->fd(), F_GET_SEALS) & F_SEAL_SEAL, 0) << "no holder adds seals";
  EXPECT_EQ(plain->Freeze().message(),
            absl::StrCat("buffer ", plain->id(),
                         " was not allocated freezable (AllocateOptions.freezable); it cannot be "
                         "frozen"));

  auto frame = client->Allocate({.heap = "system", .size = 8192, .freezable = true});
  ASSERT_TRUE(frame.ok());
  auto token = frame->Export(Access::kReadWrite);
  ASSERT_TRUE(token.ok());
  auto writer = client->Import(*token);
  ASSERT_TRUE(writer.ok());
  {
    auto map = frame->Map();
    ASSERT_TRUE(map.ok());
    std::memset(map->data(), 0x42, map->size());
    absl::Status busy = frame->Freeze();
    EXPECT_EQ(busy.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_TRUE(absl::StrContains(busy.message(), "still has a writable shared mapping")) << busy;
  }
  ASSERT_TRUE(frame->Freeze().ok());
  EXPECT_TRUE(frame->info().frozen());
  ASSERT_TRUE(frame->Freeze().ok()) << "idempotent";
  // Root, the creator's own fd, the read-write importer: no write gets in.
  for (int fd : {frame->fd(), writer->fd()}) {
    EXPECT_EQ(::pwrite(fd, "x", 1, 0), -1);
    EXPECT_EQ(errno, EPERM);
    EXPECT_EQ(::mmap(nullptr, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), MAP_FAILED);
  }
  const std::string reopen = absl::StrCat("/proc/self/fd/", frame->fd());
  ::chmod(reopen.c_str(), 0600);  // root could, on any buffer
  int reopened = ::open(reopen.c_str(), O_RDWR | O_CLOEXEC);
  if (reopened >= 0) {
    EXPECT_EQ(::pwrite(reopened, "x", 1, 0), -1) << "a reopened fd is sealed too";
    ::close(reopened);
  }
  auto read = frame->MapReadOnly();
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(read->bytes()[8191], 0x42);
  auto listed = client->ListBuffers();
  ASSERT_TRUE(listed.ok());
  bool seen = false;
  for (const auto& entry : listed->buffers()) {
    if (entry.buffer().buffer_id() != frame->id()) continue;
    seen = true;
    EXPECT_TRUE(entry.buffer().frozen());
  }
  EXPECT_TRUE(seen);
  auto ro_token = frame->Export(Access::kReadOnly);
  ASSERT_TRUE(ro_token.ok());
  auto reader = client->Import(*ro_token);
  ASSERT_TRUE(reader.ok());
  EXPECT_EQ(reader->Freeze().code(), absl::StatusCode::kPermissionDenied);
}

// Tests that bufctl says, per read-only holder, whether the kernel enforces
// it: not for root (the daemon's uid here), which could reopen the buffer
// read-write; yes once the buffer is frozen.
TEST(ReadOnlyTest, BufctlSaysWhetherReadOnlyIsEnforced) {
  auto daemon = TestDaemon::Start();
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto client = (*daemon)->Connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto frame = client->Allocate({.heap = "system", .size = 4096, .freezable = true});
  ASSERT_TRUE(frame.ok());
  auto token = frame->Export(Access::kReadOnly);
  ASSERT_TRUE(token.ok());
  auto reader = client->Import(*token);
  ASSERT_TRUE(reader.ok());
  const std::string before = Bufctl((*daemon)->socket_dir(), "buffers");
  EXPECT_TRUE(absl::StrContains(before, ":ro?")) << before;
  ASSERT_TRUE(frame->Freeze().ok());
  const std::string after = Bufctl((*daemon)->socket_dir(), "buffers");
  EXPECT_FALSE(absl::StrContains(after, ":ro?")) << after;
  EXPECT_TRUE(absl::StrContains(after, ":ro")) << after;
  EXPECT_TRUE(absl::StrContains(after, "frozen")) << after;
}

// Tests the daemon running as its own user (`user:` in the config, started
// as root): it reserves its heaps and makes its socket dir as root, then
// serves as that uid, with the dir, sockets and lock handed over; root's
// clients trust the dir (another uid's, but in a parent only root can write)
// and everything works, read-only imports included.
TEST(OwnUserTest, DaemonServesAsItsOwnUser) {
  if (::geteuid() != 0) GTEST_SKIP() << "starts the daemon as root";
  auto daemon = TestDaemon::Start(R"pb(
    heaps { name: "system" type: HEAP_TYPE_SYSTEM }
    heaps { name: "carveout" type: HEAP_TYPE_CARVEOUT capacity_bytes: 8388608 }
    user: "nobody"
  )pb");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string status = ReadFile(absl::StrCat("/proc/", (*daemon)->pid(), "/status"));
  EXPECT_TRUE(absl::StrContains(status, "\nUid:\t65534\t65534\t65534\t65534\n")) << status;
  const std::string dir = (*daemon)->socket_dir();
  for (const std::string& path : {dir, FdSocketPath(dir), ControlSocketPath(dir),
                                  absl::StrCat(dir, "/bufferd.lock")}) {
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0) << path;
    EXPECT_EQ(st.st_uid, 65534u) << path;
    EXPECT_EQ(st.st_mode & 0777, path == dir ? 0700u : 0600u) << path << ": no group configured";
  }
  auto client = (*daemon)->Connect();
  ASSERT_TRUE(client.ok()) << client.status();
  for (const char* heap : {"system", "carveout"}) {
    auto buffer = client->Allocate({.heap = heap, .size = 4096});
    ASSERT_TRUE(buffer.ok()) << heap << ": " << buffer.status();
    auto token = buffer->Export(Access::kReadOnly);
    ASSERT_TRUE(token.ok());
    auto reader = client->Import(*token);
    ASSERT_TRUE(reader.ok()) << reader.status();
    EXPECT_TRUE(reader->MapReadOnly().ok());
  }
  const std::string log = ReadFile((*daemon)->log_path());
  EXPECT_TRUE(absl::StrContains(log, "running as user 'nobody' (uid 65534")) << log;
  EXPECT_FALSE(absl::StrContains(log, "will refuse")) << "a dir its clients trust: " << log;
}

// Tests that a daemon whose socket dir its clients will not trust (its own
// user's dir inside a world-writable dir, like /tmp) says so at startup, and
// that a client of another uid (root here) does refuse it.
TEST(OwnUserTest, UntrustedSocketDirIsWarnedAbout) {
  if (::geteuid() != 0) GTEST_SKIP() << "starts the daemon as root with --user";
  TempDir root;
  const std::string open_dir = absl::StrCat(root.path(), "/open");
  ASSERT_EQ(::mkdir(open_dir.c_str(), 0755), 0);
  ASSERT_EQ(::chmod(open_dir.c_str(), 01777), 0);  // like /tmp
  const std::string dir = absl::StrCat(open_dir, "/sock");
  const std::string log_path = absl::StrCat(root.path(), "/log");
  auto daemon = testing::SpawnDaemon({"--socket-dir", dir, "--user", "nobody"}, log_path);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  EXPECT_TRUE(testing::Eventually(
      [&] { return absl::StrContains(ReadFile(log_path), "bufferd serving in"); }))
      << ReadFile(log_path);
  const std::string log = ReadFile(log_path);
  EXPECT_TRUE(absl::StrContains(log, absl::StrCat("clients of any uid but 65534 will refuse ", dir)))
      << log;
  auto client = Client::Connect(dir);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kPermissionDenied) << client.status();
}

// Tests that a daemon refused by the lock changes nothing of the running
// daemon's dir (it used to chmod it 0700 before finding the lock taken, and
// the running daemon's group members were locked out), and that directories
// planted at the lock or a socket's name are refused by name.
TEST(SocketDirTest, RefusedSecondDaemonLeavesTheDirAlone) {
  if (::geteuid() != 0) GTEST_SKIP() << "uses --user";
  struct group* entry = ::getgrnam("daemon");
  if (entry == nullptr) GTEST_SKIP() << "no group 'daemon' on this machine";
  auto daemon = TestDaemon::Start(R"pb(
    heaps { name: "system" type: HEAP_TYPE_SYSTEM }
    group: "daemon"
  )pb");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string dir = (*daemon)->socket_dir();
  struct stat before {};
  ASSERT_EQ(::stat(dir.c_str(), &before), 0);
  std::string log;
  EXPECT_EQ(StartExpectingExit(dir, absl::StrCat((*daemon)->root(), "/second.log"), &log, {"--user", "nobody"}), 1);
  EXPECT_TRUE(absl::StrContains(log, "another bufferd (pid ")) << log;
  struct stat after {};
  ASSERT_EQ(::stat(dir.c_str(), &after), 0);
  EXPECT_EQ(after.st_mode, before.st_mode);
  EXPECT_EQ(after.st_uid, before.st_uid);
  EXPECT_EQ(after.st_gid, before.st_gid);
}

TEST(SocketDirTest, PlantedDirectoriesAreRefusedByName) {
  TempDir root;
  for (const char* name : {"bufferd.lock", "fd.sock"}) {
    SCOPED_TRACE(name);
    const std::string dir = absl::StrCat(root.path(), "/", name[0] == 'b' ? "a" : "b");
    ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
    ASSERT_EQ(::mkdir(absl::StrCat(dir, "/", name).c_str(), 0700), 0);
    std::string log;
    EXPECT_EQ(StartExpectingExit(dir, absl::StrCat(dir, ".log"), &log), 1);
    EXPECT_TRUE(absl::StrContains(log, absl::StrCat(dir, "/", name, " is ")) &&
                absl::StrContains(log, "remove it (someone may have planted it)"))
        << log;
  }
}

// Tests that a root daemon never takes over another user's socket dir by
// itself, and says how to run as that user if it is that user's daemon dir.
TEST(SocketDirTest, AnotherUsersDirIsRefusedWithTheWayOut) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to chown";
  TempDir root;
  const std::string dir = absl::StrCat(root.path(), "/sock");
  ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
  ASSERT_EQ(::chown(dir.c_str(), 65534, 65534), 0);
  std::string log;
  EXPECT_EQ(StartExpectingExit(dir, absl::StrCat(root.path(), "/log"), &log), 1);
  EXPECT_TRUE(absl::StrContains(log, absl::StrCat("socket dir ", dir,
                                                  " is owned by uid 65534 (nobody), not by the "
                                                  "daemon's uid 0; if it is that user's daemon "
                                                  "dir, start with --user nobody")))
      << log;
}

// Tests that the daemon never takes over a directory it did not make: an
// existing dir that is not private (a shared 1777 dir holding other users'
// files, a 0755 or 0710 dir) is refused with what to do and left exactly as
// it was, and a missing parent is never created.
TEST(SocketDirTest, FoundDirsThatAreNotPrivateAreRefusedAndLeftAlone) {
  TempDir root;
  for (const mode_t mode : {mode_t{01777}, mode_t{0755}, mode_t{0710}}) {
    const std::string dir = absl::StrFormat("%s/dir%04o", root.path(), mode);
    SCOPED_TRACE(dir);
    ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
    ASSERT_EQ(::chmod(dir.c_str(), mode), 0);
    const std::string other = absl::StrCat(dir, "/someone-elses-file");
    std::ofstream(other) << "theirs\n";
    struct stat before {};
    ASSERT_EQ(::stat(dir.c_str(), &before), 0);
    std::string log;
    EXPECT_EQ(StartExpectingExit(dir, absl::StrCat(dir, ".log"), &log), 1);
    EXPECT_TRUE(absl::StrContains(
        log, absl::StrFormat("socket dir %s already exists with mode %04o (uid %d, gid %d): not "
                             "private; bufferd never changes a dir it did not make. Give a "
                             "--socket-dir that does not exist yet",
                             dir, mode, ::geteuid(), ::getegid())))
        << log;
    struct stat after {};
    ASSERT_EQ(::stat(dir.c_str(), &after), 0);
    EXPECT_EQ(after.st_mode, before.st_mode);
    EXPECT_EQ(ReadFile(other), "theirs\n");
    std::vector<std::string> entries;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      entries.push_back(entry.path().filename());
    }
    EXPECT_THAT(entries, ::testing::ElementsAre("someone-elses-file")) << "no lock, no sockets";
  }
  const std::string orphan = absl::StrCat(root.path(), "/missing/sock");
  std::string log;
  EXPECT_EQ(StartExpectingExit(orphan, absl::StrCat(root.path(), "/orphan.log"), &log), 1);
  EXPECT_TRUE(
      absl::StrContains(log, absl::StrCat("cannot create socket dir ", orphan, ": its parent ",
                                          root.path(), "/missing does not exist")))
      << log;
  EXPECT_FALSE(std::filesystem::exists(absl::StrCat(root.path(), "/missing")));
}

// Tests that a private dir the daemon did not make is served as it is, and
// that only one a bufferd made before (it holds bufferd.lock) is adjusted to
// a config's group: a plain 0700 dir is refused for a group config, with the
// mode it would need, and keeps its mode.
TEST(SocketDirTest, PrivateFoundDirsAreServedAndOnlyBufferdDirsAdjusted) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root for a group config";
  struct group* entry = ::getgrnam("daemon");
  if (entry == nullptr) GTEST_SKIP() << "no group 'daemon' on this machine";
  const gid_t gid = entry->gr_gid;
  TempDir root;
  int run = 0;
  const auto serves = [&](const std::string& dir, std::vector<std::string> extra) {
    const std::string log_path = absl::StrCat(dir, ".", ++run, ".log");
    std::vector<std::string> args = {"--socket-dir", dir};
    args.insert(args.end(), extra.begin(), extra.end());
    auto daemon = testing::SpawnDaemon(args, log_path);
    if (!daemon.ok()) return false;
    const bool served = testing::Eventually(
        [&] { return absl::StrContains(ReadFile(log_path), "bufferd serving in"); });
    EXPECT_TRUE(served) << ReadFile(log_path);
    return served;  // `daemon` is stopped as it goes
  };
  const std::string plain = absl::StrCat(root.path(), "/plain");
  ASSERT_EQ(::mkdir(plain.c_str(), 0700), 0);
  EXPECT_TRUE(serves(plain, {}));
  struct stat st {};
  ASSERT_EQ(::stat(plain.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u);

  const std::string config = absl::StrCat(root.path(), "/group.conf");
  std::ofstream(config) << "heaps { name: \"system\" type: HEAP_TYPE_SYSTEM }\ngroup: \"daemon\"\n";
  const std::string found = absl::StrCat(root.path(), "/found");
  ASSERT_EQ(::mkdir(found.c_str(), 0700), 0);
  std::string log;
  EXPECT_EQ(StartExpectingExit(found, absl::StrCat(found, ".log"), &log, {"--config", config}), 1);
  EXPECT_TRUE(absl::StrContains(log, absl::StrFormat("already exists with mode 0700 (uid 0, gid "
                                                     "%d): not 0750 owned by uid 0 and gid %d",
                                                     ::getegid(), gid)))
      << log;
  ASSERT_EQ(::stat(found.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u);
  EXPECT_NE(st.st_gid, gid);

  // The dir of the first daemon holds its lock: a bufferd made it.
  EXPECT_TRUE(serves(plain, {"--config", config}));
  ASSERT_EQ(::stat(plain.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0750u);
  EXPECT_EQ(st.st_gid, gid);
}

// Tests that an unknown --user stops startup naming it (exit 2, a bad
// command line, as a bad config is), before anything in the socket dir
// changes.
TEST(OwnUserTest, UnknownUserIsRefused) {
  TempDir root;
  const std::string dir = absl::StrCat(root.path(), "/sock");
  std::string log;
  EXPECT_EQ(StartExpectingExit(dir, absl::StrCat(root.path(), "/log"), &log,
                               {"--user", "no-such-user-bufferd"}),
            2);
  EXPECT_TRUE(absl::StrContains(log, "--user 'no-such-user-bufferd' does not exist")) << log;
  EXPECT_FALSE(std::filesystem::exists(dir)) << "nothing made";
}

// Tests that --user replaces the config's `user`: a config naming a user
// this machine lacks is refused on its own (exit 2, naming it), and serves
// with --user naming one it has.
TEST(OwnUserTest, TheCommandLineUserReplacesTheConfigs) {
  if (::geteuid() != 0) GTEST_SKIP() << "starts the daemon as root with --user";
  TempDir root;
  const std::string config = absl::StrCat(root.path(), "/bufferd.conf");
  std::ofstream(config) << "heaps { name: \"system\" type: HEAP_TYPE_SYSTEM }\n"
                        << "user: \"no-such-user-bufferd\"\n";
  std::string log;
  EXPECT_EQ(
      StartExpectingExit(absl::StrCat(root.path(), "/refused"),
                         absl::StrCat(root.path(), "/refused.log"), &log, {"--config", config}),
      2);
  EXPECT_TRUE(absl::StrContains(log, "user 'no-such-user-bufferd', which does not exist")) << log;

  const std::string dir = absl::StrCat(root.path(), "/sock");
  const std::string log_path = absl::StrCat(root.path(), "/log");
  auto daemon =
      testing::SpawnDaemon({"--socket-dir", dir, "--config", config, "--user", "nobody"}, log_path);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  EXPECT_TRUE(testing::Eventually([&] {
    return absl::StrContains(ReadFile(log_path), "bufferd serving in");
  })) << ReadFile(log_path);
  struct stat st {};
  ASSERT_EQ(::stat(dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 65534u) << "the socket dir belongs to --user nobody";
}

}  // namespace
}  // namespace bufferd
