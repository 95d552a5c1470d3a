// Reservation objects through a real daemon, the client library and a
// second process: a writer's WRITE fence holds readers back until it
// signals, readers' READ fences hold writers back, BOOKKEEP holds nobody,
// an owner's death unblocks, timeline points attach like fences, and every
// bad attach gets its code and message.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <future>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "bufferd/v1/fence.grpc.pb.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "testing/daemon_test.h"
#include "testing/sleep_probe.h"
#include "testing/syscall_counter.h"

namespace bufferd {
namespace {

using ::bufferd::testing::Bufctl;
using ::bufferd::testing::ChildProcess;
using ::bufferd::testing::DaemonTest;
using ::bufferd::testing::Field;
using ::bufferd::testing::FenceStub;
using ::bufferd::testing::NewAllocatorStub;
using ::bufferd::testing::OpenRawSession;
using ::bufferd::testing::RawSession;
using ::bufferd::testing::SleepsInFutexOn;
using ::bufferd::testing::SpawnPeer;
using ::testing::HasSubstr;

class ReservationTest : public DaemonTest {
 protected:
  Buffer NewBuffer() {
    absl::StatusOr<Buffer> buffer = client_->Allocate({.heap = "system", .size = 65536});
    EXPECT_TRUE(buffer.ok()) << buffer.status();
    return *std::move(buffer);
  }
  // Fences client_'s session holds (bufctl clients' FENCES HELD).
  uint32_t Held() {
    absl::StatusOr<v1::ListClientsResponse> clients = client_->ListClients();
    EXPECT_TRUE(clients.ok()) << clients.status();
    if (!clients.ok()) return 0;
    for (const v1::ClientInfo& info : clients->clients()) {
      if (info.session_id() == client_->session_id()) return info.fences_held();
    }
    return 0;
  }
  // Whether thread `tid` of this process sleeps on its status page (it has
  // been told what it waits for, and waits without the daemon).
  static bool OnStatusPage(const std::atomic<pid_t>& tid) {
    return tid != 0 && SleepsInFutexOn(::getpid(), tid, "bufferd-reservations");
  }
  void SetUp() override {
    StartDaemon();
    // The tests that must know a waiter sleeps read /proc/<pid>/task/<tid>/
    // syscall; some sandboxes (gVisor, strict Yama/seccomp) have none.
    std::ifstream probe(absl::StrCat("/proc/self/task/", ::gettid(), "/syscall"));
    std::string number;
    have_syscall_file_ = static_cast<bool>(probe >> number);
  }
  bool have_syscall_file_ = false;

  // BeginCpuAccess(kRead) of `buffer` on another thread, handed back once it
  // sleeps on its status page (it has been told what it waits for).
  std::future<absl::StatusOr<std::vector<v1::FenceInfo>>> ReadAsleep(const Buffer& buffer,
                                                                     absl::Duration timeout) {
    auto tid = std::make_shared<std::atomic<pid_t>>(0);
    auto reading = std::async(std::launch::async, [tid, &buffer, timeout] {
      *tid = ::gettid();
      return buffer.BeginCpuAccess(Cpu::kRead, timeout);
    });
    EXPECT_TRUE(::bufferd::testing::Eventually([&] { return OnStatusPage(*tid); }))
        << "the reader never slept on its status page";
    return reading;
  }
  // Two more sessions: a writer that allocated `size` bytes and a reader
  // holding them read-only.
  struct WriterAndReader {
    Client writer;
    Client reader;
    Buffer written;
    Buffer read;
  };
  absl::StatusOr<WriterAndReader> NewWriterAndReader(uint64_t size) {
    ASSIGN_OR_RETURN(Client writer, Client::Connect(daemon_->socket_dir()));
    ASSIGN_OR_RETURN(Client reader, Client::Connect(daemon_->socket_dir()));
    ASSIGN_OR_RETURN(Buffer written, writer.Allocate({.heap = "system", .size = size}));
    ASSIGN_OR_RETURN(std::string token, written.Export(Access::kReadOnly));
    ASSIGN_OR_RETURN(Buffer read, reader.Import(token));
    return WriterAndReader{std::move(writer), std::move(reader), std::move(written),
                           std::move(read)};
  }
  // A second session holding `buffer` read-write, with two fences of its
  // own, the first attached WRITE.
  struct Producer {
    Client client;
    Buffer shared;
    Fence first;
    Fence second;
  };
  std::optional<Producer> NewProducer(const Buffer& buffer) {
    absl::StatusOr<Client> client = Client::Connect(daemon_->socket_dir());
    if (!client.ok()) return std::nullopt;
    absl::StatusOr<Buffer> shared = client->Import(*buffer.Export(Access::kReadWrite));
    absl::StatusOr<Fence> first = client->CreateFence({.name = "first"});
    absl::StatusOr<Fence> second = client->CreateFence({.name = "second"});
    if (!shared.ok() || !first.ok() || !second.ok() ||
        !shared->AttachFence(*first, v1::FENCE_USAGE_WRITE).ok()) {
      return std::nullopt;
    }
    return Producer{*std::move(client), *std::move(shared), *std::move(first),
                    *std::move(second)};
  }
  // A read-only import of `of` by a raw session: its handle (0 if refused).
  uint64_t ImportReadOnly(const RawSession& raw, const Buffer& of) {
    v1::ImportRequest import;
    import.set_token(*of.Export(Access::kReadOnly));
    v1::ImportResponse imported;
    EXPECT_TRUE(NewAllocatorStub(daemon_->socket_dir())
                    ->Import(raw.Context().get(), import, &imported)
                    .ok());
    return imported.handle();
  }
  static bool Readable(int fd, absl::Duration timeout) {
    pollfd ready{fd, POLLIN, 0};
    return ::poll(&ready, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) == 1;
  }
};

TEST_F(ReservationTest, AReaderWaitsForTheWritersFenceAndSeesItsData) {
  {
    Buffer buffer = NewBuffer();
    absl::StatusOr<ChildProcess> writer = SpawnPeer(
        {"resv-write", daemon_->socket_dir(), *buffer.Export(Access::kReadWrite), "90", "500"});
    ASSERT_TRUE(writer.ok());
    const std::string ready = writer->ReadLine();
    ASSERT_FALSE(Field(ready, "fence").empty()) << ready;
    // The writer's fence is attached: a read waits for it, then sees what
    // it wrote (it writes just before it signals).
    absl::StatusOr<std::vector<v1::FenceInfo>> waited =
        buffer.BeginCpuAccess(Cpu::kRead, absl::Seconds(20));
    ASSERT_TRUE(waited.ok()) << waited.status();
    ASSERT_EQ(waited->size(), 1u);
    EXPECT_EQ((*waited)[0].status(), v1::FENCE_STATUS_OK);
    EXPECT_EQ((*waited)[0].usage(), v1::FENCE_USAGE_WRITE);
    EXPECT_EQ((*waited)[0].name(), "frame done");
    absl::StatusOr<Mapping> map = buffer.MapReadOnly();
    ASSERT_TRUE(map.ok());
    const auto* bytes = static_cast<const uint8_t*>(map->data());
    EXPECT_TRUE(std::all_of(bytes, bytes + map->size(), [](uint8_t b) { return b == 90; }))
        << "the read began before the writer's data was there";
    ASSERT_TRUE(buffer.EndCpuAccess().ok());
    EXPECT_EQ(writer->ReadLine(), "signalled");
    EXPECT_EQ(writer->Wait(), 0);
    // Signalled: pruned, nothing to wait for.
    absl::StatusOr<std::vector<Fence>> left = buffer.Fences(Cpu::kWrite);
    ASSERT_TRUE(left.ok());
    EXPECT_TRUE(left->empty());
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, AWriterWaitsForReadersAndBookkeepHoldsNobody) {
  {
    Buffer buffer = NewBuffer();
    absl::StatusOr<ChildProcess> reader =
        SpawnPeer({"resv-read", daemon_->socket_dir(), *buffer.Export(Access::kReadOnly)});
    ASSERT_TRUE(reader.ok());
    const std::string ready = reader->ReadLine();
    ASSERT_FALSE(Field(ready, "fence").empty()) << ready;
    absl::StatusOr<Fence> note = client_->CreateFence({.name = "note"});
    ASSERT_TRUE(note.ok());
    ASSERT_TRUE(buffer.AttachFence(*note, v1::FENCE_USAGE_BOOKKEEP).ok());

    // Reads do not wait for readers, nor anyone for BOOKKEEP.
    absl::StatusOr<std::vector<v1::FenceInfo>> read =
        buffer.BeginCpuAccess(Cpu::kRead, absl::ZeroDuration());
    ASSERT_TRUE(read.ok()) << read.status();
    EXPECT_TRUE(read->empty());
    // A write waits for the reader's READ fence.
    absl::Status blocked = buffer.BeginCpuAccess(Cpu::kWrite, absl::Milliseconds(200)).status();
    EXPECT_EQ(blocked.code(), absl::StatusCode::kDeadlineExceeded) << blocked;
    EXPECT_THAT(blocked.message(), HasSubstr(Field(ready, "fence")));
    absl::StatusOr<std::vector<Fence>> pending = buffer.Fences(Cpu::kWrite);
    ASSERT_TRUE(pending.ok());
    ASSERT_EQ(pending->size(), 1u);
    EXPECT_EQ((*pending)[0].info().usage(), v1::FENCE_USAGE_READ);
    EXPECT_EQ((*pending)[0].info().name(), "reading");
    // Operators see what holds the buffer, whose it is and since when.
    const std::string table = Bufctl(daemon_->socket_dir(), "buffers");
    EXPECT_THAT(table, ::testing::ContainsRegex(absl::StrCat(
                           "read:", Field(ready, "fence"), "@peer\\[", reader->pid(),
                           "\\]:[0-9.]+m?s bookkeep:")))
        << table;
    // bufctl why: what each access would wait for, and who must signal.
    const std::string why = Bufctl(daemon_->socket_dir(), absl::StrCat("why ", buffer.id()));
    EXPECT_THAT(why, HasSubstr("a read would start now: no fence holds it")) << why;
    EXPECT_THAT(why, HasSubstr(absl::StrCat("a write waits for 1 fence:\n  read fence ",
                                            Field(ready, "fence"), " 'reading': signalled by peer[",
                                            reader->pid(), "]; pending ")))
        << why;
    EXPECT_THAT(Bufctl(daemon_->socket_dir(), "why 999999 2>&1"), HasSubstr("no buffer 999999"));

    // Two pending: one merged fence, made once and handed out again while
    // the same fences are pending.
    {
      absl::StatusOr<Fence> mine = client_->CreateFence({.name = "mine"});
      ASSERT_TRUE(mine.ok());
      ASSERT_TRUE(buffer.AttachFence(*mine, v1::FENCE_USAGE_READ).ok());
      auto known = [&] { return client_->ListFences()->fences_size(); };
      absl::StatusOr<UniqueFd> first = buffer.FencesFd(Cpu::kWrite);
      ASSERT_TRUE(first.ok() && first->valid());
      const int after_first = known();
      for (int i = 0; i < 5; ++i) {
        absl::StatusOr<UniqueFd> again = buffer.FencesFd(Cpu::kWrite);
        ASSERT_TRUE(again.ok() && again->valid());
      }
      EXPECT_EQ(known(), after_first) << "no new fence per call";
      ASSERT_TRUE(mine->SignalAndConfirm().ok());
      EXPECT_FALSE(Readable(first->get(), absl::Milliseconds(50))) << "the reader's is pending";
    }

    // One fd for an event loop: readable once the reader is done.
    absl::StatusOr<UniqueFd> fd = buffer.FencesFd(Cpu::kWrite);
    ASSERT_TRUE(fd.ok()) << fd.status();
    ASSERT_TRUE(fd->valid());
    EXPECT_FALSE(Readable(fd->get(), absl::Milliseconds(50)));
    absl::StatusOr<UniqueFd> none = buffer.FencesFd(Cpu::kRead);
    ASSERT_TRUE(none.ok());
    EXPECT_FALSE(none->valid()) << "nothing pending: -1";

    // The reader dies while a writer waits: its fence fails OWNER_DIED and
    // the write goes ahead.
    const uint64_t reader_fence = (*pending)[0].id();
    pending->clear();
    std::atomic<pid_t> writer_tid{0};
    std::thread writing([&] {
      writer_tid = ::gettid();
      absl::StatusOr<Buffer::ScopedCpuAccess> write =
          buffer.CpuAccess(Cpu::kWrite, absl::Seconds(20));
      ASSERT_TRUE(write.ok()) << write.status();
      ASSERT_EQ(write->waited().size(), 1u);
      EXPECT_EQ(write->waited()[0].status(), v1::FENCE_STATUS_OWNER_DIED);
      EXPECT_EQ(write->waited()[0].usage(), v1::FENCE_USAGE_READ);
    });
    // The writer has been told what it waits for before the reader goes:
    // it sleeps on its status page, not in the daemon.
    if (!have_syscall_file_) absl::SleepFor(absl::Seconds(1));  // no probe here: a margin
    EXPECT_TRUE(!have_syscall_file_ ||
                ::bufferd::testing::Eventually([&] { return OnStatusPage(writer_tid); }))
        << "the writer never slept on its status page for fence " << reader_fence;
    reader->Kill(SIGKILL);
    reader->Wait();
    writing.join();
    EXPECT_TRUE(Readable(fd->get(), absl::Seconds(10)));
    absl::StatusOr<std::vector<Fence>> after = buffer.Fences(Cpu::kWrite);
    ASSERT_TRUE(after.ok());
    EXPECT_TRUE(after->empty()) << "signalled: pruned";
    ASSERT_TRUE(note->Signal().ok());
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, NothingPendingCostsNoRoundTrip) {
  {
    Buffer buffer = NewBuffer();
    // The first access asks the daemon and subscribes the session.
    ASSERT_TRUE(buffer.BeginCpuAccess(Cpu::kWrite, absl::ZeroDuration()).ok());
    // From then on nothing pending is read from the status page: the calls
    // succeed with the daemon stopped (a round trip would hang).
    ASSERT_EQ(::kill(daemon_->pid(), SIGSTOP), 0);
    std::future<absl::Status> accesses = std::async(std::launch::async, [&] {
      for (int i = 0; i < 1000; ++i) {
        for (Cpu access : {Cpu::kRead, Cpu::kWrite}) {
          absl::StatusOr<Buffer::ScopedCpuAccess> scoped =
              buffer.CpuAccess(access, absl::ZeroDuration());
          if (!scoped.ok()) return scoped.status();
          if (!scoped->waited().empty()) return absl::InternalError("waited for something");
        }
      }
      return absl::OkStatus();
    });
    const bool done = accesses.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
    ASSERT_EQ(::kill(daemon_->pid(), SIGCONT), 0);
    ASSERT_TRUE(done) << "BeginCpuAccess asked the stopped daemon";
    EXPECT_TRUE(accesses.get().ok());

    // An attach is in the page before AttachFence returns.
    absl::StatusOr<Fence> write = client_->CreateFence({.name = "w"});
    ASSERT_TRUE(write.ok());
    ASSERT_TRUE(buffer.AttachFence(*write, v1::FENCE_USAGE_WRITE).ok());
    EXPECT_EQ(buffer.BeginCpuAccess(Cpu::kRead, absl::ZeroDuration()).status().code(),
              absl::StatusCode::kDeadlineExceeded);
    // BOOKKEEP holds nobody; READ holds writers only.
    absl::StatusOr<Fence> read = client_->CreateFence({.name = "r"});
    absl::StatusOr<Fence> note = client_->CreateFence({.name = "note"});
    ASSERT_TRUE(read.ok() && note.ok());
    ASSERT_TRUE(write->SignalAndConfirm().ok());
    ASSERT_TRUE(buffer.AttachFence(*note, v1::FENCE_USAGE_BOOKKEEP).ok());
    EXPECT_TRUE(buffer.BeginCpuAccess(Cpu::kWrite, absl::ZeroDuration()).ok());
    ASSERT_TRUE(buffer.AttachFence(*read, v1::FENCE_USAGE_READ).ok());
    EXPECT_TRUE(buffer.BeginCpuAccess(Cpu::kRead, absl::ZeroDuration()).ok());
    EXPECT_EQ(buffer.BeginCpuAccess(Cpu::kWrite, absl::ZeroDuration()).status().code(),
              absl::StatusCode::kDeadlineExceeded);
    ASSERT_TRUE(read->SignalAndConfirm().ok());
    ASSERT_TRUE(buffer.BeginCpuAccess(Cpu::kWrite, absl::ZeroDuration()).ok());
    ASSERT_TRUE(note->Signal().ok());
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, AWaiterWhoseSessionEndsGetsAnError) {
  if (!have_syscall_file_) GTEST_SKIP() << "no /proc/<pid>/task/<tid>/syscall to see a waiter sleep";
  {
    // Its own Client: Close() ends its session while it waits, with no
    // timeout at all.
    absl::StatusOr<Client> reader = Client::Connect(daemon_->socket_dir());
    ASSERT_TRUE(reader.ok());
    Buffer buffer = NewBuffer();
    absl::StatusOr<Buffer> mine = reader->Import(*buffer.Export(Access::kReadOnly));
    ASSERT_TRUE(mine.ok());
    absl::StatusOr<Fence> write = client_->CreateFence({.name = "never"});
    ASSERT_TRUE(write.ok());
    ASSERT_TRUE(buffer.AttachFence(*write, v1::FENCE_USAGE_WRITE).ok());
    auto reading = ReadAsleep(*mine, absl::InfiniteDuration());
    reader->Close();
    ASSERT_EQ(reading.wait_for(std::chrono::seconds(30)), std::future_status::ready)
        << "still asleep on a page nobody writes";
    const absl::Status status = reading.get().status();
    EXPECT_FALSE(status.ok());
    EXPECT_TRUE(absl::IsUnavailable(status) || absl::IsUnauthenticated(status)) << status;
    ASSERT_TRUE(write->Signal().ok());
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, AWaitOnThePageReportsFailuresAndIgnoresLaterFences) {
  if (!have_syscall_file_) GTEST_SKIP() << "no /proc/<pid>/task/<tid>/syscall to see a waiter sleep";
  {
    Buffer buffer = NewBuffer();
    std::optional<Producer> producer = NewProducer(buffer);
    ASSERT_TRUE(producer.has_value());
    Fence* first = &producer->first;
    Fence* second = &producer->second;
    Buffer* shared = &producer->shared;
    const uint32_t held_before = Held();
    auto reading = ReadAsleep(buffer, absl::Seconds(20));
    EXPECT_EQ(Held(), held_before) << "listed, not held";
    // A fence attached after the read asked does not hold it.
    ASSERT_TRUE(shared->AttachFence(*second, v1::FENCE_USAGE_WRITE).ok());
    ASSERT_TRUE(first->Signal(v1::FENCE_STATUS_ERROR, "torn frame").ok());
    ASSERT_EQ(reading.wait_for(std::chrono::seconds(20)), std::future_status::ready);
    absl::StatusOr<std::vector<v1::FenceInfo>> waited = reading.get();
    ASSERT_TRUE(waited.ok()) << waited.status();
    ASSERT_EQ(waited->size(), 1u);
    EXPECT_EQ((*waited)[0].fence_id(), first->id());
    EXPECT_EQ((*waited)[0].status(), v1::FENCE_STATUS_ERROR) << "the failure is reported";
    EXPECT_EQ((*waited)[0].message(), "torn frame");
    // The later fence holds the next read.
    EXPECT_EQ(buffer.BeginCpuAccess(Cpu::kRead, absl::ZeroDuration()).status().code(),
              absl::StatusCode::kDeadlineExceeded);
    ASSERT_TRUE(second->SignalAndConfirm().ok());
    EXPECT_TRUE(buffer.BeginCpuAccess(Cpu::kRead, absl::ZeroDuration()).ok());
    EXPECT_EQ(Held(), held_before) << "nothing left to forget";
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, AFailureThatWasNotKeptIsNeverReportedOk) {
  if (!have_syscall_file_) GTEST_SKIP() << "no /proc/<pid>/task/<tid>/syscall to see a waiter sleep";
  {
    Buffer buffer = NewBuffer();
    std::optional<Producer> producer = NewProducer(buffer);
    ASSERT_TRUE(producer.has_value());
    Fence* first = &producer->first;
    Fence* last = &producer->second;
    Buffer* shared = &producer->shared;
    ASSERT_TRUE(shared->AttachFence(*last, v1::FENCE_USAGE_WRITE).ok());
    auto reading = ReadAsleep(buffer, absl::Seconds(60));
    // The first fails; then more failures than the daemon keeps (fences
    // attached after the read asked: they do not hold it), then the last
    // signals OK.
    ASSERT_TRUE(first->Signal(v1::FENCE_STATUS_ERROR, "torn").ok());
    for (int i = 0; i < 300; ++i) {
      absl::StatusOr<Fence> noise = producer->client.CreateFence();
      ASSERT_TRUE(noise.ok());
      ASSERT_TRUE(shared->AttachFence(*noise, v1::FENCE_USAGE_WRITE).ok());
      ASSERT_TRUE(noise->Signal(v1::FENCE_STATUS_ERROR, "noise").ok());
    }
    ASSERT_TRUE(last->Signal().ok());
    ASSERT_EQ(reading.wait_for(std::chrono::seconds(60)), std::future_status::ready);
    absl::StatusOr<std::vector<v1::FenceInfo>> waited = reading.get();
    ASSERT_TRUE(waited.ok()) << waited.status();
    ASSERT_EQ(waited->size(), 2u);
    for (const v1::FenceInfo& info : *waited) {
      EXPECT_EQ(info.state(), v1::FENCE_STATE_SIGNALED);
      EXPECT_NE(info.status(), v1::FENCE_STATUS_OK)
          << "fence " << info.fence_id() << ": its end was not kept, so it is not OK";
      EXPECT_THAT(info.message(), HasSubstr("no longer known"));
    }
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, ATimelinePointAttachesLikeAFence) {
  {
    // Sessions of their own: a session that holds a timeline keeps a wait
    // page (one fd) while it lives.
    absl::StatusOr<Client> producer = Client::Connect(daemon_->socket_dir());
    absl::StatusOr<Client> consumer = Client::Connect(daemon_->socket_dir());
    ASSERT_TRUE(producer.ok() && consumer.ok());
    absl::StatusOr<Buffer> allocated = consumer->Allocate({.heap = "system", .size = 65536});
    ASSERT_TRUE(allocated.ok());
    Buffer buffer = *std::move(allocated);
    absl::StatusOr<Timeline> frames = producer->CreateTimeline({.name = "frames"});
    ASSERT_TRUE(frames.ok());
    EXPECT_EQ(buffer.AttachPoint(*frames, 3, v1::FENCE_USAGE_WRITE).code(),
              absl::StatusCode::kInvalidArgument)
        << "a timeline of another Client's session";
    absl::StatusOr<Timeline> seen = consumer->ImportTimeline(*frames->Export());
    ASSERT_TRUE(seen.ok());
    ASSERT_TRUE(buffer.AttachPoint(*seen, 3, v1::FENCE_USAGE_WRITE).ok());
    std::thread signal([&] {
      absl::SleepFor(absl::Milliseconds(500));
      ASSERT_TRUE(frames->Signal(3).ok());
    });
    absl::StatusOr<std::vector<v1::FenceInfo>> waited =
        buffer.BeginCpuAccess(Cpu::kRead, absl::Seconds(20));
    signal.join();
    ASSERT_TRUE(waited.ok()) << waited.status();
    ASSERT_EQ(waited->size(), 1u);
    EXPECT_EQ((*waited)[0].kind(), v1::FENCE_KIND_TIMELINE_POINT);
    EXPECT_EQ((*waited)[0].status(), v1::FENCE_STATUS_OK);
    EXPECT_GE(frames->Query(), 3u);
    EXPECT_EQ(buffer.AttachPoint(*seen, 0, v1::FENCE_USAGE_WRITE).code(),
              absl::StatusCode::kInvalidArgument);
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, AReaderWaitsOnTheWritersTimelinePointItself) {
  if (!have_syscall_file_)
    GTEST_SKIP() << "no /proc/<pid>/task/<tid>/syscall to see a waiter sleep";
  {
    // Sessions of their own (a session that holds a timeline keeps a wait
    // page while it lives). The reader holds the buffer only, not the
    // timeline: the point attached to the buffer is what lets it wait on it.
    absl::StatusOr<Client> reader = Client::Connect(daemon_->socket_dir());
    absl::StatusOr<Client> connected = Client::Connect(daemon_->socket_dir());
    ASSERT_TRUE(reader.ok() && connected.ok());
    std::optional<Client> writer = *std::move(connected);
    absl::StatusOr<Buffer> allocated = writer->Allocate({.heap = "system", .size = 65536});
    ASSERT_TRUE(allocated.ok());
    std::optional<Buffer> written = *std::move(allocated);
    absl::StatusOr<Buffer> read = reader->Import(*written->Export(Access::kReadOnly));
    ASSERT_TRUE(read.ok());
    absl::StatusOr<Timeline> created = writer->CreateTimeline({.name = "frames"});
    ASSERT_TRUE(created.ok());
    std::optional<Timeline> frames = *std::move(created);
    absl::StatusOr<Mapping> map = written->Map();
    ASSERT_TRUE(map.ok());

    // BeginCpuAccess(kRead) on another thread, handed back once it sleeps
    // on its own timeline wake page: the owner's Signal wakes it directly.
    auto read_asleep = [&] {
      auto tid = std::make_shared<std::atomic<pid_t>>(0);
      auto reading = std::async(std::launch::async, [tid, &read] {
        *tid = ::gettid();
        return read->BeginCpuAccess(Cpu::kRead, absl::Seconds(20));
      });
      EXPECT_TRUE(::bufferd::testing::Eventually([&] {
        return *tid != 0 && SleepsInFutexOn(::getpid(), *tid, "bufferd-timeline-wake");
      })) << "the reader never slept on the timeline";
      return reading;
    };
    for (uint64_t point = 1; point <= 2; ++point) {
      ASSERT_TRUE(written->AttachPoint(*frames, point, v1::FENCE_USAGE_WRITE).ok());
      auto reading = read_asleep();
      std::memset(map->data(), static_cast<int>(point), map->size());
      ASSERT_TRUE(frames->Signal(point).ok());
      absl::StatusOr<std::vector<v1::FenceInfo>> waited = reading.get();
      ASSERT_TRUE(waited.ok()) << waited.status();
      ASSERT_EQ(waited->size(), 1u);
      EXPECT_EQ((*waited)[0].kind(), v1::FENCE_KIND_TIMELINE_POINT);
      EXPECT_EQ((*waited)[0].timeline_id(), frames->id());
      EXPECT_EQ((*waited)[0].timeline_point(), point);
      EXPECT_EQ((*waited)[0].state(), v1::FENCE_STATE_SIGNALED);
      EXPECT_EQ((*waited)[0].status(), v1::FENCE_STATUS_OK);
      absl::StatusOr<Mapping> seen = read->MapReadOnly();
      ASSERT_TRUE(seen.ok());
      const auto* bytes = static_cast<const uint8_t*>(seen->data());
      EXPECT_TRUE(std::all_of(bytes, bytes + seen->size(), [&](uint8_t b) { return b == point; }))
          << "the read began before the writer's data was there";
    }
    // The reader's library keeps the timeline for the buffer's next frames,
    // and no longer than the buffer: another buffer's reader, gone with its
    // buffer, leaves nothing of it behind.
    {
      absl::StatusOr<Timeline> other = writer->CreateTimeline({.name = "other"});
      ASSERT_TRUE(other.ok());
      absl::StatusOr<Buffer> second = writer->Allocate({.heap = "system", .size = 4096});
      ASSERT_TRUE(second.ok());
      absl::StatusOr<Buffer> second_read = reader->Import(*second->Export(Access::kReadOnly));
      ASSERT_TRUE(second_read.ok());
      ASSERT_TRUE(second->AttachPoint(*other, 1, v1::FENCE_USAGE_WRITE).ok());
      std::thread signal([&] {
        absl::SleepFor(absl::Milliseconds(200));
        ASSERT_TRUE(other->Signal(1).ok());
      });
      absl::StatusOr<std::vector<v1::FenceInfo>> waited =
          second_read->BeginCpuAccess(Cpu::kRead, absl::Seconds(20));
      signal.join();
      ASSERT_TRUE(waited.ok()) << waited.status();
      ASSERT_EQ(waited->size(), 1u);
      EXPECT_EQ((*waited)[0].timeline_id(), other->id());
      const uint64_t other_id = other->id();
      auto listed = [&] {
        absl::StatusOr<v1::ListFencesResponse> fences = client_->ListFences();
        if (!fences.ok()) return true;
        for (const v1::TimelineInfo& timeline : fences->timelines()) {
          if (timeline.timeline_id() == other_id) return true;
        }
        return false;
      };
      // The owner lets go: the reader's library still holds it, for the
      // buffer's next frame (it was kept, not used once)...
      other = absl::CancelledError("dropped");
      absl::SleepFor(absl::Milliseconds(200));
      EXPECT_TRUE(listed()) << "the reader did not keep the timeline it opened";
      // ...until the reader lets go of the buffer.
      second_read = absl::CancelledError("dropped");
      EXPECT_TRUE(::bufferd::testing::Eventually([&] { return !listed(); }))
          << "a timeline the reader opened through a buffer it dropped stayed alive";
    }
    // A failed point: its error and message, as the waiter sees it.
    ASSERT_TRUE(written->AttachPoint(*frames, 3, v1::FENCE_USAGE_WRITE).ok());
    {
      auto reading = read_asleep();
      ASSERT_TRUE(frames->Fail(3, "render failed").ok());
      absl::StatusOr<std::vector<v1::FenceInfo>> waited = reading.get();
      ASSERT_TRUE(waited.ok()) << waited.status();
      ASSERT_EQ(waited->size(), 1u);
      EXPECT_EQ((*waited)[0].status(), v1::FENCE_STATUS_ERROR);
      EXPECT_EQ((*waited)[0].message(), "render failed");
    }
    // The writer's session ends while the reader waits: OWNER_DIED.
    ASSERT_TRUE(written->AttachPoint(*frames, 4, v1::FENCE_USAGE_WRITE).ok());
    {
      auto reading = read_asleep();
      frames.reset();  // its drop record could end the timeline CANCELLED first
      written.reset();
      writer.reset();
      ASSERT_EQ(reading.wait_for(std::chrono::seconds(10)), std::future_status::ready);
      absl::StatusOr<std::vector<v1::FenceInfo>> waited = reading.get();
      ASSERT_TRUE(waited.ok()) << waited.status();
      ASSERT_EQ(waited->size(), 1u);
      EXPECT_TRUE((*waited)[0].status() == v1::FENCE_STATUS_OWNER_DIED ||
                  (*waited)[0].status() == v1::FENCE_STATUS_CANCELLED)
          << v1::FenceStatus_Name((*waited)[0].status());
    }
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, AReaderWaitingOnAFarPointEndsAtItsDeadline) {
  {
    absl::StatusOr<WriterAndReader> pair = NewWriterAndReader(4096);
    ASSERT_TRUE(pair.ok()) << pair.status();
    Buffer& buffer = pair->written;
    Buffer& read = pair->read;
    absl::StatusOr<Timeline> frames =
        pair->writer.CreateTimeline({.name = "frames", .deadline = absl::Milliseconds(300)});
    ASSERT_TRUE(frames.ok());
    // Point 2 while the timeline is at 0: not the next point, so its
    // deadline fails it for its waiters only — the reader, waiting on the
    // timeline itself, is one of them.
    ASSERT_TRUE(buffer.AttachPoint(*frames, 2, v1::FENCE_USAGE_WRITE).ok());
    const absl::Time start = absl::Now();
    absl::StatusOr<std::vector<v1::FenceInfo>> waited =
        read.BeginCpuAccess(Cpu::kRead, absl::Seconds(30));
    ASSERT_TRUE(waited.ok()) << waited.status();
    ASSERT_EQ(waited->size(), 1u);
    EXPECT_EQ((*waited)[0].status(), v1::FENCE_STATUS_DEADLINE_EXCEEDED);
    EXPECT_LT(absl::Now() - start, absl::Seconds(15))
        << "the reader slept past the point's deadline, to its own timeout";
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, AnOwnerReadingItsOwnPointStillEndsItsTimelineByDroppingIt) {
  {
    absl::StatusOr<Client> owner = Client::Connect(daemon_->socket_dir());
    ASSERT_TRUE(owner.ok());
    absl::StatusOr<Buffer> buffer = owner->Allocate({.heap = "system", .size = 4096});
    absl::StatusOr<Timeline> created = owner->CreateTimeline({.name = "frames"});
    ASSERT_TRUE(buffer.ok() && created.ok());
    std::optional<Timeline> frames = *std::move(created);
    ASSERT_TRUE(buffer->AttachPoint(*frames, 1, v1::FENCE_USAGE_WRITE).ok());
    // Its own timeline is not opened again through the buffer (that hold
    // would outlive its Timeline): the access waits on the page.
    absl::StatusOr<std::vector<v1::FenceInfo>> early =
        buffer->BeginCpuAccess(Cpu::kRead, absl::Milliseconds(50));
    EXPECT_EQ(early.status().code(), absl::StatusCode::kDeadlineExceeded) << early.status();
    frames.reset();  // the owner drops it: its pending points fail CANCELLED
    // Nothing holds the buffer back any more (the failed point is pruned,
    // or listed CANCELLED if the access asks before the daemon pruned it).
    absl::StatusOr<std::vector<v1::FenceInfo>> after =
        buffer->BeginCpuAccess(Cpu::kRead, absl::Seconds(20));
    ASSERT_TRUE(after.ok()) << after.status() << ": the timeline outlived its owner's Timeline";
    for (const v1::FenceInfo& info : *after) {
      EXPECT_EQ(info.status(), v1::FENCE_STATUS_CANCELLED);
    }
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, OnlyAHolderOfTheBufferOpensATimelineAttachedToIt) {
  {
    absl::StatusOr<Client> writer = Client::Connect(daemon_->socket_dir());
    ASSERT_TRUE(writer.ok());
    absl::StatusOr<Buffer> buffer = writer->Allocate({.heap = "system", .size = 65536});
    absl::StatusOr<Buffer> other = writer->Allocate({.heap = "system", .size = 65536});
    absl::StatusOr<Timeline> frames = writer->CreateTimeline({.name = "frames"});
    ASSERT_TRUE(buffer.ok() && other.ok() && frames.ok());
    ASSERT_TRUE(buffer->AttachPoint(*frames, 1, v1::FENCE_USAGE_WRITE).ok());

    absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok());
    auto stub = FenceStub(daemon_->socket_dir());
    // The session's timeline wait page, as the library uploads it: the
    // first import takes it, whatever comes of the rest of that call.
    UniqueFd waits(::memfd_create("waits", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    ASSERT_EQ(::ftruncate(waits.get(), 4096), 0);
    ASSERT_EQ(::fcntl(waits.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
    v1::FdChannelMessage upload;
    upload.mutable_upload()->set_upload_id(1);
    const int wait_fds[] = {waits.get()};
    ASSERT_TRUE(raw->socket.Send(upload.SerializeAsString(), wait_fds).ok());
    bool page_sent = false;
    auto import_by = [&](uint64_t handle, uint64_t timeline, const std::string& token = "") {
      v1::ImportTimelineRequest request;
      request.set_buffer_handle(handle);
      request.set_timeline_id(timeline);
      request.set_token(token);
      if (!std::exchange(page_sent, true)) request.set_wait_page_upload_id(1);
      v1::ImportTimelineResponse response;
      auto context = raw->Context();
      context->AddMetadata(kRecordsMetadataKey, "1");
      return stub->ImportTimeline(context.get(), request, &response);
    };
    // The writer's own handle: not this session's.
    grpc::Status status = import_by(buffer->handle(), frames->id());
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
    // A handle of its own, on a buffer with no point of that timeline.
    auto import_buffer = [&](const Buffer& of) { return ImportReadOnly(*raw, of); };
    const uint64_t unrelated = import_buffer(*other);
    status = import_by(unrelated, frames->id());
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(status.error_message(),
              absl::StrCat("timeline ", frames->id(),
                           " has no pending point attached to buffer handle ", unrelated));
    const uint64_t held = import_buffer(*buffer);
    status = import_by(held, frames->id() + 1000);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << "another timeline";
    status = import_by(held, 0);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("go together"));
    status = import_by(0, frames->id());
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    status = import_by(held, frames->id(), "00112233445566778899aabbccddeeff");
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("not both"));
    // Once the point is reached it is pruned: nothing is attached any more.
    ASSERT_TRUE(frames->Signal(1).ok());
    EXPECT_TRUE(::bufferd::testing::Eventually(
        [&] { return import_by(held, frames->id()).error_code() == grpc::StatusCode::NOT_FOUND; }));
    // With a point attached, the holder opens it: to wait and query only.
    ASSERT_TRUE(buffer->AttachPoint(*frames, 2, v1::FENCE_USAGE_WRITE).ok());
    status = import_by(held, frames->id());
    ASSERT_TRUE(status.ok()) << status.error_message();
    {
      v1::ExportTimelineRequest request;
      request.set_timeline_id(frames->id());
      v1::ExportTimelineResponse response;
      status = stub->ExportTimeline(raw->Context().get(), request, &response);
      EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << "share it on";
      EXPECT_THAT(status.error_message(), HasSubstr("opened through a buffer"));
    }
    {
      v1::ExportPointRequest request;
      request.set_timeline_id(frames->id());
      request.set_point(5);
      v1::ExportPointResponse response;
      status = stub->ExportPoint(raw->Context().get(), request, &response);
      EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << "a far point";
      EXPECT_THAT(status.error_message(), HasSubstr("cannot export or attach its points"));
    }
    {
      v1::AttachFenceRequest request;
      request.set_buffer_handle(held);
      request.set_timeline_id(frames->id());
      request.set_point(3);
      request.set_usage(v1::FENCE_USAGE_READ);
      v1::AttachFenceResponse response;
      status = stub->AttachFence(raw->Context().get(), request, &response);
      EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << "attach its points";
    }
    ASSERT_TRUE(frames->Signal(2).ok());
  }
  ExpectBaseline();
}

// Tests one-wake implicit sync for one-shot fences: the writer's library
// uploads its fence page with its first fence, a reader of the buffer sleeps
// on the fence's word there (beside its status slot), and the writer's
// one-way Signal wakes it with the daemon stopped (SIGSTOP): no daemon in
// between. Each frame's data is what the reader sees.
TEST_F(ReservationTest, AOneShotFenceWakesItsReaderWithoutTheDaemon) {
  if (!have_syscall_file_)
    GTEST_SKIP() << "no /proc/<pid>/task/<tid>/syscall to see a waiter sleep";
  {
    absl::StatusOr<WriterAndReader> pair = NewWriterAndReader(65536);
    ASSERT_TRUE(pair.ok()) << pair.status();
    Client& writer = pair->writer;
    Buffer& written = pair->written;
    Buffer& read = pair->read;
    absl::StatusOr<Mapping> map = written.Map();
    ASSERT_TRUE(map.ok());
    for (int frame = 1; frame <= 3; ++frame) {
      absl::StatusOr<Fence> done = writer.CreateFence({.name = "frame done"});
      ASSERT_TRUE(done.ok()) << done.status();
      EXPECT_NE(done->info().page_slot(), 0u) << "the writer's fence has a word of its page";
      ASSERT_TRUE(written.AttachFence(*done, v1::FENCE_USAGE_WRITE).ok());
      auto tid = std::make_shared<std::atomic<pid_t>>(0);
      auto reading = std::async(std::launch::async, [tid, &read] {
        *tid = ::gettid();
        return read.BeginCpuAccess(Cpu::kRead, absl::Seconds(30));
      });
      ASSERT_TRUE(::bufferd::testing::Eventually([&] {
        return *tid != 0 && SleepsInFutexOn(::getpid(), *tid, "bufferd-fence-page");
      })) << "the reader never slept on the writer's fence page";
      std::memset(map->data(), frame, map->size());
      ASSERT_EQ(::kill(daemon_->pid(), SIGSTOP), 0);
      const absl::Status signalled = done->Signal();
      const std::future_status woke = reading.wait_for(std::chrono::seconds(20));
      ASSERT_EQ(::kill(daemon_->pid(), SIGCONT), 0);
      ASSERT_TRUE(signalled.ok()) << signalled;
      ASSERT_EQ(woke, std::future_status::ready) << "the reader waited for the stopped daemon";
      absl::StatusOr<std::vector<v1::FenceInfo>> waited = reading.get();
      ASSERT_TRUE(waited.ok()) << waited.status();
      ASSERT_EQ(waited->size(), 1u);
      EXPECT_EQ((*waited)[0].fence_id(), done->id());
      EXPECT_EQ((*waited)[0].state(), v1::FENCE_STATE_SIGNALED);
      EXPECT_EQ((*waited)[0].status(), v1::FENCE_STATUS_OK);
      absl::StatusOr<Mapping> seen = read.MapReadOnly();
      ASSERT_TRUE(seen.ok());
      const auto* bytes = static_cast<const uint8_t*>(seen->data());
      EXPECT_TRUE(std::all_of(bytes, bytes + seen->size(), [&](uint8_t b) { return b == frame; }))
          << "frame " << frame;
      ASSERT_TRUE(read.EndCpuAccess().ok());
    }
  }
  ExpectBaseline();
}

// Tests that an OK Signal wakes its fence's word (FUTEX_WAKE: a page lookup
// in the kernel, 1-2 us) only when the fence was attached to a buffer
// through that Fence, the one way its process knows someone may sleep on
// the word: otherwise telling the daemon (the doorbell's close) is the
// signal's one syscall. A fence another session attached still reaches the
// reader sleeping on its word, through the daemon.
TEST_F(ReservationTest, AnOkSignalWakesItsWordOnlyWhenAttachedThroughIt) {
  {
    absl::StatusOr<WriterAndReader> pair = NewWriterAndReader(65536);
    ASSERT_TRUE(pair.ok()) << pair.status();
    Client& writer = pair->writer;
    absl::StatusOr<Fence> first = writer.CreateFence({.name = "first"});
    ASSERT_TRUE(first.ok()) << first.status();
    std::string why;
    UniqueFd counter = ::bufferd::testing::SyscallCounter(why);
    if (counter.valid()) {
      // The fewest of three each: a stray syscall (malloc growing) is not
      // the signal's.
      long alone_calls = 1000, attached_calls = 1000;
      for (int i = 0; i < 3; ++i) {
        absl::StatusOr<Fence> alone = writer.CreateFence({.name = "alone"});
        absl::StatusOr<Fence> attached = writer.CreateFence({.name = "attached"});
        ASSERT_TRUE(alone.ok() && attached.ok());
        ASSERT_NE(alone->info().page_slot(), 0u);
        ASSERT_TRUE(pair->written.AttachFence(*attached, v1::FENCE_USAGE_WRITE).ok());
        alone_calls = std::min(alone_calls, ::bufferd::testing::CountSyscalls(counter.get(), [&] {
                                 EXPECT_TRUE(alone->Signal().ok());
                               }));
        attached_calls = std::min(
            attached_calls, ::bufferd::testing::CountSyscalls(
                                counter.get(), [&] { EXPECT_TRUE(attached->Signal().ok()); }));
      }
      EXPECT_EQ(alone_calls, 1) << "a fence nobody attached here: its doorbell's close alone";
      EXPECT_EQ(attached_calls, 2) << "a fence attached here: FUTEX_WAKE, then its doorbell";
    } else {
      std::printf("(syscall counts not checked: %s)\n", why.c_str());
    }
    if (have_syscall_file_) {
      // A third session holding the buffer read-write attaches the writer's
      // fence, imported from its fd.
      absl::StatusOr<Client> third = Client::Connect(daemon_->socket_dir());
      ASSERT_TRUE(third.ok()) << third.status();
      absl::StatusOr<Buffer> shared = third->Import(*pair->written.Export(Access::kReadWrite));
      ASSERT_TRUE(shared.ok()) << shared.status();
      absl::StatusOr<Fence> done = writer.CreateFence({.name = "frame done"});
      ASSERT_TRUE(done.ok()) << done.status();
      absl::StatusOr<UniqueFd> fd = done->ExportFd();
      ASSERT_TRUE(fd.ok()) << fd.status();
      absl::StatusOr<Fence> imported = third->ImportSyncFd(fd->get());
      ASSERT_TRUE(imported.ok()) << imported.status();
      ASSERT_EQ(imported->id(), done->id());
      ASSERT_TRUE(shared->AttachFence(*imported, v1::FENCE_USAGE_WRITE).ok());
      auto tid = std::make_shared<std::atomic<pid_t>>(0);
      const Buffer& read = pair->read;
      auto reading = std::async(std::launch::async, [tid, &read] {
        *tid = ::gettid();
        return read.BeginCpuAccess(Cpu::kRead, absl::Seconds(30));
      });
      ASSERT_TRUE(::bufferd::testing::Eventually([&] {
        return *tid != 0 && SleepsInFutexOn(::getpid(), *tid, "bufferd-fence-page");
      })) << "the reader never slept on the writer's fence page";
      ASSERT_TRUE(done->Signal().ok());
      ASSERT_EQ(reading.wait_for(std::chrono::seconds(20)), std::future_status::ready)
          << "the reader never woke";
      absl::StatusOr<std::vector<v1::FenceInfo>> waited = reading.get();
      ASSERT_TRUE(waited.ok()) << waited.status();
      ASSERT_EQ(waited->size(), 1u);
      EXPECT_EQ((*waited)[0].fence_id(), done->id());
      EXPECT_EQ((*waited)[0].status(), v1::FENCE_STATUS_OK);
      ASSERT_TRUE(read.EndCpuAccess().ok());
    }
  }
  ExpectBaseline();
}

// The writable mapping of the page holding `fence`'s word in this process
// (its owner's library maps it: "bufferd-fence-page", rw, shared), or null.
uint32_t* OwnersWordOf(const Fence& fence) {
  std::ifstream maps("/proc/self/maps");
  uint32_t* found = nullptr;
  for (std::string line; std::getline(maps, line);) {
    if (line.find("bufferd-fence-page") == std::string::npos) continue;
    unsigned long begin = 0;
    char perms[5] = {};
    if (std::sscanf(line.c_str(), "%lx-%*x %4s", &begin, perms) != 2) continue;
    if (std::string(perms) != "rw-s") continue;
    auto* word = reinterpret_cast<uint32_t*>(begin) + fence.info().page_slot();
    if (*word == fence.info().page_generation() << 8) {
      if (found != nullptr) return nullptr;  // ambiguous
      found = word;
    }
  }
  return found;
}

// Tests a hostile owner that wakes its fence's word at will (100,000 times
// as it stands, then 100,000 times flipping it) without signalling: the
// reader stops sleeping on that word after 64 wakes that brought nothing and
// waits for the daemon through its slot, so its CPU time stays that of a
// few wakes, and the owner's real signal still reaches it.
TEST_F(ReservationTest, AnOwnerFlippingItsWordCannotKeepTheReaderBusy) {
  {
    absl::StatusOr<WriterAndReader> pair = NewWriterAndReader(65536);
    ASSERT_TRUE(pair.ok()) << pair.status();
    Client& writer = pair->writer;
    Buffer& written = pair->written;
    Buffer& read = pair->read;
    absl::StatusOr<Fence> done = writer.CreateFence({.name = "frame done"});
    ASSERT_TRUE(done.ok()) << done.status();
    ASSERT_NE(done->info().page_slot(), 0u);
    ASSERT_TRUE(written.AttachFence(*done, v1::FENCE_USAGE_WRITE).ok());
    uint32_t* word = OwnersWordOf(*done);
    ASSERT_NE(word, nullptr) << "the writer's page is not mapped here";
    const uint32_t pending = *word;
    auto tid = std::make_shared<std::atomic<pid_t>>(0);
    auto reading = std::async(std::launch::async, [tid, &read] {
      *tid = ::gettid();
      timespec before{}, after{};
      ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &before);
      auto waited = read.BeginCpuAccess(Cpu::kRead, absl::Seconds(60));
      ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &after);
      const double cpu_s = (after.tv_sec - before.tv_sec) + (after.tv_nsec - before.tv_nsec) / 1e9;
      return std::make_pair(std::move(waited), cpu_s);
    });
    ASSERT_TRUE(::bufferd::testing::Eventually([&] {
      return *tid != 0 && SleepsInFutexOn(::getpid(), *tid, "bufferd-fence-page");
    })) << "the reader never slept on the writer's fence page";
    // 100,000 wakes of the word as it is, then 100,000 flips, each woken:
    // pending, then "generation + 1, OK", and back (never this fence's OK).
    constexpr int kFlips = 200'000;
    for (int i = 0; i < kFlips; ++i) {
      if (i >= kFlips / 2) {
        std::atomic_ref<uint32_t>(*word).store(i % 2 == 0 ? pending + (1u << 8) + 1 : pending);
      }
      ::syscall(SYS_futex, word, FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
    }
    std::atomic_ref<uint32_t>(*word).store(pending);
    EXPECT_EQ(reading.wait_for(std::chrono::milliseconds(100)), std::future_status::timeout)
        << "the flips ended the wait";
    ASSERT_TRUE(done->Signal().ok());
    ASSERT_EQ(reading.wait_for(std::chrono::seconds(30)), std::future_status::ready);
    auto [waited, cpu_s] = reading.get();
    ASSERT_TRUE(waited.ok()) << waited.status();
    ASSERT_EQ(waited->size(), 1u);
    EXPECT_EQ((*waited)[0].status(), v1::FENCE_STATUS_OK);
    std::printf("the reader spent %.4f s of CPU over %d wakes\n", cpu_s, kFlips);
    // Woken by every one it would spend far more (each wake and look costs
    // microseconds: 0.15 s measured for 200,000 flips).
    EXPECT_LT(cpu_s, 0.05) << "the reader spent " << cpu_s << " s of CPU on " << kFlips << " wakes";
    ASSERT_TRUE(read.EndCpuAccess().ok());
  }
  ExpectBaseline();
}

// Tests what a fence page gives a reader, as a hostile one would try it: only
// a session holding a buffer the fence is pending on opens it (NOT_FOUND
// otherwise, PERMISSION_DENIED for another session's handle), and its copy
// is read-only for good: no writable mapping, not even reopened read-write
// through /proc, and no write(2). An error the owner signals reaches the
// reader with its message (through the daemon).
TEST_F(ReservationTest, AFencePageIsOpenedThroughTheBufferAndReadOnly) {
  {
    absl::StatusOr<Client> writer = Client::Connect(daemon_->socket_dir());
    ASSERT_TRUE(writer.ok());
    absl::StatusOr<Buffer> buffer = writer->Allocate({.heap = "system", .size = 65536});
    absl::StatusOr<Buffer> other = writer->Allocate({.heap = "system", .size = 65536});
    absl::StatusOr<Fence> done = writer->CreateFence({.name = "frame done"});
    ASSERT_TRUE(buffer.ok() && other.ok() && done.ok());
    ASSERT_NE(done->info().page_slot(), 0u);
    ASSERT_TRUE(buffer->AttachFence(*done, v1::FENCE_USAGE_WRITE).ok());

    absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok());
    auto stub = FenceStub(daemon_->socket_dir());
    auto open_page = [&](uint64_t handle, uint64_t fence, v1::OpenFencePageResponse* response) {
      v1::OpenFencePageRequest request;
      request.set_buffer_handle(handle);
      request.set_fence_id(fence);
      return stub->OpenFencePage(raw->Context().get(), request, response);
    };
    auto import_buffer = [&](const Buffer& of) { return ImportReadOnly(*raw, of); };
    v1::OpenFencePageResponse response;
    grpc::Status status = open_page(buffer->handle(), done->id(), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
    const uint64_t unrelated = import_buffer(*other);
    status = open_page(unrelated, done->id(), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(status.error_message(),
              absl::StrCat("fence ", done->id(), " is not pending on buffer handle ", unrelated));
    const uint64_t held = import_buffer(*buffer);
    status = open_page(held, done->id() + 1000, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << "another fence";
    status = open_page(held, done->id(), &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.owner_session(), writer->session_id());
    // The page comes on fd.sock, after the two buffers' fds.
    UniqueFd page;
    for (int i = 0; i < 3 && !page.valid(); ++i) {
      absl::StatusOr<UnixSocket::Received> got = raw->socket.RecvWithFds();
      ASSERT_TRUE(got.ok() && !got->eof);
      v1::FdChannelMessage message;
      ASSERT_TRUE(message.ParseFromString(got->bytes));
      if (message.delivery().transfer_id() == response.transfer_id()) {
        ASSERT_EQ(got->fds.size(), 1u);
        EXPECT_EQ(message.delivery().kind(), v1::FD_KIND_FENCE_PAGE);
        page = std::move(got->fds[0]);
      }
    }
    ASSERT_TRUE(page.valid());
    EXPECT_EQ(::fcntl(page.get(), F_GETFL) & O_ACCMODE, O_RDONLY);
    EXPECT_EQ(::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, page.get(), 0), MAP_FAILED);
    UniqueFd reopened(::open(absl::StrCat("/proc/self/fd/", page.get()).c_str(), O_RDWR));
    if (reopened.valid()) {
      EXPECT_EQ(::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, reopened.get(), 0),
                MAP_FAILED)
          << "sealed against writable mappings";
      const uint32_t word = 0xffffffff;
      EXPECT_EQ(::pwrite(reopened.get(), &word, sizeof(word), 4 * done->info().page_slot()), -1);
    }
    const auto* words =
        static_cast<const uint32_t*>(::mmap(nullptr, 4096, PROT_READ, MAP_SHARED, page.get(), 0));
    ASSERT_NE(words, MAP_FAILED);
    EXPECT_EQ(words[done->info().page_slot()], done->info().page_generation() << 8) << "pending";
    // The owner's signal wakes whoever sleeps on the word: here one plain
    // FUTEX_WAIT of 30 s (no time slices), which only a wake ends early.
    const uint32_t* word = &words[done->info().page_slot()];
    auto sleeper_tid = std::make_shared<std::atomic<pid_t>>(0);
    auto sleeper = std::async(std::launch::async, [word, sleeper_tid] {
      *sleeper_tid = ::gettid();
      const timespec thirty{30, 0};
      return ::syscall(SYS_futex, word, FUTEX_WAIT, *word, &thirty, nullptr, 0);
    });
    if (have_syscall_file_) {
      ASSERT_TRUE(::bufferd::testing::Eventually([&] {
        return *sleeper_tid != 0 && SleepsInFutexOn(::getpid(), *sleeper_tid, "bufferd-fence-page");
      }));
    }
    ASSERT_TRUE(done->Signal(v1::FENCE_STATUS_ERROR, "the GPU hung").ok());
    if (have_syscall_file_) {
      EXPECT_EQ(sleeper.get(), 0) << "woken by the signal, not timed out";
    }
    EXPECT_EQ(words[done->info().page_slot()],
              (done->info().page_generation() << 8) | v1::FENCE_STATUS_ERROR);
    ::munmap(const_cast<uint32_t*>(words), 4096);

    // A reader of the error learns it, message and all, from the daemon.
    absl::StatusOr<Client> reader = Client::Connect(daemon_->socket_dir());
    ASSERT_TRUE(reader.ok());
    absl::StatusOr<Buffer> read = reader->Import(*buffer->Export(Access::kReadOnly));
    ASSERT_TRUE(read.ok());
    absl::StatusOr<Fence> next = writer->CreateFence({.name = "next"});
    ASSERT_TRUE(next.ok() && buffer->AttachFence(*next, v1::FENCE_USAGE_WRITE).ok());
    auto reading = std::async(std::launch::async,
                              [&] { return read->BeginCpuAccess(Cpu::kRead, absl::Seconds(30)); });
    absl::SleepFor(absl::Milliseconds(50));
    ASSERT_TRUE(next->Signal(v1::FENCE_STATUS_ERROR, "dropped frame").ok());
    absl::StatusOr<std::vector<v1::FenceInfo>> waited = reading.get();
    ASSERT_TRUE(waited.ok()) << waited.status();
    ASSERT_EQ(waited->size(), 1u);
    EXPECT_EQ((*waited)[0].status(), v1::FENCE_STATUS_ERROR) << "the failure is reported";
    EXPECT_EQ((*waited)[0].message(), "dropped frame");
  }
  ExpectBaseline();
}

TEST_F(ReservationTest, BadAttachesGetNamedErrors) {
  daemon_.reset();
  StartDaemon(R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM }
                 limits { max_fences_per_buffer: 2 })pb");
  {
    Buffer buffer = NewBuffer();
    absl::StatusOr<Fence> fence = client_->CreateFence();
    ASSERT_TRUE(fence.ok());
    absl::Status status = buffer.AttachFence(*fence, v1::FENCE_USAGE_UNSPECIFIED);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(status.message(), HasSubstr("KERNEL, WRITE, READ or BOOKKEEP"));

    // A read-only holder cannot pretend to write.
    absl::StatusOr<Client> other = Client::Connect(daemon_->socket_dir());
    ASSERT_TRUE(other.ok());
    absl::StatusOr<Buffer> reader = other->Import(*buffer.Export(Access::kReadOnly));
    ASSERT_TRUE(reader.ok());
    absl::StatusOr<Fence> theirs = other->CreateFence();
    ASSERT_TRUE(theirs.ok());
    for (v1::FenceUsage usage : {v1::FENCE_USAGE_WRITE, v1::FENCE_USAGE_KERNEL}) {
      status = reader->AttachFence(*theirs, usage);
      EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied) << status;
      EXPECT_THAT(status.message(), HasSubstr("read-only"));
    }
    EXPECT_TRUE(reader->AttachFence(*theirs, v1::FENCE_USAGE_READ).ok());
    // One session gets a quarter of the readers' side (here 1): no one
    // importer shuts the other readers out.
    {
      absl::StatusOr<Fence> more = other->CreateFence();
      ASSERT_TRUE(more.ok());
      status = reader->AttachFence(*more, v1::FENCE_USAGE_BOOKKEEP);
      EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted) << status;
      EXPECT_THAT(status.message(), HasSubstr("its share"));
      absl::StatusOr<Fence> mine = client_->CreateFence();
      ASSERT_TRUE(mine.ok());
      EXPECT_TRUE(buffer.AttachFence(*mine, v1::FENCE_USAGE_READ).ok()) << "another reader's place";
      ASSERT_TRUE(mine->SignalAndConfirm().ok());
    }
    // Another Client's fence, through the library.
    status = buffer.AttachFence(*theirs, v1::FENCE_USAGE_READ);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);

    // Below the library: another session's handles (PERMISSION_DENIED, as
    // for every call on a handle), a request naming no fence.
    absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok());
    auto stub = FenceStub(daemon_->socket_dir());
    v1::AttachFenceRequest request;
    request.set_buffer_handle(buffer.handle());
    request.set_fence_id(fence->id());
    request.set_usage(v1::FENCE_USAGE_READ);
    v1::AttachFenceResponse response;
    grpc::Status raw_status = stub->AttachFence(raw->Context().get(), request, &response);
    EXPECT_EQ(raw_status.error_code(), grpc::StatusCode::PERMISSION_DENIED)
        << raw_status.error_message();
    request.set_buffer_handle(reader->handle());
    raw_status = stub->AttachFence(raw->Context().get(), request, &response);
    EXPECT_EQ(raw_status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    request.set_buffer_handle(123456);
    raw_status = stub->AttachFence(raw->Context().get(), request, &response);
    EXPECT_EQ(raw_status.error_code(), grpc::StatusCode::NOT_FOUND) << "an unknown handle";
    // On a handle of its own: a fence it does not hold (another session's,
    // or none at all), and its handle once released.
    {
      v1::ImportRequest import;
      import.set_token(*buffer.Export(Access::kReadWrite));
      v1::ImportResponse imported;
      ASSERT_TRUE(NewAllocatorStub(daemon_->socket_dir())
                      ->Import(raw->Context().get(), import, &imported)
                      .ok());
      request.set_buffer_handle(imported.handle());
      for (uint64_t foreign : {fence->id(), uint64_t{999999}}) {
        request.set_fence_id(foreign);
        raw_status = stub->AttachFence(raw->Context().get(), request, &response);
        EXPECT_EQ(raw_status.error_code(), grpc::StatusCode::NOT_FOUND) << foreign;
        EXPECT_EQ(raw_status.error_message(), absl::StrCat("fence ", foreign, " not found"));
      }
      v1::ReleaseRequest release;
      release.set_handle(imported.handle());
      v1::ReleaseResponse released;
      ASSERT_TRUE(NewAllocatorStub(daemon_->socket_dir())
                      ->Release(raw->Context().get(), release, &released)
                      .ok());
      raw_status = stub->AttachFence(raw->Context().get(), request, &response);
      EXPECT_EQ(raw_status.error_code(), grpc::StatusCode::NOT_FOUND);
      EXPECT_THAT(raw_status.error_message(), HasSubstr("already released"));
    }
    // A refused subscription leaves nothing behind: the page comes with the
    // first one that is answered.
    {
      v1::ImportRequest import;
      import.set_token(*buffer.Export(Access::kReadOnly));
      v1::ImportResponse imported;
      ASSERT_TRUE(NewAllocatorStub(daemon_->socket_dir())
                      ->Import(raw->Context().get(), import, &imported)
                      .ok());
      v1::GetBufferFencesRequest subscribe;
      subscribe.set_buffer_handle(imported.handle());
      subscribe.set_subscribe(true);
      subscribe.set_failures_since(UINT32_MAX);
      v1::GetBufferFencesResponse answer;
      for (int access : {0, 1, 5, -1}) {
        subscribe.set_for_access(static_cast<v1::FenceUsage>(access));
        raw_status = stub->GetBufferFences(raw->Context().get(), subscribe, &answer);
        EXPECT_EQ(raw_status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << access;
        EXPECT_THAT(raw_status.error_message(), HasSubstr("is not an access"));
      }
      subscribe.set_for_access(v1::FENCE_USAGE_READ);
      subscribe.set_as_fd(true);
      raw_status = stub->GetBufferFences(raw->Context().get(), subscribe, &answer);
      EXPECT_EQ(raw_status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
      EXPECT_THAT(raw_status.error_message(), HasSubstr("one or the other"));
      subscribe.set_as_fd(false);
      ASSERT_TRUE(stub->GetBufferFences(raw->Context().get(), subscribe, &answer).ok());
      EXPECT_NE(answer.status_page_transfer_id(), 0u);
      EXPECT_NE(answer.status_slot(), 0u);
      EXPECT_EQ(answer.failed_size(), 0) << "failures_since past every failure";
    }
    request.set_buffer_handle(buffer.handle());
    request.set_fence_id(0);
    request.set_timeline_id(0);
    raw_status = stub->AttachFence(raw->Context().get(), request, &response);
    EXPECT_EQ(raw_status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(raw_status.error_message(), HasSubstr("exactly one of fence_id and timeline_id"));
    v1::GetBufferFencesRequest get;
    get.set_buffer_handle(buffer.handle());
    get.set_for_access(v1::FENCE_USAGE_READ);
    v1::GetBufferFencesResponse got;
    EXPECT_EQ(stub->GetBufferFences(raw->Context().get(), get, &got).error_code(),
              grpc::StatusCode::PERMISSION_DENIED)
        << "nobody sees the fences of a buffer it holds no handle on";

    // The per-buffer limit counts distinct unsignalled fences on each side
    // (the reader's READ fence is on the readers' side: it takes no place
    // from the writer).
    absl::StatusOr<Fence> second = client_->CreateFence();
    absl::StatusOr<Fence> third = client_->CreateFence();
    absl::StatusOr<Fence> fourth = client_->CreateFence();
    ASSERT_TRUE(second.ok() && third.ok() && fourth.ok());
    ASSERT_TRUE(buffer.AttachFence(*second, v1::FENCE_USAGE_WRITE).ok());
    ASSERT_TRUE(buffer.AttachFence(*third, v1::FENCE_USAGE_WRITE).ok());
    ASSERT_TRUE(buffer.AttachFence(*third, v1::FENCE_USAGE_KERNEL).ok()) << "counted once";
    status = buffer.AttachFence(*fourth, v1::FENCE_USAGE_WRITE);
    EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted) << status;
    EXPECT_THAT(status.message(), HasSubstr("2 unsignalled KERNEL/WRITE fences attached, the "
                                            "limit (max_fences_per_buffer 2)"));
    ASSERT_TRUE(second->SignalAndConfirm().ok());
    EXPECT_TRUE(buffer.AttachFence(*fourth, v1::FENCE_USAGE_WRITE).ok())
        << "a signalled fence frees its place";
    ASSERT_TRUE(theirs->SignalAndConfirm().ok());

    for (Fence* done : {&*fence, &*third, &*fourth}) ASSERT_TRUE(done->Signal().ok());
  }
  ExpectBaseline();
}

}  // namespace
}  // namespace bufferd
