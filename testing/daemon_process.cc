#include "testing/daemon_process.h"

#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "base/fd_count.h"
#include "base/protocol.h"

namespace bufferd::testing {

namespace {

// A bufferd child: output to `log_path`, SIGTERM if we die (never outlive a
// crashed test), with RLIMIT_NOFILE `nofile` (0: inherited) on `cpu` (-1:
// anywhere).
absl::StatusOr<ChildProcess> SpawnDaemonBinary(const std::string& binary,
                                               const std::vector<std::string>& args,
                                               const std::string& log_path, uint64_t nofile,
                                               int cpu) {
  ChildOptions options;
  options.output_path = log_path;
  options.death_signal = SIGTERM;
  options.cpu = cpu;
  if (nofile != 0) options.rlimits.push_back({RLIMIT_NOFILE, nofile});
  return ChildProcess::Spawn(binary.empty() ? BinaryPath("daemon/bufferd") : binary, args, options);
}

}  // namespace

absl::StatusOr<ChildProcess> SpawnDaemon(const std::vector<std::string>& args,
                                         const std::string& log_path, uint64_t nofile) {
  return SpawnDaemonBinary("", args, log_path, nofile, /*cpu=*/-1);
}

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(const Options& options) {
  std::unique_ptr<DaemonProcess> daemon(new DaemonProcess());
  RETURN_IF_ERROR(daemon->Launch(options));
  return daemon;
}

absl::Status DaemonProcess::Launch(const Options& options) {
  char root[] = "/tmp/bufferd-test-XXXXXX";
  if (::mkdtemp(root) == nullptr) return absl::InternalError("mkdtemp failed");
  root_ = root;
  socket_dir_ = absl::StrCat(root, "/sock");
  std::vector<std::string> args = {"--socket-dir", socket_dir_, "--log-level", options.log_level};
  if (!options.config.empty()) {
    const std::string config_path = absl::StrCat(root, "/bufferd.conf");
    std::ofstream(config_path) << options.config;
    args.push_back("--config");
    args.push_back(config_path);
  }
  absl::StatusOr<ChildProcess> spawned =
      SpawnDaemonBinary(options.binary, args, log_path(), options.nofile, options.cpu);
  if (!spawned.ok()) return spawned.status();
  child_ = *std::move(spawned);
  for (int i = 0; i < 200; ++i) {
    if (child_->WaitFor(absl::ZeroDuration()).has_value()) {
      child_.reset();
      std::ifstream log(log_path());
      std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
      return absl::InternalError(absl::StrCat("bufferd exited at startup: ", text));
    }
    if (std::filesystem::exists(FdSocketPath(socket_dir_)) && Connect().ok()) {
      return absl::OkStatus();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  return absl::DeadlineExceededError("bufferd did not come up within 5 s");
}

std::string DaemonProcess::log_path() const { return absl::StrCat(root_, "/bufferd.log"); }

DaemonProcess::~DaemonProcess() {
  Stop();
  std::error_code error;
  if (!root_.empty()) std::filesystem::remove_all(root_, error);
}

int DaemonProcess::Stop() {
  if (!child_) return -1;
  child_->Kill(SIGTERM);
  const int code = child_->Wait();
  child_.reset();
  return code;
}

void DaemonProcess::Kill() {
  if (!child_) return;
  child_->Kill(SIGKILL);
  child_->Wait();
  child_.reset();
}

int DaemonProcess::OpenFds() const { return CountOpenFds(pid()); }

}  // namespace bufferd::testing
