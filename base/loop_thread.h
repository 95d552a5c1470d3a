// LoopThread: one thread running a poll or epoll loop, and the way to stop it.
//
// The loop watches wake_fd() (an eventfd that turns readable when Stop() is
// called) beside its own fds, and returns as soon as stopping() is true.
// Thread-safe; Stop() must not be called from the loop itself.
#ifndef BUFFERD_BASE_LOOP_THREAD_H_
#define BUFFERD_BASE_LOOP_THREAD_H_

#include <atomic>
#include <functional>
#include <thread>

#include "absl/status/status.h"
#include "base/unique_fd.h"

namespace bufferd {

class LoopThread {
 public:
  LoopThread() = default;
  LoopThread(const LoopThread&) = delete;
  LoopThread& operator=(const LoopThread&) = delete;
  ~LoopThread() { Stop(); }

  // Creates the wake eventfd (so the loop's owner can watch it before the
  // loop runs, and count it among its fds).
  absl::Status Init();
  // Runs `loop` on a new thread. Call once, after Init().
  void Run(std::function<void()> loop);
  // Asks the loop to return and joins it. True for the first call (started
  // or not), so the caller tears down what the loop used exactly once.
  bool Stop();

  // Makes wake_fd() readable (a loop that watches it drains it with
  // DrainWake): for work handed to the loop from another thread.
  void Wake();
  void DrainWake();

  bool stopping() const { return stopping_.load(std::memory_order_acquire); }
  int wake_fd() const { return wake_.get(); }

 private:
  UniqueFd wake_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
};

}  // namespace bufferd

#endif  // BUFFERD_BASE_LOOP_THREAD_H_
