// FUZZ_CHECK: what a fuzz target asserts about every input. A failed check
// prints what broke and aborts, which libFuzzer reports as a finding (and
// the corpus replay test as a failure).
#ifndef BUFFERD_TESTS_FUZZ_CHECK_H_
#define BUFFERD_TESTS_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"

#define FUZZ_CHECK(condition, ...)                                                          \
  do {                                                                                      \
    if (!(condition)) {                                                                     \
      std::fprintf(stderr, "%s:%d: check failed: %s: %s\n", __FILE__, __LINE__, #condition, \
                   ::absl::StrCat("" __VA_OPT__(, ) __VA_ARGS__).c_str());                  \
      std::abort();                                                                         \
    }                                                                                       \
  } while (0)

#endif  // BUFFERD_TESTS_FUZZ_CHECK_H_
