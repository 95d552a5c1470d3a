// The daemon under a service manager, without systemd as PID 1: started by
// systemd-socket-activate (from Debian's systemd package) on both sockets,
// with a NOTIFY_SOCKET the test reads. Nested activators pass both sockets:
// the outer binds fd.sock (SOCK_SEQPACKET), the inner control.sock, and each
// execs the next (same pid) once fd.sock has a connection waiting.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "base/protocol.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "client/client.h"
#include "testing/child_process.h"
#include "testing/daemon_test.h"

namespace bufferd {
namespace {

constexpr char kActivator[] = "/usr/bin/systemd-socket-activate";
constexpr char kConfig[] = R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM })pb";

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access(kActivator, X_OK) != 0) {
      GTEST_SKIP() << kActivator << " is missing (Debian package systemd; tools/setup installs it)";
    }
    char path[] = "/tmp/bufferd-test-XXXXXX";
    ASSERT_NE(::mkdtemp(path), nullptr);
    root_ = path;
    dir_ = root_ + "/sock";
    ASSERT_EQ(::mkdir(dir_.c_str(), 0700), 0);
    config_ = root_ + "/bufferd.conf";
    std::FILE* file = std::fopen(config_.c_str(), "w");
    ASSERT_NE(file, nullptr);
    std::fputs(kConfig, file);
    std::fclose(file);
    // The service manager's end of NOTIFY_SOCKET.
    notify_path_ = root_ + "/notify";
    notify_ = UniqueFd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, notify_path_.c_str(), sizeof(address.sun_path) - 1);
    ASSERT_EQ(::bind(notify_.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0)
        << std::strerror(errno);
  }

  void TearDown() override {
    if (daemon_.has_value()) {
      daemon_->Kill(SIGKILL);
      daemon_->Wait();
    }
    std::error_code error;
    if (!root_.empty()) std::filesystem::remove_all(root_, error);
  }

  // bufferd under two nested activators (both sockets), or one (fd.sock
  // only), with NOTIFY_SOCKET and `env` set for it.
  void StartActivated(bool both_sockets, const std::vector<std::string>& env = {}) {
    std::vector<std::string> args = {"--seqpacket", "-l", FdSocketPath(dir_)};
    if (both_sockets) {
      args.insert(args.end(), {kActivator, "-l", ControlSocketPath(dir_)});
    }
    args.insert(args.end(), {"-E", absl::StrCat("NOTIFY_SOCKET=", notify_path_)});
    for (const std::string& variable : env) args.insert(args.end(), {"-E", variable});
    args.insert(args.end(), {testing::BinaryPath("daemon/bufferd"), "--config", config_,
                             "--log-level", "debug"});
    testing::ChildOptions options;
    options.output_path = log_path();
    auto child = testing::ChildProcess::Spawn(kActivator, args, options);
    ASSERT_TRUE(child.ok()) << child.status();
    daemon_ = *std::move(child);
    // The outer activator binds fd.sock, listens, then waits for a
    // connection (the inner one binds control.sock only then). Between its
    // bind and its listen a connect is refused: wait for the listen.
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    while (!Listening(FdSocketPath(dir_)) && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
    }
  }

  // Whether a socket listens at `path`, as /proc/net/unix shows it (the
  // __SO_ACCEPTCON flag), without a connect, which would start the daemon.
  static bool Listening(const std::string& path) {
    std::ifstream in("/proc/net/unix");
    std::string line;
    std::getline(in, line);  // the header
    while (std::getline(in, line)) {
      // Num RefCount Protocol Flags Type St Inode Path
      std::istringstream fields(line);
      std::string num, refs, protocol, flags, type, state, inode, at;
      if (!(fields >> num >> refs >> protocol >> flags >> type >> state >> inode >> at)) continue;
      if (at == path && (std::stoul(flags, nullptr, 16) & 0x10000) != 0) return true;
    }
    return false;
  }

  // The next datagram on NOTIFY_SOCKET ("" after `timeout`).
  std::string NextNotification(absl::Duration timeout = absl::Seconds(20)) {
    pollfd p{notify_.get(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) != 1) return "";
    char buf[4096];
    const ssize_t n = ::recv(notify_.get(), buf, sizeof(buf), 0);
    return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
  }

  // Notifications until one contains `what`; all of them, in order.
  std::vector<std::string> NotificationsUntil(const std::string& what) {
    std::vector<std::string> seen;
    while (true) {
      std::string next = NextNotification();
      if (next.empty()) return seen;
      seen.push_back(next);
      if (absl::StrContains(next, what)) return seen;
    }
  }

  std::string log_path() const { return root_ + "/log"; }

  std::string root_;
  std::string dir_;
  std::string config_;
  std::string notify_path_;
  UniqueFd notify_;
  std::optional<testing::ChildProcess> daemon_;
};

// Tests the whole service path: a bufferd started by hand on the activated
// dir refuses to take the live sockets over; the first connection starts the
// daemon; READY=1 (with a STATUS=) arrives once both sockets serve (a
// client connects at that instant and shares a buffer with a second
// client); WATCHDOG=1 comes at half of WATCHDOG_USEC; SIGTERM says
// STOPPING=1, exits 0 and leaves the manager's sockets in place.
TEST_F(ServiceTest, ActivatedSocketsNotifyAndServe) {
  // As systemd makes /run/bufferd: 0755 (a refused daemon used to make it
  // 0700, shutting out every other uid).
  ASSERT_EQ(::chmod(dir_.c_str(), 0755), 0);
  StartActivated(/*both_sockets=*/true, {"WATCHDOG_USEC=400000"});
  ASSERT_TRUE(std::filesystem::exists(FdSocketPath(dir_))) << testing::ReadFile(log_path());

  // By hand on the same dir: fd.sock answers (and its connect starts the
  // activated daemon, as a client's would).
  const std::string intruder_log = root_ + "/intruder.log";
  auto intruder = testing::SpawnDaemon({"--socket-dir", dir_, "--config", config_}, intruder_log);
  ASSERT_TRUE(intruder.ok()) << intruder.status();
  EXPECT_EQ(intruder->Wait(), 1);
  const std::string refusal = testing::ReadFile(intruder_log);
  EXPECT_TRUE(
      absl::StrContains(refusal, "another bufferd") ||
      absl::StrContains(refusal, absl::StrCat("a bufferd already serves ", FdSocketPath(dir_))))
      << refusal;
  EXPECT_TRUE(std::filesystem::is_socket(FdSocketPath(dir_))) << "the intruder removed fd.sock";
  struct stat st {};
  ASSERT_EQ(::stat(dir_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0755u) << "the intruder changed the manager's dir";

  const std::vector<std::string> before_ready = NotificationsUntil("READY=1");
  ASSERT_FALSE(before_ready.empty()) << testing::ReadFile(log_path());
  const std::string ready = before_ready.back();
  ASSERT_TRUE(absl::StrContains(ready, "READY=1")) << testing::ReadFile(log_path());
  EXPECT_TRUE(absl::StrContains(ready, absl::StrCat("STATUS=serving ", dir_, ": "))) << ready;
  EXPECT_TRUE(absl::StrContains(ready, " sessions, ")) << ready;

  // Right at READY=1: both sockets serve.
  auto producer = Client::Connect(dir_);
  ASSERT_TRUE(producer.ok()) << producer.status() << "\n" << testing::ReadFile(log_path());
  auto buffer = producer->Allocate({.heap = "system", .size = 4096, .name = "activated"});
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  auto map = buffer->Map();
  ASSERT_TRUE(map.ok()) << map.status();
  std::memcpy(map->data(), "via systemd", 12);
  auto token = buffer->Export(Access::kReadOnly);
  ASSERT_TRUE(token.ok()) << token.status();
  auto consumer = Client::Connect(dir_);
  ASSERT_TRUE(consumer.ok()) << consumer.status();
  auto imported = consumer->Import(*token);
  ASSERT_TRUE(imported.ok()) << imported.status();
  auto view = imported->Map();
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_STREQ(reinterpret_cast<const char*>(view->data()), "via systemd");

  // Watchdog pings every 200 ms: at least 3 in the next 2 s (allowing for
  // STATUS= lines in between).
  int pings = 0;
  const absl::Time until = absl::Now() + absl::Seconds(2);
  while (absl::Now() < until) {
    const std::string next = NextNotification(until - absl::Now());
    if (next == "WATCHDOG=1") ++pings;
  }
  EXPECT_GE(pings, 3);

  daemon_->Kill(SIGTERM);
  EXPECT_TRUE(
      absl::StrContains(absl::StrJoin(NotificationsUntil("STOPPING=1"), "|"), "STOPPING=1"));
  EXPECT_EQ(daemon_->Wait(), 0) << testing::ReadFile(log_path());
  daemon_.reset();
  EXPECT_TRUE(std::filesystem::is_socket(FdSocketPath(dir_))) << "the manager's, not ours";
  EXPECT_TRUE(std::filesystem::is_socket(ControlSocketPath(dir_)));
  EXPECT_TRUE(
      absl::StrContains(testing::ReadFile(log_path()), "on sockets from the service manager"));
}

// Tests that activation with only fd.sock stops startup (exit 1) with a
// message naming what is missing, instead of binding control.sock itself.
TEST_F(ServiceTest, OneActivatedSocketIsAnError) {
  StartActivated(/*both_sockets=*/false);
  auto trigger = UnixSocket::ConnectSeqPacket(FdSocketPath(dir_));
  ASSERT_TRUE(trigger.ok()) << trigger.status();
  EXPECT_EQ(daemon_->Wait(), 1);
  daemon_.reset();
  const std::string log = testing::ReadFile(log_path());
  EXPECT_TRUE(absl::StrContains(log, "socket activation passed only fd.sock; bufferd needs both"))
      << log;
  EXPECT_FALSE(std::filesystem::exists(ControlSocketPath(dir_)));
}

// Tests that activated sockets in a dir others may write are refused (exit
// 1 naming the mode): anyone could have replaced them.
TEST_F(ServiceTest, WritableActivatedDirIsRefused) {
  ASSERT_EQ(::chmod(dir_.c_str(), 0777), 0);
  StartActivated(/*both_sockets=*/true);
  auto trigger = UnixSocket::ConnectSeqPacket(FdSocketPath(dir_));
  ASSERT_TRUE(trigger.ok()) << trigger.status();
  EXPECT_EQ(daemon_->Wait(), 1);
  daemon_.reset();
  const std::string log = testing::ReadFile(log_path());
  EXPECT_TRUE(absl::StrContains(
      log, absl::StrCat("socket dir ", dir_, " is writable by group or others (mode 0777)")))
      << log;
}

// Tests what clients trust of sockets a service manager made: their peer
// credentials are the manager's, not the daemon's. Made by pid 1 as root
// (systemd; here tests/peer as pid 1 of a pid namespace), a client connects
// and allocates; made by any other process that is not the daemon, the
// client refuses them as a relay, as before.
TEST_F(ServiceTest, SocketsMadeByPidOneAreTrustedOthersNot) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root for a pid namespace";
  if (::access("/usr/bin/unshare", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/unshare";
  const std::string peer = testing::BinaryPath("tests/peer");
  const std::string bufferd = testing::BinaryPath("daemon/bufferd");
  testing::ChildOptions options;
  options.capture_stdout = true;
  auto init = testing::ChildProcess::Spawn(
      "/usr/bin/unshare",
      {"--pid", "--fork", "--kill-child", "--mount-proc", peer, "manager", dir_, bufferd}, options);
  ASSERT_TRUE(init.ok()) << init.status();
  EXPECT_TRUE(absl::StartsWith(init->ReadLine(), "manager pid=1 daemon pid="));
  const std::string allocated = init->ReadLine();
  EXPECT_TRUE(absl::StartsWith(allocated, "allocated buffer=")) << allocated;
  EXPECT_EQ(init->Wait(), 0);

  const std::string other = root_ + "/other";
  ASSERT_EQ(::mkdir(other.c_str(), 0700), 0);
  auto manager = testing::ChildProcess::Spawn(peer, {"manager", other, bufferd}, options);
  ASSERT_TRUE(manager.ok()) << manager.status();
  EXPECT_TRUE(absl::StartsWith(manager->ReadLine(), "manager pid="));
  const std::string refused = manager->ReadLine();
  EXPECT_TRUE(absl::StrContains(refused, "error connect: PERMISSION_DENIED")) << refused;
  EXPECT_TRUE(absl::StrContains(refused, "a relay may sit between you and bufferd")) << refused;
  EXPECT_EQ(manager->Wait(), 1);
}

}  // namespace
}  // namespace bufferd
