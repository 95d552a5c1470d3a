// FUZZ_CHECK: what a fuzz target asserts about every input. A failed check
// prints what broke and aborts, which libFuzzer reports as a finding (and
// the corpus replay test as a failure). Also the small fd helper the
// targets share.
#ifndef BUFFERD_TESTS_FUZZ_CHECK_H_
#define BUFFERD_TESTS_FUZZ_CHECK_H_

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "base/unique_fd.h"

#define FUZZ_CHECK(condition, ...)                                                          \
  do {                                                                                      \
    if (!(condition)) {                                                                     \
      std::fprintf(stderr, "%s:%d: check failed: %s: %s\n", __FILE__, __LINE__, #condition, \
                   ::absl::StrCat("" __VA_OPT__(, ) __VA_ARGS__).c_str());                  \
      std::abort();                                                                         \
    }                                                                                       \
  } while (0)

namespace bufferd {

// The read end of a pipe whose write end is closed: pollable, and readable
// (EOF) at once.
inline UniqueFd ReadEndOfClosedPipe() {
  int pipe_fds[2];
  FUZZ_CHECK(::pipe2(pipe_fds, O_CLOEXEC) == 0);
  ::close(pipe_fds[1]);
  return UniqueFd(pipe_fds[0]);
}

}  // namespace bufferd

#endif  // BUFFERD_TESTS_FUZZ_CHECK_H_
