// WorkQueue: threads for work that must not run on gRPC's callback threads or
// the fd.sock loop. The daemon has two: "work" (4 threads: prefaulting
// contiguous/carveout buffers, heap statistics) and the Reaper's (1 thread,
// so FIFO: freeing big buffers and refilling carveouts). A one-thread queue
// runs its work in the order it was posted. Thread-safe. The destructor runs
// what is queued, then joins.
#ifndef BUFFERD_DAEMON_WORK_QUEUE_H_
#define BUFFERD_DAEMON_WORK_QUEUE_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace bufferd {

class WorkQueue {
 public:
  explicit WorkQueue(int threads) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
  }
  ~WorkQueue() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    for (auto& thread : threads_) thread.join();
  }
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  void Post(std::function<void()> work) {
    absl::MutexLock lock(&mu_);
    queue_.push_back(std::move(work));
  }

 private:
  void Run() {
    while (true) {
      std::function<void()> work;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](WorkQueue* q) ABSL_EXCLUSIVE_LOCKS_REQUIRED(q->mu_) {
              return q->stopping_ || !q->queue_.empty();
            },
            this));
        if (queue_.empty()) return;  // stopping, and drained
        work = std::move(queue_.front());
        queue_.pop_front();
      }
      work();
    }
  }

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_WORK_QUEUE_H_
