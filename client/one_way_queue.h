// internal::OneWayQueue: what the client tells the daemon without a round
// trip, ordered before its next RPC. Private to the client library.
//
// That is dropped Buffers' releases (fence signals go at once, through the
// RecordSender).
// A release waits for the next RPC to carry it in its metadata; what no RPC
// took within kDelay a flusher thread sends as one-way ReleaseHandle records
// on fd.sock. Every RPC also carries the releases already sent but not yet
// confirmed by a successful call, so the daemon has applied every drop made
// before an RPC started when that RPC runs, whichever copy it reads first
// (up to kMaxCarried). The flusher sleeps until a drop and then wakes at
// most once per kDelay, so a steady stream of allocations wakes neither it
// nor the daemon per buffer.
//
// Thread-safe.
#ifndef BUFFERD_CLIENT_ONE_WAY_QUEUE_H_
#define BUFFERD_CLIENT_ONE_WAY_QUEUE_H_

#include <cstdint>
#include <map>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/protocol.h"
#include "client/record_sender.h"

namespace bufferd::internal {

class OneWayQueue {
 public:
  // Handles one call carries at most (the daemon refuses more): keeps the
  // header far below gRPC's 8 KiB metadata limit. Beyond that many drops
  // between two calls, the oldest reach the daemon one-way, unordered.
  static constexpr size_t kMaxCarried = kMaxCarriedReleases;
  // How long a release waits for an RPC to carry it.
  static constexpr absl::Duration kDelay = absl::Milliseconds(2);

  // Sends through `sender`, which must outlive this object.
  explicit OneWayQueue(RecordSender* sender) : sender_(sender) {}
  // Joins the flusher (call Close first to drop what is pending).
  ~OneWayQueue();

  // Releases `handle` without a round trip.
  void QueueRelease(uint64_t handle);
  // The releases a new call carries (see the class comment).
  std::vector<uint64_t> TakeForCall();
  // A call carrying `carried` finished: OK confirms them; otherwise they are
  // queued again (the daemon may not have seen them; releasing twice is
  // harmless because handle ids are never reused).
  void FinishCall(const std::vector<uint64_t>& carried, bool ok);
  // Drops everything pending (the session's end releases it all) and stops
  // the flusher.
  void Close();

 private:
  void FlushLoop();
  void TrimUnconfirmedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  RecordSender* const sender_;
  absl::Mutex mu_;
  absl::CondVar changed_;
  std::vector<uint64_t> pending_ ABSL_GUARDED_BY(mu_);
  // Releases sent (carried by a call, or one-way by the flusher) that no
  // successful call has confirmed yet -> calls carrying them now. Bounded
  // by TrimUnconfirmedLocked.
  std::map<uint64_t, int> unconfirmed_ ABSL_GUARDED_BY(mu_);
  // Counts QueueRelease calls: the flusher stays on its timer while it moves.
  uint64_t queued_ ABSL_GUARDED_BY(mu_) = 0;
  // The flusher waits without a timeout: a drop must wake it.
  bool flusher_idle_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  std::thread flusher_;
};

}  // namespace bufferd::internal

#endif  // BUFFERD_CLIENT_ONE_WAY_QUEUE_H_
