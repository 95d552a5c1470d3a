#include "client/connection.h"

#include <poll.h>

#include <cerrno>

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
  int n = RetryOnEintr(
      [&] { return ::poll(&ready, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))); });
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
  connection->metadata_ = absl::StrCat(connection->session_id_, ":",
                                       absl::BytesToHexString(message.hello().secret()));
  connection->fd_socket_ = *std::move(socket);
  std::shared_ptr<grpc::Channel> channel = grpc::CreateChannel(
      absl::StrCat("unix:", ControlSocketPath(socket_dir)), grpc::InsecureChannelCredentials());
  connection->allocator_ = v1::Allocator::NewStub(channel);
  connection->debug_ = v1::Debug::NewStub(channel);
  Connection* raw = connection.get();
  connection->reader_ = std::thread([raw] { raw->ReadLoop(); });
  return connection;
}

Connection::~Connection() {
  Close();
  if (reader_.joinable()) reader_.join();
}

void Connection::Close() { fd_socket_.Shutdown(); }

std::unique_ptr<grpc::ClientContext> Connection::NewContext() const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->AddMetadata("bufferd-session", metadata_);
  context->set_deadline(std::chrono::system_clock::now() +
                        absl::ToChronoMilliseconds(timeout_ + absl::Seconds(50)));
  return context;
}

void Connection::ReadLoop() {
  absl::Status why;
  while (true) {
    absl::StatusOr<UnixSocket::Received> received = fd_socket_.RecvWithFds();
    if (!received.ok()) {
      why = absl::UnavailableError(
          absl::StrCat("fd.sock failed: ", received.status().message()));
      break;
    }
    if (received->eof) {
      why = absl::UnavailableError("bufferd closed fd.sock (session ended)");
      break;
    }
    v1::FdChannelMessage message;
    if (!message.ParseFromString(received->bytes) || !message.has_delivery() ||
        received->fds.size() != 1) {
      continue;  // Not for us, or malformed: its fds close here.
    }
    absl::MutexLock lock(&mu_);
    arrived_[message.delivery().transfer_id()] = std::move(received->fds[0]);
  }
  absl::MutexLock lock(&mu_);
  reader_done_ = true;
  reader_status_ = why;
}

absl::StatusOr<UniqueFd> Connection::TakeFd(uint64_t transfer_id) {
  absl::MutexLock lock(&mu_);
  auto ready = [this, transfer_id]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return reader_done_ || arrived_.count(transfer_id) > 0;
  };
  mu_.AwaitWithTimeout(absl::Condition(&ready), timeout_);
  auto it = arrived_.find(transfer_id);
  if (it == arrived_.end()) {
    if (reader_done_) return reader_status_;
    return absl::DeadlineExceededError(
        absl::StrCat("fd for transfer ", transfer_id, " did not arrive on fd.sock within ",
                     absl::FormatDuration(timeout_)));
  }
  UniqueFd fd = std::move(it->second);
  arrived_.erase(it);
  return fd;
}

}  // namespace bufferd::internal
