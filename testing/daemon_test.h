// Helpers for tests that run a real daemon (gtest-aware): the TestDaemon
// (a DaemonProcess that prints its log when the test failed), the DaemonTest
// fixture with its baseline check, raw sessions below the client library,
// tests/peer children and identity drops.
#ifndef BUFFERD_TESTING_DAEMON_TEST_H_
#define BUFFERD_TESTING_DAEMON_TEST_H_

#include <gtest/gtest.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "base/unix_socket.h"
#include "bufferd/v1/buffer.grpc.pb.h"
#include "bufferd/v1/fence.grpc.pb.h"
#include "client/client.h"
#include "grpcpp/client_context.h"
#include "testing/child_process.h"
#include "testing/daemon_process.h"
#include "testing/eventually.h"

namespace bufferd::testing {

// A raw Allocator stub on `socket_dir`'s control.sock.
std::unique_ptr<v1::Allocator::Stub> NewAllocatorStub(const std::string& socket_dir);

// A session opened by hand, below the client library, for tests that must do
// what the library never would (send foreign handles, stop reading fd.sock,
// close it mid-call): the fd.sock connection (read only up to the hello), the
// session's metadata and a raw stub.
struct RawSession {
  UnixSocket socket;
  // "<session id>:<hex secret>"
  std::string metadata;
  std::unique_ptr<v1::Allocator::Stub> stub;

  // A context carrying the metadata.
  std::unique_ptr<grpc::ClientContext> Context() const;
  // An Allocate through the raw stub (its fd, if any, is left on the socket).
  grpc::Status Allocate(const std::string& heap, uint64_t size) const;
};
absl::StatusOr<RawSession> OpenRawSession(const std::string& socket_dir);

// Runs `body` in a forked child that first becomes uid/gid nobody (65534)
// with supplementary `groups`; returns what `body` returned, -2 if the
// identity could not be taken, -1 if the child died first. Only plain
// system calls in `body`.
int AsNobody(const std::vector<gid_t>& groups, const std::function<int()>& body);

// tests/peer with `args`, its stdout readable line by line; SpawnPeerAs runs
// `binary` (a copy of tests/peer that `uid` may execute) as uid/gid with
// supplementary `groups`.
absl::StatusOr<ChildProcess> SpawnPeer(const std::vector<std::string>& args);
absl::StatusOr<ChildProcess> SpawnPeerAs(uid_t uid, gid_t gid, const std::vector<gid_t>& groups,
                                         const std::string& binary,
                                         const std::vector<std::string>& args);

// How soon after an owner's kill -9 its waiters must wake (the issues' 10
// ms; instrumented builds are slower, not wrong).
#if defined(__SANITIZE_ADDRESS__)
inline constexpr int64_t kWakeBudgetNs = 50'000'000;
#else
inline constexpr int64_t kWakeBudgetNs = 10'000'000;
#endif

// The value after `key=` in a peer's line, up to the next space.
std::string Field(const std::string& line, const std::string& key);

// The whole file at `path` ("" if it cannot be read): a child's log.
std::string ReadFile(const std::string& path);

// A raw Fence stub on `socket_dir`'s control.sock.
std::unique_ptr<v1::Fence::Stub> FenceStub(const std::string& socket_dir);

// What `bufctl --socket-dir <dir> <command>` prints (the test needs
// //tools:bufctl in its data).
std::string Bufctl(const std::string& dir, const std::string& command);

// A DaemonProcess that prints the daemon's log when the test has failed.
class TestDaemon : public DaemonProcess {
 public:
  using Options = DaemonProcess::Options;
  static absl::StatusOr<std::unique_ptr<TestDaemon>> Start(const std::string& config_text = "");
  static absl::StatusOr<std::unique_ptr<TestDaemon>> Start(const Options& options);
  ~TestDaemon() override;
};

// Fixture: a real daemon plus one connected Client, and a check that the
// daemon is back at its baseline (no buffer, handle, heap byte or fd leaked).
class DaemonTest : public ::testing::Test {
 protected:
  // Starts the daemon with `config` (empty = embedded default) and connects.
  void StartDaemon(const std::string& config = "");
  void StartDaemon(const TestDaemon::Options& options);
  // Live buffers as ListHeaps reports them (~0 if the call fails).
  uint64_t LiveBuffers();
  // No buffer, handle, heap byte or fd leaked: the daemon is back where it
  // started.
  void ExpectBaseline();

  std::unique_ptr<TestDaemon> daemon_;
  std::unique_ptr<Client> client_;
  int baseline_fds_ = 0;
  // fds the daemon's budget counts at the baseline (this client's session
  // and control connection).
  uint64_t baseline_budget_fds_ = 0;
};

}  // namespace bufferd::testing

#endif  // BUFFERD_TESTING_DAEMON_TEST_H_
