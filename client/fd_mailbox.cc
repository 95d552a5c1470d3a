#include "client/fd_mailbox.h"

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "base/protocol.h"
#include "bufferd/v1/fd_channel.pb.h"

namespace bufferd::internal {

int PollTimeoutMs(absl::Duration left) {
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(
      std::min<int64_t>(absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))),
                        std::numeric_limits<int>::max()));
}

void FdMailbox::ReadOneLocked(absl::Time deadline) {
  mu_.Unlock();
  absl::Status failure;
  std::optional<UnixSocket::Received> received;
  // The daemon queues an RPC's fd before answering it, so the record is
  // usually there already: try first, poll only if it is not.
  absl::StatusOr<UnixSocket::Received> got =
      socket_->RecvWithFds(kMaxRecordBytes, /*dont_wait=*/true);
  if (!got.ok() && IsWouldBlock(got.status())) {
    pollfd ready{socket_->fd(), POLLIN, 0};
    int n = RetryOnEintr([&] { return ::poll(&ready, 1, PollTimeoutMs(deadline - absl::Now())); });
    if (n < 0) {
      got = ErrnoError("poll(fd.sock)", errno);
    } else if (n > 0) {
      got = socket_->RecvWithFds(kMaxRecordBytes, /*dont_wait=*/true);
    }
  }
  if (got.ok()) {
    received = *std::move(got);
  } else if (!IsWouldBlock(got.status())) {
    failure = absl::UnavailableError(absl::StrCat("fd.sock failed: ", got.status().message()));
  }
  mu_.Lock();
  if (!failure.ok()) {
    closed_ = failure;
  } else if (received && received->eof) {
    closed_ = absl::UnavailableError("bufferd closed fd.sock (the session ended)");
  } else if (received) {
    v1::FdChannelMessage message;
    // Anything but a delivery with one fd per transfer id is not for us;
    // its fds close here.
    const bool parsed = message.ParseFromString(received->bytes);
    // An fd whose caller gave up is closed here, not kept forever.
    auto file = [&](uint64_t id, UniqueFd fd) {
      if (abandoned_.erase(id) == 0) arrived_[id] = {std::move(fd), absl::Now()};
    };
    if (parsed && message.has_delivery() && received->fds.size() == 1) {
      file(message.delivery().transfer_id(), std::move(received->fds[0]));
    } else if (parsed && message.has_deliveries() &&
               received->fds.size() ==
                   static_cast<size_t>(message.deliveries().deliveries_size())) {
      for (size_t i = 0; i < received->fds.size(); ++i) {
        file(message.deliveries().deliveries(static_cast<int>(i)).transfer_id(),
             std::move(received->fds[i]));
      }
    }
    // Fds whose call failed after the daemon sent them (cancelled, deadline)
    // are never taken: close them once no call could still want them.
    const absl::Time stale = absl::Now() - (timeout_ + call_timeout_);
    for (auto it = arrived_.begin(); it != arrived_.end();) {
      it = it->second.at < stale ? arrived_.erase(it) : std::next(it);
    }
  }
}

absl::StatusOr<UniqueFd> FdMailbox::Take(uint64_t transfer_id) {
  const absl::Time deadline = absl::Now() + timeout_;
  absl::MutexLock lock(&mu_);
  while (true) {
    if (auto it = arrived_.find(transfer_id); it != arrived_.end()) {
      UniqueFd fd = std::move(it->second.fd);
      arrived_.erase(it);
      return fd;
    }
    if (!closed_.ok()) return closed_;
    if (absl::Now() >= deadline) {
      abandoned_.insert(transfer_id);
      return absl::DeadlineExceededError(absl::StrCat("fd for transfer ", transfer_id,
                                                      " did not arrive on fd.sock within ",
                                                      absl::FormatDuration(timeout_)));
    }
    if (!reading_) {
      reading_ = true;
      ReadOneLocked(deadline);
      reading_ = false;
      changed_.SignalAll();
    } else {
      changed_.WaitWithDeadline(&mu_, deadline);
    }
  }
}

}  // namespace bufferd::internal
