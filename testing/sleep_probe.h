// What a blocked thread sleeps on, from /proc: for tests and benches that
// must know a waiter is asleep in the right place before they wake it.
#ifndef BUFFERD_TESTING_SLEEP_PROBE_H_
#define BUFFERD_TESTING_SLEEP_PROBE_H_

#include <sys/types.h>

#include <string_view>

namespace bufferd::testing {

// Whether thread `tid` of process `pid` is blocked in a futex wait (futex, or
// futex_waitv with one of its words there) on a word of a mapping whose name
// in /proc/<pid>/maps contains `mapping` (a memfd's name, e.g.
// "bufferd-reservations"). Reads /proc/<pid>/task/<tid>/syscall and, for
// futex_waitv, /proc/<pid>/mem (the caller needs ptrace access to the
// process: its own, or root's).
bool SleepsInFutexOn(pid_t pid, pid_t tid, std::string_view mapping);

}  // namespace bufferd::testing

#endif  // BUFFERD_TESTING_SLEEP_PROBE_H_
