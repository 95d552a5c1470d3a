// Timelines through a real daemon and the real client library: signal, wait,
// query and fail across sessions and processes; deadlines of points waited
// on before they were signalled; the owner's death; what an importer can and
// cannot do to the shared pages; hostile pages, limits and bad input.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/protocol.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "bufferd/v1/fence.grpc.pb.h"
#include "client/client.h"
#include "fences/timeline_shm.h"
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


class TimelineTest : public DaemonTest {
 protected:
  void SetUp() override { StartDaemon(); }
  // A second and third session in this process (client_ is the first).
  Client Connect() {
    absl::StatusOr<Client> client = Client::Connect(daemon_->socket_dir());
    EXPECT_TRUE(client.ok()) << client.status();
    return *std::move(client);
  }
  // An owner session with a new timeline, and a waiter session that
  // imported it.
  struct Pair {
    Client owner;
    Client waiter;
    std::optional<Timeline> produced;
    std::optional<Timeline> seen;
  };
  Pair NewPair(const TimelineOptions& options = {}) {
    Client owner = Connect();
    Client waiter = Connect();
    absl::StatusOr<Timeline> produced = owner.CreateTimeline(options);
    EXPECT_TRUE(produced.ok()) << produced.status();
    absl::StatusOr<Timeline> seen = waiter.ImportTimeline(*produced->Export());
    EXPECT_TRUE(seen.ok()) << seen.status();
    std::optional<Timeline> made, imported;
    if (produced.ok()) made.emplace(*std::move(produced));
    if (seen.ok()) imported.emplace(*std::move(seen));
    return {std::move(owner), std::move(waiter), std::move(made), std::move(imported)};
  }
  size_t KnownTimelines() {
    auto fences = client_->ListFences();
    return fences.ok() ? static_cast<size_t>(fences->timelines_size()) : ~size_t{0};
  }
};

TEST_F(TimelineTest, SignalWaitQueryAndFailAcrossSessions) {
  {
    Client owner = Connect();
    Client waiter = Connect();
    absl::StatusOr<Timeline> produced = owner.CreateTimeline({.name = "frames"});
    ASSERT_TRUE(produced.ok()) << produced.status();
    EXPECT_TRUE(produced->owned());
    EXPECT_EQ(produced->info().name(), "frames");
    EXPECT_EQ(produced->info().deadline_ms(), 10000u) << "the default fence deadline";
    absl::StatusOr<std::string> token = produced->Export();
    ASSERT_TRUE(token.ok()) << token.status();
    absl::StatusOr<Timeline> seen = waiter.ImportTimeline(*token);
    ASSERT_TRUE(seen.ok()) << seen.status();
    EXPECT_FALSE(seen->owned());
    EXPECT_EQ(seen->id(), produced->id());
    EXPECT_EQ(seen->Query(), 0u);

    // Point 0 is reached from the start; point 1 is not yet.
    absl::StatusOr<PointResult> zero = seen->Wait(0, absl::ZeroDuration());
    ASSERT_TRUE(zero.ok());
    EXPECT_EQ(zero->status, v1::FENCE_STATUS_OK);
    absl::Status polled = seen->Wait(1, absl::ZeroDuration()).status();
    EXPECT_EQ(polled.code(), absl::StatusCode::kDeadlineExceeded);
    EXPECT_THAT(polled.message(), HasSubstr("not reached yet (polled)"));
    // A timeout that ran out asleep names the point and the timeout too.
    absl::Status timed = seen->Wait(1, absl::Milliseconds(30)).status();
    EXPECT_EQ(timed.code(), absl::StatusCode::kDeadlineExceeded);
    EXPECT_EQ(timed.message(),
              absl::StrCat("point 1 of timeline ", seen->id(), " not reached within 30ms"));

    // A waiter blocked in another thread wakes on the signal (blocked: the
    // daemon has seen its wait).
    std::thread blocked([&] {
      absl::StatusOr<PointResult> two = seen->Wait(2, absl::Seconds(20));
      ASSERT_TRUE(two.ok()) << two.status();
      EXPECT_EQ(two->status, v1::FENCE_STATUS_OK);
      EXPECT_GE(seen->Query(), 2u);
    });
    EXPECT_TRUE(Eventually([&] { return produced->WaitedOn().point == 2; }));
    ASSERT_TRUE(produced->Signal(1).ok());
    ASSERT_TRUE(produced->Signal(2).ok());
    blocked.join();
    EXPECT_EQ(seen->Query(), 2u);
    EXPECT_EQ(produced->Query(), 2u);

    // An error fails every point since the last signal, with the message.
    ASSERT_TRUE(produced->Fail(5, "render failed").ok());
    for (uint64_t point : {3, 4, 5}) {
      absl::StatusOr<PointResult> failed = seen->Wait(point, absl::ZeroDuration());
      ASSERT_TRUE(failed.ok());
      EXPECT_EQ(failed->status, v1::FENCE_STATUS_ERROR) << point;
      EXPECT_EQ(failed->message, "render failed");
    }
    EXPECT_EQ(seen->Wait(2, absl::ZeroDuration())->status, v1::FENCE_STATUS_OK);
    // The timeline goes on.
    ASSERT_TRUE(produced->Signal(6).ok());
    EXPECT_EQ(seen->Wait(6, absl::ZeroDuration())->status, v1::FENCE_STATUS_OK);

    // Several points at once: any, then all.
    const TimelinePoint points[] = {{&*seen, 6}, {&*seen, 7}};
    absl::StatusOr<std::vector<PointResult>> any =
        waiter.WaitTimelines(points, false, absl::ZeroDuration());
    ASSERT_TRUE(any.ok()) << any.status();
    EXPECT_EQ((*any)[0].status, v1::FENCE_STATUS_OK);
    EXPECT_EQ((*any)[1].status, v1::FENCE_STATUS_UNSPECIFIED);
    EXPECT_EQ(waiter.WaitTimelines(points, true, absl::Milliseconds(20)).status().code(),
              absl::StatusCode::kDeadlineExceeded);

    // The daemon's view.
    absl::StatusOr<v1::TimelineInfo> info = seen->Info();
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->reached(), 6u);
    EXPECT_EQ(info->holders(), 2u);
    EXPECT_EQ(info->owner_session(), owner.session_id());
    EXPECT_EQ(info->owner_pid(), static_cast<uint32_t>(::getpid()));
    EXPECT_EQ(KnownTimelines(), 1u);
  }
  EXPECT_TRUE(Eventually([&] { return KnownTimelines() == 0; }));
  ExpectBaseline();
}

// Tests the ping-pong a producer and a consumer run, with the owner on one
// CPU and the waiter on another, so that a Wait spins before it sleeps
// (timeline::SpinNs), and again with spinning off: every point is waited
// for in order, and no Wait returns before its point was signalled (the
// owner counts a point before it signals it).
TEST_F(TimelineTest, APingPongAcrossCpusSpinningOrNotWaitsForEveryPoint) {
  if (std::thread::hardware_concurrency() < 2) GTEST_SKIP() << "needs two CPUs";
  auto pin = [](int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return ::sched_setaffinity(0, sizeof(set), &set) == 0;
  };
  const int64_t spin = timeline::SpinNs();
  ASSERT_GT(spin, 0) << "spinning is on by default";
  for (const int64_t spin_ns : {spin, int64_t{0}}) {
    timeline::SetSpinNs(spin_ns);
    Pair acquire = NewPair();
    Pair release = NewPair();  // owned by `release.owner`, imported by `release.waiter`
    ASSERT_TRUE(acquire.seen.has_value() && release.seen.has_value());
    // The consumer (CPU 1) owns `release` and waits on `acquire`'s import.
    absl::StatusOr<Timeline> consumer_acquire =
        release.owner.ImportTimeline(*acquire.produced->Export());
    ASSERT_TRUE(consumer_acquire.ok()) << consumer_acquire.status();
    constexpr uint64_t kFrames = 2000;
    std::atomic<uint64_t> produced{0}, consumed{0};
    std::atomic<bool> consumer_ok{true};
    std::thread consumer([&] {
      consumer_ok = pin(1);
      for (uint64_t i = 1; i <= kFrames && consumer_ok; ++i) {
        auto got = consumer_acquire->Wait(i, absl::Seconds(30));
        consumer_ok = got.ok() && got->status == v1::FENCE_STATUS_OK && produced.load() >= i;
        consumed.store(i);
        consumer_ok = consumer_ok && release.produced->Signal(i).ok();
      }
    });
    ASSERT_TRUE(pin(0));
    bool producer_ok = true;
    for (uint64_t i = 1; i <= kFrames && producer_ok; ++i) {
      produced.store(i);
      producer_ok = acquire.produced->Signal(i).ok();
      auto got = release.seen->Wait(i, absl::Seconds(30));
      producer_ok =
          producer_ok && got.ok() && got->status == v1::FENCE_STATUS_OK && consumed.load() >= i;
    }
    consumer.join();
    EXPECT_TRUE(producer_ok) << "spin " << spin_ns;
    EXPECT_TRUE(consumer_ok) << "spin " << spin_ns;
    EXPECT_EQ(release.seen->Query(), kFrames);
    cpu_set_t all;
    CPU_ZERO(&all);
    for (unsigned cpu = 0; cpu < std::thread::hardware_concurrency(); ++cpu) CPU_SET(cpu, &all);
    ::sched_setaffinity(0, sizeof(all), &all);
  }
  timeline::SetSpinNs(spin);
}

// Tests the spin itself: it ends when a word moves (true), or at its bound
// with nothing moved (false, not before the bound); SetSpinNs clamps.
TEST(TimelineSpinTest, SpinsUntilAWordMovesOrTheBound) {
  uint32_t words[2] = {7, 9};
  const uint32_t* watched[] = {&words[0], &words[1]};
  const uint32_t expected[] = {7, 9};
  const int64_t start = timeline::MonotonicNs();
  EXPECT_FALSE(timeline::SpinUntilMoved(watched, expected, 2, start + 2'000'000));
  EXPECT_GE(timeline::MonotonicNs() - start, 2'000'000);
  std::thread mover([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::atomic_ref<uint32_t>(words[1]).store(10);
  });
  EXPECT_TRUE(
      timeline::SpinUntilMoved(watched, expected, 2, timeline::MonotonicNs() + 60'000'000'000));
  mover.join();
  const int64_t before = timeline::SpinNs();
  timeline::SetSpinNs(-5);
  EXPECT_EQ(timeline::SpinNs(), 0);
  timeline::SetSpinNs(int64_t{1} << 40);
  EXPECT_EQ(timeline::SpinNs(), 1'000'000);
  timeline::SetSpinNs(before);
  EXPECT_NE(timeline::CurrentCpu(), 0u);
}

TEST_F(TimelineTest, TheOwnerSeesWhoWaits) {
  auto [owner, waiter, produced, seen] = NewPair({.name = "watched"});
  ASSERT_TRUE(produced && seen);
  EXPECT_EQ(produced->WaitedOn().point, 0u);
  std::thread blocked([&] { (void)seen->Wait(3, absl::Seconds(20), absl::Milliseconds(500)); });
  ASSERT_TRUE(Eventually([&] { return produced->WaitedOn().point == 3; }));
  const Timeline::Waited waited = produced->WaitedOn();
  EXPECT_LT(waited.need_by, absl::Now() + absl::Seconds(1));
  EXPECT_GT(waited.need_by, absl::Now() - absl::Seconds(5));
  absl::StatusOr<v1::TimelineInfo> info = produced->Info();
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->waits_size(), 1);
  EXPECT_EQ(info->waits(0).point(), 3u);
  const std::string table = Bufctl(daemon_->socket_dir(), "fences");
  EXPECT_THAT(table, HasSubstr("WAITED (POINT@AGE)")) << table;
  EXPECT_THAT(table, ::testing::ContainsRegex(absl::StrCat(
                         "watched +timeline_test\\[", ::getpid(), "\\] +live +0 +3@[0-9.]+m?s ")))
      << table;
  ASSERT_TRUE(produced->Signal(3).ok());
  blocked.join();
  EXPECT_TRUE(Eventually([&] { return produced->WaitedOn().point == 0; }));
}

TEST_F(TimelineTest, APointWaitedOnBeforeItsSignalFailsAtTheDeadline) {
  constexpr absl::Duration kDeadline = absl::Milliseconds(300);
  auto [owner, waiter, produced, seen] = NewPair({.deadline = kDeadline});
  ASSERT_TRUE(produced && seen);
  ASSERT_TRUE(produced->Signal(1).ok());
  const absl::Time start = absl::Now();
  absl::StatusOr<PointResult> late = seen->Wait(2, absl::Seconds(30));
  const absl::Duration took = absl::Now() - start;
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(late->status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  EXPECT_THAT(late->message, HasSubstr("point 2 was not reached within the timeline's deadline"));
  // The deadline runs from when the daemon first sees the wait (at most one
  // scan, 100 ms, after it starts) and is checked every scan.
  EXPECT_GE(took, kDeadline);
  EXPECT_LT(took, kDeadline + absl::Milliseconds(200) + absl::Seconds(1)) << took;
  // The next point failed for everyone, the owner included; the timeline
  // did not move, and the owner goes on (the mark stands once reached).
  EXPECT_EQ(seen->Query(), 1u);
  EXPECT_EQ(produced->Wait(2, absl::ZeroDuration())->status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  ASSERT_TRUE(produced->Signal(2).ok());
  ASSERT_TRUE(produced->Signal(3).ok());
  EXPECT_EQ(seen->Wait(2, absl::ZeroDuration())->status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  EXPECT_EQ(seen->Wait(3, absl::ZeroDuration())->status, v1::FENCE_STATUS_OK);
  EXPECT_EQ(produced->Info()->deadline_failures(), 1u);
}

// A wait further ahead than the next point ends at the deadline, failing
// that point for the waiting session only: an importer cannot fail future
// frames for the others.
TEST_F(TimelineTest, AWaitFarAheadFailsOnlyForItsSession) {
  auto [owner, waiter, produced, seen] = NewPair({.deadline = absl::Milliseconds(200)});
  ASSERT_TRUE(produced && seen);
  Client other = Connect();
  absl::StatusOr<Timeline> bystander = other.ImportTimeline(*produced->Export());
  ASSERT_TRUE(bystander.ok());
  absl::StatusOr<PointResult> far = seen->Wait(5, absl::Seconds(30));
  ASSERT_TRUE(far.ok()) << far.status();
  EXPECT_EQ(far->status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  EXPECT_THAT(far->message, HasSubstr("failed for this session only"));
  EXPECT_EQ(produced->Info()->deadline_failures(), 0u);
  EXPECT_EQ(bystander->Wait(5, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kDeadlineExceeded)
      << "still pending (polled) for the others";
  for (uint64_t point = 1; point <= 5; ++point) ASSERT_TRUE(produced->Signal(point).ok());
  EXPECT_EQ(bystander->Wait(5, absl::ZeroDuration())->status, v1::FENCE_STATUS_OK);
  EXPECT_EQ(seen->Wait(5, absl::ZeroDuration())->status, v1::FENCE_STATUS_OK)
      << "once reached, reached for everyone";
  const uint64_t beyond = std::numeric_limits<uint64_t>::max() - 1;
  EXPECT_EQ(seen->Wait(beyond, absl::Seconds(30))->status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  ASSERT_TRUE(produced->Signal(6).ok());
  EXPECT_EQ(bystander->Wait(6, absl::ZeroDuration())->status, v1::FENCE_STATUS_OK);
}

TEST_F(TimelineTest, DroppingOrClosingTheOwnerEndsTheTimeline) {
  Client waiter = Connect();
  {
    Client owner = Connect();
    absl::StatusOr<Timeline> produced = owner.CreateTimeline();
    ASSERT_TRUE(produced.ok());
    absl::StatusOr<Timeline> seen = waiter.ImportTimeline(*produced->Export());
    ASSERT_TRUE(seen.ok());
    ASSERT_TRUE(produced->Signal(2).ok());
    *produced = *owner.CreateTimeline();  // the first one is dropped
    absl::StatusOr<PointResult> after = seen->Wait(3, absl::Seconds(10));
    ASSERT_TRUE(after.ok()) << after.status();
    EXPECT_EQ(after->status, v1::FENCE_STATUS_CANCELLED);
    EXPECT_THAT(after->message, HasSubstr("the owner dropped the timeline at point 2"));
    EXPECT_EQ(seen->Wait(2, absl::ZeroDuration())->status, v1::FENCE_STATUS_OK);

    absl::StatusOr<Timeline> second = waiter.ImportTimeline(*produced->Export());
    ASSERT_TRUE(second.ok());
    std::thread blocked([&] {
      absl::StatusOr<PointResult> dead = second->Wait(1, absl::Seconds(10));
      ASSERT_TRUE(dead.ok()) << dead.status();
      EXPECT_EQ(dead->status, v1::FENCE_STATUS_OWNER_DIED);
    });
    EXPECT_TRUE(Eventually([&] { return produced->WaitedOn().point == 1; }));
    Timeline kept = *std::move(produced);
    owner.Close();
    blocked.join();
    absl::Status signal = kept.Signal(1);
    EXPECT_EQ(signal.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(signal.message(), HasSubstr("has ended (FENCE_STATUS_OWNER_DIED)"));
  }
  EXPECT_TRUE(Eventually([&] { return KnownTimelines() == 0; }));
}

// Tests that the owner's own Timeline going ends the timeline CANCELLED at
// once even when the owner's session also imported it: the import cannot
// signal, so keeping the timeline alive for it would leave every waiter to
// the deadline.
TEST_F(TimelineTest, DroppingTheOwnerEndsTheTimelineItsOwnSessionImported) {
  auto [owner, waiter, produced, seen] = NewPair({.deadline = absl::Seconds(60)});
  ASSERT_TRUE(produced && seen);
  absl::StatusOr<Timeline> own_import = owner.ImportTimeline(*produced->Export());
  ASSERT_TRUE(own_import.ok()) << own_import.status();
  ASSERT_TRUE(produced->Signal(1).ok());
  std::thread blocked([&] {
    absl::StatusOr<PointResult> after = seen->Wait(2, absl::Seconds(30));
    ASSERT_TRUE(after.ok()) << after.status();
    EXPECT_EQ(after->status, v1::FENCE_STATUS_CANCELLED);
    EXPECT_THAT(after->message, HasSubstr("the owner dropped the timeline at point 1"));
  });
  EXPECT_TRUE(Eventually([&] { return produced->WaitedOn().point == 2; }));
  const absl::Time dropped = absl::Now();
  produced.reset();
  blocked.join();
  EXPECT_LT(absl::Now() - dropped, absl::Seconds(5));
  absl::StatusOr<PointResult> own = own_import->Wait(2, absl::ZeroDuration());
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_EQ(own->status, v1::FENCE_STATUS_CANCELLED);
  // The import still counts as held until it goes too.
  EXPECT_EQ(KnownTimelines(), 1u);
  own_import = absl::CancelledError("dropped");
  seen.reset();
  EXPECT_TRUE(Eventually([&] { return KnownTimelines() == 0; }));
}

TEST_F(TimelineTest, AWaiterWhoseOwnSessionEndsIsToldSo) {
  {
    absl::StatusOr<Client> owner = Client::Connect(daemon_->socket_dir());
    absl::StatusOr<Client> waiter = Client::Connect(daemon_->socket_dir());
    ASSERT_TRUE(owner.ok() && waiter.ok());
    absl::StatusOr<Timeline> produced = owner->CreateTimeline({.name = "frames"});
    ASSERT_TRUE(produced.ok());
    absl::StatusOr<Timeline> seen = waiter->ImportTimeline(*produced->Export());
    ASSERT_TRUE(seen.ok());
    // No timeout at all: once the waiter's session is over nothing bounds
    // the wait (the daemon no longer reads its wait page), so it must not
    // sleep on.
    auto waiting =
        std::async(std::launch::async, [&] { return seen->Wait(1, absl::InfiniteDuration()); });
    EXPECT_TRUE(Eventually([&] { return produced->WaitedOn().point == 1; }));
    waiter->Close();
    ASSERT_EQ(waiting.wait_for(std::chrono::seconds(30)), std::future_status::ready)
        << "still asleep though its session is over";
    const absl::Status status = waiting.get().status();
    EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
    EXPECT_THAT(status.message(), HasSubstr("the session ended while it waited"));
    EXPECT_THAT(status.message(), HasSubstr("this Client closed it"));
    // A poll afterwards says the same, not "not reached yet" for ever.
    const absl::Status polled = seen->Wait(1, absl::ZeroDuration()).status();
    EXPECT_EQ(polled.code(), absl::StatusCode::kUnavailable) << polled;
    EXPECT_THAT(polled.message(), HasSubstr("the session ended while it waited"));
    // The owner goes on.
    EXPECT_TRUE(produced->Signal(1).ok());
  }
  EXPECT_TRUE(Eventually([&] { return KnownTimelines() == 0; }));
}

// The daemon ends a waiter's session (an operator's EndSession; a daemon
// restart is alike) while its event loop polls an armed notify fd and a
// thread sleeps in Wait: the fd becomes readable and Arm says the session is
// over, and the sleeper returns, though the owner (which holds a write end
// of the notify channel) never signals.
TEST_F(TimelineTest, AnArmedNotifyFdWakesWhenTheDaemonEndsItsSession) {
  {
    Pair pair = NewPair({.name = "frames"});
    ASSERT_TRUE(pair.produced.has_value() && pair.seen.has_value());
    std::optional<Timeline>& produced = pair.produced;
    std::optional<Timeline>& seen = pair.seen;
    absl::StatusOr<int> fd = seen->NotifyFd();
    ASSERT_TRUE(fd.ok()) << fd.status();
    absl::StatusOr<std::optional<PointResult>> armed = seen->Arm(5);
    ASSERT_TRUE(armed.ok() && !armed->has_value());
    auto sleeping =
        std::async(std::launch::async, [&] { return seen->Wait(5, absl::InfiniteDuration()); });
    EXPECT_TRUE(Eventually([&] { return produced->WaitedOn().point == 5; }));
    // The owner takes the waker (and with it a write end of the channel).
    ASSERT_TRUE(produced->Signal(1).ok());
    pollfd ready{*fd, POLLIN, 0};
    EXPECT_EQ(::poll(&ready, 1, 50), 0) << "point 5 is armed, not 1";

    absl::StatusOr<v1::EndSessionResponse> ended = pair.owner.EndSession(pair.waiter.session_id());
    ASSERT_TRUE(ended.ok()) << ended.status();
    ASSERT_EQ(::poll(&ready, 1, 10000), 1) << "the event loop never hears its session ended";
    absl::StatusOr<std::optional<PointResult>> again = seen->Arm(5);
    EXPECT_EQ(again.status().code(), absl::StatusCode::kUnavailable) << again.status();
    EXPECT_THAT(again.status().message(), HasSubstr("the session ended while the notify fd"));
    EXPECT_THAT(again.status().message(), HasSubstr("ended session"));
    ASSERT_EQ(sleeping.wait_for(std::chrono::seconds(30)), std::future_status::ready)
        << "still asleep though its session is over";
    const absl::Status slept = sleeping.get().status();
    EXPECT_EQ(slept.code(), absl::StatusCode::kUnavailable) << slept;
    EXPECT_THAT(slept.message(), HasSubstr("the session ended while it waited"));
    // A poll afterwards says the same (the daemon closed the waker), not
    // "not reached yet" for ever.
    const absl::Status polled = seen->Wait(5, absl::ZeroDuration()).status();
    EXPECT_EQ(polled.code(), absl::StatusCode::kUnavailable) << polled;
    EXPECT_THAT(polled.message(), HasSubstr("the session ended while it waited"));
    // The owner goes on.
    EXPECT_TRUE(produced->Signal(5).ok());
  }
  EXPECT_TRUE(Eventually([&] { return KnownTimelines() == 0; }));
}

TEST_F(TimelineTest, OwnerKilledMidStreamFailsEveryWaiterWithin10ms) {
  absl::StatusOr<ChildProcess> producer =
      SpawnPeer({"timeline-produce", daemon_->socket_dir(), "200"});
  ASSERT_TRUE(producer.ok());
  const std::string ready = producer->ReadLine();
  const std::string token = Field(ready, "token");
  ASSERT_FALSE(token.empty()) << ready;
  // One consumer blocks in Wait, the other polls the notify fd.
  std::vector<ChildProcess> consumers;
  for (auto [mode, key] : {std::pair{"timeline-consume", "token"}, {"timeline-poll", "token2"}}) {
    absl::StatusOr<ChildProcess> consumer =
        SpawnPeer({mode, daemon_->socket_dir(), Field(ready, key)});
    ASSERT_TRUE(consumer.ok());
    ASSERT_EQ(consumer->ReadLine(), "ready");
    consumers.push_back(*std::move(consumer));
  }
  // Let the stream run (the producer starts once someone waits).
  absl::SleepFor(absl::Milliseconds(100));
  const int64_t killed = timeline::MonotonicNs();
  producer->Kill(SIGKILL);
  for (ChildProcess& consumer : consumers) {
    const std::string woke = consumer.ReadLine();
    EXPECT_EQ(Field(woke, "status"), "FENCE_STATUS_OWNER_DIED") << woke;
    EXPECT_EQ(Field(woke, "order"), "ok") << woke;
    uint64_t point = 0;
    ASSERT_TRUE(absl::SimpleAtoi(Field(woke, "point"), &point)) << woke;
    EXPECT_GT(point, 10u) << "the stream ran before the kill";
    int64_t at = 0;
    ASSERT_TRUE(absl::SimpleAtoi(Field(woke, "mono_ns"), &at)) << woke;
    EXPECT_LT(at - killed, kWakeBudgetNs) << "woke " << (at - killed) / 1000 << " us after the kill";
    std::printf("consumer woke %lld us after kill -9, at point %lu\n",
                static_cast<long long>((at - killed) / 1000), static_cast<unsigned long>(point));
    EXPECT_EQ(consumer.Wait(), 0);
  }
  EXPECT_TRUE(Eventually([&] { return KnownTimelines() == 0; }));
  ExpectBaseline();
}

TEST_F(TimelineTest, AnImporterCannotWriteAByteOfTheSharedPages) {
  if (::geteuid() != 0) GTEST_SKIP() << "opening /proc/self/map_files needs root";
  Client owner = Connect();
  absl::StatusOr<Timeline> produced = owner.CreateTimeline();
  ASSERT_TRUE(produced.ok());
  ASSERT_TRUE(produced->Signal(7).ok());
  absl::StatusOr<ChildProcess> attacker =
      SpawnPeer({"timeline-attack", daemon_->socket_dir(), *produced->Export()});
  ASSERT_TRUE(attacker.ok());
  EXPECT_EQ(attacker->ReadLine(), "pages=2");
  int attempts = 0;
  for (std::string line = attacker->ReadLine(); line != "done" && !line.empty();
       line = attacker->ReadLine()) {
    EXPECT_THAT(line, ::testing::EndsWith(": refused")) << line;
    ++attempts;
  }
  EXPECT_GE(attempts, 2 * 7) << "every attack ran on both pages";
  EXPECT_EQ(attacker->Wait(), 0);
  EXPECT_EQ(produced->Query(), 7u);
  ASSERT_TRUE(produced->Signal(8).ok()) << "the owner still writes its own page";
}

// Any reader of a futex word can FUTEX_CMP_REQUEUE its sleepers away so
// that no wake reaches them. Waiters sleep on their own session's wake page,
// which other importers never see: an importer requeueing every word it can
// see delays nobody.
TEST_F(TimelineTest, AnImporterThatRequeuesFutexWaitersDelaysNobody) {
  auto [owner, waiter, produced, seen] = NewPair();
  ASSERT_TRUE(produced && seen);
  int64_t woke = 0;
  std::thread blocked([&] {
    absl::StatusOr<PointResult> got = seen->Wait(1, absl::Seconds(20));
    woke = timeline::MonotonicNs();
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->status, v1::FENCE_STATUS_OK);
  });
  ASSERT_TRUE(Eventually([&] { return produced->WaitedOn().point == 1; }));
  absl::StatusOr<ChildProcess> thief =
      SpawnPeer({"timeline-requeue", daemon_->socket_dir(), *produced->Export(), "1500"});
  ASSERT_TRUE(thief.ok());
  EXPECT_EQ(thief->ReadLine(), "ready pages=2");
  absl::SleepFor(absl::Milliseconds(300));  // it requeues the waiter again and again
  const int64_t signalled = timeline::MonotonicNs();
  ASSERT_TRUE(produced->Signal(1).ok());
  blocked.join();
  const std::string requeued = thief->ReadLine();
  long moved = 0;
  ASSERT_TRUE(absl::SimpleAtoi(Field(requeued, "requeued"), &moved)) << requeued;
  EXPECT_EQ(moved, 0) << "no waiter sleeps on a word an importer can see";
  EXPECT_LT(woke - signalled, kWakeBudgetNs)
      << "woke " << (woke - signalled) / 1000 << " us after the signal";
  EXPECT_EQ(thief->Wait(), 0);
}

TEST_F(TimelineTest, AnEventLoopWaitsOnTheNotifyFd) {
  auto [owner, waiter, produced, seen] = NewPair();
  ASSERT_TRUE(produced && seen);
  // A blocking wait first: the owner takes the waker before it has a
  // notify fd, and must take it again after.
  std::thread first([&] { EXPECT_EQ(seen->Wait(1, absl::Seconds(10))->status, v1::FENCE_STATUS_OK); });
  ASSERT_TRUE(Eventually([&] { return produced->WaitedOn().point == 1; }));
  ASSERT_TRUE(produced->Signal(1).ok());
  first.join();
  absl::StatusOr<int> fd = seen->NotifyFd();
  ASSERT_TRUE(fd.ok()) << fd.status();
  EXPECT_EQ(*seen->NotifyFd(), *fd) << "one per timeline and session";
  for (uint64_t point = 2; point <= 4; ++point) {
    absl::StatusOr<std::optional<PointResult>> armed = seen->Arm(point);
    ASSERT_TRUE(armed.ok()) << armed.status();
    ASSERT_FALSE(armed->has_value()) << "not reached yet";
    pollfd ready{*fd, POLLIN, 0};
    EXPECT_EQ(::poll(&ready, 1, 0), 0) << "armed, not readable";
    ASSERT_TRUE(produced->Signal(point).ok());
    EXPECT_EQ(::poll(&ready, 1, 5000), 1) << "readable once the owner signals";
    armed = seen->Arm(point);
    ASSERT_TRUE(armed.ok() && armed->has_value());
    EXPECT_EQ((*armed)->status, v1::FENCE_STATUS_OK);
  }
  // An owner signalling points nobody armed for writes nothing.
  ASSERT_TRUE(seen->Arm(10).ok());
  ASSERT_TRUE(produced->Signal(5).ok());
  pollfd ready{*fd, POLLIN, 0};
  EXPECT_EQ(::poll(&ready, 1, 50), 0);
  absl::StatusOr<v1::TimelineInfo> info = produced->Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->wakers(), 1u);
  EXPECT_EQ(info->notify_fds(), 1u);
}

// The owner holds a write end of its own channel to every event-loop waiter:
// filling it (or closing its copy) cannot stop the daemon's wake at the
// deadline, nor block the daemon; a waiter that goes away never raises
// SIGPIPE in the owner.
TEST_F(TimelineTest, AnOwnerFillingItsNotifyPipeBlocksNothing) {
  Client owner = Connect();
  absl::StatusOr<Timeline> produced = owner.CreateTimeline({.deadline = absl::Milliseconds(300)});
  ASSERT_TRUE(produced.ok());
  {
    // A waiter that arms, then goes (its read ends closed).
    Client gone = Connect();
    absl::StatusOr<Timeline> seen = gone.ImportTimeline(*produced->Export());
    ASSERT_TRUE(seen.ok());
    ASSERT_TRUE(seen->Arm(1).ok());
    ASSERT_TRUE(produced->Signal(1).ok());  // the owner takes its waker
    ASSERT_TRUE(seen->Arm(2).ok());
  }
  ASSERT_TRUE(produced->Signal(2).ok()) << "no SIGPIPE, no error";

  Client waiter = Connect();
  absl::StatusOr<Timeline> seen = waiter.ImportTimeline(*produced->Export());
  ASSERT_TRUE(seen.ok());
  absl::StatusOr<int> fd = seen->NotifyFd();
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(seen->Arm(3).ok());
  ASSERT_TRUE(produced->Signal(3).ok());  // the owner takes the new waker
  // The owner's ends of its notify channels are among this process's
  // datagram sockets (the waiter's ends are too: sending on those fills
  // queues nobody reads, harmless). Fill them all.
  std::vector<int> owner_ends;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    int n = 0;
    if (!absl::SimpleAtoi(entry.path().filename().string(), &n)) continue;
    int type = 0;
    socklen_t length = sizeof(type);
    if (::getsockopt(n, SOL_SOCKET, SO_TYPE, &type, &length) == 0 && type == SOCK_DGRAM) {
      owner_ends.push_back(n);
    }
  }
  ASSERT_FALSE(owner_ends.empty());
  auto fill = [&] {
    const char byte = 'x';
    for (int n : owner_ends) {
      while (::send(n, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL) > 0) {
      }
    }
  };
  fill();
  // Spurious wakes: readable, but point 5 is not reached.
  absl::StatusOr<std::optional<PointResult>> armed = seen->Arm(5);
  ASSERT_TRUE(armed.ok());
  EXPECT_FALSE(armed->has_value());
  fill();
  // The event loop polls until its point is decided: the daemon's mark at
  // the deadline reaches it through the daemon's own pipe.
  const absl::Time start = absl::Now();
  std::optional<PointResult> result;
  while (!result.has_value() && absl::Now() - start < absl::Seconds(10)) {
    pollfd ready{*fd, POLLIN, 0};
    ASSERT_EQ(::poll(&ready, 1, 10000), 1);
    absl::StatusOr<std::optional<PointResult>> again = seen->Arm(5);
    ASSERT_TRUE(again.ok());
    result = *again;
    fill();  // the owner keeps the pipe full
  }
  ASSERT_TRUE(result.has_value());
  EXPECT_EQ(result->status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  EXPECT_TRUE(produced->Info().ok()) << "the daemon serves on";
}

// A session's Timeline objects of one timeline share its waker: one that
// waited and went leaves the others able to wait.
TEST_F(TimelineTest, AnotherObjectWaitsAfterTheOneThatWaitedWent) {
  Client owner = Connect();
  Client waiter = Connect();
  absl::StatusOr<Timeline> produced = owner.CreateTimeline();
  ASSERT_TRUE(produced.ok());
  absl::StatusOr<Timeline> first = waiter.ImportTimeline(*produced->Export());
  absl::StatusOr<Timeline> second = waiter.ImportTimeline(*produced->Export());
  ASSERT_TRUE(first.ok() && second.ok());
  ASSERT_TRUE(produced->Signal(1).ok());
  EXPECT_EQ(first->Wait(1, absl::Seconds(5))->status, v1::FENCE_STATUS_OK);
  ASSERT_TRUE(first->NotifyFd().ok());
  { Timeline dropped = *std::move(first); }
  std::thread blocked([&] { EXPECT_EQ(second->Wait(2, absl::Seconds(10))->status, v1::FENCE_STATUS_OK); });
  ASSERT_TRUE(Eventually([&] { return produced->WaitedOn().point == 2; }));
  ASSERT_TRUE(produced->Signal(2).ok());
  blocked.join();
  absl::StatusOr<int> fd = second->NotifyFd();
  ASSERT_TRUE(fd.ok()) << fd.status();
  ASSERT_FALSE(second->Arm(3)->has_value());
  ASSERT_TRUE(produced->Signal(3).ok());
  pollfd ready{*fd, POLLIN, 0};
  EXPECT_EQ(::poll(&ready, 1, 5000), 1);
}

// The owner's page is its own to scribble on: a counter written backwards
// never makes a point a reader saw reached look pending again.
TEST_F(TimelineTest, ACounterWrittenBackwardsNeverUnreachesAPoint) {
  auto [owner, waiter, produced, seen] = NewPair();
  ASSERT_TRUE(produced && seen);
  ASSERT_TRUE(produced->Signal(10).ok());
  EXPECT_EQ(seen->Query(), 10u);
  // Long enough for the daemon's scans (every 100 ms) to see it.
  absl::SleepFor(absl::Milliseconds(500));
  // Find the owner's writable mapping of its counter page and rewind it.
  std::ifstream maps("/proc/self/maps");
  std::string line;
  int rewound = 0;
  while (std::getline(maps, line)) {
    if (line.find("bufferd-timeline-counters") == std::string::npos) continue;
    if (line.find(" rw-s ") == std::string::npos) continue;
    unsigned long from = 0;
    ASSERT_EQ(std::sscanf(line.c_str(), "%lx-", &from), 1);
    auto* page = reinterpret_cast<timeline::CounterPage*>(from);
    timeline::Store(page->reached, uint64_t{3});
    timeline::Bump(page->seq);
    ++rewound;
  }
  ASSERT_EQ(rewound, 1);
  EXPECT_EQ(seen->Query(), 10u);
  EXPECT_EQ(seen->Wait(9, absl::ZeroDuration())->status, v1::FENCE_STATUS_OK);
  // The daemon saw 10 too (it published it), so a reader that never looked
  // before also sees 10.
  Client late = Connect();
  absl::StatusOr<Timeline> fresh = late.ImportTimeline(*produced->Export());
  ASSERT_TRUE(fresh.ok());
  EXPECT_EQ(fresh->Query(), 10u);
}

// The owner writes its counter forward without a wake, then back: a waiter
// blocked on that point must still see it (the daemon saw it reached).
TEST_F(TimelineTest, AReachedPointTakenBackStillWakesItsWaiter) {
  auto [owner, waiter, produced, seen] = NewPair();
  ASSERT_TRUE(produced && seen);
  timeline::CounterPage* page = nullptr;
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    unsigned long from = 0;
    if (line.find("bufferd-timeline-counters") != std::string::npos &&
        line.find(" rw-s ") != std::string::npos && std::sscanf(line.c_str(), "%lx-", &from) == 1) {
      page = reinterpret_cast<timeline::CounterPage*>(from);
    }
  }
  ASSERT_NE(page, nullptr);
  std::thread blocked([&] {
    absl::StatusOr<PointResult> got = seen->Wait(2, absl::Seconds(20));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->status, v1::FENCE_STATUS_OK);
  });
  ASSERT_TRUE(Eventually([&] { return produced->WaitedOn().point == 2; }));
  timeline::Store(page->reached, uint64_t{2});  // no seq bump, no wake
  // Long enough for the daemon's scans (every 100 ms) to see it.
  absl::SleepFor(absl::Milliseconds(500));
  timeline::Store(page->reached, uint64_t{0});
  blocked.join();
}

TEST_F(TimelineTest, TimelineObjectsOfOneSessionAreCountedApart) {
  Client owner = Connect();
  Client waiter = Connect();
  absl::StatusOr<Timeline> produced = owner.CreateTimeline();
  ASSERT_TRUE(produced.ok());
  // The owner imports its own timeline and drops the copy: it lives on.
  { ASSERT_TRUE(owner.ImportTimeline(*produced->Export()).ok()); }
  ASSERT_TRUE(produced->Signal(1).ok());
  EXPECT_TRUE(produced->Info().ok());
  EXPECT_EQ(produced->Info()->ended(), v1::FENCE_STATUS_UNSPECIFIED);
  // Two imports in one session; dropping one leaves the other working.
  absl::StatusOr<Timeline> first = waiter.ImportTimeline(*produced->Export());
  absl::StatusOr<Timeline> second = waiter.ImportTimeline(*produced->Export());
  ASSERT_TRUE(first.ok() && second.ok());
  { Timeline dropped = *std::move(second); }
  EXPECT_TRUE(first->Info().ok()) << "still held";
  ASSERT_TRUE(produced->Signal(2).ok());
  EXPECT_EQ(first->Wait(2, absl::Seconds(5))->status, v1::FENCE_STATUS_OK);
}

// Whether `fd` polls readable (or hung up) within `timeout`.
bool Readable(int fd, absl::Duration timeout) {
  pollfd ready{fd, POLLIN, 0};
  return ::poll(&ready, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) == 1;
}

TEST_F(TimelineTest, ExportPointGivesAFenceTheDaemonSignalsWithThePoint) {
  {
    auto [owner, waiter, produced, seen] = NewPair({.name = "frames"});
    ASSERT_TRUE(produced && seen);
    absl::StatusOr<Fence> third = seen->ExportPoint(3);
    ASSERT_TRUE(third.ok()) << third.status();
    EXPECT_EQ(third->info().kind(), v1::FENCE_KIND_TIMELINE_POINT);
    EXPECT_EQ(third->info().name(), "point 3");
    EXPECT_EQ(third->info().timeline(), "frames");
    absl::StatusOr<UniqueFd> fd = seen->ExportPointFd(3);
    ASSERT_TRUE(fd.ok()) << fd.status();
    ASSERT_TRUE(fd->valid());
    EXPECT_EQ(third->Signal().code(), absl::StatusCode::kPermissionDenied)
        << "only its timeline signals it";
    EXPECT_EQ(produced->Info()->exported_points(), 2u);

    ASSERT_TRUE(produced->Signal(2).ok());
    EXPECT_FALSE(Readable(fd->get(), absl::Milliseconds(50)));
    ASSERT_TRUE(produced->Signal(3).ok());
    EXPECT_TRUE(Readable(fd->get(), absl::Seconds(10))) << "the fd polls readable";
    absl::StatusOr<v1::FenceInfo> done = third->Wait(absl::Seconds(10));
    ASSERT_TRUE(done.ok()) << done.status();
    EXPECT_EQ(done->status(), v1::FENCE_STATUS_OK);

    // Reached already: a readable fd, or -1 (Vulkan's SYNC_FD convention)
    // without a round trip when asked for.
    absl::StatusOr<UniqueFd> reached = seen->ExportPointFd(3);
    ASSERT_TRUE(reached.ok());
    EXPECT_TRUE(Readable(reached->get(), absl::ZeroDuration()));
    absl::StatusOr<UniqueFd> minus_one = seen->ExportPointFd(2, Timeline::IfReached::kMinusOne);
    ASSERT_TRUE(minus_one.ok());
    EXPECT_FALSE(minus_one->valid());

    // A failed point's fence carries its failure, and the owner's exports
    // work the same.
    absl::StatusOr<Fence> failed = produced->ExportPoint(5);
    ASSERT_TRUE(failed.ok()) << failed.status();
    ASSERT_TRUE(produced->Fail(5, "render failed").ok());
    absl::StatusOr<v1::FenceInfo> why = failed->Wait(absl::Seconds(10));
    ASSERT_TRUE(why.ok());
    EXPECT_EQ(why->status(), v1::FENCE_STATUS_ERROR);
    EXPECT_EQ(why->message(), "render failed");
    absl::StatusOr<UniqueFd> failed_fd = seen->ExportPointFd(4, Timeline::IfReached::kMinusOne);
    ASSERT_TRUE(failed_fd.ok());
    EXPECT_TRUE(failed_fd->valid()) << "a failed point is not -1: its fence has the error";

    // The owner dropping the timeline cancels the points it exported, at
    // once, even with nobody holding the timeline any more.
    {
      Client lone = Connect();
      absl::StatusOr<Timeline> dropped = lone.CreateTimeline();
      ASSERT_TRUE(dropped.ok());
      absl::StatusOr<Fence> out = dropped->ExportPoint(1);
      ASSERT_TRUE(out.ok());
      *dropped = *lone.CreateTimeline();  // the first one is dropped
      absl::StatusOr<v1::FenceInfo> cancelled = out->Wait(absl::Seconds(1));
      ASSERT_TRUE(cancelled.ok()) << cancelled.status();
      EXPECT_EQ(cancelled->status(), v1::FENCE_STATUS_CANCELLED);
    }

    // The owner's end fails what is pending.
    absl::StatusOr<Fence> orphan = seen->ExportPoint(9);
    ASSERT_TRUE(orphan.ok());
    owner.Close();
    absl::StatusOr<v1::FenceInfo> died = orphan->Wait(absl::Seconds(10));
    ASSERT_TRUE(died.ok());
    EXPECT_EQ(died->status(), v1::FENCE_STATUS_OWNER_DIED);

    EXPECT_EQ(seen->ExportPoint(std::numeric_limits<uint64_t>::max()).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  ExpectBaseline();
}

TEST_F(TimelineTest, AnExportedPointIsBoundedByTheDeadline) {
  auto [owner, waiter, produced, seen] = NewPair({.deadline = absl::Milliseconds(300)});
  ASSERT_TRUE(produced && seen);
  absl::StatusOr<UniqueFd> fd = seen->ExportPointFd(1);
  ASSERT_TRUE(fd.ok()) << fd.status();
  EXPECT_TRUE(Readable(fd->get(), absl::Seconds(20)));
  absl::StatusOr<Fence> again = seen->ExportPoint(1);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->info().status(), v1::FENCE_STATUS_DEADLINE_EXCEEDED)
      << "signalled at once: the point failed already";
  EXPECT_THAT(again->info().message(), HasSubstr("the timeline's deadline"))
      << "failed by the timeline, not by the fence's own backstop";
}

// "Transfer from a fence": a point reached when a fence signals, available
// before that.
TEST_F(TimelineTest, AFenceBehindAPointReachesOrFailsIt) {
  {
    auto [owner, waiter, produced, seen] = NewPair();
    ASSERT_TRUE(produced && seen);
    absl::StatusOr<Fence> render = owner.CreateFence({.name = "render"});
    ASSERT_TRUE(render.ok());
    EXPECT_EQ(seen->WaitAvailable(2, absl::ZeroDuration()).status().code(),
              absl::StatusCode::kDeadlineExceeded);
    // A waiter blocked for availability wakes when the fence comes.
    std::thread available([&] {
      absl::StatusOr<PointResult> got = seen->WaitAvailable(2, absl::Seconds(20));
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->status, v1::FENCE_STATUS_OK);
    });
    EXPECT_TRUE(Eventually([&] { return produced->WaitedOn().point == 2; }));
    ASSERT_TRUE(produced->ImportFence(2, *render).ok());
    available.join();
    absl::Status polled = seen->Wait(2, absl::ZeroDuration()).status();
    EXPECT_EQ(polled.code(), absl::StatusCode::kDeadlineExceeded) << "available, not reached";
    EXPECT_EQ(produced->Info()->available(), 2u);
    EXPECT_EQ(produced->Info()->promised_points_size(), 1);
    // Operators see which point waits on a fence.
    EXPECT_THAT(Bufctl(daemon_->socket_dir(), "fences"), HasSubstr("BEHIND FENCES"));
    EXPECT_THAT(Bufctl(daemon_->socket_dir(), "fences --json"),
                ::testing::ContainsRegex("\"promised_points\":\\s*\\[\\s*\"2\"\\s*\\]"));

    absl::Status early = produced->Signal(2);
    EXPECT_EQ(early.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(early.message(), HasSubstr("stands behind a fence"));
    ASSERT_TRUE(produced->Signal(1).ok()) << "points before it are the owner's";
    std::thread blocked([&] {
      absl::StatusOr<PointResult> got = seen->Wait(2, absl::Seconds(20));
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->status, v1::FENCE_STATUS_OK);
    });
    EXPECT_TRUE(Eventually([&] { return produced->WaitedOn().point == 2; }));
    ASSERT_TRUE(render->Signal().ok());
    blocked.join();
    EXPECT_EQ(seen->Query(), 2u);
    EXPECT_EQ(produced->Query(), 2u);
    ASSERT_TRUE(produced->Signal(3).ok()) << "the owner goes on after it";

    // Between two points behind fences: only points before the first.
    absl::StatusOr<Fence> a = owner.CreateFence();
    absl::StatusOr<Fence> b = owner.CreateFence();
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_TRUE(produced->ImportFence(5, *a).ok());
    ASSERT_TRUE(produced->ImportFence(7, *b).ok());
    absl::Status between = produced->Signal(6);
    EXPECT_EQ(between.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(between.message(), HasSubstr("point 5 of timeline"));
    ASSERT_TRUE(produced->Signal(4).ok());
    ASSERT_TRUE(b->Signal().ok());
    EXPECT_EQ(seen->Wait(7, absl::Milliseconds(200)).status().code(),
              absl::StatusCode::kDeadlineExceeded)
        << "7 settles after 5";
    ASSERT_TRUE(a->Signal().ok());
    EXPECT_EQ(seen->Wait(7, absl::Seconds(20))->status, v1::FENCE_STATUS_OK);
    // The owner's Fail after a settled point fails only points after it.
    ASSERT_TRUE(produced->Fail(8, "dropped").ok());
    EXPECT_EQ(seen->Wait(7, absl::ZeroDuration())->status, v1::FENCE_STATUS_OK);
    EXPECT_EQ(seen->Wait(8, absl::ZeroDuration())->status, v1::FENCE_STATUS_ERROR);

    // A fence's error fails the points behind it, with its message.
    absl::StatusOr<Fence> broken = owner.CreateFence();
    ASSERT_TRUE(broken.ok());
    ASSERT_TRUE(produced->ImportFence(10, *broken).ok());
    ASSERT_TRUE(broken->Signal(v1::FENCE_STATUS_ERROR, "gpu hang").ok());
    absl::StatusOr<PointResult> ten = seen->Wait(10, absl::Seconds(20));
    ASSERT_TRUE(ten.ok()) << ten.status();
    EXPECT_EQ(ten->status, v1::FENCE_STATUS_ERROR);
    EXPECT_THAT(ten->message, HasSubstr("gpu hang"));
    EXPECT_EQ(seen->Wait(9, absl::ZeroDuration())->status, v1::FENCE_STATUS_ERROR);

    // Who may, and which points.
    absl::StatusOr<Fence> mine = waiter.CreateFence();
    ASSERT_TRUE(mine.ok());
    absl::Status status = seen->ImportFence(7, *mine);
    EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied) << status;
    EXPECT_THAT(status.message(), HasSubstr("only its owner"));
    status = produced->ImportFence(7, *mine);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(status.message(), HasSubstr("another Client's session"));
    absl::StatusOr<Fence> late = owner.CreateFence();
    ASSERT_TRUE(late.ok());
    status = produced->ImportFence(10, *late);
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(status.message(), HasSubstr("is not after timeline"));
    EXPECT_EQ(produced->ImportFence(0, *late).code(), absl::StatusCode::kInvalidArgument);
    ASSERT_TRUE(late->Signal().ok());
  }
  ExpectBaseline();
}

TEST_F(TimelineTest, ASyncFdGoesStraightBehindAPoint) {
  {
    auto [owner, waiter, produced, seen] = NewPair();
    ASSERT_TRUE(produced && seen);
    // An event loop waits for availability on its notify fd.
    absl::StatusOr<int> notify = seen->NotifyFd();
    ASSERT_TRUE(notify.ok());
    absl::StatusOr<std::optional<PointResult>> armed = seen->ArmAvailable(1);
    ASSERT_TRUE(armed.ok());
    EXPECT_FALSE(armed->has_value());

    UniqueFd event(::eventfd(0, EFD_CLOEXEC));
    ASSERT_TRUE(event.valid());
    ASSERT_TRUE(produced->ImportSyncFd(1, event.get()).ok());
    EXPECT_TRUE(Readable(*notify, absl::Seconds(10))) << "available: the byte came";
    armed = seen->ArmAvailable(1);
    ASSERT_TRUE(armed.ok() && armed->has_value());
    EXPECT_EQ((*armed)->status, v1::FENCE_STATUS_OK);
    EXPECT_FALSE(seen->Arm(1)->has_value()) << "not reached yet";
    const uint64_t one = 1;
    ASSERT_EQ(::write(event.get(), &one, sizeof(one)), 8);
    EXPECT_TRUE(Readable(*notify, absl::Seconds(10))) << "reached: the daemon's byte";
    absl::StatusOr<PointResult> reached = seen->Wait(1, absl::Seconds(20));
    ASSERT_TRUE(reached.ok());
    EXPECT_EQ(reached->status, v1::FENCE_STATUS_OK);

    // A pipe's read end: reached when the write end closes.
    int ends[2];
    ASSERT_EQ(::pipe2(ends, O_CLOEXEC), 0);
    UniqueFd read_end(ends[0]);
    UniqueFd write_end(ends[1]);
    ASSERT_TRUE(produced->ImportSyncFd(2, read_end.get()).ok());
    read_end.Reset();
    write_end.Reset();
    EXPECT_EQ(seen->Wait(2, absl::Seconds(20))->status, v1::FENCE_STATUS_OK);

    // An fd that signalled already reaches the point at once.
    UniqueFd ready(::eventfd(1, EFD_CLOEXEC));
    ASSERT_TRUE(produced->ImportSyncFd(3, ready.get()).ok());
    EXPECT_EQ(seen->Wait(3, absl::Seconds(20))->status, v1::FENCE_STATUS_OK);

    // A timeline's own point behind an earlier or the same point: a cycle.
    absl::StatusOr<Fence> own = produced->ExportPoint(5);
    ASSERT_TRUE(own.ok());
    absl::Status cycle = produced->ImportFence(5, *own);
    EXPECT_EQ(cycle.code(), absl::StatusCode::kFailedPrecondition) << cycle;
    EXPECT_THAT(cycle.message(), HasSubstr("which would wait for it"));
    absl::StatusOr<UniqueFd> own_fd = produced->ExportPointFd(6);
    ASSERT_TRUE(own_fd.ok());
    EXPECT_EQ(produced->ImportSyncFd(4, own_fd->get()).code(),
              absl::StatusCode::kFailedPrecondition);

    // Bad fds and callers: named errors, nothing kept.
    UniqueFd file(::open("/proc/self/status", O_RDONLY | O_CLOEXEC));
    absl::Status status = produced->ImportSyncFd(4, file.get());
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(status.message(), HasSubstr("only a sync_file, an eventfd"));
    status = seen->ImportSyncFd(4, ready.get());
    EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied) << status;
    EXPECT_EQ(produced->ImportSyncFd(4, 12345).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(produced->ImportSyncFd(3, ready.get()).code(),
              absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(produced->Query(), 3u);

    // An fd that never signals, behind a point of a timeline then dropped:
    // the daemon lets go of it at once (nobody else could), not at its
    // deadline.
    UniqueFd never(::eventfd(0, EFD_CLOEXEC));
    ASSERT_TRUE(produced->ImportSyncFd(7, never.get(), absl::Minutes(4)).ok());
    v1::ListFencesRequest pending;
    pending.set_state(v1::FENCE_STATE_PENDING);
    EXPECT_EQ(client_->ListFences(pending)->fences_size(), 3)
        << "points 5 and 6 exported, and the fd behind 7";
    produced.reset();
    EXPECT_TRUE(Eventually([&] {
      auto fences = client_->ListFences(pending);
      return fences.ok() && fences->fences_size() == 0;
    })) << "both settled: point 5 cancelled, the fd's fence let go";
  }
  ExpectBaseline();
}

TEST_F(TimelineTest, APointBehindASlowFenceOutlivesTheTimelinesDeadline) {
  auto [owner, waiter, produced, seen] = NewPair({.deadline = absl::Milliseconds(300)});
  ASSERT_TRUE(produced && seen);
  absl::StatusOr<Fence> slow = owner.CreateFence({.deadline = absl::Seconds(20)});
  ASSERT_TRUE(slow.ok());
  ASSERT_TRUE(produced->ImportFence(1, *slow).ok());
  absl::StatusOr<UniqueFd> exported = seen->ExportPointFd(1);
  ASSERT_TRUE(exported.ok());
  std::thread blocked([&] {
    absl::StatusOr<PointResult> got = seen->Wait(1, absl::Seconds(20));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->status, v1::FENCE_STATUS_OK) << got->message;
  });
  // Well past the timeline's deadline and two scans.
  absl::SleepFor(absl::Seconds(1));
  EXPECT_FALSE(Readable(exported->get(), absl::ZeroDuration()));
  ASSERT_TRUE(slow->Signal().ok());
  blocked.join();
  EXPECT_TRUE(Readable(exported->get(), absl::Seconds(10)));
}

TEST_F(TimelineTest, BadInputGetsNamedErrors) {
  auto [owner, waiter, produced, seen] = NewPair();
  ASSERT_TRUE(produced && seen);
  ASSERT_TRUE(produced->Signal(4).ok());

  absl::Status status = produced->Signal(4);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("point 4 is not after timeline"));
  EXPECT_THAT(status.message(), HasSubstr("last point 4"));
  EXPECT_EQ(produced->Signal(2).code(), absl::StatusCode::kFailedPrecondition);
  status = produced->Signal(0);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("point 0 is reached from the start"));
  status = produced->Signal(std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("UINT64_MAX"));
  status = seen->Wait(std::numeric_limits<uint64_t>::max(), absl::ZeroDuration()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  status = seen->Signal(5);
  EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(status.message(), HasSubstr("only its owner signals it"));
  status = produced->Fail(5, "bad\nmessage");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(produced->Query(), 4u) << "nothing changed";

  status = owner.CreateTimeline({.name = std::string(201, 'x')}).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  status = owner.CreateTimeline({.deadline = absl::Minutes(6)}).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("max_fence_deadline_ms"));

  status = waiter.ImportTimeline("00112233445566778899aabbccddeeff").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  const std::string token = *produced->Export();
  ASSERT_TRUE(waiter.ImportTimeline(token).ok());
  status = waiter.ImportTimeline(token).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_EQ(produced->Export(absl::Hours(2)).status().code(), absl::StatusCode::kInvalidArgument);

  // A point of another Client's timeline, and too many points at once.
  const TimelinePoint foreign[] = {{&*produced, 1}};
  status = waiter.WaitTimelines(foreign, true, absl::ZeroDuration()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("belongs to another Client's session"));
  std::vector<TimelinePoint> many(65, TimelinePoint{&*seen, 1});
  EXPECT_EQ(waiter.WaitTimelines(many, true, absl::ZeroDuration()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(TimelineTest, ForeignIdsAreNotFound) {
  Client owner = Connect();
  absl::StatusOr<Timeline> produced = owner.CreateTimeline();
  ASSERT_TRUE(produced.ok());
  absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok());
  auto stub = FenceStub(daemon_->socket_dir());
  for (uint64_t id : {produced->id(), produced->id() + 1000}) {
    v1::GetTimelineInfoRequest info;
    info.set_timeline_id(id);
    v1::GetTimelineInfoResponse got;
    grpc::Status status = stub->GetTimelineInfo(raw->Context().get(), info, &got);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << id;
    EXPECT_EQ(status.error_message(), absl::StrCat("timeline ", id, " not found"));
    v1::ExportTimelineRequest exported;
    exported.set_timeline_id(id);
    v1::ExportTimelineResponse token;
    EXPECT_EQ(stub->ExportTimeline(raw->Context().get(), exported, &token).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
}

// Pages a client makes itself, wrong every way the daemon checks.
TEST_F(TimelineTest, HostilePagesAreRefused) {
  auto stub = FenceStub(daemon_->socket_dir());
  struct Case {
    std::string what;
    int size;
    int seals;
    bool pipe;
    std::string error;
  };
  const int kGood = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL;
  const std::vector<Case> cases = {
      {"unsealed", 4096, 0, false, "must be sealed with"},
      {"writable by others", 4096, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL, false,
       "F_SEAL_FUTURE_WRITE"},
      {"too big", 8192, kGood, false, "is 8192 bytes; it must be 4096"},
      {"a pipe", 0, 0, true, "upload"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<RawSession> raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok());
    UniqueFd page;
    UniqueFd other_end;
    if (c.pipe) {
      int ends[2];
      ASSERT_EQ(::pipe2(ends, O_CLOEXEC), 0);
      page = UniqueFd(ends[0]);
      other_end = UniqueFd(ends[1]);
    } else {
      page = UniqueFd(::memfd_create("hostile", MFD_CLOEXEC | MFD_ALLOW_SEALING));
      ASSERT_EQ(::ftruncate(page.get(), c.size), 0);
      if (c.seals != 0) {
        ASSERT_EQ(::fcntl(page.get(), F_ADD_SEALS, c.seals), 0);
      }
    }
    v1::FdChannelMessage upload;
    upload.mutable_upload()->set_upload_id(1);
    const int fds[] = {page.get()};
    ASSERT_TRUE(raw->socket.Send(upload.SerializeAsString(), fds).ok());
    // A good wait page, so that only the counter page is wrong.
    UniqueFd waits(::memfd_create("waits", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    ASSERT_EQ(::ftruncate(waits.get(), 4096), 0);
    ASSERT_EQ(::fcntl(waits.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
    upload.mutable_upload()->set_upload_id(2);
    const int wait_fds[] = {waits.get()};
    ASSERT_TRUE(raw->socket.Send(upload.SerializeAsString(), wait_fds).ok());
    auto context = raw->Context();
    context->AddMetadata(kRecordsMetadataKey, "2");
    v1::CreateTimelineRequest request;
    request.set_counters_upload_id(1);
    request.set_wait_page_upload_id(2);
    v1::CreateTimelineResponse response;
    grpc::Status status = stub->CreateTimeline(context.get(), request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << c.what << ": " << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.pipe ? "not a memfd" : c.error)) << c.what;
  }
  stub.reset();
  EXPECT_EQ(KnownTimelines(), 0u);
  ExpectBaseline();
}

TEST_F(TimelineTest, LimitsAreNamed) {
  daemon_.reset();
  StartDaemon(R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM }
                 limits { max_timelines_per_session: 2 })pb");
  {
    Client owner = Connect();
    std::vector<Timeline> kept;
    for (int i = 0; i < 2; ++i) kept.push_back(*owner.CreateTimeline());
    absl::Status full = owner.CreateTimeline().status();
    EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
    EXPECT_THAT(full.message(),
                HasSubstr("holds 2 timelines, the limit (max_timelines_per_session 2)"));
    // Imports count too.
    Client other = Connect();
    absl::StatusOr<Timeline> mine = other.CreateTimeline();
    ASSERT_TRUE(mine.ok());
    EXPECT_EQ(owner.ImportTimeline(*mine->Export()).status().code(),
              absl::StatusCode::kResourceExhausted);
    kept.pop_back();
    EXPECT_TRUE(Eventually([&] { return owner.CreateTimeline().ok(); }))
        << "a dropped timeline frees its place";

    // Every wait slot of a session in use: the next wait is refused, named.
    absl::StatusOr<Timeline> seen = owner.ImportTimeline(*mine->Export());
    ASSERT_TRUE(seen.ok()) << seen.status();
    // 64 + 63 points: all 127 slots.
    const std::vector<TimelinePoint> points[] = {
        std::vector<TimelinePoint>(64, TimelinePoint{&*seen, 1}),
        std::vector<TimelinePoint>(63, TimelinePoint{&*seen, 1})};
    std::vector<std::thread> waiters;
    for (int i = 0; i < 2; ++i) {
      waiters.emplace_back([&, i] {
        // Retried while the probe below holds a slot.
        absl::Status waited;
        do {
          waited = owner.WaitTimelines(points[i], true, absl::Seconds(20)).status();
        } while (waited.code() == absl::StatusCode::kResourceExhausted);
        EXPECT_TRUE(waited.ok()) << waited;
      });
    }
    ASSERT_TRUE(Eventually([&] {
      absl::Status refused = seen->Wait(1, absl::Milliseconds(1)).status();
      return refused.code() == absl::StatusCode::kResourceExhausted &&
             absl::StrContains(refused.message(), "all 127 timeline wait slots");
    }));
    ASSERT_TRUE(mine->Signal(1).ok());
    for (std::thread& waiter : waiters) waiter.join();
  }
  EXPECT_TRUE(Eventually([&] { return KnownTimelines() == 0; }));
  ExpectBaseline();
}

}  // namespace
}  // namespace bufferd
