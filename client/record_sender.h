// internal::RecordSender: every record the client sends on fd.sock, counted.
// Private to the client library.
//
// Each call tells the daemon how many records were sent before it
// (kRecordsMetadataKey), and the daemon applies that many first: a one-way
// fence signal or an FdUpload is never overtaken by a later RPC.
//
// Thread-safe.
#ifndef BUFFERD_CLIENT_RECORD_SENDER_H_
#define BUFFERD_CLIENT_RECORD_SENDER_H_

#include <atomic>
#include <cstdint>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "base/unix_socket.h"
#include "bufferd/v1/fd_channel.pb.h"

namespace bufferd::internal {

class RecordSender {
 public:
  // Sends on `socket`, which must outlive this object.
  explicit RecordSender(const UnixSocket* socket) : socket_(socket) {}

  // Sends one record (blocking while the socket buffer is full).
  absl::Status Send(const v1::FdChannelMessage& message, std::span<const int> fds = {}) {
    const std::string bytes = message.SerializeAsString();
    // One sender at a time, so the count grows in socket order: were two
    // threads to send at once, the second to count could count only the
    // first's record and make a call the daemon runs before its own.
    absl::MutexLock lock(&mu_);
    absl::Status sent = socket_->Send(bytes, fds);
    // Counted once in the socket: the daemon will read it before any call
    // made from now on.
    if (sent.ok()) sent_.fetch_add(1, std::memory_order_release);
    return sent;
  }
  // Records sent so far.
  uint64_t sent() const { return sent_.load(std::memory_order_acquire); }

 private:
  const UnixSocket* const socket_;
  absl::Mutex mu_;
  std::atomic<uint64_t> sent_{0};
};

}  // namespace bufferd::internal

#endif  // BUFFERD_CLIENT_RECORD_SENDER_H_
