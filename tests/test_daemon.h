// TestDaemon: a real bufferd process on a fresh temporary socket dir, for
// integration tests; and helpers to run a second client process (tests/peer).
#ifndef BUFFERD_TESTS_TEST_DAEMON_H_
#define BUFFERD_TESTS_TEST_DAEMON_H_

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
#include "client/client.h"
#include "grpcpp/client_context.h"

namespace bufferd::testing {

// Polls `condition` every 10 ms for up to 5 s; returns its last value.
template <typename F>
bool Eventually(F condition) {
  for (int i = 0; i < 500; ++i) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return condition();
}

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

// Runs `body` in a forked child that first becomes uid/gid nobody (65534)
// with supplementary `groups`; returns what `body` returned (-2 if the
// identity could not be taken). Only plain system calls in `body`.
int AsNobody(const std::vector<gid_t>& groups, const std::function<int()>& body);
absl::StatusOr<RawSession> OpenRawSession(const std::string& socket_dir);

// Path of a binary of this workspace in the test's runfiles ("daemon/bufferd").
std::string RunfilePath(const std::string& path);

class TestDaemon {
 public:
  struct Options {
    // Textproto; empty = the embedded default.
    std::string config;
    // RLIMIT_NOFILE (soft and hard) the daemon starts with; 0 = inherited.
    uint64_t nofile = 0;
    std::string log_level = "debug";
  };

  // Starts bufferd with `config_text` (textproto; empty = embedded default)
  // and waits until a client can connect.
  static absl::StatusOr<std::unique_ptr<TestDaemon>> Start(const std::string& config_text = "");
  static absl::StatusOr<std::unique_ptr<TestDaemon>> Start(const Options& options);
  // Stops the daemon (SIGTERM) if still running and removes the dir.
  ~TestDaemon();

  // SIGTERM and wait; returns the exit status (as from waitpid) or -1.
  int Stop();
  // SIGKILL and wait.
  void Kill();

  const std::string& socket_dir() const { return socket_dir_; }
  // The daemon's stderr; and the temp dir holding it and the socket dir.
  std::string log_path() const;
  const std::string& root() const { return root_; }
  pid_t pid() const { return pid_; }
  // The daemon's open fds now.
  int OpenFds() const;
  absl::StatusOr<Client> Connect() const { return Client::Connect(socket_dir_); }

 private:
  std::string root_;
  std::string socket_dir_;
  pid_t pid_ = -1;
};

// Spawns bufferd with `args` and returns its pid, stderr going to `log_path`;
// with `nofile`, under that RLIMIT_NOFILE (soft and hard).
pid_t SpawnDaemon(const std::vector<std::string>& args, const std::string& log_path,
                  uint64_t nofile = 0);

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

// A child process running tests/peer with `args`, its stdout readable line by line.
class Peer {
 public:
  static absl::StatusOr<Peer> Spawn(const std::vector<std::string>& args);
  // Runs `binary` (a copy of tests/peer that `uid` may execute) as
  // uid/gid with supplementary `groups`, dropped before exec.
  static absl::StatusOr<Peer> SpawnAs(uid_t uid, gid_t gid, const std::vector<gid_t>& groups,
                                      const std::string& binary,
                                      const std::vector<std::string>& args);
  Peer(Peer&&) noexcept;
  ~Peer();

  // Next line of stdout (without '\n'); empty at EOF or after `timeout_ms`.
  std::string ReadLine(int timeout_ms = 10000);
  // Waits for exit; returns the exit code, or 128+signal.
  int Wait();
  void Kill(int signal);
  pid_t pid() const { return pid_; }

 private:
  Peer(pid_t pid, int out) : pid_(pid), out_(out) {}
  pid_t pid_ = -1;
  int out_ = -1;
  std::string buffered_;
};

}  // namespace bufferd::testing

#endif  // BUFFERD_TESTS_TEST_DAEMON_H_
