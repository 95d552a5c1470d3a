#include "testing/daemon_test.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "base/protocol.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "grpcpp/create_channel.h"

namespace bufferd::testing {

absl::StatusOr<std::unique_ptr<TestDaemon>> TestDaemon::Start(const std::string& config_text) {
  return Start(Options{.config = config_text});
}

absl::StatusOr<std::unique_ptr<TestDaemon>> TestDaemon::Start(const Options& options) {
  std::unique_ptr<TestDaemon> daemon(new TestDaemon());
  absl::Status launched = daemon->Launch(options);
  if (!launched.ok()) return launched;
  return daemon;
}

TestDaemon::~TestDaemon() {
  Stop();
  std::ifstream log(log_path());
  if (log && ::testing::Test::HasFailure()) {
    std::cerr << "---- bufferd log ----\n" << log.rdbuf() << "---- end of log ----\n";
  }
}

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
  EXPECT_EQ(heaps.fds().exports(), 0u);
}

uint64_t DaemonTest::LiveBuffers() {
  auto heaps = client_->ListHeaps();
  EXPECT_TRUE(heaps.ok()) << heaps.status();
  return heaps.ok() ? heaps->live_buffers() : ~0ull;
}

void DaemonTest::ExpectBaseline() {
  EXPECT_TRUE(Eventually([&] { return LiveBuffers() == 0; })) << LiveBuffers();
  // A session that created a fence keeps its fence page while it lives: the
  // fixture's client's, at most, once every other session is gone. Counted
  // again at each look: one still ending holds its page for a moment.
  uint64_t pages = 0;
  int open_fds = 0;
  EXPECT_TRUE(Eventually([&] {
    auto heaps = client_->ListHeaps();
    pages = heaps.ok() ? heaps->fds().fence_pages() : ~0ull;
    open_fds = daemon_->OpenFds();
    return pages <= 1 && open_fds == baseline_fds_ + static_cast<int>(pages);
  })) << open_fds
      << " fds open, baseline " << baseline_fds_ << " + " << pages << " fence pages";
  // Dropped Buffers release one-way, and big frees finish on the daemon's
  // reaper thread: the heaps' used bytes return a moment after the buffers
  // go, and the daemon's fd count once the reaper has closed the big ones.
  EXPECT_TRUE(Eventually([&] {
    auto heaps = client_->ListHeaps();
    if (!heaps.ok()) return false;
    pages = heaps->fds().fence_pages();
    if (pages > 1 || heaps->fds_in_use() != baseline_budget_fds_ + pages) return false;
    for (const auto& heap : heaps->heaps()) {
      if (heap.used() != 0) return false;
    }
    return true;
  }));
  // Dropped Fences are forgotten one-way too.
  EXPECT_TRUE(Eventually([&] {
    auto fences = client_->ListFences();
    return fences.ok() && fences->fences().empty() && fences->timelines().empty();
  })) << "fences or timelines left behind";
  auto heaps = client_->ListHeaps();
  ASSERT_TRUE(heaps.ok());
  EXPECT_EQ(heaps->live_handles(), 0u);
  EXPECT_EQ(heaps->fds().fences(), 0u);
  EXPECT_EQ(heaps->fds_in_use(), baseline_budget_fds_ + heaps->fds().fence_pages())
      << heaps->fds().ShortDebugString();
  EXPECT_EQ(heaps->fds().fence_pages(), pages) << "the fixture's page came or went";
  EXPECT_EQ(heaps->fds().exports(), 0u);
  EXPECT_EQ(heaps->fds().deliveries(), 0u);
  for (const auto& heap : heaps->heaps()) EXPECT_EQ(heap.used(), 0u) << heap.name();
}

std::string Bufctl(const std::string& dir, const std::string& command) {
  const std::string line =
      absl::StrCat(BinaryPath("tools/bufctl"), " --socket-dir ", dir, " ", command);
  std::string out;
  FILE* pipe = ::popen(line.c_str(), "r");
  if (pipe == nullptr) return out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  ::pclose(pipe);
  return out;
}

std::string Field(const std::string& line, const std::string& key) {
  const size_t at = line.find(key + "=");
  if (at == std::string::npos) return "";
  const std::string rest = line.substr(at + key.size() + 1);
  return rest.substr(0, rest.find(' '));
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::unique_ptr<v1::Fence::Stub> FenceStub(const std::string& socket_dir) {
  return v1::Fence::NewStub(grpc::CreateChannel(
      absl::StrCat("unix:", ControlSocketPath(socket_dir)), grpc::InsecureChannelCredentials()));
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
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return -1;
  ChildOptions options;
  options.uid = 65534;
  options.gid = 65534;
  options.groups = groups;
  absl::StatusOr<ChildProcess> child = ChildProcess::Fork(
      [&] {
        const int result = body();
        return ::write(pipe_fds[1], &result, sizeof(result)) == sizeof(result) ? 0 : 1;
      },
      options);
  ::close(pipe_fds[1]);
  int result = -1;
  const bool got = child.ok() && ::read(pipe_fds[0], &result, sizeof(result)) == sizeof(result);
  ::close(pipe_fds[0]);
  if (!child.ok()) return -1;
  const int code = child->Wait();
  if (got) return result;
  return code == kChildSetupFailed ? -2 : -1;  // could not become nobody, or crashed
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
  session.metadata =
      FormatSessionCredential(message.hello().session_id(), message.hello().secret());
  session.stub = NewAllocatorStub(socket_dir);
  return session;
}

absl::StatusOr<ChildProcess> SpawnPeer(const std::vector<std::string>& args) {
  ChildOptions options;
  options.capture_stdout = true;
  return ChildProcess::Spawn(BinaryPath("tests/peer"), args, options);
}

absl::StatusOr<ChildProcess> SpawnPeerAs(uid_t uid, gid_t gid, const std::vector<gid_t>& groups,
                                         const std::string& binary,
                                         const std::vector<std::string>& args) {
  ChildOptions options;
  options.capture_stdout = true;
  options.uid = uid;
  options.gid = gid;
  options.groups = groups;
  return ChildProcess::Spawn(binary, args, options);
}

}  // namespace bufferd::testing
