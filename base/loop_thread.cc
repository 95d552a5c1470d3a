#include "base/loop_thread.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

#include "base/errno_status.h"

namespace bufferd {

absl::Status LoopThread::Init() {
  wake_.Reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_.valid()) return ErrnoError("eventfd", errno);
  return absl::OkStatus();
}

void LoopThread::Run(std::function<void()> loop) { thread_ = std::thread(std::move(loop)); }

void LoopThread::Wake() {
  uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof(one));
}

void LoopThread::DrainWake() {
  uint64_t count;
  (void)!::read(wake_.get(), &count, sizeof(count));
}

bool LoopThread::Stop() {
  if (stopping_.exchange(true, std::memory_order_acq_rel)) return false;
  if (thread_.joinable()) {
    Wake();
    thread_.join();
  }
  return true;
}

}  // namespace bufferd
