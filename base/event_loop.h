// EventLoop: one thread that watches fds (epoll) and runs timers.
//
// Watch an fd with a callback that gets the epoll events; run a function
// after a delay, or every period. Timers run on the monotonic clock: a step
// of the wall clock neither fires nor stalls them. Callbacks run on the loop thread, one at a time,
// never under the loop's lock, so they may call back into the loop (watch,
// unwatch, add timers). epoll's data names the fd and which watch of it this
// is, so an event for an fd unwatched (and maybe reused) earlier in the same
// batch is dropped, never delivered to the new owner of the number.
//
// Thread-safe: every method may be called from any thread. Stop() must not
// be called from a callback. Unwatch and Cancel do not wait for a callback
// already running on the loop thread: stop the loop before destroying
// anything its callbacks use.
#ifndef BUFFERD_BASE_EVENT_LOOP_H_
#define BUFFERD_BASE_EVENT_LOOP_H_

#include <cstdint>
#include <functional>
#include <map>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/loop_thread.h"
#include "base/unique_fd.h"

namespace bufferd {

// CLOCK_MONOTONIC, as a duration since boot: the clock timers run on.
absl::Duration MonotonicNow();

class EventLoop {
 public:
  using FdCallback = std::function<void(uint32_t events)>;
  using TimerId = uint64_t;

  EventLoop() = default;
  ~EventLoop() { Stop(); }
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Opens the epoll fd and the wake eventfd (so the owner can count them
  // among its own fds before the loop runs).
  absl::Status Init();
  // Runs the loop on a new thread. Call once, after Init().
  void Start();
  // Returns from the loop and joins it; true for the first call.
  bool Stop();

  // Calls `callback` with the events (EPOLLIN, ...) whenever `fd` has some
  // of `events`. One watch per fd.
  absl::Status Watch(int fd, uint32_t events, FdCallback callback);
  // Changes the events a watched fd is watched for.
  absl::Status Modify(int fd, uint32_t events);
  // Stops watching `fd` (before it is closed); no callback for it runs
  // after this returns on the loop thread.
  void Unwatch(int fd);

  // Runs `fn` once on the loop thread, `delay` from now (at once if <= 0).
  TimerId RunAfter(absl::Duration delay, std::function<void()> fn);
  // Runs `fn` every `period`, the first time one period from now.
  TimerId RunEvery(absl::Duration period, std::function<void()> fn);
  // A timer cancelled before it fires never runs.
  void Cancel(TimerId timer);

 private:
  struct Watcher {
    // Which watch of the fd this is: epoll's data carries it beside the fd,
    // so an event of an earlier watch of the same number is told apart.
    uint32_t generation = 0;
    FdCallback callback;
  };
  struct Timer {
    // On the monotonic clock (MonotonicNow).
    absl::Duration when;
    absl::Duration period = absl::ZeroDuration();  // zero: once
    std::function<void()> fn;
  };

  void Loop();
  // The epoll_wait timeout until the next timer (-1: none).
  int TimeoutMs() ABSL_LOCKS_EXCLUDED(mu_);
  void RunDueTimers() ABSL_LOCKS_EXCLUDED(mu_);
  TimerId AddTimer(Timer timer);

  LoopThread thread_;
  UniqueFd epoll_;

  absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;  // of timers
  uint32_t next_generation_ ABSL_GUARDED_BY(mu_) = 1;
  // By fd. Flat: nothing points into it past the lock (Loop copies the
  // callback out), and a watched fd (a session's fd.sock) costs one
  // 48-byte slot here.
  absl::flat_hash_map<int, Watcher> watchers_ ABSL_GUARDED_BY(mu_);
  std::map<TimerId, Timer> timers_ ABSL_GUARDED_BY(mu_);
  std::multimap<absl::Duration, TimerId> due_ ABSL_GUARDED_BY(mu_);
};

}  // namespace bufferd

#endif  // BUFFERD_BASE_EVENT_LOOP_H_
