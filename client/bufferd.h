/* bufferd.h: the C API of bufferd's client library (libbufferd.so.1).
 *
 * A C program allocates shared-memory buffers from the bufferd daemon, maps
 * them, shares them with other processes by token, and synchronises with
 * fences, timelines and CPU-access brackets. It is a thin layer over the C++
 * client library (client/client.h), with the same semantics; the README's
 * "Using it from C" has a complete example.
 *
 *   cc prog.c $(pkg-config --cflags --libs bufferd)
 *
 * Conventions:
 *  - Objects are opaque pointers, created by bufferd_* calls and freed by
 *    their *_destroy (or bufferd_disconnect). Buffers, fences and timelines
 *    keep their client's connection alive; destroy them before or after the
 *    client, either way.
 *  - Every call that can fail returns an int: 0 (BUFFERD_OK) or the status
 *    code of the failure, the daemon's own when the daemon refused (the gRPC
 *    codes: BUFFERD_NOT_FOUND, BUFFERD_PERMISSION_DENIED, ...).
 *    bufferd_last_error() then gives its message, for this thread, until the
 *    thread's next call. Bad arguments (a NULL where an object is needed)
 *    are BUFFERD_INVALID_ARGUMENT, never a crash.
 *  - Out-parameters are written only on success (and a wait's status on
 *    BUFFERD_DEADLINE_EXCEEDED: BUFFERD_FENCE_PENDING).
 *  - Strings returned to you (tokens) are freed with bufferd_free.
 *  - fds: "borrowed" fds stay the object's (do not close them); "owned" fds
 *    are yours to close.
 *  - Parameters that take one of this header's enum values are ints (so a
 *    value out of range is an INVALID_ARGUMENT, never undefined behaviour).
 *  - Timeouts are milliseconds; a negative timeout is INVALID_ARGUMENT (no
 *    wait is indefinite: fences and timeline points have deadlines).
 *  - Thread-safe: a client and its objects may be used from any thread (one
 *    object's destroy must not race with its other calls).
 */
#ifndef BUFFERD_CLIENT_BUFFERD_H_
#define BUFFERD_CLIENT_BUFFERD_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BUFFERD_API_VERSION 1

/* Status codes (the gRPC / absl codes). */
enum bufferd_status {
  BUFFERD_OK = 0,
  BUFFERD_CANCELLED = 1,
  BUFFERD_UNKNOWN = 2,
  BUFFERD_INVALID_ARGUMENT = 3,
  BUFFERD_DEADLINE_EXCEEDED = 4,
  BUFFERD_NOT_FOUND = 5,
  BUFFERD_ALREADY_EXISTS = 6,
  BUFFERD_PERMISSION_DENIED = 7,
  BUFFERD_RESOURCE_EXHAUSTED = 8,
  BUFFERD_FAILED_PRECONDITION = 9,
  BUFFERD_ABORTED = 10,
  BUFFERD_OUT_OF_RANGE = 11,
  BUFFERD_UNIMPLEMENTED = 12,
  BUFFERD_INTERNAL = 13,
  BUFFERD_UNAVAILABLE = 14,
  BUFFERD_DATA_LOSS = 15,
  BUFFERD_UNAUTHENTICATED = 16
};

/* How a fence or timeline point came out (bufferd.v1.FenceStatus). */
enum bufferd_fence_status {
  BUFFERD_FENCE_PENDING = 0,
  BUFFERD_FENCE_OK = 1,
  BUFFERD_FENCE_ERROR = 2,
  BUFFERD_FENCE_OWNER_DIED = 3,
  BUFFERD_FENCE_DEADLINE_EXCEEDED = 4,
  BUFFERD_FENCE_CANCELLED = 5
};

/* What a fence attached to a buffer stands for (bufferd.v1.FenceUsage). */
enum bufferd_fence_usage {
  BUFFERD_USAGE_KERNEL = 1,
  BUFFERD_USAGE_WRITE = 2,
  BUFFERD_USAGE_READ = 3,
  BUFFERD_USAGE_BOOKKEEP = 4
};

/* A CPU access (bufferd_buffer_begin_cpu_access, bufferd_buffer_fences_fd). */
enum bufferd_cpu_access { BUFFERD_CPU_READ = 0, BUFFERD_CPU_WRITE = 1 };

typedef struct bufferd_client bufferd_client;
typedef struct bufferd_buffer bufferd_buffer;
typedef struct bufferd_fence bufferd_fence;
typedef struct bufferd_timeline bufferd_timeline;

/* ---- errors ---- */

/* The message of this thread's last failed call ("" after a success; after
 * a wait whose fence or point failed, its message). Valid until the
 * thread's next bufferd call. */
const char* bufferd_last_error(void);
/* "NOT_FOUND" for BUFFERD_NOT_FOUND; "UNKNOWN" for a code out of range. */
const char* bufferd_status_name(int status);
/* Frees a string bufferd gave you (NULL is fine). */
void bufferd_free(void* string);

/* ---- connecting ---- */

/* Connects to the daemon serving socket_dir (NULL: $BUFFERD_SOCKET_DIR, else
 * $XDG_RUNTIME_DIR/bufferd, or /run/bufferd as root; "" is
 * INVALID_ARGUMENT), checking it is the real daemon. */
int bufferd_connect(const char* socket_dir, bufferd_client** client);
/* Frees the client. The session lasts while any of its buffers, fences or
 * timelines is alive (they keep working), and ends with the last of them:
 * the daemon then releases everything it held. NULL is fine. */
void bufferd_disconnect(bufferd_client* client);
uint64_t bufferd_client_session_id(const bufferd_client* client);

/* ---- buffers ---- */

/* What to allocate: set struct_size = sizeof(struct bufferd_allocation) and
 * zero what you do not use (a later version may add fields at the end). */
struct bufferd_allocation {
  size_t struct_size;
  /* Where from: a heap ("system"), or a usage of the daemon's config
   * ("camera_frame"); at most one; neither (NULL or "") means "system". */
  const char* heap;
  const char* usage;
  /* Bytes; 0 for a frame. */
  uint64_t size;
  /* A frame instead of a byte count: the daemon lays out its planes
   * (LINEAR). fourcc is a DRM fourcc (<libdrm/drm_fourcc.h>);
   * stride_alignment a power of two up to 4096 (0: 64). */
  uint32_t width;
  uint32_t height;
  uint32_t fourcc;
  uint32_t stride_alignment;
  /* Debug name (bufctl buffers, /proc/<pid>/maps); NULL for none. */
  const char* name;
  /* Non-zero: may be frozen later (bufferd_buffer_freeze). */
  int freezable;
};

int bufferd_allocate(bufferd_client* client, const struct bufferd_allocation* request,
                     bufferd_buffer** buffer);
/* Imports a buffer another process exported (bufferd_buffer_export). */
int bufferd_import(bufferd_client* client, const char* token, bufferd_buffer** buffer);

/* Drops the handle: without a round trip (the daemon hears of it with the
 * session's next call, or within 2 ms). Mappings stay valid until unmapped.
 * NULL is fine. */
void bufferd_buffer_destroy(bufferd_buffer* buffer);
/* Drops the handle with a round trip and returns the daemon's answer; the
 * object is freed either way. */
int bufferd_buffer_release(bufferd_buffer* buffer);

uint64_t bufferd_buffer_id(const bufferd_buffer* buffer);
uint64_t bufferd_buffer_size(const bufferd_buffer* buffer);
/* The memfd (borrowed): mmap it, pass it on, but do not close it. */
int bufferd_buffer_fd(const bufferd_buffer* buffer);
/* Non-zero if this handle is read-only. */
int bufferd_buffer_read_only(const bufferd_buffer* buffer);

/* A frame's layout. */
struct bufferd_frame {
  uint32_t width;
  uint32_t height;
  uint32_t fourcc;
  uint32_t plane_count;
  uint64_t modifier;
  uint64_t offsets[4];
  uint32_t strides[4];
  uint64_t plane_sizes[4];
};
/* FAILED_PRECONDITION if the buffer is not a frame. */
int bufferd_buffer_frame(const bufferd_buffer* buffer, struct bufferd_frame* frame);

/* Maps the whole buffer shared, writable if `writable` (PERMISSION_DENIED
 * for a read-only handle), else read-only; undo with
 * bufferd_unmap(*data, *size). */
int bufferd_buffer_map(const bufferd_buffer* buffer, int writable, void** data, size_t* size);
int bufferd_unmap(void* data, size_t size);
/* Copies `length` bytes at `offset` out with pread: zeros where a writer
 * punched a hole, never a SIGBUS. */
int bufferd_buffer_read(const bufferd_buffer* buffer, uint64_t offset, void* out, size_t length);

/* bufferd_buffer_export's flags. */
enum bufferd_export_flags {
  /* The importer may write (else read-only: an O_RDONLY fd). */
  BUFFERD_EXPORT_READ_WRITE = 1,
  /* Needed for a read-write export of a hugetlb- or carveout-backed buffer
   * (FAILED_PRECONDITION without it): a read-write importer could punch
   * holes that make this process's mappings SIGBUS (bufferd_buffer_read
   * never does). Only for importers you trust. */
  BUFFERD_EXPORT_ACCEPT_SIGBUS_RISK = 2
};
/* A one-use token for another process's bufferd_import; `flags`: 0
 * (read-only) or bufferd_export_flags or'ed; ttl_ms 0 is the daemon's
 * default (30 s). Free it with bufferd_free. */
int bufferd_buffer_export(const bufferd_buffer* buffer, int flags, uint32_t ttl_ms, char** token);
/* Seals the buffer's contents for good (it must be freezable). */
int bufferd_buffer_freeze(bufferd_buffer* buffer);

/* Implicit sync (reservation objects): attach a fence or a timeline point
 * to the buffer for every holder to see. */
int bufferd_buffer_attach_fence(const bufferd_buffer* buffer, const bufferd_fence* fence,
                                int usage);
int bufferd_buffer_attach_point(const bufferd_buffer* buffer, const bufferd_timeline* timeline,
                                uint64_t point, int usage);
/* One pollable fd (owned) that becomes readable once an access may start. */
int bufferd_buffer_fences_fd(const bufferd_buffer* buffer, int access, int* fd);
/* Waits until the attached fences let `access` start (a read waits for
 * KERNEL and WRITE fences, a write for READ ones too), up to timeout_ms
 * (BUFFERD_DEADLINE_EXCEEDED naming the fences still pending), then
 * brackets the access: end it with bufferd_buffer_end_cpu_access. As with
 * dma_resv, a fence that failed does not fail the access. When nothing is
 * pending this makes no syscall. */
int bufferd_buffer_begin_cpu_access(const bufferd_buffer* buffer, int access, int64_t timeout_ms);
/* The same, and *status says how the fences it waited for came out:
 * BUFFERD_FENCE_OK if every one did (or none was pending), else the status
 * of the first listed that failed (ERROR, OWNER_DIED, DEADLINE_EXCEEDED or
 * CANCELLED; bufferd_last_error() then says how), so that a reader can tell
 * a frame its writer finished from one it abandoned. PENDING if the call
 * fails. */
int bufferd_buffer_begin_cpu_access_status(const bufferd_buffer* buffer, int access,
                                           int64_t timeout_ms, enum bufferd_fence_status* status);
int bufferd_buffer_end_cpu_access(const bufferd_buffer* buffer);

/* ---- fences ---- */

/* A fence this session owns; name may be NULL; deadline_ms 0 is the
 * daemon's default (10 s). */
int bufferd_fence_create(bufferd_client* client, const char* name, uint32_t deadline_ms,
                         bufferd_fence** fence);
/* Tells the daemon this session is done with it (a pending fence it created
 * is then CANCELLED). NULL is fine. */
void bufferd_fence_destroy(bufferd_fence* fence);
uint64_t bufferd_fence_id(const bufferd_fence* fence);
/* status: BUFFERD_FENCE_OK, _ERROR (with a message) or _CANCELLED. One-way:
 * applied before this session's next call. A second signal of the same
 * fence is BUFFERD_FAILED_PRECONDITION. */
int bufferd_fence_signal(bufferd_fence* fence, int status, const char* message);
/* Waits up to timeout_ms (0: poll); *status is how it came out (PENDING if
 * the timeout passed first: then the call returns BUFFERD_DEADLINE_EXCEEDED). */
int bufferd_fence_wait(bufferd_fence* fence, int64_t timeout_ms, enum bufferd_fence_status* status);
/* A pollable fd (owned), readable once the fence is signalled; another
 * process imports it with bufferd_fence_import_fd. */
int bufferd_fence_export_fd(const bufferd_fence* fence, int* fd);
/* Imports a fence fd, a kernel sync_file, an eventfd or a pipe (the fd
 * stays yours). */
int bufferd_fence_import_fd(bufferd_client* client, int fd, bufferd_fence** fence);
/* A fence signalled when all of `fences` are; its status is their first
 * failure. */
int bufferd_fence_merge(bufferd_client* client, const bufferd_fence* const* fences, size_t count,
                        bufferd_fence** merged);

/* ---- timelines ---- */

/* A timeline this session owns; deadline_ms 0 is the daemon's default. */
int bufferd_timeline_create(bufferd_client* client, const char* name, uint32_t deadline_ms,
                            bufferd_timeline** timeline);
void bufferd_timeline_destroy(bufferd_timeline* timeline);
uint64_t bufferd_timeline_id(const bufferd_timeline* timeline);
/* Reaches `point` (each point after the last). */
int bufferd_timeline_signal(bufferd_timeline* timeline, uint64_t point);
int bufferd_timeline_fail(bufferd_timeline* timeline, uint64_t point, const char* message);
/* The last point reached, from shared memory (no call to the daemon). */
uint64_t bufferd_timeline_query(const bufferd_timeline* timeline);
/* Waits up to timeout_ms for `point`; *status as for fences. */
int bufferd_timeline_wait(bufferd_timeline* timeline, uint64_t point, int64_t timeout_ms,
                          enum bufferd_fence_status* status);
/* A token another process imports the timeline with (it may wait, not
 * signal). ttl_ms 0: the default. Free it with bufferd_free. */
int bufferd_timeline_export(const bufferd_timeline* timeline, uint32_t ttl_ms, char** token);
int bufferd_timeline_import(bufferd_client* client, const char* token, bufferd_timeline** timeline);
/* For an event loop: a borrowed fd, readable after bufferd_timeline_arm's
 * point is reached (or failed). arm sets *reached to 1 (and arms nothing)
 * if it already is reached or failed: bufferd_timeline_wait with timeout 0
 * then gives its status. */
int bufferd_timeline_notify_fd(const bufferd_timeline* timeline, int* fd);
int bufferd_timeline_arm(const bufferd_timeline* timeline, uint64_t point, int* reached);

#ifdef __cplusplus
}
#endif

#endif /* BUFFERD_CLIENT_BUFFERD_H_ */
