// ProcessRef: a client process as the daemon saw it when its session
// opened (pid, escaped comm, start time), kept with what the session made
// (buffers, share tokens) so debug views can name it after the session is
// gone, and say whether that process has exited since.
//
// Pure data and functions of /proc; thread-safe.
#ifndef BUFFERD_DAEMON_PROCESS_REF_H_
#define BUFFERD_DAEMON_PROCESS_REF_H_

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace bufferd {

struct ProcessRef {
  pid_t pid = 0;
  // /proc/<pid>/comm, escaped (base/client_text.h).
  std::string comm;
  // Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid,
  // names one process for good (pids are reused, start times are not).
  uint64_t start_ticks = 0;
};

// The start time of `pid`; 0 if it has no /proc entry (exited).
uint64_t ProcessStartTicks(pid_t pid);

// Whether the process is gone: no such pid, or the pid is another
// process's now. False for a ProcessRef with no pid (unknown).
bool ProcessExited(const ProcessRef& process);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_PROCESS_REF_H_
