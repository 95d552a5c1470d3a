#include "base/event_loop.h"

#include <sys/epoll.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <limits>
#include <thread>
#include <vector>

#include "base/errno_status.h"

namespace bufferd {
namespace {

// epoll data of the wake eventfd; a watched fd's is its generation (never
// 0) above the fd.
constexpr uint64_t kWakeId = 0;

uint64_t EpollData(int fd, uint32_t generation) {
  return (uint64_t{generation} << 32) | static_cast<uint32_t>(fd);
}

}  // namespace

absl::Duration MonotonicNow() {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  return absl::DurationFromTimespec(now);
}

absl::Status EventLoop::Init() {
  epoll_.Reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) return ErrnoError("epoll_create1", errno);
  RETURN_IF_ERROR(thread_.Init());
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.u64 = kWakeId;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, thread_.wake_fd(), &event) != 0) {
    return ErrnoError("epoll_ctl(ADD, wake)", errno);
  }
  return absl::OkStatus();
}

void EventLoop::Start() {
  thread_.Run([this] { Loop(); });
}

bool EventLoop::Stop() { return thread_.Stop(); }

absl::Status EventLoop::Watch(int fd, uint32_t events, FdCallback callback) {
  absl::MutexLock lock(&mu_);
  if (fd < 0) return absl::InvalidArgumentError("no fd to watch");
  if (watchers_.contains(fd)) return absl::AlreadyExistsError("fd is watched already");
  const uint32_t generation = next_generation_;
  // Wraps, skipping 0; an event is checked against the fd's watch when it
  // is dispatched, so only a stale event 2^32 watches later could match.
  next_generation_ = generation == UINT32_MAX ? 1 : generation + 1;
  epoll_event event{};
  event.events = events;
  event.data.u64 = EpollData(fd, generation);
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
    return ErrnoError("epoll_ctl(ADD)", errno);
  }
  watchers_[fd] = Watcher{generation, std::move(callback)};
  return absl::OkStatus();
}

absl::Status EventLoop::Modify(int fd, uint32_t events) {
  absl::MutexLock lock(&mu_);
  auto it = watchers_.find(fd);
  if (it == watchers_.end()) return absl::NotFoundError("fd is not watched");
  epoll_event event{};
  event.events = events;
  event.data.u64 = EpollData(fd, it->second.generation);
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &event) != 0) {
    return ErrnoError("epoll_ctl(MOD)", errno);
  }
  return absl::OkStatus();
}

void EventLoop::Unwatch(int fd) {
  absl::MutexLock lock(&mu_);
  auto it = watchers_.find(fd);
  if (it == watchers_.end()) return;
  ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  watchers_.erase(it);
}

EventLoop::TimerId EventLoop::RunAfter(absl::Duration delay, std::function<void()> fn) {
  return AddTimer(Timer{MonotonicNow() + delay, absl::ZeroDuration(), std::move(fn)});
}

EventLoop::TimerId EventLoop::RunEvery(absl::Duration period, std::function<void()> fn) {
  return AddTimer(Timer{MonotonicNow() + period, period, std::move(fn)});
}

EventLoop::TimerId EventLoop::AddTimer(Timer timer) {
  bool earliest;
  TimerId id;
  {
    absl::MutexLock lock(&mu_);
    id = next_id_++;
    earliest = due_.empty() || timer.when < due_.begin()->first;
    due_.emplace(timer.when, id);
    timers_[id] = std::move(timer);
  }
  // The loop may be asleep until a later time.
  if (earliest) thread_.Wake();
  return id;
}

void EventLoop::Cancel(TimerId timer) {
  absl::MutexLock lock(&mu_);
  auto it = timers_.find(timer);
  if (it == timers_.end()) return;
  auto [first, last] = due_.equal_range(it->second.when);
  for (auto d = first; d != last; ++d) {
    if (d->second == timer) {
      due_.erase(d);
      break;
    }
  }
  timers_.erase(it);
}

int EventLoop::TimeoutMs() {
  absl::MutexLock lock(&mu_);
  if (due_.empty()) return -1;
  const absl::Duration left = due_.begin()->first - MonotonicNow();
  if (left <= absl::ZeroDuration()) return 0;
  // Rounded up: a timer never fires early.
  return static_cast<int>(
      std::min<int64_t>(absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))),
                        std::numeric_limits<int>::max()));
}

void EventLoop::RunDueTimers() {
  const absl::Duration now = MonotonicNow();
  while (true) {
    std::function<void()> fn;
    {
      absl::MutexLock lock(&mu_);
      if (due_.empty() || due_.begin()->first > now) return;
      const TimerId id = due_.begin()->second;
      due_.erase(due_.begin());
      Timer& timer = timers_.at(id);
      if (timer.period == absl::ZeroDuration()) {
        fn = std::move(timer.fn);
        timers_.erase(id);
      } else {
        fn = timer.fn;
        // The next run one period after this one, or after now if late.
        timer.when = std::max(timer.when + timer.period, now + absl::Milliseconds(1));
        due_.emplace(timer.when, id);
      }
    }
    fn();
  }
}

void EventLoop::Loop() {
  epoll_event events[64];
  while (!thread_.stopping()) {
    const int n = ::epoll_wait(epoll_.get(), events, 64, TimeoutMs());
    if (thread_.stopping()) return;
    if (n < 0 && errno != EINTR) {
      // Not expected once Init() succeeded; never spin on it.
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    for (int i = 0; i < n; ++i) {
      const uint64_t data = events[i].data.u64;
      if (data == kWakeId) {
        thread_.DrainWake();
        continue;
      }
      const int fd = static_cast<int>(static_cast<uint32_t>(data));
      const auto generation = static_cast<uint32_t>(data >> 32);
      FdCallback callback;
      {
        absl::MutexLock lock(&mu_);
        auto it = watchers_.find(fd);
        // Unwatched earlier in this batch (and maybe watched again).
        if (it == watchers_.end() || it->second.generation != generation) continue;
        callback = it->second.callback;
      }
      callback(events[i].events);
    }
    RunDueTimers();
  }
}

}  // namespace bufferd
