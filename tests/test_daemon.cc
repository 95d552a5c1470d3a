#include "tests/test_daemon.h"

#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "base/fd_count.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "grpcpp/create_channel.h"

namespace bufferd::testing {
namespace {

std::vector<char*> Argv(const std::string& binary, const std::vector<std::string>& args) {
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(binary.c_str()));
  for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  return argv;
}

}  // namespace

std::string RunfilePath(const std::string& path) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir != nullptr) {
    return absl::StrCat(srcdir, "/", workspace != nullptr ? workspace : "bufferd", "/", path);
  }
  return path;
}

pid_t SpawnDaemon(const std::vector<std::string>& args, const std::string& log_path,
                  uint64_t nofile) {
  const std::string binary = RunfilePath("daemon/bufferd");
  std::vector<char*> argv = Argv(binary, args);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // never outlive a crashed test
    if (nofile != 0) {
      rlimit limit{nofile, nofile};
      if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) ::_exit(126);
    }
    int log = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log >= 0) {
      ::dup2(log, STDERR_FILENO);
      ::dup2(log, STDOUT_FILENO);
    }
    ::execv(binary.c_str(), argv.data());
    ::_exit(127);
  }
  return pid;
}

absl::StatusOr<std::unique_ptr<TestDaemon>> TestDaemon::Start(const std::string& config_text) {
  return Start(Options{.config = config_text});
}

std::string TestDaemon::log_path() const { return absl::StrCat(root_, "/bufferd.log"); }

absl::StatusOr<std::unique_ptr<TestDaemon>> TestDaemon::Start(const Options& options) {
  const std::string& config_text = options.config;
  auto daemon = std::unique_ptr<TestDaemon>(new TestDaemon());
  char root[] = "/tmp/bufferd-test-XXXXXX";
  if (::mkdtemp(root) == nullptr) return absl::InternalError("mkdtemp failed");
  daemon->root_ = root;
  daemon->socket_dir_ = absl::StrCat(root, "/sock");
  std::vector<std::string> args = {"--socket-dir", daemon->socket_dir_, "--log-level",
                                   options.log_level};
  if (!config_text.empty()) {
    const std::string config_path = absl::StrCat(root, "/bufferd.conf");
    std::ofstream(config_path) << config_text;
    args.push_back("--config");
    args.push_back(config_path);
  }
  daemon->pid_ = SpawnDaemon(args, daemon->log_path(), options.nofile);
  for (int i = 0; i < 200; ++i) {
    int status;
    if (::waitpid(daemon->pid_, &status, WNOHANG) == daemon->pid_) {
      daemon->pid_ = -1;
      std::ifstream log(absl::StrCat(root, "/bufferd.log"));
      std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
      return absl::InternalError(absl::StrCat("bufferd exited at startup: ", text));
    }
    if (std::filesystem::exists(FdSocketPath(daemon->socket_dir_)) && daemon->Connect().ok()) {
      return daemon;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  return absl::DeadlineExceededError("bufferd did not come up within 5 s");
}

TestDaemon::~TestDaemon() {
  Stop();
  std::ifstream log(absl::StrCat(root_, "/bufferd.log"));
  if (log && ::testing::Test::HasFailure())
    std::cerr << "---- bufferd log ----\n" << log.rdbuf() << "---- end of log ----\n";
  std::error_code error;
  std::filesystem::remove_all(root_, error);
}

int TestDaemon::Stop() {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  int status = -1;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  return status;
}

void TestDaemon::Kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

int TestDaemon::OpenFds() const { return CountOpenFds(pid_); }

void DaemonTest::StartDaemon(const std::string& config) {
  StartDaemon(TestDaemon::Options{.config = config});
}

void DaemonTest::StartDaemon(const TestDaemon::Options& options) {
  auto daemon = TestDaemon::Start(options);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  daemon_ = *std::move(daemon);
  auto client = daemon_->Connect();
  ASSERT_TRUE(client.ok()) << client.status();
  client_ = std::make_unique<Client>(*std::move(client));
  // gRPC connects lazily: make one call so its connection is in the baseline.
  ASSERT_TRUE(client_->ListHeaps().ok());
  // Start()'s probe session closes asynchronously: wait until the daemon has
  // ended it and its fd count holds still, then take the baseline every later
  // check compares to.
  ASSERT_TRUE(Eventually([&] {
    auto clients = client_->ListClients();
    return clients.ok() && clients->clients_size() == 1;
  })) << "the startup probe's session never ended";
  // Settled = the same count 5 times in a row (50 ms).
  int previous = -1;
  int same = 0;
  ASSERT_TRUE(Eventually([&] {
    const int now = daemon_->OpenFds();
    same = now == previous ? same + 1 : 0;
    previous = now;
    return same >= 4;
  })) << "the daemon's fd count never settled";
  baseline_fds_ = previous;
  // This client's session and control connection, as the fd budget counts
  // them (the probe's connection is forgotten within a second of closing).
  v1::ListHeapsResponse heaps;
  ASSERT_TRUE(Eventually([&] {
    auto now = client_->ListHeaps();
    if (now.ok()) heaps = *std::move(now);
    return now.ok() && heaps.fds().control_connections() == 1;
  })) << heaps.fds().ShortDebugString();
  baseline_budget_fds_ = heaps.fds_in_use();
  EXPECT_EQ(heaps.fds().sessions(), 1u);
  EXPECT_EQ(heaps.fds().buffers(), 0u);
}

uint64_t DaemonTest::LiveBuffers() {
  auto heaps = client_->ListHeaps();
  EXPECT_TRUE(heaps.ok()) << heaps.status();
  return heaps.ok() ? heaps->live_buffers() : ~0ull;
}

void DaemonTest::ExpectBaseline() {
  EXPECT_TRUE(Eventually([&] { return LiveBuffers() == 0; })) << LiveBuffers();
  EXPECT_TRUE(Eventually([&] { return daemon_->OpenFds() == baseline_fds_; }))
      << daemon_->OpenFds() << " fds open, baseline " << baseline_fds_;
  // Dropped Buffers release one-way, and big frees finish on the daemon's
  // work queue: the heaps' used bytes return a moment after the buffers go.
  // ...and the daemon's fd count once the reaper has closed the big ones.
  EXPECT_TRUE(Eventually([&] {
    auto heaps = client_->ListHeaps();
    if (!heaps.ok() || heaps->fds_in_use() != baseline_budget_fds_) return false;
    for (const auto& heap : heaps->heaps()) {
      if (heap.used() != 0) return false;
    }
    return true;
  }));
  auto heaps = client_->ListHeaps();
  ASSERT_TRUE(heaps.ok());
  EXPECT_EQ(heaps->live_handles(), 0u);
  EXPECT_EQ(heaps->fds_in_use(), baseline_budget_fds_);
  EXPECT_EQ(heaps->fds().buffers(), 0u);
  EXPECT_EQ(heaps->fds().deliveries(), 0u);
  for (const auto& heap : heaps->heaps()) EXPECT_EQ(heap.used(), 0u) << heap.name();
}

std::unique_ptr<v1::Allocator::Stub> NewAllocatorStub(const std::string& socket_dir) {
  return v1::Allocator::NewStub(grpc::CreateChannel(
      absl::StrCat("unix:", ControlSocketPath(socket_dir)), grpc::InsecureChannelCredentials()));
}

std::unique_ptr<grpc::ClientContext> RawSession::Context() const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->AddMetadata(kSessionMetadataKey, metadata);
  return context;
}

grpc::Status RawSession::Allocate(const std::string& heap, uint64_t size) const {
  v1::AllocateRequest request;
  request.set_heap(heap);
  request.set_size(size);
  v1::AllocateResponse response;
  return stub->Allocate(Context().get(), request, &response);
}

int AsNobody(const std::vector<gid_t>& groups, const std::function<int()>& body) {
  int pipe_fds[2];
  if (::pipe(pipe_fds) != 0) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(pipe_fds[0]);
    int result = -2;
    if (::setgroups(groups.size(), groups.data()) == 0 && ::setgid(65534) == 0 &&
        ::setuid(65534) == 0) {
      result = body();
    }
    (void)!::write(pipe_fds[1], &result, sizeof(result));
    ::_exit(0);
  }
  ::close(pipe_fds[1]);
  int result = -1;
  (void)!::read(pipe_fds[0], &result, sizeof(result));
  ::close(pipe_fds[0]);
  ::waitpid(pid, nullptr, 0);
  return result;
}

absl::StatusOr<RawSession> OpenRawSession(const std::string& socket_dir) {
  RawSession session;
  absl::StatusOr<UnixSocket> socket = UnixSocket::ConnectSeqPacket(FdSocketPath(socket_dir));
  if (!socket.ok()) return socket.status();
  absl::StatusOr<UnixSocket::Received> hello = socket->RecvWithFds();
  if (!hello.ok()) return hello.status();
  v1::FdChannelMessage message;
  if (!message.ParseFromString(hello->bytes) || !message.has_hello()) {
    return absl::InternalError("no hello on fd.sock");
  }
  session.socket = *std::move(socket);
  session.metadata = FormatSessionCredential(message.hello().session_id(), message.hello().secret());
  session.stub = NewAllocatorStub(socket_dir);
  return session;
}

absl::StatusOr<Peer> Peer::Spawn(const std::vector<std::string>& args) {
  return SpawnAs(::getuid(), ::getgid(), {}, RunfilePath("tests/peer"), args);
}

absl::StatusOr<Peer> Peer::SpawnAs(uid_t uid, gid_t gid, const std::vector<gid_t>& groups,
                                   const std::string& binary,
                                   const std::vector<std::string>& args) {
  const bool drop = uid != ::getuid();
  std::vector<char*> argv = Argv(binary, args);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
  pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (drop && (::setgroups(groups.size(), groups.data()) != 0 || ::setgid(gid) != 0 ||
                 ::setuid(uid) != 0)) {
      ::_exit(125);
    }
    ::dup2(pipe_fds[1], STDOUT_FILENO);
    ::execv(binary.c_str(), argv.data());
    ::_exit(127);
  }
  ::close(pipe_fds[1]);
  return Peer(pid, pipe_fds[0]);
}

Peer::Peer(Peer&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      out_(std::exchange(other.out_, -1)),
      buffered_(std::move(other.buffered_)) {}

Peer::~Peer() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  if (out_ >= 0) ::close(out_);
}

std::string Peer::ReadLine(int timeout_ms) {
  while (buffered_.find('\n') == std::string::npos) {
    pollfd ready{out_, POLLIN, 0};
    if (::poll(&ready, 1, timeout_ms) <= 0) return "";
    char chunk[256];
    ssize_t n = ::read(out_, chunk, sizeof(chunk));
    if (n <= 0) return "";
    buffered_.append(chunk, static_cast<size_t>(n));
  }
  size_t end = buffered_.find('\n');
  std::string line = buffered_.substr(0, end);
  buffered_.erase(0, end + 1);
  return line;
}

int Peer::Wait() {
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + WTERMSIG(status);
}

void Peer::Kill(int signal) { ::kill(pid_, signal); }

}  // namespace bufferd::testing
