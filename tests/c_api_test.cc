// The C API (client/bufferd.h) against a real daemon: what it returns for
// every kind of call, and that bad arguments are clear errors, never
// crashes. (packaging:install_test builds a C program against the installed
// library; this one runs under the sanitizers with the rest.)
#include <gtest/gtest.h>
#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bufferd/bufferd.h"
#include "testing/daemon_test.h"
#include "testing/sleep_probe.h"

namespace bufferd {
namespace {

using ::bufferd::testing::TestDaemon;

class CApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto daemon = TestDaemon::Start();
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    ASSERT_EQ(bufferd_connect(daemon_->socket_dir().c_str(), &client_), BUFFERD_OK)
        << bufferd_last_error();
  }
  void TearDown() override { bufferd_disconnect(client_); }

  bufferd_buffer* Allocate(uint64_t size, const char* heap = "system") {
    bufferd_allocation request{};
    request.struct_size = sizeof(request);
    request.heap = heap;
    request.size = size;
    bufferd_buffer* buffer = nullptr;
    EXPECT_EQ(bufferd_allocate(client_, &request, &buffer), BUFFERD_OK) << bufferd_last_error();
    return buffer;
  }

  std::unique_ptr<TestDaemon> daemon_;
  bufferd_client* client_ = nullptr;
};

// Tests that bad arguments are INVALID_ARGUMENT naming what was wrong, that
// the daemon's refusals come with its code and message, and that the
// message is cleared by the next success.
TEST_F(CApiTest, ErrorsAreCodesWithMessages) {
  bufferd_buffer* buffer = nullptr;
  EXPECT_EQ(bufferd_allocate(nullptr, nullptr, &buffer), BUFFERD_INVALID_ARGUMENT);
  EXPECT_STREQ(bufferd_last_error(), "client is NULL");
  bufferd_allocation request{};
  request.size = 4096;
  EXPECT_EQ(bufferd_allocate(client_, &request, &buffer), BUFFERD_INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StartsWith(bufferd_last_error(), "request->struct_size is 0; set it to"))
      << bufferd_last_error();
  request.struct_size = sizeof(request);
  request.heap = "no-such-heap";
  EXPECT_EQ(bufferd_allocate(client_, &request, &buffer), BUFFERD_NOT_FOUND);
  EXPECT_TRUE(absl::StrContains(bufferd_last_error(), "no-such-heap")) << bufferd_last_error();
  EXPECT_EQ(buffer, nullptr) << "out-parameters are written only on success";
  EXPECT_EQ(bufferd_import(client_, "1:00", &buffer), BUFFERD_NOT_FOUND);
  EXPECT_STREQ(bufferd_status_name(BUFFERD_NOT_FOUND), "NOT_FOUND");
  EXPECT_STREQ(bufferd_status_name(99), "UNKNOWN");
  EXPECT_STREQ(bufferd_status_name(-1), "UNKNOWN");
  bufferd_client* empty = nullptr;
  EXPECT_EQ(bufferd_connect("", &empty), BUFFERD_INVALID_ARGUMENT);
  EXPECT_EQ(empty, nullptr);

  buffer = Allocate(4096);
  ASSERT_NE(buffer, nullptr);
  EXPECT_STREQ(bufferd_last_error(), "");
  EXPECT_EQ(bufferd_buffer_begin_cpu_access(buffer, BUFFERD_CPU_READ, -1),
            BUFFERD_INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(bufferd_last_error(), "never indefinite"));
  EXPECT_EQ(bufferd_buffer_attach_fence(buffer, nullptr, BUFFERD_USAGE_WRITE),
            BUFFERD_INVALID_ARGUMENT);
  bufferd_fence* fence = nullptr;
  ASSERT_EQ(bufferd_fence_create(client_, "f", 0, &fence), BUFFERD_OK);
  EXPECT_EQ(bufferd_buffer_attach_fence(buffer, fence, 9), BUFFERD_INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StartsWith(bufferd_last_error(), "usage 9 is not")) << bufferd_last_error();
  EXPECT_EQ(bufferd_buffer_begin_cpu_access(buffer, 7, 0), BUFFERD_INVALID_ARGUMENT);
  EXPECT_EQ(bufferd_fence_signal(fence, BUFFERD_FENCE_OWNER_DIED, nullptr),
            BUFFERD_INVALID_ARGUMENT);
  EXPECT_EQ(bufferd_fence_signal(fence, 42, nullptr), BUFFERD_INVALID_ARGUMENT);
  EXPECT_EQ(bufferd_buffer_frame(buffer, nullptr), BUFFERD_INVALID_ARGUMENT);
  bufferd_frame frame;
  EXPECT_EQ(bufferd_buffer_frame(buffer, &frame), BUFFERD_FAILED_PRECONDITION);
  EXPECT_EQ(bufferd_buffer_release(nullptr), BUFFERD_INVALID_ARGUMENT);
  // Destroy and accessors take NULL.
  bufferd_buffer_destroy(nullptr);
  bufferd_fence_destroy(nullptr);
  bufferd_timeline_destroy(nullptr);
  bufferd_disconnect(nullptr);
  EXPECT_EQ(bufferd_buffer_fd(nullptr), -1);
  EXPECT_EQ(bufferd_buffer_size(nullptr), 0u);
  bufferd_fence_destroy(fence);
  EXPECT_EQ(bufferd_buffer_release(buffer), BUFFERD_OK) << bufferd_last_error();
}

// Tests allocation (bytes and frames), mapping, export and import into a
// second session, Read, and a read-only import that cannot map writable.
TEST_F(CApiTest, BuffersFramesAndSharing) {
  bufferd_allocation request{};
  request.struct_size = sizeof(request);
  request.usage = "display_frame";
  request.width = 64;
  request.height = 32;
  request.fourcc = 0x3231564e;  // DRM_FORMAT_NV12
  request.name = "c-frame";
  bufferd_buffer* frame_buffer = nullptr;
  ASSERT_EQ(bufferd_allocate(client_, &request, &frame_buffer), BUFFERD_OK) << bufferd_last_error();
  bufferd_frame frame;
  ASSERT_EQ(bufferd_buffer_frame(frame_buffer, &frame), BUFFERD_OK) << bufferd_last_error();
  EXPECT_EQ(frame.plane_count, 2u);
  EXPECT_EQ(frame.strides[0], 64u);
  EXPECT_EQ(frame.offsets[1], 64u * 32u);
  EXPECT_GE(bufferd_buffer_size(frame_buffer), 64u * 32u * 3 / 2);

  void* data = nullptr;
  size_t size = 0;
  ASSERT_EQ(bufferd_buffer_map(frame_buffer, 1, &data, &size), BUFFERD_OK);
  std::memcpy(data, "c api", 6);
  ASSERT_EQ(bufferd_unmap(data, size), BUFFERD_OK);
  char* token = nullptr;
  ASSERT_EQ(bufferd_buffer_export(frame_buffer, 0, 0, &token), BUFFERD_OK);
  bufferd_client* other = nullptr;
  ASSERT_EQ(bufferd_connect(daemon_->socket_dir().c_str(), &other), BUFFERD_OK);
  EXPECT_NE(bufferd_client_session_id(other), bufferd_client_session_id(client_));
  bufferd_buffer* imported = nullptr;
  ASSERT_EQ(bufferd_import(other, token, &imported), BUFFERD_OK) << bufferd_last_error();
  EXPECT_EQ(bufferd_import(other, token, &imported), BUFFERD_FAILED_PRECONDITION)
      << "a token is used once";
  bufferd_free(token);
  EXPECT_EQ(bufferd_buffer_id(imported), bufferd_buffer_id(frame_buffer));
  EXPECT_EQ(bufferd_buffer_read_only(imported), 1);
  char text[6] = {};
  ASSERT_EQ(bufferd_buffer_read(imported, 0, text, sizeof(text)), BUFFERD_OK);
  EXPECT_STREQ(text, "c api");
  EXPECT_EQ(bufferd_buffer_map(imported, 1, &data, &size), BUFFERD_PERMISSION_DENIED);
  EXPECT_TRUE(absl::StrContains(bufferd_last_error(), "read-only handle")) << bufferd_last_error();
  ASSERT_EQ(bufferd_buffer_map(imported, 0, &data, &size), BUFFERD_OK);
  EXPECT_STREQ(static_cast<const char*>(data), "c api");
  ASSERT_EQ(bufferd_unmap(data, size), BUFFERD_OK);
  char* again = nullptr;
  EXPECT_EQ(bufferd_buffer_export(imported, BUFFERD_EXPORT_READ_WRITE, 0, &again),
            BUFFERD_PERMISSION_DENIED)
      << "read-write export of a read-only handle";
  EXPECT_EQ(bufferd_buffer_export(imported, 8, 0, &again), BUFFERD_INVALID_ARGUMENT);
  bufferd_buffer_destroy(imported);
  bufferd_disconnect(other);
  bufferd_buffer_destroy(frame_buffer);

  // A carveout buffer is exported read-write only with the holder's consent
  // to the SIGBUS risk.
  bufferd_buffer* carveout = Allocate(1 << 20, "carveout");
  ASSERT_NE(carveout, nullptr);
  EXPECT_EQ(bufferd_buffer_export(carveout, BUFFERD_EXPORT_READ_WRITE, 0, &token),
            BUFFERD_FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(bufferd_last_error(), "accept_sigbus_risk"))
      << bufferd_last_error();
  ASSERT_EQ(bufferd_buffer_export(
                carveout, BUFFERD_EXPORT_READ_WRITE | BUFFERD_EXPORT_ACCEPT_SIGBUS_RISK, 0, &token),
            BUFFERD_OK)
      << bufferd_last_error();
  bufferd_free(token);
  bufferd_buffer_destroy(carveout);
}

// Tests fences (signal with an error, wait, export as a pollable fd, import,
// merge), a timeline (signal, query, wait, notify fd), and implicit sync: a
// write access waits for an attached READ fence.
TEST_F(CApiTest, FencesTimelinesAndCpuAccess) {
  bufferd_fence* a = nullptr;
  bufferd_fence* b = nullptr;
  ASSERT_EQ(bufferd_fence_create(client_, "a", 0, &a), BUFFERD_OK);
  ASSERT_EQ(bufferd_fence_create(client_, "b", 0, &b), BUFFERD_OK);
  bufferd_fence_status status = BUFFERD_FENCE_OK;
  EXPECT_EQ(bufferd_fence_wait(a, 0, &status), BUFFERD_DEADLINE_EXCEEDED);
  EXPECT_EQ(status, BUFFERD_FENCE_PENDING);
  const bufferd_fence* inputs[] = {a, b};
  bufferd_fence* merged = nullptr;
  ASSERT_EQ(bufferd_fence_merge(client_, inputs, 2, &merged), BUFFERD_OK) << bufferd_last_error();
  int fd = -1;
  ASSERT_EQ(bufferd_fence_export_fd(merged, &fd), BUFFERD_OK);
  bufferd_fence* reimported = nullptr;
  ASSERT_EQ(bufferd_fence_import_fd(client_, fd, &reimported), BUFFERD_OK) << bufferd_last_error();
  EXPECT_EQ(bufferd_fence_id(reimported), bufferd_fence_id(merged)) << "the same fence";
  ASSERT_EQ(bufferd_fence_signal(a, BUFFERD_FENCE_OK, nullptr), BUFFERD_OK);
  ASSERT_EQ(bufferd_fence_signal(b, BUFFERD_FENCE_ERROR, "render failed"), BUFFERD_OK);
  ASSERT_EQ(bufferd_fence_wait(merged, 10000, &status), BUFFERD_OK) << bufferd_last_error();
  EXPECT_EQ(status, BUFFERD_FENCE_ERROR);
  EXPECT_STREQ(bufferd_last_error(), "input fence 2 ('b'): FENCE_STATUS_ERROR: render failed")
      << "the wait says how the fence failed";
  pollfd p{fd, POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 10000), 1) << "the exported fd polls once signalled";
  ::close(fd);
  bufferd_fence_destroy(reimported);
  bufferd_fence_destroy(merged);
  bufferd_fence_destroy(a);
  bufferd_fence_destroy(b);

  bufferd_timeline* timeline = nullptr;
  ASSERT_EQ(bufferd_timeline_create(client_, "frames", 0, &timeline), BUFFERD_OK);
  int notify = -1;
  ASSERT_EQ(bufferd_timeline_notify_fd(timeline, &notify), BUFFERD_OK) << bufferd_last_error();
  int reached = -1;
  ASSERT_EQ(bufferd_timeline_arm(timeline, 1, &reached), BUFFERD_OK);
  EXPECT_EQ(reached, 0);
  ASSERT_EQ(bufferd_timeline_signal(timeline, 1), BUFFERD_OK);
  pollfd n{notify, POLLIN, 0};
  EXPECT_EQ(::poll(&n, 1, 10000), 1) << "the notify fd wakes at the armed point";
  EXPECT_EQ(bufferd_timeline_query(timeline), 1u);
  ASSERT_EQ(bufferd_timeline_wait(timeline, 1, 0, &status), BUFFERD_OK);
  EXPECT_EQ(status, BUFFERD_FENCE_OK);
  EXPECT_EQ(bufferd_timeline_signal(timeline, 1), BUFFERD_FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(bufferd_last_error(), "1")) << bufferd_last_error();
  ASSERT_EQ(bufferd_timeline_fail(timeline, 2, "camera unplugged"), BUFFERD_OK);
  ASSERT_EQ(bufferd_timeline_wait(timeline, 2, 1000, &status), BUFFERD_OK);
  EXPECT_EQ(status, BUFFERD_FENCE_ERROR);
  EXPECT_STREQ(bufferd_last_error(), "camera unplugged");

  // A write waits for a reader's fence.
  bufferd_buffer* buffer = Allocate(4096);
  ASSERT_NE(buffer, nullptr);
  bufferd_fence* reading = nullptr;
  ASSERT_EQ(bufferd_fence_create(client_, "reading", 0, &reading), BUFFERD_OK);
  ASSERT_EQ(bufferd_buffer_attach_fence(buffer, reading, BUFFERD_USAGE_READ), BUFFERD_OK)
      << bufferd_last_error();
  ASSERT_EQ(bufferd_buffer_begin_cpu_access(buffer, BUFFERD_CPU_READ, 0), BUFFERD_OK)
      << "a read does not wait for a reader";
  ASSERT_EQ(bufferd_buffer_end_cpu_access(buffer), BUFFERD_OK);
  EXPECT_EQ(bufferd_buffer_begin_cpu_access(buffer, BUFFERD_CPU_WRITE, 50),
            BUFFERD_DEADLINE_EXCEEDED);
  int fences_fd = -1;
  ASSERT_EQ(bufferd_buffer_fences_fd(buffer, BUFFERD_CPU_WRITE, &fences_fd), BUFFERD_OK);
  ASSERT_GE(fences_fd, 0);
  ASSERT_EQ(bufferd_fence_signal(reading, BUFFERD_FENCE_OK, nullptr), BUFFERD_OK);
  pollfd f{fences_fd, POLLIN, 0};
  EXPECT_EQ(::poll(&f, 1, 10000), 1);
  ::close(fences_fd);
  EXPECT_EQ(bufferd_buffer_begin_cpu_access(buffer, BUFFERD_CPU_WRITE, 10000), BUFFERD_OK)
      << bufferd_last_error();
  EXPECT_EQ(bufferd_buffer_end_cpu_access(buffer), BUFFERD_OK);
  bufferd_fence_destroy(reading);
  bufferd_buffer_destroy(buffer);
  bufferd_timeline_destroy(timeline);
}

// Tests that a reader in C can tell a frame its writer finished from one
// its writer failed: bufferd_buffer_begin_cpu_access_status begins the
// access either way (as dma_resv does) and says how the fence it waited for
// came out, with its message.
TEST_F(CApiTest, AnAccessSaysHowTheFencesItWaitedForCameOut) {
  if (::access(absl::StrCat("/proc/self/task/", ::gettid(), "/syscall").c_str(), R_OK) != 0) {
    GTEST_SKIP() << "no /proc/<pid>/task/<tid>/syscall to see the reader sleep";
  }
  bufferd_buffer* buffer = Allocate(4096);
  ASSERT_NE(buffer, nullptr);
  bufferd_fence_status status = BUFFERD_FENCE_OK;
  EXPECT_EQ(bufferd_buffer_begin_cpu_access_status(buffer, BUFFERD_CPU_READ, 0, nullptr),
            BUFFERD_INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(bufferd_last_error(), "status")) << bufferd_last_error();
  EXPECT_EQ(bufferd_buffer_begin_cpu_access_status(nullptr, BUFFERD_CPU_READ, 0, &status),
            BUFFERD_INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(bufferd_last_error(), "buffer")) << bufferd_last_error();
  EXPECT_EQ(bufferd_buffer_begin_cpu_access_status(buffer, 7, 0, &status),
            BUFFERD_INVALID_ARGUMENT);
  EXPECT_EQ(status, BUFFERD_FENCE_PENDING) << "a call that fails says PENDING";
  EXPECT_EQ(bufferd_buffer_begin_cpu_access_status(buffer, BUFFERD_CPU_READ, -1, &status),
            BUFFERD_INVALID_ARGUMENT);
  ASSERT_EQ(bufferd_buffer_begin_cpu_access_status(buffer, BUFFERD_CPU_READ, 0, &status),
            BUFFERD_OK)
      << bufferd_last_error();
  EXPECT_EQ(status, BUFFERD_FENCE_OK) << "nothing pending";
  ASSERT_EQ(bufferd_buffer_end_cpu_access(buffer), BUFFERD_OK);

  for (const bool fail : {false, true}) {
    bufferd_fence* writing = nullptr;
    ASSERT_EQ(bufferd_fence_create(client_, "writing", 0, &writing), BUFFERD_OK);
    ASSERT_EQ(bufferd_buffer_attach_fence(buffer, writing, BUFFERD_USAGE_WRITE), BUFFERD_OK)
        << bufferd_last_error();
    EXPECT_EQ(bufferd_buffer_begin_cpu_access_status(buffer, BUFFERD_CPU_READ, 20, &status),
              BUFFERD_DEADLINE_EXCEEDED);
    EXPECT_EQ(status, BUFFERD_FENCE_PENDING);
    // The reader waits on another thread; the writer signals once it sleeps
    // on its status page (a fence failed before an access begins is no
    // longer one it waits for, as with dma_resv).
    bufferd_fence_status seen = BUFFERD_FENCE_PENDING;
    std::string message;
    int code = -1;
    std::atomic<pid_t> tid{0};
    std::thread reader([&] {
      tid = ::gettid();
      code = bufferd_buffer_begin_cpu_access_status(buffer, BUFFERD_CPU_READ, 20000, &seen);
      message = bufferd_last_error();
    });
    EXPECT_TRUE(::bufferd::testing::Eventually([&] {
      return tid != 0 &&
             ::bufferd::testing::SleepsInFutexOn(::getpid(), tid, "bufferd-reservations");
    })) << "the reader never slept on its status page";
    ASSERT_EQ(bufferd_fence_signal(writing, fail ? BUFFERD_FENCE_ERROR : BUFFERD_FENCE_OK,
                                   fail ? "gpu hang" : nullptr),
              BUFFERD_OK);
    reader.join();
    ASSERT_EQ(code, BUFFERD_OK) << message;
    EXPECT_EQ(seen, fail ? BUFFERD_FENCE_ERROR : BUFFERD_FENCE_OK);
    if (fail) {
      EXPECT_EQ(message, "gpu hang");
    }
    ASSERT_EQ(bufferd_buffer_end_cpu_access(buffer), BUFFERD_OK);
    bufferd_fence_destroy(writing);
  }
  bufferd_buffer_destroy(buffer);
}

}  // namespace
}  // namespace bufferd
