// Integration tests for configured daemons: named carveouts, quotas, bad
// config files, and a client that stops reading fd.sock.
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "base/fd_count.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "bufferd/v1/buffer.grpc.pb.h"
#include "bufferd/v1/debug.grpc.pb.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "client/client.h"
#include "grpcpp/create_channel.h"
#include "heaps/kernel_info.h"
#include "testing/daemon_test.h"

namespace bufferd {
namespace {

using ::bufferd::testing::Eventually;
using ::bufferd::testing::OpenRawSession;
using ::bufferd::testing::TestDaemon;
using ::bufferd::testing::ReadFile;

constexpr uint64_t kMiB = 1 << 20;

constexpr char kConfig[] = R"pb(
  heaps { name: "system" type: HEAP_TYPE_SYSTEM capacity_bytes: 16777216 }
  heaps { name: "display" type: HEAP_TYPE_CARVEOUT capacity_bytes: 4194304 }
  heaps {
    name: "camera"
    type: HEAP_TYPE_CARVEOUT
    capacity_bytes: 2097152
    hugepage_size: HUGEPAGE_SIZE_2M
  }
  quotas {
    max_bytes_per_session: 3145728
    max_buffers_per_session: 64
    max_allocation_bytes: 4194304
  }
  stalled_session_timeout_ms: 400
  max_queued_deliveries: 8
)pb";

class ConfiguredDaemonTest : public testing::DaemonTest {
 protected:
  void SetUp() override { StartDaemon(kConfig); }
};

// Tests that configured heaps exist with their capacities, carveouts are
// separate, and a full carveout refuses with RESOURCE_EXHAUSTED then recovers.
TEST_F(ConfiguredDaemonTest, NamedCarveoutsAreSeparate) {
  auto heaps = client_->ListHeaps();
  ASSERT_TRUE(heaps.ok());
  ASSERT_EQ(heaps->heaps_size(), 3);
  EXPECT_EQ(heaps->heaps(1).name(), "display");
  EXPECT_EQ(heaps->heaps(1).capacity(), 4 * kMiB);
  EXPECT_EQ(heaps->heaps(1).reserved_resident(), 4 * kMiB);
  EXPECT_EQ(heaps->heaps(2).capacity(), 2 * kMiB);
  {
    auto other = daemon_->Connect();
    ASSERT_TRUE(other.ok());
    auto d1 = client_->Allocate({.heap = "display", .size = 3 * kMiB});
    auto d2 = other->Allocate({.heap = "display", .size = kMiB});
    ASSERT_TRUE(d1.ok() && d2.ok()) << d1.status() << d2.status();
    auto full = other->Allocate({.heap = "display", .size = 4096});
    EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_NE(full.status().message().find("heap 'display' has 0 B free of 4 MiB"),
              absl::string_view::npos)
        << full.status();
    auto camera = other->Allocate({.heap = "camera", .size = 2 * kMiB});
    EXPECT_TRUE(camera.ok()) << camera.status();
    ASSERT_TRUE(d2->Release().ok());
    heaps = client_->ListHeaps();
    ASSERT_TRUE(heaps.ok());
    EXPECT_EQ(heaps->heaps(1).used(), 3 * kMiB);
    EXPECT_EQ(heaps->heaps(1).free(), kMiB);
    EXPECT_EQ(heaps->heaps(0).free(), 16 * kMiB) << "system heap capped at 16 MiB, empty";
    EXPECT_TRUE(other->Allocate({.heap = "display", .size = kMiB}).ok());
    heaps = client_->ListHeaps();
    EXPECT_EQ(heaps->heaps(1).peak(), 4 * kMiB);
    EXPECT_EQ(heaps->heaps(1).failures(), 1u);
  }
  ExpectBaseline();
}

// Tests that a dropped buffer's bytes are free for the very next allocation,
// on a capacity-bound system heap and on a carveout (whose reservation must be
// refilled first), whether the next RPC carries the release or the client's
// flusher already sent it one-way (the pauses of 5 ms > OneWayQueue::kDelay). Each
// buffer is more than half of what the session quota and the heap allow, so
// any release the daemon had not applied would fail the next Allocate.
TEST_F(ConfiguredDaemonTest, DroppedBytesAreFreeForTheNextCall) {
  const struct {
    const char* heap;
    uint64_t size;
  } cases[] = {{"system", 2 * kMiB}, {"display", 3 * kMiB}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.heap);
    for (int i = 0; i < 60; ++i) {
      {
        auto buffer = client_->Allocate({.heap = c.heap, .size = c.size, .name = "churn"});
        ASSERT_TRUE(buffer.ok()) << "round " << i << ": " << buffer.status();
      }  // dropped
      if (i % 3 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  ExpectBaseline();
}

// Tests the same on one Client shared by two threads: while one drops and
// re-allocates 2 MiB under the 3 MiB session quota, the other keeps making
// calls, which pick up the first thread's drops. A call that started after a
// drop must still find it applied, whichever call carried it first.
TEST_F(ConfiguredDaemonTest, DropsCarriedByAnotherThreadStillPrecedeTheNextCall) {
  std::atomic<bool> done{false};
  std::thread other([&] {
    while (!done) (void)client_->ListClients();
  });
  const absl::Time end = absl::Now() + absl::Seconds(2);
  int rounds = 0;
  while (absl::Now() < end) {
    auto buffer = client_->Allocate({.heap = "system", .size = 2 * kMiB, .name = "churn"});
    if (!buffer.ok()) {
      ADD_FAILURE() << "round " << rounds << ": " << buffer.status();
      break;  // not ASSERT: `other` must be joined
    }
    ++rounds;
  }
  done = true;
  other.join();
  EXPECT_GT(rounds, 20);
  ExpectBaseline();
}

// Tests the configured quotas through the daemon: largest allocation, bytes
// per session (per heap), each naming the quota; importing counts too.
TEST_F(ConfiguredDaemonTest, QuotasThroughTheDaemon) {
  {
    auto too_big = client_->Allocate({.heap = "system", .size = 5 * kMiB});
    EXPECT_EQ(too_big.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_NE(too_big.status().message().find("quota max_allocation_bytes"),
              absl::string_view::npos);
    auto a = client_->Allocate({.heap = "system", .size = 2 * kMiB});
    ASSERT_TRUE(a.ok());
    auto b = client_->Allocate({.heap = "system", .size = 2 * kMiB});
    EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_NE(b.status().message().find("quota max_bytes_per_session on heap 'system'"),
              absl::string_view::npos)
        << b.status();
    // The other session's budget is its own, and an import is charged.
    auto other = daemon_->Connect();
    ASSERT_TRUE(other.ok());
    auto own = other->Allocate({.heap = "system", .size = 2 * kMiB});
    ASSERT_TRUE(own.ok());
    auto token = a->Export(Access::kReadOnly);
    ASSERT_TRUE(token.ok());
    auto imported = other->Import(*token);
    EXPECT_EQ(imported.status().code(), absl::StatusCode::kResourceExhausted) << imported.status();
  }
  ExpectBaseline();
}

// Tests that a client that never reads fd.sock cannot block the daemon: its
// deliveries queue up to the bound, further calls fail with
// RESOURCE_EXHAUSTED, and the stalled session is ended and cleaned up.
class StalledReaderTest : public testing::DaemonTest {
 protected:
  void SetUp() override {
    StartDaemon(R"pb(
      heaps { name: "system" type: HEAP_TYPE_SYSTEM }
      stalled_session_timeout_ms: 400
      max_queued_deliveries: 8
    )pb");
  }
};

TEST_F(StalledReaderTest, StalledReaderIsEnded) {
  {
    auto raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok()) << raw.status();
    grpc::Status last;
    int allocated = 0;
    // A connected SEQPACKET pair is bounded only by the daemon's send buffer
    // (a few hundred small records); then 8 more queue; then refusal.
    for (int i = 0; i < 5000; ++i) {
      v1::AllocateRequest request;
      request.set_heap("system");
      request.set_size(4096);
      v1::AllocateResponse response;
      last = raw->stub->Allocate(raw->Context().get(), request, &response);
      if (!last.ok()) break;
      ++allocated;
    }
    ASSERT_FALSE(last.ok()) << "never filled the queue after " << allocated << " deliveries";
    EXPECT_EQ(last.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << last.error_message();
    EXPECT_NE(last.error_message().find("fd deliveries queued"), std::string::npos)
        << last.error_message();
    // The daemon still serves everyone else meanwhile.
    EXPECT_TRUE(client_->Allocate({.heap = "system", .size = 4096}).ok());
    // After the stall timeout the session is gone, and so are its buffers.
    EXPECT_TRUE(Eventually([&] {
      v1::GetBufferRequest request;
      v1::GetBufferResponse response;
      return raw->stub->GetBuffer(raw->Context().get(), request, &response).error_code() ==
             grpc::StatusCode::UNAUTHENTICATED;
    }));
  }
  ExpectBaseline();
}

// Connects to `path` as uid/gid nobody with supplementary `groups`; returns
// the connect errno (0 = connected).
int ConnectAsNobody(const std::string& path, std::vector<gid_t> groups) {
  return testing::AsNobody(groups, [&] {
    int fd = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
    return ::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 ? 0 : errno;
  });
}

// Tests the socket-dir group and anonymous Debug access: with `group` the dir
// is 0770 and the sockets 0660, all three owned by that group, so a process of
// another uid in that group can connect and one outside it cannot;
// DEBUG_ACCESS_ANYONE lets Debug calls through without a session while
// Allocator calls still need one.
// Tests that an unbounded heap's free figure is what the machine could give
// it (so an alert on "free == 0" means something), never 0.
TEST(HeapFreeTest, UnboundedHeapsReportWhatTheMachineHas) {
  auto daemon = TestDaemon::Start();  // the embedded default: system unbounded
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto client = (*daemon)->Connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto heaps = client->ListHeaps();
  ASSERT_TRUE(heaps.ok()) << heaps.status();
  uint64_t mem_total = 0;
  std::istringstream meminfo(ReadFile("/proc/meminfo"));
  for (std::string key; meminfo >> key >> mem_total && key != "MemTotal:";) {
    meminfo.ignore(1 << 10, '\n');
  }
  for (const auto& heap : heaps->heaps()) {
    SCOPED_TRACE(heap.name());
    if (heap.capacity() != 0) continue;
    EXPECT_GT(heap.free(), 0u);
    EXPECT_LE(heap.free(),
              mem_total * 1024 + heap.hugepages().total_pages() * heap.hugepages().page_size());
  }
}

TEST(ConfigAccessTest, GroupModesAndAnonymousDebug) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to chown to another group and drop to nobody";
  struct group* entry = ::getgrnam("daemon");
  if (entry == nullptr) GTEST_SKIP() << "no group 'daemon' on this machine";
  const gid_t gid = entry->gr_gid;
  ASSERT_NE(gid, ::getegid()) << "the test needs a group other than the daemon's own";
  auto daemon = TestDaemon::Start(R"pb(
    heaps { name: "system" type: HEAP_TYPE_SYSTEM }
    group: "daemon"
    debug_access: DEBUG_ACCESS_ANYONE
  )pb");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string dir = (*daemon)->socket_dir();
  for (const std::string& path : {dir, FdSocketPath(dir), ControlSocketPath(dir)}) {
    SCOPED_TRACE(path);
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, path == dir ? 0750u : 0660u) << "members connect, only the daemon writes the dir";
    EXPECT_EQ(st.st_gid, gid);
  }
  // The test's temp root is 0700: let `nobody` through to the socket dir.
  const std::string root = std::filesystem::path(dir).parent_path();
  ASSERT_EQ(::chmod(root.c_str(), 0711), 0);
  EXPECT_EQ(ConnectAsNobody(FdSocketPath(dir), {gid}), 0);
  EXPECT_EQ(ConnectAsNobody(FdSocketPath(dir), {}), EACCES);

  auto channel = grpc::CreateChannel(absl::StrCat("unix:", ControlSocketPath(dir)),
                                     grpc::InsecureChannelCredentials());
  auto debug = v1::Debug::NewStub(channel);
  grpc::ClientContext debug_context;
  v1::ListHeapsResponse heaps;
  grpc::Status status = debug->ListHeaps(&debug_context, v1::ListHeapsRequest(), &heaps);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(heaps.heaps_size(), 1);
  auto allocator = v1::Allocator::NewStub(channel);
  grpc::ClientContext allocate_context;
  v1::AllocateRequest request;
  request.set_heap("system");
  request.set_size(4096);
  v1::AllocateResponse response;
  status = allocator->Allocate(&allocate_context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

// Runs bufferd with `config_text` as its --config file, expecting it to exit
// at load; returns the exit code and sets `path` and `log` to the config
// file's path and what the daemon printed.
int RunWithConfig(const std::string& config_text, std::string* path, std::string* log) {
  char root[] = "/tmp/bufferd-cfg-XXXXXX";
  if (::mkdtemp(root) == nullptr) return -1;
  *path = absl::StrCat(root, "/bufferd.conf");
  std::ofstream(*path) << config_text;
  const std::string log_path = absl::StrCat(root, "/log");
  auto daemon = testing::SpawnDaemon(
      {"--config", *path, "--socket-dir", absl::StrCat(root, "/sock")}, log_path);
  if (!daemon.ok()) return -1;
  const int code = daemon->Wait();
  *log = ReadFile(log_path);
  const bool made_socket_dir = std::filesystem::exists(absl::StrCat(root, "/sock"));
  std::filesystem::remove_all(root);
  return made_socket_dir ? -3 : code;  // refused at load: nothing made
}

// Tests that a config naming a group (or a debug group, or a user) this
// machine does not have is refused at load: exit 2, the file, line and column
// of the field, nothing made.
TEST(ConfigStartupTest, UnknownGroupIsRefusedAtLoad) {
  const struct {
    std::string text;
    std::string expected;
  } cases[] = {
      {"heaps { name: \"system\" type: HEAP_TYPE_SYSTEM }\ngroup: \"no-such-group-bufferd\"\n",
       ":2:1: field 'group' names group 'no-such-group-bufferd', which does not exist on this "
       "machine\n"},
      {"heaps { name: \"system\" type: HEAP_TYPE_SYSTEM }\ndebug_groups: \"root\"\n"
       "debug_groups: \"no-such-group-bufferd\"\n",
       ":3:1: field 'debug_groups' names group 'no-such-group-bufferd', which does not exist on "
       "this machine\n"},
      {"heaps { name: \"system\" type: HEAP_TYPE_SYSTEM }\n\n  user: \"no-such-user-bufferd\"\n",
       ":3:3: field 'user' names user 'no-such-user-bufferd', which does not exist on this "
       "machine\n"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    std::string path, log;
    EXPECT_EQ(RunWithConfig(c.text, &path, &log), 2) << log;
    EXPECT_EQ(log, absl::StrCat("bufferd: ", path, c.expected));
  }
}

// Tests that a carveout of 1 TiB (meant as 1 GiB) is refused at load, naming
// the field and both figures, before anything is reserved: exit 2.
TEST(ConfigStartupTest, TebibyteCarveoutIsRefusedAtLoad) {
  const uint64_t memory = HostMemoryBytes();
  ASSERT_GT(memory, 0u);
  ASSERT_LT(memory, uint64_t{1} << 40) << "this machine could hold the carveout: proves nothing";
  std::string path, log;
  EXPECT_EQ(RunWithConfig("heaps { name: \"system\" type: HEAP_TYPE_SYSTEM }\nheaps {\n"
                          "  name: \"c\"\n  type: HEAP_TYPE_CARVEOUT\n"
                          "  capacity_bytes: 1099511627776\n}\n",
                          &path, &log),
            2)
      << log;
  EXPECT_TRUE(absl::StartsWith(log, absl::StrCat("bufferd: ", path,
                                                 ":5:3: heaps[1] ('c'): field 'capacity_bytes' "
                                                 "is 1 TiB (1099511627776 bytes)")))
      << log;
  EXPECT_TRUE(absl::EndsWith(
      log, absl::StrCat("; carveouts may reserve at most half of this machine's memory (MemTotal ",
                        FormatBytes(memory), "): ", FormatBytes(memory / 2), "\n")))
      << log;
  EXPECT_FALSE(absl::StrContains(log, "bufferd.errno")) << log;
}

// Tests that a directory given as --config is named as one (exit 2), not
// read as a config without heaps.
TEST(ConfigStartupTest, DirectoryAsConfigIsNamed) {
  char root[] = "/tmp/bufferd-cfg-XXXXXX";
  ASSERT_NE(::mkdtemp(root), nullptr);
  const std::string log_path = absl::StrCat(root, "/log");
  auto daemon = testing::SpawnDaemon(
      {"--config", root, "--socket-dir", absl::StrCat(root, "/sock")}, log_path);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  EXPECT_EQ(daemon->Wait(), 2);
  EXPECT_EQ(ReadFile(log_path), absl::StrCat("bufferd: config file ", root,
                                             " is a directory; --config takes a textproto file\n"));
  std::filesystem::remove_all(root);
}

// Tests that a bad config file stops startup with exit code 2 and a message
// naming the file, line and field; and that the default config prints.
TEST(ConfigStartupTest, BadConfigFailsWithLineAndField) {
  char root[] = "/tmp/bufferd-cfg-XXXXXX";
  ASSERT_NE(::mkdtemp(root), nullptr);
  const std::string config = absl::StrCat(root, "/bad.conf");
  std::ofstream(config)
      << "heaps {\n  name: \"system\"\n  type: HEAP_TYPE_SYSTEM\n  capacity: 5\n}\n";
  const std::string log = absl::StrCat(root, "/log");
  auto bad =
      testing::SpawnDaemon({"--config", config, "--socket-dir", absl::StrCat(root, "/sock")}, log);
  ASSERT_TRUE(bad.ok()) << bad.status();
  EXPECT_EQ(bad->Wait(), 2);
  std::string text = ReadFile(log);
  EXPECT_NE(text.find(absl::StrCat(config, ":4:")), std::string::npos) << text;
  EXPECT_NE(text.find("no field named \"capacity\"; did you mean \"capacity_bytes\"?"),
            std::string::npos)
      << text;

  const std::string printed = absl::StrCat(root, "/printed");
  auto print = testing::SpawnDaemon({"--print-default-config"}, printed);
  ASSERT_TRUE(print.ok()) << print.status();
  EXPECT_EQ(print->Wait(), 0);
  text = ReadFile(printed);
  EXPECT_NE(text.find("name: \"carveout\""), std::string::npos) << text;
  // What it prints is itself a valid config.
  auto good =
      testing::SpawnDaemon({"--config", printed, "--socket-dir", absl::StrCat(root, "/s2")}, log);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_TRUE(Eventually([&] { return Client::Connect(absl::StrCat(root, "/s2")).ok(); }));
  good->Kill(SIGTERM);
  EXPECT_EQ(good->Wait(), 0);
  std::filesystem::remove_all(root);
}

}  // namespace
}  // namespace bufferd
