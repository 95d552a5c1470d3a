// Fences through a real daemon and the real client library: create, signal
// (one-way and confirmed), wait by RPC and by polling exported fds across
// processes, merge, import of eventfds and pipes, owner death, deadlines,
// limits and bad input, 10,000 concurrent waiters.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/protocol.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "bufferd/v1/fence.grpc.pb.h"
#include "client/client.h"
#include "fences/fence_page.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "testing/daemon_test.h"

namespace bufferd {
namespace {

using ::bufferd::testing::Bufctl;
using ::bufferd::testing::ChildProcess;
using ::bufferd::testing::DaemonTest;
using ::bufferd::testing::Eventually;
using ::bufferd::testing::FenceStub;
using ::bufferd::testing::Field;
using ::bufferd::testing::kWakeBudgetNs;
using ::bufferd::testing::OpenRawSession;
using ::bufferd::testing::RawSession;
using ::bufferd::testing::SpawnPeer;
using ::testing::HasSubstr;


int64_t MonotonicNs() {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  return int64_t{now.tv_sec} * 1000000000 + now.tv_nsec;
}

bool Readable(int fd, int timeout_ms = 0) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1;
}

class FenceTest : public DaemonTest {
 protected:
  void SetUp() override { StartDaemon(); }
  // Pending and signalled fences the daemon knows.
  size_t KnownFences() {
    auto fences = client_->ListFences();
    return fences.ok() ? static_cast<size_t>(fences->fences_size()) : ~size_t{0};
  }
  uint32_t Waiters(uint64_t id) {
    auto fences = client_->ListFences();
    if (!fences.ok()) return 0;
    for (const auto& fence : fences->fences()) {
      if (fence.fence_id() == id) return fence.waiters();
    }
    return 0;
  }
};

TEST_F(FenceTest, CreateSignalWaitInfo) {
  {
    absl::StatusOr<Fence> fence =
        client_->CreateFence({.name = "frame 1", .timeline = "render", .deadline = absl::Seconds(5)});
    ASSERT_TRUE(fence.ok()) << fence.status();
    EXPECT_EQ(fence->info().state(), v1::FENCE_STATE_PENDING);
    EXPECT_EQ(fence->info().owner_pid(), static_cast<uint32_t>(::getpid()));
    EXPECT_FALSE(fence->info().owner_comm().empty());
    EXPECT_EQ(fence->info().kind(), v1::FENCE_KIND_CREATED);
    EXPECT_NEAR(fence->info().deadline().seconds() - fence->info().created_at().seconds(), 5, 1);

    absl::StatusOr<v1::FenceInfo> polled = fence->Wait(absl::ZeroDuration());
    EXPECT_EQ(polled.status().code(), absl::StatusCode::kDeadlineExceeded);
    EXPECT_THAT(polled.status().message(), HasSubstr("not signalled yet (polled)"));

    absl::StatusOr<v1::FenceInfo> signalled =
        fence->SignalAndConfirm(v1::FENCE_STATUS_ERROR, "shader fault");
    ASSERT_TRUE(signalled.ok()) << signalled.status();
    EXPECT_EQ(signalled->state(), v1::FENCE_STATE_SIGNALED);
    EXPECT_EQ(signalled->message(), "shader fault");
    EXPECT_TRUE(signalled->has_signaled_at());

    absl::StatusOr<v1::FenceInfo> again = fence->SignalAndConfirm(v1::FENCE_STATUS_OK);
    EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(again.status().message(), HasSubstr("was signalled already (FENCE_STATUS_ERROR"));

    absl::StatusOr<v1::FenceInfo> waited = fence->Wait(absl::Seconds(5));
    ASSERT_TRUE(waited.ok());
    EXPECT_EQ(waited->status(), v1::FENCE_STATUS_ERROR) << "the second signal changed nothing";
    EXPECT_EQ(KnownFences(), 1u);
  }
  EXPECT_TRUE(Eventually([&] { return KnownFences() == 0; })) << "a dropped Fence is forgotten";
  ExpectBaseline();
}

// Runs bufctl against the daemon; returns its stdout.

TEST_F(FenceTest, BufctlShowsFencesAndWhoHoldsThem) {
  {
    absl::StatusOr<Fence> late = client_->CreateFence({.name = "frame 7", .timeline = "render"});
    absl::StatusOr<Fence> done = client_->CreateFence({.name = "frame 6"});
    ASSERT_TRUE(late.ok() && done.ok());
    ASSERT_TRUE(done->SignalAndConfirm(v1::FENCE_STATUS_ERROR, "gpu reset").ok());
    absl::StatusOr<UniqueFd> fd = late->ExportFd();
    ASSERT_TRUE(fd.ok());
    const std::string table = Bufctl(daemon_->socket_dir(), "fences");
    EXPECT_THAT(table, HasSubstr("DEADLINE IN")) << table;
    // Pending first.
    EXPECT_LT(table.find("frame 7"), table.find("frame 6")) << table;
    EXPECT_THAT(table, HasSubstr("gpu reset"));
    EXPECT_THAT(table, ::testing::ContainsRegex(
                           absl::StrCat("frame 7 +render +created +[^ ]+\\[", ::getpid(),
                                        "\\] +pending .* 1 ")))
        << table;
    const std::string pending = Bufctl(daemon_->socket_dir(), "fences --pending");
    EXPECT_THAT(pending, ::testing::Not(HasSubstr("frame 6"))) << pending;
    const std::string clients = Bufctl(daemon_->socket_dir(), "clients");
    EXPECT_THAT(clients, ::testing::ContainsRegex("FENCES")) << clients;
    const std::string metrics = Bufctl(daemon_->socket_dir(), "metrics");
    EXPECT_THAT(metrics, HasSubstr("bufferd_fences{state=\"pending\"} 1"));
    EXPECT_THAT(metrics, HasSubstr("bufferd_fence_signals_total{status=\"error\"} 1"));
    EXPECT_THAT(metrics, HasSubstr("bufferd_fence_wait_seconds_bucket{le=\"+Inf\"}"));
    EXPECT_THAT(metrics, HasSubstr("bufferd_fds_in_use{use=\"fences\"} 2"));
  }
  ExpectBaseline();
}

TEST_F(FenceTest, OneWaySignalIsAppliedBeforeTheNextCall) {
  for (int i = 0; i < 300; ++i) {
    absl::StatusOr<Fence> fence = client_->CreateFence({.name = "ordered"});
    ASSERT_TRUE(fence.ok());
    ASSERT_TRUE(fence->Signal(v1::FENCE_STATUS_OK).ok());
    absl::StatusOr<v1::FenceInfo> info = fence->Info();
    ASSERT_TRUE(info.ok());
    ASSERT_EQ(info->state(), v1::FENCE_STATE_SIGNALED) << "iteration " << i;
  }
  ExpectBaseline();
}

TEST_F(FenceTest, CrossProcessSignalWakesRpcAndFdWaiters) {
  absl::StatusOr<Fence> fence = client_->CreateFence({.name = "shared"});
  ASSERT_TRUE(fence.ok());
  absl::StatusOr<UniqueFd> fd = fence->ExportFd();
  ASSERT_TRUE(fd.ok()) << fd.status();
  EXPECT_FALSE(Readable(fd->get()));
  const std::string path = absl::StrCat("/proc/", ::getpid(), "/fd/", fd->get());
  absl::StatusOr<ChildProcess> by_rpc = SpawnPeer({"fence-wait", daemon_->socket_dir(), path});
  absl::StatusOr<ChildProcess> by_fd = SpawnPeer({"fence-poll", daemon_->socket_dir(), path});
  ASSERT_TRUE(by_rpc.ok() && by_fd.ok());
  const std::string rpc_ready = by_rpc->ReadLine();
  ASSERT_EQ(Field(rpc_ready, "fence"), absl::StrCat(fence->id())) << "the same fence: " << rpc_ready;
  ASSERT_EQ(by_fd->ReadLine(), "ready");
  ASSERT_TRUE(Eventually([&] { return Waiters(fence->id()) == 1; }));
  ASSERT_TRUE(fence->Signal(v1::FENCE_STATUS_OK).ok());
  EXPECT_EQ(Field(by_rpc->ReadLine(), "status"), "FENCE_STATUS_OK");
  EXPECT_EQ(Field(by_fd->ReadLine(), "status"), "readable");
  EXPECT_EQ(by_rpc->Wait(), 0);
  EXPECT_EQ(by_fd->Wait(), 0);
  EXPECT_TRUE(Readable(fd->get())) << "stays readable";
}

TEST_F(FenceTest, OwnerKilledWakesEveryWaiterWithOwnerDied) {
  absl::StatusOr<ChildProcess> owner = SpawnPeer({"fence-own", daemon_->socket_dir()});
  ASSERT_TRUE(owner.ok());
  const std::string ready = owner->ReadLine();
  ASSERT_FALSE(Field(ready, "fd").empty()) << ready;
  const std::string path = absl::StrCat("/proc/", owner->pid(), "/fd/", Field(ready, "fd"));
  absl::StatusOr<ChildProcess> by_rpc = SpawnPeer({"fence-wait", daemon_->socket_dir(), path});
  absl::StatusOr<ChildProcess> by_fd = SpawnPeer({"fence-poll", daemon_->socket_dir(), path});
  ASSERT_TRUE(by_rpc.ok() && by_fd.ok());
  ASSERT_FALSE(Field(by_rpc->ReadLine(), "fence").empty());
  ASSERT_EQ(by_fd->ReadLine(), "ready");
  uint64_t id = 0;
  ASSERT_TRUE(absl::SimpleAtoi(Field(ready, "fence"), &id));
  ASSERT_TRUE(Eventually([&] { return Waiters(id) == 1; })) << "the RPC waiter is blocked";

  const int64_t killed = MonotonicNs();
  owner->Kill(SIGKILL);
  const std::string rpc_woke = by_rpc->ReadLine();
  const std::string fd_woke = by_fd->ReadLine();
  EXPECT_EQ(Field(rpc_woke, "status"), "FENCE_STATUS_OWNER_DIED") << rpc_woke;
  int64_t rpc_at = 0, fd_at = 0;
  ASSERT_TRUE(absl::SimpleAtoi(Field(rpc_woke, "mono_ns"), &rpc_at)) << rpc_woke;
  ASSERT_TRUE(absl::SimpleAtoi(Field(fd_woke, "mono_ns"), &fd_at)) << fd_woke;
  EXPECT_LT(rpc_at - killed, kWakeBudgetNs) << "RPC waiter woke " << (rpc_at - killed) / 1000 << " us after the kill";
  EXPECT_LT(fd_at - killed, kWakeBudgetNs) << "fd waiter woke " << (fd_at - killed) / 1000 << " us after the kill";
  std::printf("woke after kill -9: RPC %lld us, fd %lld us\n",
              static_cast<long long>((rpc_at - killed) / 1000),
              static_cast<long long>((fd_at - killed) / 1000));
  EXPECT_EQ(by_rpc->Wait(), 0);
  EXPECT_EQ(by_fd->Wait(), 0);
  ExpectBaseline();
}

TEST_F(FenceTest, DeadlineSignalsDeadlineExceeded) {
  {
    absl::StatusOr<Fence> fence = client_->CreateFence({.deadline = absl::Milliseconds(100)});
    ASSERT_TRUE(fence.ok());
    absl::StatusOr<v1::FenceInfo> info = fence->Wait(absl::Seconds(10));
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->status(), v1::FENCE_STATUS_DEADLINE_EXCEEDED);
    EXPECT_THAT(info->message(), HasSubstr("deadline passed 100 ms after"));
    // The owner's late signal is refused and changes nothing.
    EXPECT_EQ(fence->SignalAndConfirm().status().code(), absl::StatusCode::kFailedPrecondition);
    ASSERT_TRUE(fence->Signal().ok()) << "one-way: only logged";
    EXPECT_EQ(fence->Info()->status(), v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  }
  absl::Status above = client_->CreateFence({.deadline = absl::Minutes(6)}).status();
  EXPECT_EQ(above.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(above.message(), HasSubstr("above max_fence_deadline_ms (300000)"));
  ExpectBaseline();
}

TEST_F(FenceTest, MergeCarriesTheFirstError) {
  {
    absl::StatusOr<Fence> a = client_->CreateFence({.name = "a"});
    absl::StatusOr<Fence> b = client_->CreateFence({.name = "b"});
    ASSERT_TRUE(a.ok() && b.ok());
    const Fence* inputs[] = {&*a, &*b, &*a};
    absl::StatusOr<Fence> merged = client_->Merge(inputs, "both");
    ASSERT_TRUE(merged.ok()) << merged.status();
    EXPECT_EQ(merged->info().kind(), v1::FENCE_KIND_MERGED);
    absl::StatusOr<UniqueFd> fd = merged->ExportFd();
    ASSERT_TRUE(fd.ok());
    ASSERT_TRUE(b->Signal(v1::FENCE_STATUS_ERROR, "decode failed").ok());
    EXPECT_FALSE(merged->Info()->state() == v1::FENCE_STATE_SIGNALED);
    EXPECT_FALSE(Readable(fd->get()));
    ASSERT_TRUE(a->Signal(v1::FENCE_STATUS_OK).ok());
    absl::StatusOr<v1::FenceInfo> info = merged->Wait(absl::Seconds(5));
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->status(), v1::FENCE_STATUS_ERROR);
    EXPECT_THAT(info->message(), HasSubstr("'b'"));
    EXPECT_THAT(info->message(), HasSubstr("decode failed"));
    EXPECT_TRUE(Readable(fd->get(), 1000));
    EXPECT_EQ(merged->SignalAndConfirm().status().code(), absl::StatusCode::kPermissionDenied);

    absl::Status empty = client_->Merge({}, "").status();
    EXPECT_EQ(empty.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(empty.message(), HasSubstr("fence_ids is empty"));
  }
  ExpectBaseline();
}

TEST_F(FenceTest, ImportsEventfdAndPipe) {
  {
    UniqueFd event(::eventfd(0, EFD_CLOEXEC));
    int ends[2];
    ASSERT_EQ(::pipe2(ends, O_CLOEXEC), 0);
    UniqueFd read_end(ends[0]), write_end(ends[1]);
    absl::StatusOr<Fence> from_event = client_->ImportSyncFd(event.get(), {.name = "eventfd"});
    absl::StatusOr<Fence> from_pipe = client_->ImportSyncFd(read_end.get(), {.name = "pipe"});
    ASSERT_TRUE(from_event.ok()) << from_event.status();
    ASSERT_TRUE(from_pipe.ok()) << from_pipe.status();
    EXPECT_EQ(from_event->info().kind(), v1::FENCE_KIND_IMPORTED);
    EXPECT_EQ(from_event->Wait(absl::ZeroDuration()).status().code(),
              absl::StatusCode::kDeadlineExceeded);
    const Fence* both[] = {&*from_event, &*from_pipe};
    std::thread signaller([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      uint64_t one = 1;
      (void)!::write(event.get(), &one, sizeof(one));
      write_end.Reset();
    });
    absl::StatusOr<WaitResult> done = client_->WaitAll(both, absl::Seconds(10));
    signaller.join();
    ASSERT_TRUE(done.ok()) << done.status();
    EXPECT_EQ(done->fences[0].status(), v1::FENCE_STATUS_OK);
    EXPECT_EQ(done->fences[1].status(), v1::FENCE_STATUS_OK);
    EXPECT_TRUE(Eventually([&] {
      auto heaps = client_->ListHeaps();
      return heaps.ok() && heaps->fds().fences() == 0;
    })) << "the daemon closed the imported fds at the signal";

    // Not pollable: refused, named.
    UniqueFd dir(::open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    absl::Status from_dir = client_->ImportSyncFd(dir.get()).status();
    EXPECT_EQ(from_dir.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(from_dir.message(), HasSubstr("the uploaded fd is a directory"));
    UniqueFd file(::open("/proc/self/exe", O_RDONLY | O_CLOEXEC));
    absl::Status from_file = client_->ImportSyncFd(file.get()).status();
    EXPECT_EQ(from_file.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(from_file.message(), HasSubstr("the uploaded fd is a regular file"));
  }
  ExpectBaseline();
}

TEST_F(FenceTest, ForeignIdsAreNotFoundLikeUnknownOnes) {
  absl::StatusOr<Fence> mine = client_->CreateFence();
  ASSERT_TRUE(mine.ok());
  auto other = daemon_->Connect();
  ASSERT_TRUE(other.ok());
  absl::StatusOr<Fence> theirs = other->CreateFence({.name = "theirs"});
  ASSERT_TRUE(theirs.ok());

  auto stub = FenceStub(daemon_->socket_dir());
  absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok());
  for (uint64_t id : {theirs->id(), theirs->id() + 1000}) {
    v1::GetFenceInfoRequest request;
    request.set_fence_id(id);
    v1::GetFenceInfoResponse response;
    grpc::Status status = stub->GetFenceInfo(raw->Context().get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(status.error_message(), absl::StrCat("fence ", id, " not found"));
  }
  // Signalling someone else's fence by id, and waiting on it.
  v1::SignalFenceRequest signal;
  signal.set_fence_id(theirs->id());
  signal.set_status(v1::FENCE_STATUS_OK);
  v1::SignalFenceResponse signalled;
  EXPECT_EQ(stub->SignalFence(raw->Context().get(), signal, &signalled).error_code(),
            grpc::StatusCode::NOT_FOUND);
  v1::WaitFenceRequest wait;
  wait.add_fence_ids(theirs->id());
  v1::WaitFenceResponse waited;
  EXPECT_EQ(stub->WaitFence(raw->Context().get(), wait, &waited).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(theirs->Info()->state(), v1::FENCE_STATE_PENDING) << "untouched";

  // Given the fd, this session may see and wait on it, but not signal it.
  absl::StatusOr<UniqueFd> fd = theirs->ExportFd();
  ASSERT_TRUE(fd.ok());
  absl::StatusOr<Fence> shared = client_->ImportSyncFd(fd->get());
  ASSERT_TRUE(shared.ok()) << shared.status();
  EXPECT_EQ(shared->id(), theirs->id());
  absl::Status not_owner = shared->SignalAndConfirm().status();
  EXPECT_EQ(not_owner.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(not_owner.message(), HasSubstr("only its owner signals it"));
  ASSERT_TRUE(theirs->Signal(v1::FENCE_STATUS_OK).ok());
  EXPECT_EQ(shared->Wait(absl::Seconds(5))->status(), v1::FENCE_STATUS_OK);

  shared = absl::CancelledError("dropped");
  mine = absl::CancelledError("dropped");
  theirs = absl::CancelledError("dropped");
  other = absl::CancelledError("closed");
  raw = absl::CancelledError("closed");
  stub.reset();
  ExpectBaseline();
}

TEST_F(FenceTest, AWaiterThatGoesAwayIsDroppedAtOnce) {
  absl::StatusOr<Fence> fence = client_->CreateFence({.deadline = absl::Seconds(60)});
  ASSERT_TRUE(fence.ok());
  absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok());
  auto stub = FenceStub(daemon_->socket_dir());
  absl::StatusOr<UniqueFd> fd = fence->ExportFd();
  ASSERT_TRUE(fd.ok());
  // The raw session imports the fence (upload record, then the call).
  v1::FdChannelMessage upload;
  upload.mutable_upload()->set_upload_id(5);
  const int fds[] = {fd->get()};
  ASSERT_TRUE(raw->socket.Send(upload.SerializeAsString(), fds).ok());
  v1::ImportSyncFdRequest import;
  import.set_upload_id(5);
  v1::ImportSyncFdResponse imported;
  {
    auto context = raw->Context();
    context->AddMetadata(kRecordsMetadataKey, "1");
    ASSERT_TRUE(stub->ImportSyncFd(context.get(), import, &imported).ok());
  }
  ASSERT_EQ(imported.fence().fence_id(), fence->id());

  // Its client gives up (the call's deadline) long before the wait's timeout.
  auto context = raw->Context();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  v1::WaitFenceRequest wait;
  wait.add_fence_ids(fence->id());
  wait.set_timeout_ms(60000);
  v1::WaitFenceResponse response;
  EXPECT_EQ(stub->WaitFence(context.get(), wait, &response).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(Eventually([&] { return Waiters(fence->id()) == 0; })) << "dropped, not kept";

  // A session that ends mid-wait: its wait goes too.
  std::thread waiter([&] {
    auto waiting = raw->Context();
    v1::WaitFenceResponse ignored;
    (void)stub->WaitFence(waiting.get(), wait, &ignored);
  });
  ASSERT_TRUE(Eventually([&] { return Waiters(fence->id()) == 1; }));
  raw->socket = UnixSocket();
  EXPECT_TRUE(Eventually([&] { return Waiters(fence->id()) == 0; }));
  waiter.join();
  context.reset();  // holds its call's channel
  raw = absl::CancelledError("closed");
  stub.reset();
  fence = absl::CancelledError("dropped");
  ExpectBaseline();
}

TEST_F(FenceTest, BadRequestsGetNamedErrors) {
  auto stub = FenceStub(daemon_->socket_dir());
  absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok());
  // Every call needs a session.
  {
    grpc::ClientContext context;
    v1::CreateFenceRequest request;
    v1::CreateFenceResponse response;
    EXPECT_EQ(stub->CreateFence(&context, request, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext wait_context;
    v1::WaitFenceRequest wait;
    wait.add_fence_ids(1);
    v1::WaitFenceResponse waited;
    EXPECT_EQ(stub->WaitFence(&wait_context, wait, &waited).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  v1::CreateFenceResponse created;
  ASSERT_TRUE(stub->CreateFence(raw->Context().get(), {}, &created).ok());
  const uint64_t id = created.fence().fence_id();
  // Statuses only the daemon sets.
  for (v1::FenceStatus status : {v1::FENCE_STATUS_UNSPECIFIED, v1::FENCE_STATUS_OWNER_DIED,
                                 v1::FENCE_STATUS_DEADLINE_EXCEEDED}) {
    v1::SignalFenceRequest request;
    request.set_fence_id(id);
    request.set_status(status);
    v1::SignalFenceResponse response;
    grpc::Status s = stub->SignalFence(raw->Context().get(), request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status;
    EXPECT_THAT(s.error_message(), HasSubstr("a client signals OK, ERROR or CANCELLED"));
  }
  // Waits: none, too many, an id that never existed.
  {
    v1::WaitFenceRequest request;
    v1::WaitFenceResponse response;
    request.add_fence_ids(id + 100000);
    grpc::Status unknown = stub->WaitFence(raw->Context().get(), request, &response);
    EXPECT_EQ(unknown.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(unknown.error_message(), absl::StrCat("fence ", id + 100000, " not found"));
    request.clear_fence_ids();
    grpc::Status s = stub->WaitFence(raw->Context().get(), request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("fence_ids is empty"));
    for (int i = 0; i < 1025; ++i) request.add_fence_ids(id);
    s = stub->WaitFence(raw->Context().get(), request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("1025 fence ids in one wait; at most 1024"));
  }
  // An upload id nobody sent.
  {
    v1::ImportSyncFdRequest request;
    request.set_upload_id(77);
    v1::ImportSyncFdResponse response;
    grpc::Status s = stub->ImportSyncFd(raw->Context().get(), request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_THAT(s.error_message(), HasSubstr("upload 77 not found"));
  }
  // A name that is not text.
  {
    v1::CreateFenceRequest request;
    request.set_name(std::string("\x1b[2J", 4));
    v1::CreateFenceResponse response;
    grpc::Status s = stub->CreateFence(raw->Context().get(), request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("name must be printable ASCII"));
  }
  raw = absl::CancelledError("closed");
  stub.reset();
  ExpectBaseline();
}

TEST_F(FenceTest, FenceQuotaIsNamed) {
  daemon_.reset();
  StartDaemon(R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM }
                 quotas { max_fences_per_session: 3 })pb");
  {
    std::vector<Fence> fences;
    for (int i = 0; i < 3; ++i) {
      absl::StatusOr<Fence> fence = client_->CreateFence();
      ASSERT_TRUE(fence.ok());
      fences.push_back(*std::move(fence));
    }
    absl::Status full = client_->CreateFence().status();
    EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
    EXPECT_THAT(full.message(), HasSubstr("quota max_fences_per_session: the session owns 3"));
    ASSERT_TRUE(fences[0].Signal().ok());
    EXPECT_TRUE(client_->CreateFence().ok()) << "signalled fences do not count";
  }
  ExpectBaseline();
}

TEST_F(FenceTest, GarbageOneWaySignalEndsOnlyThatSession) {
  absl::StatusOr<Fence> survivor = client_->CreateFence({.name = "survivor"});
  ASSERT_TRUE(survivor.ok());
  auto stub = FenceStub(daemon_->socket_dir());
  // Statuses only the daemon sets, and one that does not exist, on a fence
  // the sender owns; then someone else's fence.
  for (int status : {static_cast<int>(v1::FENCE_STATUS_OWNER_DIED),
                     static_cast<int>(v1::FENCE_STATUS_DEADLINE_EXCEEDED), 99, -1}) {
    absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok());
    v1::CreateFenceResponse own;
    ASSERT_TRUE(stub->CreateFence(raw->Context().get(), {}, &own).ok());
    v1::FdChannelMessage record;
    record.mutable_signal()->set_fence_id(own.fence().fence_id());
    record.mutable_signal()->set_status(status);
    ASSERT_TRUE(raw->socket.Send(record.SerializeAsString()).ok());
    // A call made after it never runs: the record is applied first, and it
    // ended the session.
    auto after = raw->Context();
    after->AddMetadata(kRecordsMetadataKey, "1");
    v1::GetFenceInfoRequest info;
    info.set_fence_id(own.fence().fence_id());
    v1::GetFenceInfoResponse got;
    EXPECT_EQ(stub->GetFenceInfo(after.get(), info, &got).error_code(),
              grpc::StatusCode::UNAUTHENTICATED)
        << status;
    // The daemon ends the session: fd.sock reads EOF.
    ASSERT_TRUE(Readable(raw->socket.fd(), 5000)) << status;
    absl::StatusOr<UnixSocket::Received> end = raw->socket.RecvWithFds();
    EXPECT_TRUE(!end.ok() || end->eof) << status;
  }
  {
    absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok());
    v1::FdChannelMessage record;
    record.mutable_signal()->set_fence_id(survivor->id());  // not its fence
    record.mutable_signal()->set_status(v1::FENCE_STATUS_OK);
    ASSERT_TRUE(raw->socket.Send(record.SerializeAsString()).ok());
    ASSERT_TRUE(Readable(raw->socket.fd(), 5000));
  }
  // A record that is not a protobuf at all, and an upload with two fds.
  {
    absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok());
    ASSERT_TRUE(raw->socket.Send(std::string("\xff\xff\xff", 3)).ok());
    ASSERT_TRUE(Readable(raw->socket.fd(), 5000));
  }
  {
    absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok());
    v1::FdChannelMessage upload;
    upload.mutable_upload()->set_upload_id(1);
    const int two[] = {0, 1};
    ASSERT_TRUE(raw->socket.Send(upload.SerializeAsString(), two).ok());
    ASSERT_TRUE(Readable(raw->socket.fd(), 5000));
  }
  EXPECT_EQ(survivor->Info()->state(), v1::FENCE_STATE_PENDING) << "nothing else is hurt";
  ASSERT_TRUE(survivor->Signal().ok());
  EXPECT_EQ(survivor->Wait(absl::Seconds(5))->status(), v1::FENCE_STATUS_OK);
  survivor = absl::InternalError("dropped");
  stub.reset();
  ExpectBaseline();
}

// Tests a fence's doorbell through a raw session that does what the library
// does: its owner writes OK into the fence's word and closes the doorbell's
// write end, and the daemon signals the fence with no record at all (the
// record, sent after, is taken as that signal); a doorbell closed while the
// word is pending signals nothing; a doorbell that is no pipe's read end is
// INVALID_ARGUMENT naming it, and no fence is made.
TEST_F(FenceTest, ADoorbellSignalsFromTheWordAndNothingElse) {
  absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok());
  auto stub = FenceStub(daemon_->socket_dir());
  uint64_t records = 0;
  auto upload = [&](uint64_t id, int fd) {
    v1::FdChannelMessage record;
    record.mutable_upload()->set_upload_id(id);
    const int fds[] = {fd};
    ++records;
    return raw->socket.Send(record.SerializeAsString(), fds).ok();
  };
  auto create = [&](uint64_t page_upload, uint64_t doorbell_upload, v1::FenceInfo* info,
                    bool* watched = nullptr) {
    v1::CreateFenceRequest request;
    request.set_name("rung");
    request.set_fence_page_upload_id(page_upload);
    request.set_doorbell_upload_id(doorbell_upload);
    v1::CreateFenceResponse response;
    auto context = raw->Context();
    context->AddMetadata(kRecordsMetadataKey, absl::StrCat(records));
    grpc::Status status = stub->CreateFence(context.get(), request, &response);
    if (info != nullptr) *info = response.fence();
    if (watched != nullptr) *watched = response.doorbell_watched();
    return status;
  };
  // GetFenceInfo, carrying `rung` as bufferd-rung if not empty.
  auto info_call = [&](uint64_t id, const std::string& rung, v1::FenceInfo* info) {
    v1::GetFenceInfoRequest request;
    request.set_fence_id(id);
    v1::GetFenceInfoResponse response;
    auto context = raw->Context();
    context->AddMetadata(kRecordsMetadataKey, absl::StrCat(records));
    if (!rung.empty()) context->AddMetadata(kRungMetadataKey, rung);
    grpc::Status status = stub->GetFenceInfo(context.get(), request, &response);
    *info = response.fence();
    return status;
  };
  auto state = [&](uint64_t id) {
    v1::FenceInfo info;
    return info_call(id, "", &info).ok() ? info : v1::FenceInfo();
  };
  // The fence page, as the library makes it.
  UniqueFd page(::memfd_create("bufferd-fence-page", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_EQ(::ftruncate(page.get(), 4096), 0);
  void* mapped = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, page.get(), 0);
  ASSERT_NE(mapped, MAP_FAILED);
  uint32_t* words = static_cast<uint32_t*>(mapped);
  ASSERT_EQ(::fcntl(page.get(), F_ADD_SEALS,
                    F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL),
            0);
  ASSERT_EQ(::fchmod(page.get(), 0444), 0);
  ASSERT_TRUE(upload(1, page.get()));
  v1::FenceInfo first;
  ASSERT_TRUE(create(1, 0, &first).ok());
  ASSERT_NE(first.page_slot(), 0u) << "the page was taken";
  const size_t known = KnownFences();

  // Not a pipe's read end: a pipe's write end, an eventfd.
  int ends[2];
  ASSERT_EQ(::pipe2(ends, O_CLOEXEC), 0);
  UniqueFd read_end(ends[0]), write_end(ends[1]);
  UniqueFd event(::eventfd(0, EFD_CLOEXEC));
  ASSERT_TRUE(upload(10, write_end.get()));
  grpc::Status refused = create(0, 10, nullptr);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(refused.error_message(), HasSubstr("the uploaded fd is the write end of a pipe"));
  ASSERT_TRUE(upload(11, event.get()));
  refused = create(0, 11, nullptr);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(refused.error_message(),
            "doorbell_upload_id names no pipe's read end: a fence's doorbell is one");
  EXPECT_EQ(KnownFences(), known) << "a refused CreateFence makes no fence";

  // Rung after the word says OK: signalled, though no record says so.
  ASSERT_TRUE(upload(2, read_end.get()));
  read_end.Reset();
  v1::FenceInfo rung;
  bool watched = false;
  ASSERT_TRUE(create(0, 2, &rung, &watched).ok());
  ASSERT_NE(rung.page_slot(), 0u);
  EXPECT_TRUE(watched) << "the owner may signal OK by its doorbell alone";
  EXPECT_EQ(state(rung.fence_id()).state(), v1::FENCE_STATE_PENDING);
  std::atomic_ref<uint32_t>(words[rung.page_slot()])
      .store(fence_page::Word(rung.page_generation(), v1::FENCE_STATUS_OK));
  write_end.Reset();
  EXPECT_TRUE(::bufferd::testing::Eventually(
      [&] { return state(rung.fence_id()).state() == v1::FENCE_STATE_SIGNALED; }));
  EXPECT_EQ(state(rung.fence_id()).status(), v1::FENCE_STATUS_OK);
  // The owner's record, come after: that same signal, not a second one.
  v1::FdChannelMessage signal;
  signal.mutable_signal()->set_fence_id(rung.fence_id());
  signal.mutable_signal()->set_status(v1::FENCE_STATUS_OK);
  ASSERT_TRUE(raw->socket.Send(signal.SerializeAsString()).ok());
  ++records;
  EXPECT_EQ(state(rung.fence_id()).status(), v1::FENCE_STATUS_OK) << "the session lives on";

  // A new fence with a doorbell uploaded as `upload_id`: the write end.
  auto with_doorbell = [&](uint64_t upload_id, v1::FenceInfo* info) {
    int pipe_ends[2];
    EXPECT_EQ(::pipe2(pipe_ends, O_CLOEXEC), 0);
    UniqueFd doorbell(pipe_ends[0]), ringer(pipe_ends[1]);
    EXPECT_TRUE(upload(upload_id, doorbell.get()));
    doorbell.Reset();
    EXPECT_TRUE(create(0, upload_id, info).ok());
    return ringer;
  };

  // Rung while the word is pending (a Fence dropped unsignalled): nothing.
  v1::FenceInfo quiet;
  with_doorbell(3, &quiet).Reset();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(state(quiet.fence_id()).state(), v1::FENCE_STATE_PENDING);

  // Not rung yet, but carried by a call (bufferd-rung): its word is read
  // before the call runs, so the call sees it signalled. A carried fence
  // whose word is pending stays so; an unknown id is skipped.
  v1::FenceInfo carried;
  write_end = with_doorbell(4, &carried);
  std::atomic_ref<uint32_t>(words[carried.page_slot()])
      .store(fence_page::Word(carried.page_generation(), v1::FENCE_STATUS_OK));
  v1::FenceInfo seen;
  ASSERT_TRUE(info_call(carried.fence_id(),
                        absl::StrCat(quiet.fence_id(), ",999999,", carried.fence_id()), &seen)
                  .ok());
  EXPECT_EQ(seen.state(), v1::FENCE_STATE_SIGNALED) << "applied before the call ran";
  EXPECT_EQ(seen.status(), v1::FENCE_STATUS_OK);
  EXPECT_EQ(state(quiet.fence_id()).state(), v1::FENCE_STATE_PENDING);
  // A list that is no list: the call is refused, naming it.
  grpc::Status junk = info_call(carried.fence_id(), "12,x", &seen);
  EXPECT_EQ(junk.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(junk.error_message(),
            "metadata bufferd-rung: expected up to 64 comma-separated fence ids, got '12,x'");
  EXPECT_EQ(state(carried.fence_id()).status(), v1::FENCE_STATUS_OK) << "the session lives on";

  // A record that overtakes the ring (the doorbell not closed yet): the OK
  // in the word came first and stands, the record is a second signal (only
  // logged: one-way), and a SignalFence saying otherwise is refused.
  v1::FenceInfo overtaken;
  UniqueFd unrung = with_doorbell(5, &overtaken);
  std::atomic_ref<uint32_t>(words[overtaken.page_slot()])
      .store(fence_page::Word(overtaken.page_generation(), v1::FENCE_STATUS_OK));
  v1::FdChannelMessage late;
  late.mutable_signal()->set_fence_id(overtaken.fence_id());
  late.mutable_signal()->set_status(v1::FENCE_STATUS_ERROR);
  late.mutable_signal()->set_message("late");
  ASSERT_TRUE(raw->socket.Send(late.SerializeAsString()).ok());
  ++records;
  EXPECT_EQ(state(overtaken.fence_id()).status(), v1::FENCE_STATUS_OK) << "the word's OK stands";
  v1::SignalFenceRequest again;
  again.set_fence_id(overtaken.fence_id());
  again.set_status(v1::FENCE_STATUS_CANCELLED);
  v1::SignalFenceResponse answered;
  {
    auto context = raw->Context();
    context->AddMetadata(kRecordsMetadataKey, absl::StrCat(records));
    grpc::Status second = stub->SignalFence(context.get(), again, &answered);
    EXPECT_EQ(second.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(second.error_message(), HasSubstr("was signalled already (FENCE_STATUS_OK"));
  }
  EXPECT_EQ(state(overtaken.fence_id()).status(), v1::FENCE_STATUS_OK);
  ::munmap(mapped, 4096);
  // The session's end lets go of its doorbells, page and fences.
  write_end.Reset();
  unrung.Reset();
  raw = absl::CancelledError("closed");
  stub.reset();
  ExpectBaseline();
}

// Tests that a Fence refuses a second signal of its own, one-way or
// confirmed, FAILED_PRECONDITION naming the first, whether it signalled by
// record (a session's first fence) or by its doorbell alone, and that the
// first stands.
TEST_F(FenceTest, AFenceRefusesItsOwnSecondSignal) {
  for (int i = 0; i < 2; ++i) {
    SCOPED_TRACE(i == 0 ? "by record" : "by doorbell");
    absl::StatusOr<Fence> fence = client_->CreateFence({.name = "twice"});
    ASSERT_TRUE(fence.ok()) << fence.status();
    ASSERT_TRUE(fence->Signal().ok());
    const absl::Status again = fence->Signal(v1::FENCE_STATUS_ERROR, "second");
    EXPECT_EQ(again.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(again.message(), absl::StrCat("fence ", fence->id(),
                                            " was signalled already (FENCE_STATUS_OK, by this "
                                            "Fence)"));
    EXPECT_EQ(fence->SignalAndConfirm().status().code(), absl::StatusCode::kFailedPrecondition);
    absl::StatusOr<v1::FenceInfo> info = fence->Info();
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->status(), v1::FENCE_STATUS_OK);
  }
  ExpectBaseline();
}

// Tests that an OK Fence::Signal reaches the daemon by its doorbell even
// while a child forked without exec is alive (it would hold a copy of the
// doorbell's write end, and keep it from ringing, but for the library's fork
// handler): a poller elsewhere wakes long before the fence's deadline,
// though no call follows the signal.
TEST_F(FenceTest, AForkedChildDoesNotKeepADoorbellFromRinging) {
  absl::StatusOr<Client> owner = Client::Connect(daemon_->socket_dir());
  ASSERT_TRUE(owner.ok()) << owner.status();
  // The session's second fence is the first with a doorbell.
  absl::StatusOr<Fence> first = owner->CreateFence({.name = "first"});
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<Fence> fence = owner->CreateFence({.name = "rung", .deadline = absl::Seconds(60)});
  ASSERT_TRUE(fence.ok()) << fence.status();
  absl::StatusOr<UniqueFd> exported = fence->ExportFd();
  ASSERT_TRUE(exported.ok()) << exported.status();
  int hold[2];
  ASSERT_EQ(::pipe2(hold, O_CLOEXEC), 0);
  UniqueFd hold_read(hold[0]), hold_write(hold[1]);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Alive, holding whatever the fork gave it, until the parent lets go.
    hold_write.Reset();
    char byte;
    (void)!::read(hold_read.get(), &byte, 1);
    ::_exit(0);
  }
  hold_read.Reset();
  ASSERT_TRUE(fence->Signal().ok());
  pollfd poller{.fd = exported->get(), .events = POLLIN};
  const int ready = ::poll(&poller, 1, 10000);
  hold_write.Reset();
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_EQ(ready, 1) << "the doorbell did not ring: the child held it";
  absl::StatusOr<v1::FenceInfo> info = fence->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->status(), v1::FENCE_STATUS_OK);
  fence = absl::CancelledError("dropped");
  first = absl::CancelledError("dropped");
  owner = absl::CancelledError("closed");
  ExpectBaseline();
}

TEST_F(FenceTest, UploadsCannotPinASessionOrEndIt) {
  absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok());
  auto stub = FenceStub(daemon_->socket_dir());
  // Its own fd.sock end, uploaded: refused on arrival, so nothing keeps the
  // session alive once the client goes.
  v1::FdChannelMessage upload;
  upload.mutable_upload()->set_upload_id(1);
  const int own[] = {raw->socket.fd()};
  ASSERT_TRUE(raw->socket.Send(upload.SerializeAsString(), own).ok());
  v1::ImportSyncFdRequest request;
  request.set_upload_id(1);
  v1::ImportSyncFdResponse response;
  {
    auto context = raw->Context();
    context->AddMetadata(kRecordsMetadataKey, "1");
    grpc::Status socket = stub->ImportSyncFd(context.get(), request, &response);
    EXPECT_EQ(socket.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(socket.error_message(), HasSubstr("the uploaded fd is a socket"));
  }
  // Then 40 uploads nobody claims: the oldest are closed, the session lives.
  for (uint64_t id = 2; id < 42; ++id) {
    UniqueFd event(::eventfd(0, EFD_CLOEXEC));
    upload.mutable_upload()->set_upload_id(id);
    const int fds[] = {event.get()};
    ASSERT_TRUE(raw->socket.Send(upload.SerializeAsString(), fds).ok());
  }
  auto context = raw->Context();
  context->AddMetadata(kRecordsMetadataKey, "41");
  request.set_upload_id(41);
  ASSERT_TRUE(stub->ImportSyncFd(context.get(), request, &response).ok())
      << "the newest upload is there";
  request.set_upload_id(2);
  EXPECT_EQ(stub->ImportSyncFd(raw->Context().get(), request, &response).error_code(),
            grpc::StatusCode::NOT_FOUND)
      << "the oldest went";
  // Oldest by arrival, not the lowest id: 26 .. 40 wait; 5 fills the last
  // place and 6 pushes 26 out (dropping the lowest id would take 5).
  for (uint64_t id : {5, 6}) {
    UniqueFd event(::eventfd(0, EFD_CLOEXEC));
    upload.mutable_upload()->set_upload_id(id);
    const int fds[] = {event.get()};
    ASSERT_TRUE(raw->socket.Send(upload.SerializeAsString(), fds).ok());
  }
  context = raw->Context();
  context->AddMetadata(kRecordsMetadataKey, "43");
  request.set_upload_id(5);
  ASSERT_TRUE(stub->ImportSyncFd(context.get(), request, &response).ok())
      << "the newest upload stays, whatever its id";
  request.set_upload_id(26);
  EXPECT_EQ(stub->ImportSyncFd(raw->Context().get(), request, &response).error_code(),
            grpc::StatusCode::NOT_FOUND)
      << "the oldest went";
  context.reset();
  raw = absl::CancelledError("closed");
  stub.reset();
  ExpectBaseline();
}

TEST_F(FenceTest, TenThousandConcurrentWaitersWokenByOneSignal) {
  // Async WaitFence calls on one raw session: no thread per waiter anywhere.
  absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok());
  auto stub = FenceStub(daemon_->socket_dir());
  v1::CreateFenceRequest create;
  create.set_deadline_ms(120000);
  v1::CreateFenceResponse created;
  ASSERT_TRUE(stub->CreateFence(raw->Context().get(), create, &created).ok());
  const uint64_t id = created.fence().fence_id();

  constexpr int kWaiters = 10000;
  struct Call {
    std::unique_ptr<grpc::ClientContext> context;
    v1::WaitFenceResponse response;
    grpc::Status status;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::WaitFenceResponse>> reader;
  };
  std::vector<Call> calls(kWaiters);
  grpc::CompletionQueue queue;
  v1::WaitFenceRequest wait;
  wait.add_fence_ids(id);
  wait.set_timeout_ms(120000);
  for (int i = 0; i < kWaiters; ++i) {
    calls[i].context = raw->Context();
    calls[i].reader = stub->AsyncWaitFence(calls[i].context.get(), wait, &queue);
    calls[i].reader->Finish(&calls[i].response, &calls[i].status, &calls[i]);
  }
  ASSERT_TRUE(Eventually([&] { return Waiters(id) == kWaiters; })) << Waiters(id);

  v1::SignalFenceRequest signal;
  signal.set_fence_id(id);
  signal.set_status(v1::FENCE_STATUS_OK);
  v1::SignalFenceResponse signalled;
  ASSERT_TRUE(stub->SignalFence(raw->Context().get(), signal, &signalled).ok());
  int satisfied = 0;
  for (int i = 0; i < kWaiters; ++i) {
    void* tag;
    bool ok;
    ASSERT_TRUE(queue.Next(&tag, &ok));
    Call* call = static_cast<Call*>(tag);
    if (ok && call->status.ok() && call->response.satisfied()) ++satisfied;
  }
  EXPECT_EQ(satisfied, kWaiters);
  queue.Shutdown();
  void* tag;
  bool ok;
  while (queue.Next(&tag, &ok)) {
  }
}

}  // namespace
}  // namespace bufferd
