// Reaper: the one place buffers are freed.
//
// A buffer dies in two steps. When its last handle goes, DaemonState retires
// its memory (the heap's accounting gets the bytes back at once, so the very
// next Allocate sees them) and returns it as a DeadBuffer; it never frees
// anything itself. Whoever ended the handle (a Release call, a one-way
// release, a session's end, an undone grant) hands the DeadBuffers here:
// memory that is cheap to free (small, no refill) is freed on the calling
// thread; the rest (big buffers, carveout refills, hugetlb pages going back
// to the pool) on the reaper's one thread, in the order it was handed over.
// The daemon holds no fd of a live buffer; those its share tokens held close
// here, with it.
//
// Thread-safe. The destructor frees what is queued, then joins.
#ifndef BUFFERD_DAEMON_REAPER_H_
#define BUFFERD_DAEMON_REAPER_H_

#include <functional>
#include <memory>
#include <vector>

#include "base/fd_budget.h"
#include "daemon/work_queue.h"
#include "heaps/heap.h"

namespace bufferd {

// A destroyed buffer's memory, retired but not yet freed, and the fds its
// share tokens held (closed before the memory's page work runs).
struct DeadBuffer {
  std::unique_ptr<HeapBuffer> memory;
  // The buffer's id once it had handles (0: it never had one).
  uint64_t buffer_id = 0;
  std::vector<LeasedFd> token_fds;  // destroyed before `memory`
};

class Reaper {
 public:
  Reaper() : thread_(1) {}

  // Told each buffer id that dies (its reservation goes with it), on the
  // thread that hands it over. Call before serving.
  void SetOnDead(std::function<void(uint64_t buffer_id)> on_dead) {
    on_dead_ = std::move(on_dead);
  }

  // Frees `dead`: cheap memory now, the rest on the reaper thread.
  void Free(std::vector<DeadBuffer> dead) { Free(std::move(dead), nullptr); }
  // As Free(dead), then runs `done` once all of it is freed: on the reaper
  // thread if some went there (after everything handed over before it),
  // else here.
  void Free(std::vector<DeadBuffer> dead, std::function<void()> done);
  // Closes fds of buffers (expired share tokens' fds, dropped uploads) on
  // the reaper's thread: any may be a big buffer's last, whose pages go then.
  void Close(std::vector<LeasedFd> fds);

 private:
  std::function<void(uint64_t)> on_dead_;
  WorkQueue thread_;
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_REAPER_H_
