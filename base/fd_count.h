// How many fds a process has open (/proc/<pid>/fd): for tests, and for the
// daemon's fd reserve at startup.
#ifndef BUFFERD_BASE_FD_COUNT_H_
#define BUFFERD_BASE_FD_COUNT_H_

#include <sys/types.h>
#include <unistd.h>

#include <filesystem>
#include <string>

namespace bufferd {

// Number of open fds of `pid` (this process by default); -1 if unreadable.
inline int CountOpenFds(pid_t pid = ::getpid()) {
  std::error_code error;
  std::filesystem::directory_iterator it("/proc/" + std::to_string(pid) + "/fd", error);
  if (error) return -1;
  int count = 0;
  for (; it != std::filesystem::directory_iterator(); it.increment(error)) {
    if (error) return -1;
    ++count;
  }
  return count;
}

}  // namespace bufferd

#endif  // BUFFERD_BASE_FD_COUNT_H_
