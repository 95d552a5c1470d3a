#include "testing/child_process.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"

namespace bufferd::testing {
namespace {

// In the child, before exec or body: only plain system calls.
void SetUpChild(const ChildOptions& options, int out_pipe, pid_t parent) {
  ::prctl(PR_SET_PDEATHSIG, options.death_signal);
  // The parent died before prctl took: nobody will send the signal.
  if (::getppid() != parent) ::_exit(kChildSetupFailed);
  for (const auto& [resource, value] : options.rlimits) {
    rlimit limit{value, value};
    if (::setrlimit(resource, &limit) != 0) ::_exit(kChildSetupFailed);
  }
  if (options.cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(options.cpu, &set);
    if (::sched_setaffinity(0, sizeof(set), &set) != 0) ::_exit(kChildSetupFailed);
  }
  if (!options.output_path.empty()) {
    int log = ::open(options.output_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log < 0) ::_exit(kChildSetupFailed);
    ::dup2(log, STDERR_FILENO);
    ::dup2(log, STDOUT_FILENO);
  }
  if (out_pipe >= 0) ::dup2(out_pipe, STDOUT_FILENO);
  if (options.uid.has_value() && (::setgroups(options.groups.size(), options.groups.data()) != 0 ||
                                  ::setgid(options.gid) != 0 || ::setuid(*options.uid) != 0)) {
    ::_exit(kChildSetupFailed);
  }
}

}  // namespace

absl::StatusOr<ChildProcess> ChildProcess::Spawn(const std::string& binary,
                                                 const std::vector<std::string>& args,
                                                 const ChildOptions& options) {
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(binary.c_str()));
  for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  return Fork(
      [&] {
        ::execv(binary.c_str(), argv.data());
        return kChildExecFailed;
      },
      options);
}

absl::StatusOr<ChildProcess> ChildProcess::Fork(const std::function<int()>& body,
                                                const ChildOptions& options) {
  int pipe_fds[2] = {-1, -1};
  if (options.capture_stdout && ::pipe2(pipe_fds, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
  }
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    for (int fd : pipe_fds) {
      if (fd >= 0) ::close(fd);
    }
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  }
  if (pid == 0) {
    SetUpChild(options, pipe_fds[1], parent);
    ::_exit(body());
  }
  if (pipe_fds[1] >= 0) ::close(pipe_fds[1]);
  return ChildProcess(pid, pipe_fds[0]);
}

ChildProcess::ChildProcess(ChildProcess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      out_(std::exchange(other.out_, -1)),
      buffered_(std::move(other.buffered_)) {}

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    Reset();
    pid_ = std::exchange(other.pid_, -1);
    out_ = std::exchange(other.out_, -1);
    buffered_ = std::move(other.buffered_);
  }
  return *this;
}

ChildProcess::~ChildProcess() { Reset(); }

void ChildProcess::Reset() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }
  if (out_ >= 0) ::close(out_);
  out_ = -1;
  buffered_.clear();
}

namespace {
int ExitCode(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + WTERMSIG(status);
}
}  // namespace

int ChildProcess::Wait() {
  if (pid_ <= 0) return -1;
  int status = 0;
  pid_t got;
  while ((got = ::waitpid(pid_, &status, 0)) < 0 && errno == EINTR) {
  }
  pid_ = -1;
  return got < 0 ? -1 : ExitCode(status);
}

std::optional<int> ChildProcess::WaitFor(absl::Duration timeout) {
  if (pid_ <= 0) return -1;
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int status = 0;
    const pid_t got = ::waitpid(pid_, &status, WNOHANG);
    if (got == pid_ || (got < 0 && errno != EINTR)) {
      pid_ = -1;
      return got < 0 ? -1 : ExitCode(status);
    }
    if (absl::Now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

void ChildProcess::Kill(int signal) {
  if (pid_ > 0) ::kill(pid_, signal);
}

std::string ChildProcess::ReadLine(int timeout_ms) {
  while (buffered_.find('\n') == std::string::npos) {
    pollfd ready{out_, POLLIN, 0};
    if (out_ < 0 || ::poll(&ready, 1, timeout_ms) <= 0) return "";
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

std::string BinaryPath(const std::string& workspace_path) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir != nullptr) {
    return absl::StrCat(srcdir, "/", workspace != nullptr ? workspace : "bufferd", "/",
                        workspace_path);
  }
  std::error_code error;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  if (!error) {
    // bazel run: <binary>.runfiles/bufferd/<path>; or beside it in bazel-bin.
    for (const std::filesystem::path& candidate :
         {std::filesystem::path(self.string() + ".runfiles/bufferd") / workspace_path,
          self.parent_path().parent_path() / workspace_path}) {
      if (std::filesystem::exists(candidate, error)) return candidate.string();
    }
  }
  return absl::StrCat("bazel-bin/", workspace_path);
}

}  // namespace bufferd::testing
