#include "bench/bench_util.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "base/protocol.h"
#include "base/unix_socket.h"
#include "client/client.h"

namespace bufferd::bench {

pid_t StartPinnedDaemon(const std::string& binary, const std::string& dir, int cpu) {
  pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    PinTo(cpu);
    ::execl(binary.c_str(), binary.c_str(), "--socket-dir", dir.c_str(), "--log-level", "warn",
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  for (int i = 0; i < 400; ++i) {
    if (std::filesystem::exists(FdSocketPath(dir)) && Client::Connect(dir).ok()) return pid;
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  StopDaemon(pid);
  return -1;
}

void StopDaemon(pid_t pid) {
  if (pid <= 0) return;
  ::kill(pid, SIGTERM);
  ::waitpid(pid, nullptr, 0);
}

std::string FindDaemonBinary(const char* argv0) {
  std::filesystem::path self = std::filesystem::absolute(argv0);
  for (const auto& candidate : {self.string() + ".runfiles/bufferd/daemon/bufferd",
                                (self.parent_path().parent_path() / "daemon/bufferd").string()}) {
    if (std::filesystem::exists(candidate)) return candidate;
  }
  return "bazel-bin/daemon/bufferd";
}

}  // namespace bufferd::bench
