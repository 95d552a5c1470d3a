#include "client/connection.h"

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <optional>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

namespace bufferd::internal {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

namespace {
// poll()'s timeout for `left`: rounded up to whole ms (so the last partial ms
// is waited, not spun), never negative, clamped to int.
int PollTimeoutMs(absl::Duration left) {
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(
      std::min<int64_t>(absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))),
                        std::numeric_limits<int>::max()));
}
}  // namespace

absl::StatusOr<std::shared_ptr<Connection>> Connection::Open(const std::string& socket_dir,
                                                             absl::Duration timeout) {
  std::shared_ptr<Connection> connection(new Connection());
  connection->timeout_ = timeout;
  absl::StatusOr<UnixSocket> socket = UnixSocket::ConnectSeqPacket(FdSocketPath(socket_dir));
  if (!socket.ok()) {
    return absl::UnavailableError(absl::StrCat("cannot connect to bufferd in ", socket_dir,
                                               " (is it running?): ", socket.status().message()));
  }
  pollfd ready{socket->fd(), POLLIN, 0};
  int n = RetryOnEintr([&] { return ::poll(&ready, 1, PollTimeoutMs(timeout)); });
  if (n <= 0) return absl::DeadlineExceededError("bufferd sent no hello on fd.sock");
  ASSIGN_OR_RETURN(UnixSocket::Received received, socket->RecvWithFds());
  v1::FdChannelMessage message;
  if (received.eof || !message.ParseFromString(received.bytes) || !message.has_hello()) {
    return absl::UnavailableError("bufferd closed fd.sock or sent no hello");
  }
  if (message.hello().protocol_version() != 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "bufferd speaks protocol ", message.hello().protocol_version(), "; this library speaks 1"));
  }
  connection->session_id_ = message.hello().session_id();
  connection->metadata_ =
      absl::StrCat(connection->session_id_, ":", absl::BytesToHexString(message.hello().secret()));
  connection->fd_socket_ = *std::move(socket);
  std::shared_ptr<grpc::Channel> channel = grpc::CreateChannel(
      absl::StrCat("unix:", ControlSocketPath(socket_dir)), grpc::InsecureChannelCredentials());
  connection->allocator_ = v1::Allocator::NewStub(channel);
  connection->debug_ = v1::Debug::NewStub(channel);
  return connection;
}

Connection::~Connection() { Close(); }

void Connection::Close() { fd_socket_.Shutdown(); }

std::unique_ptr<grpc::ClientContext> Connection::NewContext() const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->AddMetadata("bufferd-session", metadata_);
  context->set_deadline(std::chrono::system_clock::now() +
                        absl::ToChronoMilliseconds(timeout_ + absl::Seconds(50)));
  return context;
}

absl::Status Connection::SendRelease(uint64_t handle) {
  v1::FdChannelMessage message;
  message.mutable_release()->set_handle(handle);
  return fd_socket_.Send(message.SerializeAsString());
}

void Connection::ReadOneLocked(absl::Time deadline) {
  mu_.Unlock();
  absl::Status failure;
  std::optional<UnixSocket::Received> received;
  pollfd ready{fd_socket_.fd(), POLLIN, 0};
  int n = RetryOnEintr([&] { return ::poll(&ready, 1, PollTimeoutMs(deadline - absl::Now())); });
  if (n < 0) {
    failure = ErrnoError("poll(fd.sock)", errno);
  } else if (n > 0) {
    absl::StatusOr<UnixSocket::Received> got = fd_socket_.RecvWithFds(4096, /*dont_wait=*/true);
    if (got.ok()) {
      received = *std::move(got);
    } else if (!IsWouldBlock(got.status())) {
      failure = absl::UnavailableError(absl::StrCat("fd.sock failed: ", got.status().message()));
    }
  }
  mu_.Lock();
  if (!failure.ok()) {
    closed_ = failure;
  } else if (received && received->eof) {
    closed_ = absl::UnavailableError("bufferd closed fd.sock (the session ended)");
  } else if (received) {
    v1::FdChannelMessage message;
    // Anything but a one-fd delivery is not for us; its fds close here.
    if (message.ParseFromString(received->bytes) && message.has_delivery() &&
        received->fds.size() == 1) {
      const uint64_t id = message.delivery().transfer_id();
      // An fd whose caller gave up is closed here, not kept forever.
      if (abandoned_.erase(id) == 0) arrived_[id] = std::move(received->fds[0]);
    }
  }
}

absl::StatusOr<UniqueFd> Connection::TakeFd(uint64_t transfer_id) {
  const absl::Time deadline = absl::Now() + timeout_;
  absl::MutexLock lock(&mu_);
  while (true) {
    if (auto it = arrived_.find(transfer_id); it != arrived_.end()) {
      UniqueFd fd = std::move(it->second);
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
