// bufferd: the buffer and fence daemon. Flags and wiring only.
#include <pwd.h>
#include <signal.h>

#include <cstdio>
#include <iostream>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/synchronization/mutex.h"
#include "base/errno_status.h"
#include "base/protocol.h"
#include "daemon/config.h"
#include "daemon/daemon.h"
#include "daemon/log.h"
#include "daemon/systemd.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

int main(int argc, char** argv) {
#ifdef NDEBUG
  // Debian's abseil is built with deadlock detection on: every absl::Mutex
  // acquisition (gRPC's included) then updates a global lock graph. Release
  // builds turn it off; debug and test builds keep it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif
  CLI::App app{"bufferd: shared-memory buffers and fences for processes on this host"};
  std::string config_path;
  std::string socket_dir;
  std::string log_level;
  std::string user;
  bool print_default = false;
  app.add_option("--config", config_path, "bufferd.v1.Config textproto (default: embedded)");
  app.add_option("--socket-dir", socket_dir,
                 "directory for control.sock and fd.sock (default: $XDG_RUNTIME_DIR/bufferd, "
                 "/tmp/bufferd-<uid> without $XDG_RUNTIME_DIR, "
                 "or /run/bufferd as root; socket-activated: where the sockets are)");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, critical, off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}));
  app.add_option("--user", user,
                 "drop to this user once the sockets and heaps are set up (start as root)");
  app.add_flag("--print-default-config", print_default, "print the embedded default config");
  app.set_version_flag("--version", bufferd::VersionText("bufferd"));
  CLI11_PARSE(app, argc, argv);

  if (print_default) {
    std::cout << bufferd::DefaultConfigText();
    return 0;
  }
  auto logger = spdlog::stderr_color_mt("bufferd");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");

  if (!user.empty() && ::getpwnam(user.c_str()) == nullptr) {
    std::fprintf(stderr, "bufferd: --user '%s' does not exist on this machine\n", user.c_str());
    return 2;
  }
  // --user replaces the config's `user`, so that one is not checked.
  auto machine = [&user] {
    bufferd::MachineFacts facts = bufferd::ReadMachineFacts();
    if (!user.empty()) facts.user_exists = nullptr;
    return facts;
  };
  absl::StatusOr<bufferd::v1::Config> config =
      config_path.empty() ? bufferd::DefaultConfig()
                          : bufferd::LoadConfigFile(config_path, machine());
  if (!config.ok()) {
    // "bufferd: bufferd.conf:3:40: heaps[0] ('c'): ...": the message names
    // the file, place and field; a file that cannot be read adds its code.
    const absl::Status& status = config.status();
    const std::string text = status.code() == absl::StatusCode::kInvalidArgument
                                 ? std::string(status.message())
                                 : bufferd::StatusText(status);
    std::fprintf(stderr, "bufferd: %s\n", text.c_str());
    return 2;
  }
  if (!user.empty()) config->set_user(user);
  const std::string level = !log_level.empty() ? log_level : config->log_level();
  if (!level.empty()) spdlog::set_level(spdlog::level::from_str(level));
  bufferd::InstallLibraryLogHandlers();

  // Block the signals a daemon commonly gets before any thread starts, then
  // handle each on this thread: none ends the daemon without a log line.
  sigset_t handled;
  sigemptyset(&handled);
  for (int signal_number : {SIGINT, SIGTERM, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2}) {
    sigaddset(&handled, signal_number);
  }
  pthread_sigmask(SIG_BLOCK, &handled, nullptr);
  signal(SIGPIPE, SIG_IGN);

  // Under systemd's bufferd.socket (or systemd-socket-activate), the sockets
  // come with the process.
  absl::StatusOr<std::optional<bufferd::ActivatedSockets>> activated =
      bufferd::TakeActivatedSockets();
  if (!activated.ok()) {
    spdlog::critical("cannot start: {}", bufferd::StatusText(activated.status()));
    return 1;
  }
  absl::StatusOr<std::unique_ptr<bufferd::Daemon>> daemon =
      bufferd::Daemon::Start(*config, socket_dir, *std::move(activated));
  if (!daemon.ok()) {
    spdlog::critical("cannot start: {}", bufferd::StatusText(daemon.status()));
    return 1;
  }
  while (true) {
    int signal_number = 0;
    sigwait(&handled, &signal_number);
    const char* name = sigabbrev_np(signal_number);
    if (signal_number == SIGHUP) {
      // Reload what may change live; a bad file changes nothing.
      if (config_path.empty()) {
        spdlog::info("SIGHUP: no --config file, nothing to reload (the embedded default is fixed)");
        continue;
      }
      absl::StatusOr<bufferd::v1::Config> next = bufferd::LoadConfigFile(config_path, machine());
      if (!next.ok()) {
        spdlog::error("SIGHUP: config not reloaded, still serving the previous one: {}",
                      std::string(next.status().message()));
        continue;
      }
      if (!user.empty()) next->set_user(user);
      (*daemon)->Reload(*next, /*keep_log_level=*/!log_level.empty());
      continue;
    }
    if (signal_number == SIGUSR1 || signal_number == SIGUSR2) {
      spdlog::info("SIG{} ignored (SIGHUP reloads the config; SIGTERM, SIGINT or SIGQUIT stop)",
                   name != nullptr ? name : "?");
      continue;
    }
    spdlog::info("SIG{} received; shutting down", name != nullptr ? name : "?");
    break;
  }
  (*daemon)->Shutdown();
  daemon->reset();
  spdlog::info("bye");
  return 0;
}
