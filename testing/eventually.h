// Eventually: polls a condition until it holds or a timeout passes.
#ifndef BUFFERD_TESTING_EVENTUALLY_H_
#define BUFFERD_TESTING_EVENTUALLY_H_

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace bufferd::testing {

// Polls `condition` every `every` for up to `timeout`; returns its last
// value.
template <typename F>
bool Eventually(F condition, absl::Duration timeout = absl::Seconds(5),
                absl::Duration every = absl::Milliseconds(10)) {
  const absl::Time until = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() > until) return condition();
    absl::SleepFor(every);
  }
  return true;
}

}  // namespace bufferd::testing

#endif  // BUFFERD_TESTING_EVENTUALLY_H_
