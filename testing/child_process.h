// ChildProcess: a child process for tests and benches, owned like an fd.
//
// Spawn() execs a binary; Fork() runs a function. Either way the child is
// set up before it runs: rlimits, a CPU, an identity to drop to, where its
// output goes, and the signal it gets if this process dies (so nothing
// outlives a crashed test). Destroying a ChildProcess that still runs
// SIGKILLs and reaps it: no stray processes.
//
// Fork() children of a threaded process may only make plain system calls
// (no malloc, no locks) in `body`. Thread-compatible; move-only.
#ifndef BUFFERD_TESTING_CHILD_PROCESS_H_
#define BUFFERD_TESTING_CHILD_PROCESS_H_

#include <signal.h>
#include <sys/resource.h>
#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace bufferd::testing {

struct ChildOptions {
  // setrlimit(resource, {value, value}) for each, e.g. {RLIMIT_NOFILE, 64}.
  std::vector<std::pair<int, rlim_t>> rlimits;
  // Pinned to this CPU (all its threads inherit); -1 = anywhere.
  int cpu = -1;
  // Becomes this uid/gid with these supplementary groups (needs root).
  std::optional<uid_t> uid;
  gid_t gid = 0;
  std::vector<gid_t> groups;
  // Sent to the child when this process dies.
  int death_signal = SIGKILL;
  // stdout and stderr appended to this file; empty = inherited.
  std::string output_path;
  // stdout readable with ReadLine() (wins over output_path for stdout).
  bool capture_stdout = false;
};

// Exit codes of a child that could not be set up.
inline constexpr int kChildSetupFailed = 125;
inline constexpr int kChildExecFailed = 127;

class ChildProcess {
 public:
  static absl::StatusOr<ChildProcess> Spawn(const std::string& binary,
                                            const std::vector<std::string>& args,
                                            const ChildOptions& options = {});
  // Runs `body` in a forked child; its return value is the exit code.
  static absl::StatusOr<ChildProcess> Fork(const std::function<int()>& body,
                                           const ChildOptions& options = {});

  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  // SIGKILLs and reaps the child if it still runs.
  ~ChildProcess();

  // Waits for the child's end: its exit code, or 128 + the signal; -1 if it
  // could not be waited for (already reaped).
  int Wait();
  // As Wait, but gives up after `timeout` (nullopt: still running).
  std::optional<int> WaitFor(absl::Duration timeout);
  // Sends `signal` (if the child was not reaped yet).
  void Kill(int signal);
  // The next line of captured stdout (without '\n'); empty at EOF or after
  // `timeout_ms`.
  std::string ReadLine(int timeout_ms = 10000);

  pid_t pid() const { return pid_; }

 private:
  ChildProcess(pid_t pid, int out) : pid_(pid), out_(out) {}
  // Kills and reaps a running child; closes the stdout pipe.
  void Reset();
  pid_t pid_ = -1;
  int out_ = -1;
  std::string buffered_;
};

// Path of a binary of this workspace ("daemon/bufferd"): in a test's
// runfiles, beside a bazel-run binary's runfiles, or under bazel-bin.
std::string BinaryPath(const std::string& workspace_path);

}  // namespace bufferd::testing

#endif  // BUFFERD_TESTING_CHILD_PROCESS_H_
