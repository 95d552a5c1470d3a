#include "fences/timeline_table.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>

#include "absl/synchronization/notification.h"
#include "base/fd_count.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace bufferd {
namespace {

using ::testing::HasSubstr;
using timeline::Load;
using timeline::Store;

constexpr uint64_t kOwner = 1;
constexpr uint64_t kOther = 2;
constexpr absl::Duration kDeadline = absl::Seconds(1);

// A page as a client makes it: a memfd mapped writable here, then sealed.
struct Page {
  UniqueFd fd;
  Mapping map;
  template <typename T>
  T& as() {
    return *reinterpret_cast<T*>(map.data());
  }
};
Page NewPage(int seals, off_t size = timeline::kPageSize) {
  Page page;
  page.fd = UniqueFd(::memfd_create("test-page", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  EXPECT_EQ(::ftruncate(page.fd.get(), size), 0);
  page.map = *Mapping::Create(page.fd.get(), size, Mapping::Protection::kReadWrite);
  if (seals != 0) {
    EXPECT_EQ(::fcntl(page.fd.get(), F_ADD_SEALS, seals), 0);
  }
  return page;
}
constexpr int kCounterSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL;
constexpr int kWaitSeals = F_SEAL_SHRINK | F_SEAL_GROW;

UniqueFd Dup(const UniqueFd& fd) { return UniqueFd(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0)); }

// A wake page the table handed out, mapped read-write as its session and
// the owner map it.
Page MapWakePage(const LeasedFd& page) {
  return Page{UniqueFd(), *Mapping::Create(page.fd.get(), timeline::kPageSize,
                                           Mapping::Protection::kReadWrite)};
}

void Arm(timeline::WaitSlot& slot, uint64_t timeline, uint64_t point) {
  Store(slot.gen, Load(slot.gen) + 1);
  Store(slot.timeline, timeline);
  Store(slot.point, point);
  Store(slot.gen, Load(slot.gen) + 1);
}

class TimelineTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    baseline_fds_ = CountOpenFds();
    ASSERT_TRUE(loop_.Init().ok());  // not started: the tests call Scan
    table_ = std::make_unique<TimelineTable>(&loop_, &budget_, TimelineLimits{});
    table_->AddSession(kOwner, 1000);
    table_->AddSession(kOther, 1001);
    for (uint64_t session : {kOwner, kOther}) {
      waits_[session] = NewPage(kWaitSeals);
      ASSERT_TRUE(table_->SetWaitPage(session, Dup(waits_[session].fd)).ok());
    }
  }
  void TearDown() override {
    table_->CloseSession(kOwner);
    table_->CloseSession(kOther);
    table_->Stop();
    table_.reset();
    EXPECT_EQ(budget_.usage().total, 0u) << "every page fd's lease is back";
  }
  // A timeline kOwner owns: its counter page (writable here) and its state
  // page (the read-only copy the owner gets).
  struct Owned {
    uint64_t id = 0;
    Page counters;
    Mapping state_map;
    timeline::CounterPage& page() { return counters.as<timeline::CounterPage>(); }
    const timeline::StatePage& state() const {
      return *reinterpret_cast<const timeline::StatePage*>(state_map.data());
    }
  };
  Owned Create(absl::Duration deadline = kDeadline) {
    Owned owned;
    owned.counters = NewPage(kCounterSeals);
    absl::StatusOr<TimelineTable::Created> created =
        table_->Create(kOwner, Dup(owned.counters.fd), "frames", deadline);
    EXPECT_TRUE(created.ok()) << created.status();
    if (!created.ok()) return owned;
    owned.id = created->view.id;
    owned.state_map = *Mapping::Create(created->state.fd.get(), timeline::kPageSize,
                                       Mapping::Protection::kReadOnly);
    return owned;
  }
  // Slot i of the session's wait page, marked as holding a wait (as the
  // library marks a slot before it writes it).
  timeline::WaitSlot& Slot(uint64_t session, size_t i) {
    auto& page = waits_[session].as<timeline::WaitPage>();
    page.armed[i / 64] |= uint64_t{1} << (i % 64);
    return page.slots[i];
  }

  int baseline_fds_ = 0;
  EventLoop loop_;
  FdBudget budget_;
  std::unique_ptr<TimelineTable> table_;
  std::map<uint64_t, Page> waits_;
};

TEST_F(TimelineTableTest, PagesThatAreNotSealedMemfdsAreRefused) {
  struct Case {
    Page page;
    std::string error;
  };
  Case cases[] = {
      {NewPage(0), "must be sealed with F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_FUTURE_WRITE"},
      {NewPage(F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), "F_SEAL_FUTURE_WRITE"},
      {NewPage(kCounterSeals, 8192), "is 8192 bytes; it must be 4096"},
      {NewPage(kCounterSeals, 1024), "is 1024 bytes"},
  };
  for (Case& c : cases) {
    absl::Status status = table_->Create(kOwner, Dup(c.page.fd), "x", kDeadline).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(status.message(), HasSubstr(c.error));
  }
  int ends[2];
  ASSERT_EQ(::pipe2(ends, O_CLOEXEC), 0);
  UniqueFd read_end(ends[0]), write_end(ends[1]);
  EXPECT_THAT(table_->Create(kOwner, std::move(read_end), "x", kDeadline).status().message(),
              HasSubstr("is not a memfd"));
  // A wait page the session could truncate under the daemon's mapping.
  table_->AddSession(3, 1002);
  EXPECT_THAT(table_->SetWaitPage(3, NewPage(0).fd).message(),
              HasSubstr("the wait page must be sealed with F_SEAL_SHRINK and F_SEAL_GROW"));
  table_->CloseSession(3);
  // Another wait page for a session that has one; the same one again is fine.
  EXPECT_EQ(table_->SetWaitPage(kOwner, NewPage(kWaitSeals).fd).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(table_->SetWaitPage(kOwner, Dup(waits_[kOwner].fd)).ok());
  // A page of a timeline, as another's counters.
  Owned owned = Create();
  absl::StatusOr<TimelineTable::Handout> handout = table_->Hold(kOther, owned.id);
  ASSERT_TRUE(handout.ok());
  EXPECT_THAT(
      table_->Create(kOther, std::move(handout->state.fd), "x", kDeadline).status().message(),
      HasSubstr("is a page of timeline"));
  EXPECT_EQ(table_->Create(kOwner, Dup(owned.counters.fd), "x", kDeadline).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(TimelineTableTest, TheNextPointFailsAtItsDeadlineForEveryone) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  const absl::Duration t0 = absl::Seconds(100);
  Arm(Slot(kOther, 0), owned.id, 1);
  table_->Scan(t0);
  EXPECT_EQ(Load(owned.state().waited_point), 1u) << "the owner sees who waits";
  const uint32_t seq = Load(owned.state().seq);
  table_->Scan(t0 + kDeadline - absl::Milliseconds(1));
  EXPECT_EQ(Load(owned.state().mark_count), 0u) << "not yet";
  table_->Scan(t0 + kDeadline);
  ASSERT_EQ(Load(owned.state().mark_count), 1u);
  EXPECT_EQ(Load(owned.state().marks[0]), 1u);
  EXPECT_NE(Load(owned.state().seq), seq) << "waiters were woken";
  std::atomic<uint64_t> seen{0};
  EXPECT_EQ(timeline::Evaluate(owned.page(), owned.state(), 1, seen).status,
            v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  EXPECT_FALSE(timeline::Evaluate(owned.page(), owned.state(), 2, seen).done)
      << "the timeline did not move";
  EXPECT_EQ(Load(owned.state().waited_point), 0u);
}

TEST_F(TimelineTableTest, APointFurtherAheadFailsOnlyForItsWaiters) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  absl::StatusOr<TimelineTable::Registered> waker = table_->RegisterWaker(kOther, owned.id, false);
  ASSERT_TRUE(waker.ok());
  Page page = MapWakePage(waker->page);
  const auto& wake = page.as<timeline::WakePage>();
  const absl::Duration t0 = absl::Seconds(100);
  Arm(Slot(kOther, 0), owned.id, 5);
  table_->Scan(t0);
  const uint32_t seq = Load(wake.seq);
  table_->Scan(t0 + kDeadline);
  EXPECT_EQ(Load(owned.state().mark_count), 0u) << "nobody else's point fails";
  ASSERT_EQ(Load(wake.expired_count), 1u);
  EXPECT_EQ(Load(wake.expired[0]), 5u);
  EXPECT_NE(Load(wake.seq), seq) << "its waiter was woken";
  std::atomic<uint64_t> seen{0};
  timeline::PointState mine = timeline::Evaluate(owned.page(), owned.state(), 5, seen, &wake);
  EXPECT_EQ(mine.status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  EXPECT_THAT(mine.message, HasSubstr("failed for this session only"));
  EXPECT_FALSE(timeline::Evaluate(owned.page(), owned.state(), 5, seen).done)
      << "still pending for the others";
  Store(owned.page().reached, uint64_t{5});
  EXPECT_EQ(timeline::Evaluate(owned.page(), owned.state(), 5, seen, &wake).status,
            v1::FENCE_STATUS_OK)
      << "reached: reached for everyone";
}

TEST_F(TimelineTableTest, APointNobodyWaitsOnAnyMoreStartsAfresh) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  const absl::Duration t0 = absl::Seconds(100);
  Arm(Slot(kOther, 0), owned.id, 1);
  table_->Scan(t0);
  Arm(Slot(kOther, 0), 0, 0);
  table_->Scan(t0 + kDeadline / 2);
  Arm(Slot(kOther, 0), owned.id, 1);
  table_->Scan(t0 + kDeadline);
  EXPECT_EQ(Load(owned.state().mark_count), 0u);
  table_->Scan(t0 + kDeadline * 2);
  EXPECT_EQ(Load(owned.state().mark_count), 1u);
}

TEST_F(TimelineTableTest, AReachedPointIsNotTimedAndReachingItCounts) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  const absl::Duration t0 = absl::Seconds(100);
  Arm(Slot(kOther, 0), owned.id, 3);
  table_->Scan(t0);
  Store(owned.page().reached, uint64_t{3});  // reached, but no wake sent
  const uint32_t seq = Load(owned.state().seq);
  table_->Scan(t0 + absl::Milliseconds(100));
  EXPECT_EQ(Load(owned.state().observed), 3u) << "published";
  EXPECT_NE(Load(owned.state().seq), seq) << "its waiter, who missed it, was woken";
  Store(owned.page().reached, uint64_t{1});  // taken back
  table_->Scan(t0 + kDeadline * 2);
  EXPECT_EQ(Load(owned.state().mark_count), 0u) << "never failed: it was reached";
  std::atomic<uint64_t> fresh{0};
  EXPECT_EQ(timeline::Reached(owned.page(), owned.state(), fresh), 3u);
}

TEST_F(TimelineTableTest, SlotsTheDaemonCannotTrustAreSkipped) {
  Owned owned = Create();
  const absl::Duration t0 = absl::Seconds(100);
  // A timeline the session does not hold, and a slot mid-rewrite.
  Arm(Slot(kOther, 0), owned.id, 5);
  Store(Slot(kOther, 1).gen, uint32_t{7});
  Store(Slot(kOther, 1).timeline, owned.id);
  Store(Slot(kOther, 1).point, uint64_t{6});
  table_->Scan(t0);
  table_->Scan(t0 + kDeadline * 2);
  EXPECT_EQ(Load(owned.state().mark_count), 0u);
  EXPECT_EQ(Load(owned.state().waited_point), 0u);
}

TEST_F(TimelineTableTest, OnlySlotsMarkedArmedAreRead) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  auto& page = waits_[kOther].as<timeline::WaitPage>();
  const absl::Duration t0 = absl::Seconds(100);
  // A wait written but not marked: the daemon never reads it.
  Arm(page.slots[3], owned.id, 1);
  // Every bit set, the one past the last slot included (which names no
  // slot: timeline::SlotBits), and the marked empty slots are skipped.
  ASSERT_EQ(timeline::WaitPage::kSlots, 127u);
  Store(page.armed[1], ~uint64_t{0});
  table_->Scan(t0);
  table_->Scan(t0 + kDeadline * 2);
  EXPECT_EQ(Load(owned.state().mark_count), 0u);
  EXPECT_EQ(Load(owned.state().waited_point), 0u);
  // Marked, it is timed: the last slot, read through the second mask.
  Arm(page.slots[timeline::WaitPage::kSlots - 1], owned.id, 1);
  table_->Scan(t0 + kDeadline * 3);
  EXPECT_EQ(Load(owned.state().waited_point), 1u);
  table_->Scan(t0 + kDeadline * 4);
  EXPECT_EQ(Load(owned.state().mark_count), 1u);
}

TEST_F(TimelineTableTest, AHoldThroughABufferWaitsButNeitherTimesNorShares) {
  Owned owned = Create();
  EXPECT_EQ(table_->Hold(kOwner, owned.id, /*through_buffer=*/true).status().code(),
            absl::StatusCode::kFailedPrecondition)
      << "the owner's own hold must end with its Timeline";
  ASSERT_TRUE(table_->Hold(kOther, owned.id, /*through_buffer=*/true).ok());
  const absl::Duration t0 = absl::Seconds(100);
  // Its wait on the next point is seen by nobody: no deadline starts.
  Arm(Slot(kOther, 0), owned.id, 1);
  table_->Scan(t0);
  table_->Scan(t0 + kDeadline * 2);
  EXPECT_EQ(Load(owned.state().mark_count), 0u);
  EXPECT_EQ(Load(owned.state().waited_point), 0u);
  absl::Status shared = table_->CheckHeld(kOther, owned.id, /*to_share=*/true);
  EXPECT_EQ(shared.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(shared.message(), HasSubstr("opened through a buffer"));
  EXPECT_TRUE(table_->CheckHeld(kOther, owned.id).ok()) << "it still holds it";
  absl::Status watched = table_->WatchPoint(kOther, owned.id, 1, [](timeline::PointState) {});
  EXPECT_EQ(watched.code(), absl::StatusCode::kPermissionDenied) << watched;
  // A token lifts it: the wait counts from then on, and a later open
  // through a buffer leaves the hold whole.
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  EXPECT_TRUE(table_->CheckHeld(kOther, owned.id, /*to_share=*/true).ok());
  ASSERT_TRUE(table_->Hold(kOther, owned.id, /*through_buffer=*/true).ok());
  EXPECT_TRUE(table_->CheckHeld(kOther, owned.id, /*to_share=*/true).ok());
  table_->Scan(t0 + kDeadline * 3);
  EXPECT_EQ(Load(owned.state().waited_point), 1u);
  table_->Scan(t0 + kDeadline * 4);
  EXPECT_EQ(Load(owned.state().mark_count), 1u);
}

TEST_F(TimelineTableTest, AWaitThroughABufferEndsWithThePointSomeoneElseTimes) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id, /*through_buffer=*/true).ok());
  absl::StatusOr<TimelineTable::Registered> waker = table_->RegisterWaker(kOther, owned.id, false);
  ASSERT_TRUE(waker.ok());
  Page page = MapWakePage(waker->page);
  const auto& wake = page.as<timeline::WakePage>();
  // Point 5 is attached to a buffer (the daemon watches it, from the
  // attach); the reader waits on it, and on 7, which nobody else does.
  bool failed = false;
  ASSERT_TRUE(table_
                  ->WatchPoint(kOwner, owned.id, 5,
                               [&](timeline::PointState state) {
                                 failed = state.status == v1::FENCE_STATUS_DEADLINE_EXCEEDED;
                               })
                  .ok());
  const absl::Duration t0 = absl::Seconds(100);
  table_->Scan(t0);
  Arm(Slot(kOther, 0), owned.id, 5);
  Arm(Slot(kOther, 1), owned.id, 7);
  table_->Scan(t0 + kDeadline / 2);
  table_->Scan(t0 + kDeadline);
  EXPECT_TRUE(failed) << "the watch's point failed at its deadline";
  ASSERT_EQ(Load(wake.expired_count), 1u) << "the reader's wait on it ended with it";
  EXPECT_EQ(Load(wake.expired[0]), 5u);
  table_->Scan(t0 + kDeadline * 4);
  EXPECT_EQ(Load(wake.expired_count), 1u) << "point 7: nobody's deadline, none started";
  EXPECT_EQ(Load(owned.state().mark_count), 0u);
}

TEST_F(TimelineTableTest, TheOwnersEndFailsEveryLaterPoint) {
  Owned owned = Create();
  Owned dropped = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  ASSERT_TRUE(table_->Hold(kOther, dropped.id).ok());
  Store(owned.page().reached, uint64_t{4});
  table_->Forget(kOwner, dropped.id);
  EXPECT_EQ(Load(dropped.state().ended), static_cast<uint32_t>(v1::FENCE_STATUS_CANCELLED));
  table_->CloseSession(kOwner);
  EXPECT_EQ(Load(owned.state().ended), static_cast<uint32_t>(v1::FENCE_STATUS_OWNER_DIED));
  EXPECT_EQ(Load(owned.state().ended_after), 4u);
  Store(owned.page().reached, uint64_t{9});  // too late: not counted
  std::atomic<uint64_t> seen{0};
  EXPECT_EQ(timeline::Evaluate(owned.page(), owned.state(), 4, seen).status,
            v1::FENCE_STATUS_OK);
  EXPECT_EQ(timeline::Evaluate(owned.page(), owned.state(), 5, seen).status,
            v1::FENCE_STATUS_OWNER_DIED);
  absl::StatusOr<TimelineView> view = table_->Info(kOther, owned.id);
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->ended, v1::FENCE_STATUS_OWNER_DIED);
  EXPECT_EQ(view->owner_session, 0u);
  EXPECT_EQ(table_->Info(kOwner, owned.id).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(TimelineTableTest, HoldsAreCountedPerObject) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOwner, owned.id).ok());  // the owner imports its own
  table_->Forget(kOwner, owned.id);
  EXPECT_EQ(Load(owned.state().ended), 0u) << "one of two holds dropped";
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  table_->Forget(kOther, owned.id);
  EXPECT_TRUE(table_->CheckHeld(kOther, owned.id).ok());
  table_->Forget(kOther, owned.id);
  EXPECT_EQ(table_->CheckHeld(kOther, owned.id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table_->CheckHeld(kOther, owned.id).message(),
            absl::StrCat("timeline ", owned.id, " not found"));
}

TEST_F(TimelineTableTest, WakersReachTheOwnerAndAreWokenAtTheEnd) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  absl::StatusOr<TimelineTable::Registered> registered =
      table_->RegisterWaker(kOther, owned.id, false);
  ASSERT_TRUE(registered.ok()) << registered.status();
  EXPECT_FALSE(registered->notify_read.has_value());
  Page page = MapWakePage(registered->page);
  auto& wake = page.as<timeline::WakePage>();
  EXPECT_EQ(Load(wake.timeline_id), owned.id);
  const uint64_t gen = Load(owned.state().wakers_gen);
  // Again: the same waker (a copy of its page), and nothing new for the
  // owner to take.
  absl::StatusOr<TimelineTable::Registered> again = table_->RegisterWaker(kOther, owned.id, false);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->waker_id, registered->waker_id);
  EXPECT_EQ(Load(owned.state().wakers_gen), gen) << "a no-op registration moves nothing";
  // With notify pipes: the same waker gains them.
  absl::StatusOr<TimelineTable::Registered> notify = table_->RegisterWaker(kOther, owned.id, true);
  ASSERT_TRUE(notify.ok()) << notify.status();
  ASSERT_TRUE(notify->notify_read.has_value());
  EXPECT_NE(Load(owned.state().wakers_gen), gen);
  EXPECT_EQ(table_->RegisterWaker(3, owned.id, false).status().code(),
            absl::StatusCode::kNotFound);
  // Only the owner takes wakers; a waker it knows comes again once it has
  // notify pipes the owner lacks.
  EXPECT_EQ(table_->TakeWakers(kOther, owned.id, {}, {}).status().code(),
            absl::StatusCode::kPermissionDenied);
  absl::StatusOr<TimelineTable::Wakers> taken = table_->TakeWakers(kOwner, owned.id, {}, {});
  ASSERT_TRUE(taken.ok());
  ASSERT_EQ(taken->wakers.size(), 1u);
  ASSERT_TRUE(taken->wakers[0].notify.has_value());
  EXPECT_EQ(taken->gen, Load(owned.state().wakers_gen));
  const uint64_t id = taken->wakers[0].waker_id;
  EXPECT_TRUE(table_->TakeWakers(kOwner, owned.id, {id}, {id})->wakers.empty());
  EXPECT_EQ(table_->TakeWakers(kOwner, owned.id, {id}, {})->wakers.size(), 1u);
  // The waiter closing its read end never makes the owner's send fail (the
  // daemon keeps one; MSG_NOSIGNAL in any case).
  const int owner_write = taken->wakers[0].notify->fd.get();
  const char byte = 1;
  absl::StatusOr<TimelineTable::Registered> second = table_->RegisterWaker(kOther, owned.id, true);
  ASSERT_TRUE(second.ok() && second->notify_read.has_value());
  notify->notify_read.reset();
  ASSERT_EQ(::send(owner_write, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL), 1);
  // The end sends to the channel too (MSG_DONTWAIT: a full one never
  // blocks it).
  const int read_end = second->notify_read->fd.get();
  char drained[64];
  while (::recv(read_end, drained, sizeof(drained), MSG_DONTWAIT) > 0) {
  }
  const uint32_t seq = Load(wake.seq);
  table_->CloseSession(kOwner);
  EXPECT_NE(Load(wake.seq), seq);
  pollfd readable{read_end, POLLIN, 0};
  EXPECT_EQ(::poll(&readable, 1, 0), 1);
  table_->Forget(kOther, owned.id);
  EXPECT_EQ(Load(wake.closed), 1u) << "the waker is gone with the hold";
}

TEST_F(TimelineTableTest, TheDaemonWritesTheByteAnOwnerDidNot) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  absl::StatusOr<TimelineTable::Registered> notify = table_->RegisterWaker(kOther, owned.id, true);
  ASSERT_TRUE(notify.ok());
  Page page = MapWakePage(notify->page);
  Store(page.as<timeline::WakePage>().armed, uint64_t{2});
  // Its point reached without a byte (the owner never took the waker).
  Store(owned.page().reached, uint64_t{2});
  pollfd readable{notify->notify_read->fd.get(), POLLIN, 0};
  EXPECT_EQ(::poll(&readable, 1, 0), 0);
  table_->Scan(absl::Seconds(100));
  EXPECT_EQ(::poll(&readable, 1, 0), 1);
}

TEST_F(TimelineTableTest, AnArmedNotifyPointIsTimed) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  absl::StatusOr<TimelineTable::Registered> registered =
      table_->RegisterWaker(kOther, owned.id, true);
  ASSERT_TRUE(registered.ok());
  Page page = MapWakePage(registered->page);
  Store(page.as<timeline::WakePage>().armed, uint64_t{1});
  const absl::Duration t0 = absl::Seconds(100);
  table_->Scan(t0);
  table_->Scan(t0 + kDeadline);
  ASSERT_EQ(Load(owned.state().mark_count), 1u);
  EXPECT_EQ(Load(owned.state().marks[0]), 1u);
  pollfd readable{registered->notify_read->fd.get(), POLLIN, 0};
  EXPECT_EQ(::poll(&readable, 1, 0), 1) << "the event loop hears of it";
}

// What a watch got, once.
struct Got {
  int calls = 0;
  timeline::PointState state;
  TimelineTable::PointDone Done() {
    return [this](timeline::PointState s) {
      ++calls;
      state = std::move(s);
    };
  }
};

TEST_F(TimelineTableTest, AnExportedPointIsDoneAtOnceWhenReachedAndLaterAtAScan) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  Store(owned.page().reached, uint64_t{2});
  Got reached, later;
  ASSERT_TRUE(table_->WatchPoint(kOther, owned.id, 2, reached.Done()).ok());
  EXPECT_EQ(reached.calls, 1) << "reached already: done before it returns";
  EXPECT_EQ(reached.state.status, v1::FENCE_STATUS_OK);
  ASSERT_TRUE(table_->WatchPoint(kOther, owned.id, 4, later.Done()).ok());
  EXPECT_EQ(later.calls, 0);
  EXPECT_EQ(table_->Info(kOther, owned.id)->exported_points, 1u);
  EXPECT_EQ(table_->WatchPoint(kOther, owned.id, UINT64_MAX, later.Done()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(table_->WatchPoint(3, owned.id, 4, later.Done()).code(),
            absl::StatusCode::kNotFound);
  // The owner gets the daemon's waker like any other, armed at the point.
  absl::StatusOr<TimelineTable::Wakers> taken = table_->TakeWakers(kOwner, owned.id, {}, {});
  ASSERT_TRUE(taken.ok());
  ASSERT_EQ(taken->wakers.size(), 1u);
  ASSERT_TRUE(taken->wakers[0].notify.has_value());
  Page page = MapWakePage(taken->wakers[0].page);
  EXPECT_EQ(Load(page.as<timeline::WakePage>().armed), 4u);
  // Reached without a byte: the next scan settles it.
  Store(owned.page().reached, uint64_t{5});
  table_->Scan(absl::Seconds(100));
  EXPECT_EQ(later.calls, 1);
  EXPECT_EQ(later.state.status, v1::FENCE_STATUS_OK);
  EXPECT_EQ(Load(page.as<timeline::WakePage>().armed), 0u)
      << "nothing left to watch";
}

TEST_F(TimelineTableTest, AnExportedPointFailsAtItsDeadlineAndAtTheOwnersEnd) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  Got next, ahead, after_end;
  ASSERT_TRUE(table_->WatchPoint(kOther, owned.id, 1, next.Done()).ok());
  ASSERT_TRUE(table_->WatchPoint(kOther, owned.id, 3, ahead.Done()).ok());
  const absl::Duration t0 = absl::Seconds(100);
  table_->Scan(t0);
  EXPECT_EQ(next.calls + ahead.calls, 0);
  table_->Scan(t0 + kDeadline);
  EXPECT_EQ(next.calls, 1);
  EXPECT_EQ(next.state.status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  EXPECT_EQ(ahead.calls, 1) << "an exported point is a wait: it is bounded too";
  EXPECT_EQ(ahead.state.status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  EXPECT_THAT(ahead.state.message, HasSubstr("failed for its waiters only"));
  EXPECT_EQ(Load(owned.state().mark_count), 1u) << "only the next point failed for everyone";
  ASSERT_TRUE(table_->WatchPoint(kOther, owned.id, 2, after_end.Done()).ok());
  table_->CloseSession(kOwner);
  table_->Scan(t0 + kDeadline + absl::Milliseconds(100));
  EXPECT_EQ(after_end.calls, 1);
  EXPECT_EQ(after_end.state.status, v1::FENCE_STATUS_OWNER_DIED);
}

TEST_F(TimelineTableTest, TheOwnersByteReachesTheDaemonOnItsLoop) {
  table_->Stop();
  // No scan could settle it: only the byte the owner sends.
  table_ = std::make_unique<TimelineTable>(&loop_, &budget_,
                                           TimelineLimits{.scan_interval = absl::Hours(1)});
  table_->AddSession(kOwner, 1000);
  table_->AddSession(kOther, 1001);
  loop_.Start();
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  absl::Notification settled;
  timeline::PointState got;
  ASSERT_TRUE(table_
                  ->WatchPoint(kOther, owned.id, 2,
                               [&](timeline::PointState state) {
                                 got = std::move(state);
                                 settled.Notify();
                               })
                  .ok());
  absl::StatusOr<TimelineTable::Wakers> taken = table_->TakeWakers(kOwner, owned.id, {}, {});
  ASSERT_TRUE(taken.ok() && taken->wakers.size() == 1 && taken->wakers[0].notify.has_value());
  // What the owner's library does at Signal(2).
  Store(owned.page().reached, uint64_t{2});
  const char byte = 1;
  ASSERT_EQ(::send(taken->wakers[0].notify->fd.get(), &byte, 1, MSG_DONTWAIT), 1);
  EXPECT_TRUE(settled.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(got.status, v1::FENCE_STATUS_OK);
  loop_.Stop();
}

TEST_F(TimelineTableTest, FencesBehindPointsSettleInOrder) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  EXPECT_EQ(table_->Promise(kOther, owned.id, 3).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(table_->Promise(kOwner, owned.id, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(table_->Promise(kOwner, owned.id, UINT64_MAX).code(),
            absl::StatusCode::kInvalidArgument);
  // An event loop waiting for point 3 to be available.
  absl::StatusOr<TimelineTable::Registered> waker = table_->RegisterWaker(kOther, owned.id, true);
  ASSERT_TRUE(waker.ok());
  Page page = MapWakePage(waker->page);
  auto& wake = page.as<timeline::WakePage>();
  Store(wake.arm_available, uint32_t{1});
  Store(wake.armed, uint64_t{3});
  pollfd readable{waker->notify_read->fd.get(), POLLIN, 0};
  ASSERT_EQ(::poll(&readable, 1, 0), 0);

  ASSERT_TRUE(table_->Promise(kOwner, owned.id, 3).ok());
  EXPECT_EQ(::poll(&readable, 1, 0), 1) << "available: the event loop hears of it";
  std::atomic<uint64_t> seen{0};
  EXPECT_TRUE(timeline::Available(owned.page(), owned.state(), 2, seen));
  EXPECT_TRUE(timeline::Available(owned.page(), owned.state(), 3, seen));
  EXPECT_FALSE(timeline::Available(owned.page(), owned.state(), 4, seen));
  EXPECT_FALSE(timeline::Evaluate(owned.page(), owned.state(), 3, seen).done) << "not reached";
  EXPECT_THAT(table_->Promise(kOwner, owned.id, 3).message(),
              HasSubstr("the last point with a fence behind it, 3"));
  ASSERT_TRUE(table_->Promise(kOwner, owned.id, 5).ok());
  EXPECT_EQ(table_->Info(kOwner, owned.id)->promised, (std::vector<uint64_t>{3, 5}));

  // 5's fence first: nothing moves until 3's has signalled.
  table_->Settle(owned.id, 5, v1::FENCE_STATUS_OK, "");
  EXPECT_FALSE(timeline::Evaluate(owned.page(), owned.state(), 5, seen).done);
  const uint32_t seq = Load(wake.seq);
  table_->Settle(owned.id, 3, v1::FENCE_STATUS_ERROR, "gpu hang");
  EXPECT_NE(Load(wake.seq), seq) << "waiters were woken";
  for (uint64_t point : {1, 3}) {
    timeline::PointState state = timeline::Evaluate(owned.page(), owned.state(), point, seen);
    EXPECT_EQ(state.status, v1::FENCE_STATUS_ERROR) << point;
    EXPECT_EQ(state.message, "gpu hang");
  }
  EXPECT_EQ(timeline::Evaluate(owned.page(), owned.state(), 4, seen).status,
            v1::FENCE_STATUS_OK);
  EXPECT_EQ(timeline::Evaluate(owned.page(), owned.state(), 5, seen).status,
            v1::FENCE_STATUS_OK);
  EXPECT_TRUE(table_->Info(kOwner, owned.id)->promised.empty());
  EXPECT_EQ(table_->Promise(kOwner, owned.id, 5).code(), absl::StatusCode::kFailedPrecondition)
      << "reached";
  // A settle for a point nobody promised, or twice, changes nothing.
  table_->Settle(owned.id, 9, v1::FENCE_STATUS_ERROR, "no");
  EXPECT_FALSE(timeline::Evaluate(owned.page(), owned.state(), 9, seen).done);
}

TEST_F(TimelineTableTest, APointBehindAFenceIsBoundedByThatFenceAndDroppedAtTheEnd) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  int dropped = 0;
  ASSERT_TRUE(table_->Promise(kOwner, owned.id, 3, [&] { ++dropped; }).ok());
  // Waited on for twice the timeline's deadline: the fence behind it (with
  // its own deadline) is what bounds it, not the timeline.
  Arm(Slot(kOther, 0), owned.id, 2);
  Arm(Slot(kOther, 1), owned.id, 3);
  const absl::Duration t0 = absl::Seconds(100);
  table_->Scan(t0);
  table_->Scan(t0 + kDeadline * 2);
  EXPECT_EQ(Load(owned.state().mark_count), 0u);
  EXPECT_TRUE(table_->Info(kOwner, owned.id)->waits.empty());
  // A point past it is the timeline's again.
  Arm(Slot(kOther, 2), owned.id, 4);
  table_->Scan(t0 + kDeadline * 3);
  EXPECT_EQ(table_->Info(kOwner, owned.id)->waits.size(), 1u);
  // The owner's end: whoever waits on the fence is told, once.
  EXPECT_EQ(dropped, 0);
  table_->CloseSession(kOwner);
  EXPECT_EQ(dropped, 1);
}

TEST_F(TimelineTableTest, TheLowestUnsettledPointIsPublishedAndAnAvailableArmIsNoWait) {
  Owned owned = Create();
  ASSERT_TRUE(table_->Hold(kOther, owned.id).ok());
  ASSERT_TRUE(table_->Promise(kOwner, owned.id, 3).ok());
  ASSERT_TRUE(table_->Promise(kOwner, owned.id, 5).ok());
  EXPECT_EQ(Load(owned.state().unsettled), 3u) << "the owner signals only points before it";
  // An event loop armed for availability of 3 got it: its arm is no wait
  // for 3 to be reached, so 3 never fails at the deadline for it.
  absl::StatusOr<TimelineTable::Registered> waker = table_->RegisterWaker(kOther, owned.id, true);
  ASSERT_TRUE(waker.ok());
  Page page = MapWakePage(waker->page);
  auto& wake = page.as<timeline::WakePage>();
  Store(wake.arm_available, uint32_t{1});
  Store(wake.armed, uint64_t{3});
  const absl::Duration t0 = absl::Seconds(100);
  table_->Scan(t0);
  table_->Scan(t0 + kDeadline * 2);
  EXPECT_EQ(Load(owned.state().mark_count), 0u);
  EXPECT_TRUE(table_->Info(kOwner, owned.id)->waits.empty());
  table_->Settle(owned.id, 3, v1::FENCE_STATUS_OK, "");
  EXPECT_EQ(Load(owned.state().unsettled), 5u);
  table_->Settle(owned.id, 5, v1::FENCE_STATUS_OK, "");
  EXPECT_EQ(Load(owned.state().unsettled), 0u);
  EXPECT_EQ(Load(owned.state().observed), 5u);
}

TEST_F(TimelineTableTest, LimitsAreNamed) {
  table_->Stop();
  table_ = std::make_unique<TimelineTable>(
      &loop_, &budget_,
      TimelineLimits{.max_per_session = 2, .max_per_uid = 3, .max_timelines = 4});
  table_->AddSession(kOwner, 1000);
  table_->AddSession(kOther, 1000);  // the same uid
  table_->AddSession(3, 1002);
  std::vector<Page> pages;
  auto create = [&](uint64_t session) {
    pages.push_back(NewPage(kCounterSeals));
    return table_->Create(session, Dup(pages.back().fd), "x", kDeadline).status();
  };
  ASSERT_TRUE(create(kOwner).ok());
  ASSERT_TRUE(create(kOwner).ok());
  EXPECT_THAT(create(kOwner).message(), HasSubstr("the limit (max_timelines_per_session 2)"));
  ASSERT_TRUE(create(kOther).ok());
  EXPECT_THAT(create(kOther).message(), HasSubstr("the limit (max_timelines_per_uid 3)"));
  ASSERT_TRUE(create(3).ok());
  EXPECT_THAT(create(3).message(), HasSubstr("the limit (max_timelines 4)"));
  table_->CloseSession(3);

  table_->Stop();
  table_ = std::make_unique<TimelineTable>(&loop_, &budget_,
                                           TimelineLimits{.max_points_behind_fences = 2});
  table_->AddSession(kOwner, 1000);
  pages.push_back(NewPage(kCounterSeals));
  absl::StatusOr<TimelineTable::Created> created =
      table_->Create(kOwner, Dup(pages.back().fd), "x", kDeadline);
  ASSERT_TRUE(created.ok());
  ASSERT_TRUE(table_->Promise(kOwner, created->view.id, 1).ok());
  ASSERT_TRUE(table_->Promise(kOwner, created->view.id, 2).ok());
  absl::Status full = table_->Promise(kOwner, created->view.id, 3);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(full.message(), HasSubstr("the limit (max_points_behind_fences 2)"));
  EXPECT_EQ(table_->CheckPromise(kOwner, created->view.id, 3).code(),
            absl::StatusCode::kResourceExhausted);
  table_->Settle(created->view.id, 1, v1::FENCE_STATUS_OK, "");
  EXPECT_TRUE(table_->Promise(kOwner, created->view.id, 3).ok()) << "a settled point frees its place";
}

}  // namespace
}  // namespace bufferd
