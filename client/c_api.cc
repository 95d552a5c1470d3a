// The C API (client/bufferd.h) over the C++ client library: each C object
// holds the C++ one; each call turns an absl::Status into its code and
// keeps the message for bufferd_last_error on this thread.
#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "client/bufferd.h"
#include "client/client.h"

struct bufferd_client {
  bufferd::Client client;
};
struct bufferd_buffer {
  bufferd::Buffer buffer;
};
struct bufferd_fence {
  bufferd::Fence fence;
};
struct bufferd_timeline {
  bufferd::Timeline timeline;
};

namespace {

thread_local std::string last_error;

int Fail(const absl::Status& status) {
  last_error = std::string(status.message());
  return static_cast<int>(status.code());
}

int Succeed() {
  last_error.clear();
  return 0;
}

int Report(const absl::Status& status) { return status.ok() ? Succeed() : Fail(status); }

int Missing(const char* what) {
  return Fail(absl::InvalidArgumentError(absl::StrCat(what, " is NULL")));
}

// Every entry point: C++ exceptions (std::bad_alloc) never cross into C.
template <typename Body>
int Guard(Body body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Fail(absl::ResourceExhaustedError("out of memory"));
  } catch (...) {
    return Fail(absl::InternalError("unexpected C++ exception"));
  }
}

absl::Duration Millis(int64_t ms) { return absl::Milliseconds(ms); }

absl::Status CheckTimeout(int64_t timeout_ms) {
  if (timeout_ms < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("timeout_ms is ", timeout_ms, ": waits are never indefinite; give 0 or more"));
  }
  return absl::OkStatus();
}

// Hands a result to C: a new `Wrapper` holding it in `*out`, or its error.
template <typename Wrapper, typename Value>
int Give(absl::StatusOr<Value> result, Wrapper** out) {
  if (!result.ok()) return Fail(result.status());
  *out = new Wrapper{*std::move(result)};
  return Succeed();
}

// The same for a string: a copy the caller frees with bufferd_free.
int Give(const absl::StatusOr<std::string>& result, char** out) {
  if (!result.ok()) return Fail(result.status());
  char* copy = static_cast<char*>(std::malloc(result->size() + 1));
  if (copy == nullptr) return Fail(absl::ResourceExhaustedError("out of memory"));
  std::memcpy(copy, result->c_str(), result->size() + 1);
  *out = copy;
  return Succeed();
}

absl::StatusOr<bufferd::Cpu> ToCpu(int access) {
  switch (access) {
    case BUFFERD_CPU_READ:
      return bufferd::Cpu::kRead;
    case BUFFERD_CPU_WRITE:
      return bufferd::Cpu::kWrite;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "access ", access, " is neither BUFFERD_CPU_READ (0) nor BUFFERD_CPU_WRITE (1)"));
}

absl::StatusOr<bufferd::v1::FenceUsage> ToUsage(int usage) {
  switch (usage) {
    case BUFFERD_USAGE_KERNEL:
      return bufferd::v1::FENCE_USAGE_KERNEL;
    case BUFFERD_USAGE_WRITE:
      return bufferd::v1::FENCE_USAGE_WRITE;
    case BUFFERD_USAGE_READ:
      return bufferd::v1::FENCE_USAGE_READ;
    case BUFFERD_USAGE_BOOKKEEP:
      return bufferd::v1::FENCE_USAGE_BOOKKEEP;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "usage ", usage, " is not a bufferd_fence_usage (KERNEL 1, WRITE 2, READ 3, BOOKKEEP 4)"));
}

bufferd_fence_status ToC(bufferd::v1::FenceStatus status) {
  return static_cast<bufferd_fence_status>(status);
}

}  // namespace

extern "C" {

const char* bufferd_last_error(void) { return last_error.c_str(); }

const char* bufferd_status_name(int status) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  return status >= 0 && status <= 16 ? kNames[status] : "UNKNOWN";
}

void bufferd_free(void* string) { std::free(string); }

int bufferd_connect(const char* socket_dir, bufferd_client** client) {
  return Guard([&] {
    if (client == nullptr) return Missing("client");
    if (socket_dir != nullptr && *socket_dir == '\0') {
      return Fail(absl::InvalidArgumentError(
          "socket_dir is \"\"; pass NULL for $BUFFERD_SOCKET_DIR or the default dir"));
    }
    return Give<bufferd_client>(
        socket_dir != nullptr ? bufferd::Client::Connect(socket_dir) : bufferd::Client::Connect(),
        client);
  });
}

void bufferd_disconnect(bufferd_client* client) { delete client; }

uint64_t bufferd_client_session_id(const bufferd_client* client) {
  return client != nullptr ? client->client.session_id() : 0;
}

int bufferd_allocate(bufferd_client* client, const bufferd_allocation* request,
                     bufferd_buffer** buffer) {
  return Guard([&] {
    if (client == nullptr) return Missing("client");
    if (request == nullptr) return Missing("request");
    if (buffer == nullptr) return Missing("buffer");
    if (request->struct_size < sizeof(bufferd_allocation)) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("request->struct_size is ", request->struct_size,
                       "; set it to sizeof(struct "
                       "bufferd_allocation) (",
                       sizeof(bufferd_allocation), " in this library)")));
    }
    bufferd::AllocateOptions options;
    // NULL and "" alike: not set.
    if (request->heap != nullptr) options.heap = request->heap;
    if (request->usage != nullptr) options.usage = request->usage;
    if (request->name != nullptr) options.name = request->name;
    options.size = request->size;
    options.freezable = request->freezable != 0;
    if (request->width != 0 || request->height != 0 || request->fourcc != 0) {
      options.frame = bufferd::FrameRequest{.width = request->width,
                                            .height = request->height,
                                            .fourcc = request->fourcc,
                                            .stride_alignment = request->stride_alignment};
    }
    return Give<bufferd_buffer>(client->client.Allocate(options), buffer);
  });
}

int bufferd_import(bufferd_client* client, const char* token, bufferd_buffer** buffer) {
  return Guard([&] {
    if (client == nullptr) return Missing("client");
    if (token == nullptr) return Missing("token");
    if (buffer == nullptr) return Missing("buffer");
    return Give<bufferd_buffer>(client->client.Import(token), buffer);
  });
}

void bufferd_buffer_destroy(bufferd_buffer* buffer) { delete buffer; }

int bufferd_buffer_release(bufferd_buffer* buffer) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    const absl::Status status = buffer->buffer.Release();
    delete buffer;
    return Report(status);
  });
}

uint64_t bufferd_buffer_id(const bufferd_buffer* buffer) {
  return buffer != nullptr ? buffer->buffer.id() : 0;
}

uint64_t bufferd_buffer_size(const bufferd_buffer* buffer) {
  return buffer != nullptr ? buffer->buffer.size() : 0;
}

int bufferd_buffer_fd(const bufferd_buffer* buffer) {
  return buffer != nullptr ? buffer->buffer.fd() : -1;
}

int bufferd_buffer_read_only(const bufferd_buffer* buffer) {
  return buffer != nullptr && buffer->buffer.access() == bufferd::Access::kReadOnly;
}

int bufferd_buffer_frame(const bufferd_buffer* buffer, bufferd_frame* frame) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    if (frame == nullptr) return Missing("frame");
    std::optional<bufferd::FrameFormat> format = buffer->buffer.frame();
    if (!format.has_value()) {
      return Fail(absl::FailedPreconditionError(
          absl::StrCat("buffer ", buffer->buffer.id(), " is not a frame (allocated by size)")));
    }
    bufferd_frame out{};
    out.width = format->width;
    out.height = format->height;
    out.fourcc = format->fourcc;
    out.modifier = format->modifier;
    out.plane_count = static_cast<uint32_t>(std::min<size_t>(format->planes.size(), 4));
    for (uint32_t i = 0; i < out.plane_count; ++i) {
      out.offsets[i] = format->planes[i].offset;
      out.strides[i] = format->planes[i].stride;
      out.plane_sizes[i] = format->planes[i].size;
    }
    *frame = out;
    return Succeed();
  });
}

int bufferd_buffer_map(const bufferd_buffer* buffer, int writable, void** data, size_t* size) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    if (data == nullptr || size == nullptr) return Missing("data or size");
    const bool write = writable != 0;
    if (write && buffer->buffer.access() == bufferd::Access::kReadOnly) {
      return Fail(absl::PermissionDeniedError(absl::StrCat(
          "buffer ", buffer->buffer.id(), " is a read-only handle: map it with writable = 0")));
    }
    const size_t length = buffer->buffer.size();
    void* address = ::mmap(nullptr, length, PROT_READ | (write ? PROT_WRITE : 0), MAP_SHARED,
                           buffer->buffer.fd(), 0);
    if (address == MAP_FAILED) {
      return Fail(bufferd::ErrnoError(absl::StrCat("mmap buffer ", buffer->buffer.id()), errno));
    }
    *data = address;
    *size = length;
    return Succeed();
  });
}

int bufferd_unmap(void* data, size_t size) {
  return Guard([&] {
    if (data == nullptr) return Missing("data");
    if (::munmap(data, size) != 0) return Fail(bufferd::ErrnoError("munmap", errno));
    return Succeed();
  });
}

int bufferd_buffer_read(const bufferd_buffer* buffer, uint64_t offset, void* out, size_t length) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    if (out == nullptr && length != 0) return Missing("out");
    return Report(buffer->buffer.Read(offset, {static_cast<uint8_t*>(out), length}));
  });
}

int bufferd_buffer_export(const bufferd_buffer* buffer, int flags, uint32_t ttl_ms, char** token) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    if (token == nullptr) return Missing("token");
    constexpr int kKnown = BUFFERD_EXPORT_READ_WRITE | BUFFERD_EXPORT_ACCEPT_SIGBUS_RISK;
    if ((flags & ~kKnown) != 0) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "flags ", flags, " has bits no bufferd_export_flags value has (", kKnown, " are)")));
    }
    bufferd::ExportOptions options;
    options.ttl = Millis(ttl_ms);
    options.accept_sigbus_risk = (flags & BUFFERD_EXPORT_ACCEPT_SIGBUS_RISK) != 0;
    return Give(
        buffer->buffer.Export((flags & BUFFERD_EXPORT_READ_WRITE) != 0 ? bufferd::Access::kReadWrite
                                                                       : bufferd::Access::kReadOnly,
                              options),
        token);
  });
}

int bufferd_buffer_freeze(bufferd_buffer* buffer) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    return Report(buffer->buffer.Freeze());
  });
}

int bufferd_buffer_attach_fence(const bufferd_buffer* buffer, const bufferd_fence* fence,
                                int usage) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    if (fence == nullptr) return Missing("fence");
    absl::StatusOr<bufferd::v1::FenceUsage> proto_usage = ToUsage(usage);
    if (!proto_usage.ok()) return Fail(proto_usage.status());
    return Report(buffer->buffer.AttachFence(fence->fence, *proto_usage));
  });
}

int bufferd_buffer_attach_point(const bufferd_buffer* buffer, const bufferd_timeline* timeline,
                                uint64_t point, int usage) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    if (timeline == nullptr) return Missing("timeline");
    absl::StatusOr<bufferd::v1::FenceUsage> proto_usage = ToUsage(usage);
    if (!proto_usage.ok()) return Fail(proto_usage.status());
    return Report(buffer->buffer.AttachPoint(timeline->timeline, point, *proto_usage));
  });
}

int bufferd_buffer_fences_fd(const bufferd_buffer* buffer, int access, int* fd) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    if (fd == nullptr) return Missing("fd");
    absl::StatusOr<bufferd::Cpu> cpu = ToCpu(access);
    if (!cpu.ok()) return Fail(cpu.status());
    absl::StatusOr<bufferd::UniqueFd> fences = buffer->buffer.FencesFd(*cpu);
    if (!fences.ok()) return Fail(fences.status());
    *fd = fences->Release();
    return Succeed();
  });
}

namespace {

// Both begin_cpu_access calls: the access's arguments checked, then begun.
absl::StatusOr<std::vector<bufferd::v1::FenceInfo>> BeginAccess(const bufferd_buffer& buffer,
                                                                int access, int64_t timeout_ms) {
  RETURN_IF_ERROR(CheckTimeout(timeout_ms));
  ASSIGN_OR_RETURN(const bufferd::Cpu cpu, ToCpu(access));
  return buffer.buffer.BeginCpuAccess(cpu, Millis(timeout_ms));
}

}  // namespace

int bufferd_buffer_begin_cpu_access(const bufferd_buffer* buffer, int access, int64_t timeout_ms) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    return Report(BeginAccess(*buffer, access, timeout_ms).status());
  });
}

int bufferd_buffer_begin_cpu_access_status(const bufferd_buffer* buffer, int access,
                                           int64_t timeout_ms, bufferd_fence_status* status) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    if (status == nullptr) return Missing("status");
    *status = BUFFERD_FENCE_PENDING;
    absl::StatusOr<std::vector<bufferd::v1::FenceInfo>> waited =
        BeginAccess(*buffer, access, timeout_ms);
    if (!waited.ok()) return Fail(waited.status());
    *status = BUFFERD_FENCE_OK;
    Succeed();
    for (const bufferd::v1::FenceInfo& info : *waited) {
      if (info.status() != bufferd::v1::FENCE_STATUS_OK) {
        // The access began; the message says how its writer failed.
        *status = ToC(info.status());
        last_error = info.message();
        break;
      }
    }
    return 0;
  });
}

int bufferd_buffer_end_cpu_access(const bufferd_buffer* buffer) {
  return Guard([&] {
    if (buffer == nullptr) return Missing("buffer");
    return Report(buffer->buffer.EndCpuAccess());
  });
}

int bufferd_fence_create(bufferd_client* client, const char* name, uint32_t deadline_ms,
                         bufferd_fence** fence) {
  return Guard([&] {
    if (client == nullptr) return Missing("client");
    if (fence == nullptr) return Missing("fence");
    bufferd::FenceOptions options;
    if (name != nullptr) options.name = name;
    options.deadline = Millis(deadline_ms);
    return Give<bufferd_fence>(client->client.CreateFence(options), fence);
  });
}

void bufferd_fence_destroy(bufferd_fence* fence) { delete fence; }

uint64_t bufferd_fence_id(const bufferd_fence* fence) {
  return fence != nullptr ? fence->fence.id() : 0;
}

int bufferd_fence_signal(bufferd_fence* fence, int status, const char* message) {
  return Guard([&] {
    if (fence == nullptr) return Missing("fence");
    if (status != BUFFERD_FENCE_OK && status != BUFFERD_FENCE_ERROR &&
        status != BUFFERD_FENCE_CANCELLED) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "status ", status, " cannot be signalled: give BUFFERD_FENCE_OK, _ERROR or _CANCELLED")));
    }
    return Report(fence->fence.Signal(static_cast<bufferd::v1::FenceStatus>(status),
                                      message != nullptr ? message : ""));
  });
}

int bufferd_fence_wait(bufferd_fence* fence, int64_t timeout_ms, bufferd_fence_status* status) {
  return Guard([&] {
    if (fence == nullptr) return Missing("fence");
    if (absl::Status s = CheckTimeout(timeout_ms); !s.ok()) return Fail(s);
    absl::StatusOr<bufferd::v1::FenceInfo> info = fence->fence.Wait(Millis(timeout_ms));
    if (!info.ok()) {
      if (status != nullptr && absl::IsDeadlineExceeded(info.status())) {
        *status = BUFFERD_FENCE_PENDING;
      }
      return Fail(info.status());
    }
    if (status != nullptr) *status = ToC(info->status());
    Succeed();
    // The wait succeeded; the message says how the fence failed, if it did.
    if (info->status() != bufferd::v1::FENCE_STATUS_OK) last_error = info->message();
    return 0;
  });
}

int bufferd_fence_export_fd(const bufferd_fence* fence, int* fd) {
  return Guard([&] {
    if (fence == nullptr) return Missing("fence");
    if (fd == nullptr) return Missing("fd");
    absl::StatusOr<bufferd::UniqueFd> exported = fence->fence.ExportFd();
    if (!exported.ok()) return Fail(exported.status());
    *fd = exported->Release();
    return Succeed();
  });
}

int bufferd_fence_import_fd(bufferd_client* client, int fd, bufferd_fence** fence) {
  return Guard([&] {
    if (client == nullptr) return Missing("client");
    if (fence == nullptr) return Missing("fence");
    return Give<bufferd_fence>(client->client.ImportSyncFd(fd), fence);
  });
}

int bufferd_fence_merge(bufferd_client* client, const bufferd_fence* const* fences, size_t count,
                        bufferd_fence** merged) {
  return Guard([&] {
    if (client == nullptr) return Missing("client");
    if (merged == nullptr) return Missing("merged");
    if (fences == nullptr && count != 0) return Missing("fences");
    std::vector<const bufferd::Fence*> inputs;
    for (size_t i = 0; i < count; ++i) {
      if (fences[i] == nullptr) return Missing(absl::StrCat("fences[", i, "]").c_str());
      inputs.push_back(&fences[i]->fence);
    }
    return Give<bufferd_fence>(client->client.Merge(inputs), merged);
  });
}

int bufferd_timeline_create(bufferd_client* client, const char* name, uint32_t deadline_ms,
                            bufferd_timeline** timeline) {
  return Guard([&] {
    if (client == nullptr) return Missing("client");
    if (timeline == nullptr) return Missing("timeline");
    bufferd::TimelineOptions options;
    if (name != nullptr) options.name = name;
    options.deadline = Millis(deadline_ms);
    return Give<bufferd_timeline>(client->client.CreateTimeline(options), timeline);
  });
}

void bufferd_timeline_destroy(bufferd_timeline* timeline) { delete timeline; }

uint64_t bufferd_timeline_id(const bufferd_timeline* timeline) {
  return timeline != nullptr ? timeline->timeline.id() : 0;
}

int bufferd_timeline_signal(bufferd_timeline* timeline, uint64_t point) {
  return Guard([&] {
    if (timeline == nullptr) return Missing("timeline");
    return Report(timeline->timeline.Signal(point));
  });
}

int bufferd_timeline_fail(bufferd_timeline* timeline, uint64_t point, const char* message) {
  return Guard([&] {
    if (timeline == nullptr) return Missing("timeline");
    return Report(timeline->timeline.Fail(point, message != nullptr ? message : ""));
  });
}

uint64_t bufferd_timeline_query(const bufferd_timeline* timeline) {
  return timeline != nullptr ? timeline->timeline.Query() : 0;
}

int bufferd_timeline_wait(bufferd_timeline* timeline, uint64_t point, int64_t timeout_ms,
                          bufferd_fence_status* status) {
  return Guard([&] {
    if (timeline == nullptr) return Missing("timeline");
    if (absl::Status s = CheckTimeout(timeout_ms); !s.ok()) return Fail(s);
    absl::StatusOr<bufferd::PointResult> result =
        timeline->timeline.Wait(point, Millis(timeout_ms));
    if (!result.ok()) {
      if (status != nullptr && absl::IsDeadlineExceeded(result.status())) {
        *status = BUFFERD_FENCE_PENDING;
      }
      return Fail(result.status());
    }
    if (status != nullptr) *status = ToC(result->status);
    if (result->status != bufferd::v1::FENCE_STATUS_OK) {
      // Succeeded waiting; the message says how the point failed.
      last_error = result->message;
      return 0;
    }
    return Succeed();
  });
}

int bufferd_timeline_export(const bufferd_timeline* timeline, uint32_t ttl_ms, char** token) {
  return Guard([&] {
    if (timeline == nullptr) return Missing("timeline");
    if (token == nullptr) return Missing("token");
    return Give(timeline->timeline.Export(Millis(ttl_ms)), token);
  });
}

int bufferd_timeline_import(bufferd_client* client, const char* token,
                            bufferd_timeline** timeline) {
  return Guard([&] {
    if (client == nullptr) return Missing("client");
    if (token == nullptr) return Missing("token");
    if (timeline == nullptr) return Missing("timeline");
    return Give<bufferd_timeline>(client->client.ImportTimeline(token), timeline);
  });
}

int bufferd_timeline_notify_fd(const bufferd_timeline* timeline, int* fd) {
  return Guard([&] {
    if (timeline == nullptr) return Missing("timeline");
    if (fd == nullptr) return Missing("fd");
    absl::StatusOr<int> notify = timeline->timeline.NotifyFd();
    if (!notify.ok()) return Fail(notify.status());
    *fd = *notify;
    return Succeed();
  });
}

int bufferd_timeline_arm(const bufferd_timeline* timeline, uint64_t point, int* reached) {
  return Guard([&] {
    if (timeline == nullptr) return Missing("timeline");
    absl::StatusOr<std::optional<bufferd::PointResult>> armed = timeline->timeline.Arm(point);
    if (!armed.ok()) return Fail(armed.status());
    if (reached != nullptr) *reached = armed->has_value() ? 1 : 0;
    return Succeed();
  });
}

}  // extern "C"
