// Counts the syscalls this thread makes (the raw_syscalls:sys_enter
// tracepoint through perf_event_open): what a hot path costs in kernel
// entries, for tests and benchmarks that assert it. Needs tracefs and the
// right to open the tracepoint (root, or perf_event_paranoid allowing it);
// without them the counter is invalid and says why.
#ifndef BUFFERD_TESTING_SYSCALL_COUNTER_H_
#define BUFFERD_TESTING_SYSCALL_COUNTER_H_

#include <linux/perf_event.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "base/unique_fd.h"

namespace bufferd::testing {

// A counter of this thread's syscalls, disabled; invalid if the kernel or
// its settings do not allow one (the reason in `why`).
inline UniqueFd SyscallCounter(std::string& why) {
  // tracefs, where it is usually mounted, or under debugfs.
  uint64_t id = 0;
  bool found = false;
  for (const char* root : {"/sys/kernel/tracing", "/sys/kernel/debug/tracing"}) {
    std::ifstream id_file(absl::StrCat(root, "/events/raw_syscalls/sys_enter/id"));
    if (id_file >> id) {
      found = true;
      break;
    }
  }
  if (!found) {
    why =
        "no raw_syscalls/sys_enter/id under /sys/kernel/tracing or /sys/kernel/debug/tracing "
        "(as root: mount -t tracefs nodev /sys/kernel/tracing)";
    return UniqueFd();
  }
  perf_event_attr attr{};
  attr.type = PERF_TYPE_TRACEPOINT;
  attr.size = sizeof(attr);
  attr.config = id;
  attr.disabled = 1;
  const int fd =
      static_cast<int>(::syscall(SYS_perf_event_open, &attr, 0, -1, -1, PERF_FLAG_FD_CLOEXEC));
  if (fd < 0) why = absl::StrCat("perf_event_open: ", std::strerror(errno));
  return UniqueFd(fd);
}

// Syscalls `body` makes on this thread, less what counting itself costs
// (-1 without a counter).
template <typename F>
long CountSyscalls(int counter, F body) {
  if (counter < 0) return -1;
  auto count = [&](auto inner) {
    ::ioctl(counter, PERF_EVENT_IOC_RESET, 0);
    ::ioctl(counter, PERF_EVENT_IOC_ENABLE, 0);
    inner();
    ::ioctl(counter, PERF_EVENT_IOC_DISABLE, 0);
    uint64_t value = 0;
    if (::read(counter, &value, sizeof(value)) != sizeof(value)) return -1L;
    return static_cast<long>(value);
  };
  const long empty = count([] {});
  const long counted = count(body);
  return counted < 0 || empty < 0 ? -1 : counted - empty;
}

}  // namespace bufferd::testing

#endif  // BUFFERD_TESTING_SYSCALL_COUNTER_H_
