#include "client/client.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "client/buffer_store.h"
#include "client/connection.h"

namespace bufferd {
namespace {

using internal::FromGrpcStatus;

v1::Access ToProto(Access access) {
  return access == Access::kReadOnly ? v1::ACCESS_READ_ONLY : v1::ACCESS_READ_WRITE;
}

// Checks that a delivered fd is what the daemon said: the right open mode
// and size.
absl::Status CheckFd(int fd, Access access, uint64_t size) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return ErrnoError("fcntl(F_GETFL) on delivered fd", errno);
  int want = access == Access::kReadOnly ? O_RDONLY : O_RDWR;
  if ((flags & O_ACCMODE) != want) {
    return absl::InternalError(
        absl::StrCat("delivered fd has access mode ", flags & O_ACCMODE, ", expected ", want));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) return ErrnoError("fstat on delivered fd", errno);
  if (static_cast<uint64_t>(st.st_size) != size) {
    return absl::InternalError(
        absl::StrCat("delivered fd is ", st.st_size, " bytes, expected ", size));
  }
  return absl::OkStatus();
}

void FillProto(const FrameMetadata& metadata, v1::FrameMetadata& proto) {
  if (metadata.crop.has_value()) {
    v1::Rect* crop = proto.mutable_crop();
    crop->set_x(metadata.crop->x);
    crop->set_y(metadata.crop->y);
    crop->set_width(metadata.crop->width);
    crop->set_height(metadata.crop->height);
  }
  proto.set_color_space(metadata.color_space);
  proto.set_color_range(metadata.color_range);
  proto.set_tag(metadata.tag);
  proto.set_generation(metadata.generation);
}

void FillProto(const AllocateOptions& options, v1::AllocateRequest& request) {
  if (options.heap.empty() && options.heaps.empty() && options.usage.empty()) {
    request.set_heap("system");
  } else {
    request.set_heap(options.heap);
    for (const std::string& heap : options.heaps) request.add_heaps(heap);
    request.set_usage(options.usage);
  }
  request.set_size(options.size);
  request.set_name(options.name);
  request.set_freezable(options.freezable);
  if (options.frame.has_value()) {
    v1::FrameRequest* frame = request.mutable_frame();
    frame->set_width(options.frame->width);
    frame->set_height(options.frame->height);
    frame->set_fourcc(options.frame->fourcc);
    frame->set_modifier(options.frame->modifier);
    frame->set_stride_alignment(options.frame->stride_alignment);
    // Laid out here, with the daemon's code, rather than built, sent and
    // parsed (TakeAllocated).
    request.set_caller_lays_out_frame(true);
  }
  if (options.metadata.has_value()) FillProto(*options.metadata, *request.mutable_metadata());
}

// A call answered with a buffer's description (Refresh, SetMetadata,
// Freeze): `rpc(context, response)` fills an answer made on a new store,
// which then holds the description.
template <typename Response, typename Rpc>
absl::StatusOr<std::unique_ptr<internal::BufferStore>> Described(internal::Connection& connection,
                                                                 Rpc rpc) {
  std::unique_ptr<internal::BufferStore> store = internal::BufferStore::Make();
  auto* response = store->New<Response>();
  internal::Call call = connection.NewCall();
  RETURN_IF_ERROR(connection.Finish(call, rpc(call.context.get(), response)));
  store->Adopt(response->mutable_buffer());
  return store;
}

}  // namespace

Buffer::Buffer(std::shared_ptr<internal::Connection> connection, uint64_t handle,
               std::unique_ptr<internal::BufferStore> store, Access access, UniqueFd fd)
    : connection_(std::move(connection)),
      handle_(handle),
      store_(std::move(store)),
      access_(access),
      fd_(std::move(fd)) {}

Buffer::Buffer(Buffer&& other) noexcept
    : connection_(std::move(other.connection_)),
      handle_(std::exchange(other.handle_, 0)),
      store_(std::move(other.store_)),
      access_(other.access_),
      fd_(std::move(other.fd_)),
      skipped_(std::move(other.skipped_)),
      status_slot_(other.status_slot_.exchange(0)),
      kept_timelines_(other.kept_timelines_.exchange(false)) {}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    Drop();
    connection_ = std::move(other.connection_);
    handle_ = std::exchange(other.handle_, 0);
    store_ = std::move(other.store_);
    access_ = other.access_;
    fd_ = std::move(other.fd_);
    skipped_ = std::move(other.skipped_);
    status_slot_.store(other.status_slot_.exchange(0));
    kept_timelines_.store(other.kept_timelines_.exchange(false));
  }
  return *this;
}

Buffer::~Buffer() { Drop(); }

void Buffer::ForgetKeptTimelines() {
  if (kept_timelines_.exchange(false) && connection_ != nullptr) {
    connection_->ForgetTimelinesOf(handle_);
  }
}

void Buffer::Drop() {
  fd_.Reset();
  ForgetKeptTimelines();
  // Lazy: the next RPC carries the release, or the flusher sends it one-way
  // within OneWayQueue::kDelay. Dropping costs no round trip.
  if (handle_ != 0 && connection_ != nullptr) connection_->QueueRelease(handle_);
  handle_ = 0;
}

absl::Status Buffer::Release() {
  fd_.Reset();
  ForgetKeptTimelines();
  if (handle_ == 0 || connection_ == nullptr) return absl::OkStatus();
  v1::ReleaseRequest request;
  request.set_handle(std::exchange(handle_, 0));
  v1::ReleaseResponse response;
  internal::Call call = connection_->NewCall();
  return connection_->Finish(
      call, connection_->allocator().Release(call.context.get(), request, &response));
}

absl::StatusOr<Mapping> Buffer::Map() const {
  if (!fd_.valid()) return absl::FailedPreconditionError("buffer was released");
  return Mapping::Create(fd_.get(), size(),
                         access_ == Access::kReadWrite ? Mapping::Protection::kReadWrite
                                                       : Mapping::Protection::kReadOnly);
}

const v1::BufferInfo& Buffer::info() const {
  return store_ != nullptr ? store_->info() : v1::BufferInfo::default_instance();
}

const v1::BufferInfo& Buffer::fields() const {
  return store_ != nullptr ? store_->fields() : v1::BufferInfo::default_instance();
}

std::optional<FrameFormat> Buffer::frame() const {
  if (store_ == nullptr) return std::nullopt;
  return store_->frame();
}

FrameMetadata Buffer::metadata() const {
  const v1::FrameMetadata& proto = fields().metadata();
  FrameMetadata metadata{.color_space = proto.color_space(),
                         .color_range = proto.color_range(),
                         .tag = proto.tag(),
                         .generation = proto.generation()};
  if (proto.has_crop()) {
    metadata.crop =
        Rect{proto.crop().x(), proto.crop().y(), proto.crop().width(), proto.crop().height()};
  }
  return metadata;
}

absl::Status Buffer::SetMetadata(const FrameMetadata& metadata, bool overwrite) {
  if (handle_ == 0) return absl::FailedPreconditionError("buffer was released");
  v1::SetMetadataRequest request;
  request.set_handle(handle_);
  FillProto(metadata, *request.mutable_metadata());
  // The generation is the daemon's; the one read is what the change is
  // based on.
  request.mutable_metadata()->clear_generation();
  if (!overwrite) request.set_expected_generation(metadata.generation);
  ASSIGN_OR_RETURN(store_, Described<v1::SetMetadataResponse>(
                               *connection_, [&](grpc::ClientContext* context, auto* response) {
                                 return connection_->allocator().SetMetadata(context, request,
                                                                             response);
                               }));
  return absl::OkStatus();
}

absl::Status Buffer::Refresh() {
  if (handle_ == 0) return absl::FailedPreconditionError("buffer was released");
  v1::GetBufferRequest request;
  request.set_handle(handle_);
  ASSIGN_OR_RETURN(store_, Described<v1::GetBufferResponse>(
                               *connection_, [&](grpc::ClientContext* context, auto* response) {
                                 return connection_->allocator().GetBuffer(context, request,
                                                                           response);
                               }));
  return absl::OkStatus();
}

absl::Status Buffer::Freeze() {
  if (handle_ == 0) return absl::FailedPreconditionError("buffer was released");
  v1::FreezeRequest request;
  request.set_handle(handle_);
  const internal::Connection::UploadPlaces place = connection_->ReserveUploads(1);
  ASSIGN_OR_RETURN(const uint64_t upload_id, connection_->Upload(fd_.get()));
  request.set_upload_id(upload_id);
  ASSIGN_OR_RETURN(store_, Described<v1::FreezeResponse>(
                               *connection_, [&](grpc::ClientContext* context, auto* response) {
                                 return connection_->allocator().Freeze(context, request, response);
                               }));
  return absl::OkStatus();
}

absl::Status Buffer::Read(uint64_t offset, std::span<uint8_t> out) const {
  if (!fd_.valid()) return absl::FailedPreconditionError("buffer was released");
  if (offset > size() || out.size() > size() - offset) {
    return absl::OutOfRangeError(absl::StrCat("read of ", out.size(), " bytes at ", offset,
                                              " is past the end of a ", size(), "-byte buffer"));
  }
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = RetryOnEintr([&] {
      return ::pread(fd_.get(), out.data() + done, out.size() - done,
                     static_cast<off_t>(offset + done));
    });
    if (n < 0) return ErrnoError("pread on buffer", errno);
    if (n == 0) break;  // holes past a shrunken end cannot happen (sealed): stop anyway
    done += static_cast<size_t>(n);
  }
  if (done < out.size()) std::fill(out.begin() + done, out.end(), 0);
  return absl::OkStatus();
}

absl::StatusOr<Mapping> Buffer::MapReadOnly() const {
  if (!fd_.valid()) return absl::FailedPreconditionError("buffer was released");
  return Mapping::Create(fd_.get(), size(), Mapping::Protection::kReadOnly);
}

absl::StatusOr<std::string> Buffer::Export(Access access, absl::Duration ttl) const {
  return Export(access, ExportOptions{.ttl = ttl});
}

absl::StatusOr<std::string> Buffer::Export(Access access, const ExportOptions& options) const {
  if (handle_ == 0) return absl::FailedPreconditionError("buffer was released");
  v1::ExportRequest request;
  request.set_handle(handle_);
  request.set_access(ToProto(access));
  request.set_ttl_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(options.ttl)));
  request.set_accept_sigbus_risk(options.accept_sigbus_risk);
  const internal::Connection::UploadPlaces place = connection_->ReserveUploads(1);
  ASSIGN_OR_RETURN(const uint64_t upload_id, connection_->Upload(fd_.get()));
  request.set_upload_id(upload_id);
  v1::ExportResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->allocator().Export(call.context.get(), request, &response)));
  return response.token();
}

absl::StatusOr<Client> Client::Connect(const std::string& socket_dir, Options options) {
  ASSIGN_OR_RETURN(
      std::shared_ptr<internal::Connection> connection,
      internal::Connection::Open(socket_dir, options.timeout, options.share_control_connection));
  return Client(std::move(connection));
}

absl::StatusOr<Client> Client::Connect(const std::string& socket_dir) {
  return Connect(socket_dir, Options{});
}

absl::StatusOr<Client> Client::Connect() {
  const char* dir = std::getenv("BUFFERD_SOCKET_DIR");
  return Connect(dir != nullptr && *dir != '\0' ? std::string(dir) : DefaultSocketDir());
}

Client::Client(std::shared_ptr<internal::Connection> connection)
    : connection_(std::move(connection)) {}
Client::Client(Client&&) noexcept = default;
Client& Client::operator=(Client&&) noexcept = default;
Client::~Client() = default;

uint64_t Client::session_id() const { return connection_->session_id(); }

void Client::Close() { connection_->Close(); }

absl::StatusOr<Buffer> Client::Allocate(const AllocateOptions& options) const {
  // Request and answer on the Buffer's store: the description takes the
  // request's metadata as it is, and nested messages cost no malloc.
  std::unique_ptr<internal::BufferStore> store = internal::BufferStore::Make();
  auto* request = store->New<v1::AllocateRequest>();
  FillProto(options, *request);
  auto* response = store->New<v1::AllocateResponse>();
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->allocator().Allocate(call.context.get(), *request, response)));
  return TakeAllocated(*request, *response, std::move(store), /*last=*/true);
}

absl::StatusOr<Buffer> Client::TakeAllocated(v1::AllocateRequest& request,
                                             v1::AllocateResponse& response,
                                             std::unique_ptr<internal::BufferStore> store,
                                             bool last) const {
  // Not sent by the daemon: the metadata the request set (at generation 0),
  // and the frame's layout (laid out here when first asked for, by the
  // daemon's own code).
  if (store != nullptr) {
    store->Adopt(response.mutable_buffer());
    if (request.has_metadata()) {
      store->mutable_info().unsafe_arena_set_allocated_metadata(
          request.unsafe_arena_release_metadata());
    }
    if (request.caller_lays_out_frame()) store->LayOutLater(&request.frame());
  } else {
    store =
        internal::BufferStore::Taking(std::unique_ptr<v1::BufferInfo>(response.release_buffer()));
    if (request.has_metadata()) {
      // The last takes the tag's bytes rather than a copy.
      std::string tag;
      if (last) tag.swap(*request.mutable_metadata()->mutable_tag());
      v1::FrameMetadata& metadata = *store->mutable_info().mutable_metadata();
      metadata = request.metadata();
      if (last) metadata.set_tag(std::move(tag));
    }
    if (request.caller_lays_out_frame()) {
      auto* frame = store->New<v1::FrameRequest>();
      *frame = request.frame();
      store->LayOutLater(frame);
    }
  }
  // From here the daemon holds a handle for us: the Buffer (or its
  // destructor on an error path) releases it.
  Buffer buffer(connection_, response.handle(), std::move(store), Access::kReadWrite, UniqueFd());
  buffer.skipped_.assign(response.skipped().begin(), response.skipped().end());
  ASSIGN_OR_RETURN(buffer.fd_, connection_->TakeFd(response.transfer_id()));
  RETURN_IF_ERROR(CheckFd(buffer.fd(), Access::kReadWrite, buffer.size()));
  return buffer;
}

absl::StatusOr<std::vector<Buffer>> Client::AllocateSet(uint32_t count,
                                                        const AllocateOptions& options) const {
  v1::AllocateSetRequest request;
  request.set_count(count);
  FillProto(options, *request.mutable_request());
  v1::AllocateSetResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->allocator().AllocateSet(call.context.get(), request, &response)));
  if (response.buffers_size() != static_cast<int>(count)) {
    // Release what did come (each Buffer's destructor does).
    for (v1::AllocateResponse& one : *response.mutable_buffers()) {
      (void)TakeAllocated(*request.mutable_request(), one, nullptr, /*last=*/false);
    }
    return absl::InternalError(absl::StrCat("bufferd answered AllocateSet(", count, ") with ",
                                            response.buffers_size(), " buffers"));
  }
  std::vector<Buffer> buffers;
  buffers.reserve(count);
  absl::Status failed;
  for (uint32_t i = 0; i < count; ++i) {
    v1::AllocateResponse& one = *response.mutable_buffers(static_cast<int>(i));
    if (response.skipped_size() != 0) *one.mutable_skipped() = response.skipped();
    absl::StatusOr<Buffer> buffer =
        TakeAllocated(*request.mutable_request(), one, nullptr, /*last=*/i + 1 == count);
    // Every handle is taken (and so released) even after a failure.
    if (buffer.ok()) {
      buffers.push_back(*std::move(buffer));
    } else if (failed.ok()) {
      failed = buffer.status();
    }
  }
  if (!failed.ok()) return failed;
  return buffers;
}

absl::StatusOr<v1::CanAllocateResponse> Client::CanAllocate(const AllocateOptions& options,
                                                            uint32_t count) const {
  v1::CanAllocateRequest request;
  FillProto(options, *request.mutable_request());
  request.set_count(count);
  v1::CanAllocateResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->allocator().CanAllocate(call.context.get(), request, &response)));
  return response;
}

absl::StatusOr<Buffer> Client::Import(absl::string_view token) const {
  v1::ImportRequest request;
  request.set_token(std::string(token));
  std::unique_ptr<internal::BufferStore> store = internal::BufferStore::Make();
  auto* response = store->New<v1::ImportResponse>();
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->allocator().Import(call.context.get(), request, response)));
  const Access access =
      response->access() == v1::ACCESS_READ_ONLY ? Access::kReadOnly : Access::kReadWrite;
  store->Adopt(response->mutable_buffer());
  Buffer buffer(connection_, response->handle(), std::move(store), access, UniqueFd());
  ASSIGN_OR_RETURN(buffer.fd_, connection_->TakeFd(response->transfer_id()));
  RETURN_IF_ERROR(CheckFd(buffer.fd(), access, buffer.size()));
  return buffer;
}

absl::StatusOr<v1::ListHeapsResponse> Client::ListHeaps() const {
  v1::ListHeapsResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->debug().ListHeaps(call.context.get(), v1::ListHeapsRequest(), &response)));
  return response;
}

absl::StatusOr<v1::ListClientsResponse> Client::ListClients() const {
  v1::ListClientsResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call,
      connection_->debug().ListClients(call.context.get(), v1::ListClientsRequest(), &response)));
  return response;
}

absl::StatusOr<v1::ListBuffersResponse> Client::ListBuffers(
    const v1::ListBuffersRequest& request) const {
  v1::ListBuffersResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->debug().ListBuffers(call.context.get(), request, &response)));
  return response;
}

absl::StatusOr<v1::ListBuffersResponse> Client::ListAllBuffers(
    v1::ListBuffersRequest request) const {
  ASSIGN_OR_RETURN(v1::ListBuffersResponse all, ListBuffers(request));
  while (!all.next_page_token().empty()) {
    request.set_page_token(all.next_page_token());
    ASSIGN_OR_RETURN(v1::ListBuffersResponse page, ListBuffers(request));
    for (v1::BufferDebugInfo& buffer : *page.mutable_buffers()) {
      *all.add_buffers() = std::move(buffer);
    }
    all.set_next_page_token(page.next_page_token());
  }
  return all;
}

absl::StatusOr<v1::ListTokensResponse> Client::ListTokens() const {
  v1::ListTokensResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call,
      connection_->debug().ListTokens(call.context.get(), v1::ListTokensRequest(), &response)));
  return response;
}

absl::StatusOr<v1::EndSessionResponse> Client::EndSession(uint64_t session_id) const {
  v1::EndSessionRequest request;
  request.set_session_id(session_id);
  v1::EndSessionResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call, connection_->debug().EndSession(call.context.get(), request, &response)));
  return response;
}

absl::StatusOr<std::string> Client::Metrics() const {
  v1::GetMetricsResponse response;
  internal::Call call = connection_->NewCall();
  RETURN_IF_ERROR(connection_->Finish(
      call,
      connection_->debug().GetMetrics(call.context.get(), v1::GetMetricsRequest(), &response)));
  return response.text();
}

}  // namespace bufferd
