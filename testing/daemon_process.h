// DaemonProcess: a real bufferd process on a fresh temporary socket dir, for
// integration tests and benches. Start() returns once a client can connect
// (or with the daemon's log if it exited at startup); destruction stops it
// (SIGTERM) and removes the temporary dir.
//
// Thread-compatible.
#ifndef BUFFERD_TESTING_DAEMON_PROCESS_H_
#define BUFFERD_TESTING_DAEMON_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "testing/child_process.h"

namespace bufferd::testing {

class DaemonProcess {
 public:
  struct Options {
    // Textproto; empty = the embedded default.
    std::string config;
    // RLIMIT_NOFILE (soft and hard) the daemon starts with; 0 = inherited.
    uint64_t nofile = 0;
    std::string log_level = "debug";
    // The daemon (all its threads) pinned to this CPU; -1 = anywhere.
    int cpu = -1;
    // Empty: this workspace's daemon/bufferd.
    std::string binary;
  };

  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(const Options& options);
  virtual ~DaemonProcess();

  // SIGTERM and wait; returns the exit code (128 + signal if killed), or -1
  // if it was stopped already.
  int Stop();
  // SIGKILL and wait.
  void Kill();

  const std::string& socket_dir() const { return socket_dir_; }
  // The daemon's stdout and stderr; and the temp dir holding it and the
  // socket dir.
  std::string log_path() const;
  const std::string& root() const { return root_; }
  pid_t pid() const { return child_ ? child_->pid() : -1; }
  // The daemon's open fds now.
  int OpenFds() const;
  absl::StatusOr<Client> Connect() const { return Client::Connect(socket_dir_); }

 protected:
  DaemonProcess() = default;
  // Makes the temp dir, spawns the daemon and waits until it serves.
  absl::Status Launch(const Options& options);

 private:
  std::string root_;
  std::string socket_dir_;
  std::optional<ChildProcess> child_;
};

// Spawns bufferd with `args`, its output appended to `log_path`; with
// `nofile`, under that RLIMIT_NOFILE (soft and hard).
absl::StatusOr<ChildProcess> SpawnDaemon(const std::vector<std::string>& args,
                                         const std::string& log_path, uint64_t nofile = 0);

}  // namespace bufferd::testing

#endif  // BUFFERD_TESTING_DAEMON_PROCESS_H_
