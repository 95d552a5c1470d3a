#include "client/one_way_queue.h"

#include <algorithm>
#include <set>
#include <system_error>

#include "bufferd/v1/fd_channel.pb.h"

namespace bufferd::internal {

OneWayQueue::~OneWayQueue() {
  Close();
  if (flusher_.joinable()) flusher_.join();
}

void OneWayQueue::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
  pending_.clear();
  unconfirmed_.clear();
  changed_.Signal();
}

std::vector<uint64_t> OneWayQueue::TakeForCall() {
  absl::MutexLock lock(&mu_);
  // Never-sent drops first, then those sent but not yet confirmed (carried
  // by a call still in flight, or sent one-way by the flusher): the daemon
  // may not have applied them when this call arrives, so it carries them
  // too. Whichever copy the daemon reads second is skipped.
  const size_t n = std::min(pending_.size(), kMaxCarried);
  std::set<uint64_t> taken(pending_.end() - n, pending_.end());
  pending_.resize(pending_.size() - n);
  std::vector<uint64_t> carried(taken.begin(), taken.end());
  for (uint64_t handle : taken) ++unconfirmed_[handle];
  for (auto it = unconfirmed_.rbegin(); it != unconfirmed_.rend() && carried.size() < kMaxCarried;
       ++it) {
    if (taken.count(it->first) != 0) continue;
    carried.push_back(it->first);
    ++it->second;
  }
  return carried;
}

void OneWayQueue::FinishCall(const std::vector<uint64_t>& carried, bool ok) {
  if (carried.empty()) return;
  absl::MutexLock lock(&mu_);
  for (uint64_t handle : carried) {
    auto it = unconfirmed_.find(handle);
    if (it == unconfirmed_.end()) continue;
    --it->second;
    // The daemon applied every carried release before an OK call ran.
    if (ok) unconfirmed_.erase(it);
  }
  if (!ok && !closed_) {
    // It may not have seen them: send them again (one-way, or on the next
    // call).
    pending_.insert(pending_.end(), carried.begin(), carried.end());
    ++queued_;
    if (flusher_idle_) changed_.Signal();
  }
  TrimUnconfirmedLocked();
}

void OneWayQueue::TrimUnconfirmedLocked() {
  // Oldest first (handle ids grow): only those no call is carrying now, all
  // of them sent one-way long ago.
  for (auto it = unconfirmed_.begin();
       unconfirmed_.size() > kMaxCarried && it != unconfirmed_.end();) {
    it = it->second == 0 ? unconfirmed_.erase(it) : std::next(it);
  }
}

void OneWayQueue::QueueRelease(uint64_t handle) {
  absl::MutexLock lock(&mu_);
  if (closed_) return;
  pending_.push_back(handle);
  ++queued_;
  if (!flusher_.joinable()) {
    try {
      flusher_ = std::thread([this] { FlushLoop(); });  // first drop: start it
    } catch (const std::system_error&) {
      // No thread to be had: the next RPC, or the session's end, releases it.
    }
  } else if (flusher_idle_) {
    changed_.Signal();
  }
}

void OneWayQueue::FlushLoop() {
  absl::MutexLock lock(&mu_);
  uint64_t seen = queued_;
  while (!closed_) {
    if (pending_.empty() && seen == queued_) {
      // Nothing dropped since the last look: sleep until a drop.
      flusher_idle_ = true;
      changed_.Wait(&mu_);
      flusher_idle_ = false;
      continue;
    }
    // Drops are happening: give RPCs kDelay to carry them, then send what
    // is left one-way.
    seen = queued_;
    changed_.WaitWithTimeout(&mu_, kDelay);
    if (closed_) break;
    std::vector<uint64_t> handles;
    handles.swap(pending_);
    if (handles.empty()) continue;
    // Unconfirmed until a call that carries them again succeeds.
    for (uint64_t handle : handles) unconfirmed_.emplace(handle, 0);
    TrimUnconfirmedLocked();
    mu_.Unlock();
    for (uint64_t handle : handles) {
      v1::FdChannelMessage message;
      message.mutable_release()->set_handle(handle);
      // Fails only when the session is over, which releases them anyway.
      (void)sender_->Send(message);
    }
    mu_.Lock();
  }
}

}  // namespace bufferd::internal
