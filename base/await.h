// AwaitWithTimeout: absl::Mutex::AwaitWithTimeout for a lambda.
#ifndef BUFFERD_BASE_AWAIT_H_
#define BUFFERD_BASE_AWAIT_H_

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace bufferd {

// Waits, with `mu` held, until `ready()` (evaluated under `mu`) is true or
// `timeout` has passed; returns whether it became true.
template <typename Predicate>
bool AwaitWithTimeout(absl::Mutex& mu, Predicate ready, absl::Duration timeout) {
  return mu.AwaitWithTimeout(absl::Condition(
                                 +[](Predicate* p) { return (*p)(); }, &ready),
                             timeout);
}

}  // namespace bufferd

#endif  // BUFFERD_BASE_AWAIT_H_
