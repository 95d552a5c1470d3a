#include "fences/reservations.h"

#include <fcntl.h>
#include <sys/mman.h>

#include <memory>

#include "base/mapping.h"
#include "fences/reservation_page.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace bufferd {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr uint64_t kWriter = 1;
constexpr uint64_t kReader = 2;
constexpr uint64_t kThird = 3;
constexpr uint64_t kFourth = 4;
constexpr uint64_t kBuffer = 7;

class ReservationTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(loop_.Init().ok());
    fences_ = std::make_unique<FenceTable>(&loop_, &budget_, FenceLimits{});
    fences_->AddSession(kWriter, 1000);
    fences_->AddSession(kReader, 1001);
    fences_->AddSession(kThird, 1002);
    fences_->AddSession(kFourth, 1003);
    table_ = std::make_unique<ReservationTable>(fences_.get(),
                                                ReservationLimits{.max_fences_per_buffer = 3});
  }
  void TearDown() override {
    table_.reset();
    fences_->CloseSession(kWriter);
    fences_->CloseSession(kReader);
    fences_->CloseSession(kThird);
    fences_->CloseSession(kFourth);
    EXPECT_TRUE(fences_->List({}).empty()) << "no fence left pinned";
    fences_->Stop();
  }
  uint64_t NewFence(uint64_t session) {
    return fences_->Create(session, "f", "", absl::ZeroDuration())->id;
  }
  std::vector<uint64_t> Ids(v1::FenceUsage access) {
    std::vector<uint64_t> ids;
    absl::StatusOr<std::vector<ReservationTable::Attached>> pending =
        table_->Pending(kBuffer, access);
    EXPECT_TRUE(pending.ok()) << pending.status();
    if (!pending.ok()) return ids;
    for (const auto& entry : *pending) ids.push_back(entry.fence_id);
    return ids;
  }

  EventLoop loop_;
  FdBudget budget_;
  std::unique_ptr<FenceTable> fences_;
  std::unique_ptr<ReservationTable> table_;
};

TEST_F(ReservationTableTest, AccessesWaitForTheRightUsages) {
  const uint64_t kernel = NewFence(kWriter);
  const uint64_t write = NewFence(kWriter);
  const uint64_t read = NewFence(kReader);
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, kernel, v1::FENCE_USAGE_KERNEL).ok());
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, write, v1::FENCE_USAGE_WRITE).ok());
  ASSERT_TRUE(table_->Attach(kReader, kBuffer, read, v1::FENCE_USAGE_READ).ok());
  EXPECT_THAT(Ids(v1::FENCE_USAGE_READ), ElementsAre(kernel, write));
  EXPECT_THAT(Ids(v1::FENCE_USAGE_WRITE), ElementsAre(kernel, write, read));
  EXPECT_THAT(Ids(v1::FENCE_USAGE_BOOKKEEP), ElementsAre(kernel, write, read));
  EXPECT_FALSE(AccessWaitsFor(v1::FENCE_USAGE_READ, v1::FENCE_USAGE_BOOKKEEP));
  EXPECT_FALSE(AccessWaitsFor(v1::FENCE_USAGE_WRITE, v1::FENCE_USAGE_BOOKKEEP));
  EXPECT_TRUE(AccessWaitsFor(v1::FENCE_USAGE_BOOKKEEP, v1::FENCE_USAGE_BOOKKEEP));

  // Signalled fences are pruned.
  ASSERT_TRUE(fences_->Signal(kWriter, write, v1::FENCE_STATUS_OK, "").ok());
  EXPECT_THAT(Ids(v1::FENCE_USAGE_READ), ElementsAre(kernel));
  // Another session may hold an attached fence (and wait on it).
  ASSERT_TRUE(fences_->HoldFor(kReader, kernel).ok());
  fences_->Forget(kReader, kernel);
  // Its owner letting go of a pending created fence cancels it: pruned.
  fences_->Forget(kReader, read);
  EXPECT_THAT(Ids(v1::FENCE_USAGE_WRITE), ElementsAre(kernel));
}

TEST_F(ReservationTableTest, BadAttachesAreNamed) {
  const uint64_t mine = NewFence(kWriter);
  absl::Status status = table_->Attach(kReader, kBuffer, mine, v1::FENCE_USAGE_READ);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << "a fence the session does not hold";
  EXPECT_EQ(table_->Attach(kReader, kBuffer, 999, v1::FENCE_USAGE_READ).code(),
            absl::StatusCode::kNotFound)
      << "an unknown fence";
  status = table_->Attach(kWriter, kBuffer, mine, v1::FENCE_USAGE_UNSPECIFIED);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("KERNEL, WRITE, READ or BOOKKEEP"));
  EXPECT_EQ(table_->Pending(kBuffer, v1::FENCE_USAGE_UNSPECIFIED).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The limit counts distinct unsignalled fences per side; the same fence
  // again is a no-op, and with another usage of the same side it counts once.
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(table_->Attach(kWriter, kBuffer, NewFence(kWriter), v1::FENCE_USAGE_WRITE).ok());
  }
  ASSERT_TRUE(
      table_->Attach(kWriter, kBuffer, Ids(v1::FENCE_USAGE_WRITE)[1], v1::FENCE_USAGE_KERNEL)
          .ok());
  // The readers' side is its own: readers never crowd out the writer. One
  // session gets a quarter of it (here 1).
  ASSERT_TRUE(table_->Attach(kReader, kBuffer, NewFence(kReader), v1::FENCE_USAGE_READ).ok());
  absl::Status share = table_->Attach(kReader, kBuffer, NewFence(kReader), v1::FENCE_USAGE_READ);
  EXPECT_EQ(share.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(share.message(), HasSubstr("its share"));
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, NewFence(kWriter), v1::FENCE_USAGE_READ).ok());
  ASSERT_TRUE(table_->Attach(kThird, kBuffer, NewFence(kThird), v1::FENCE_USAGE_READ).ok());
  absl::Status readers_full =
      table_->Attach(kFourth, kBuffer, NewFence(kFourth), v1::FENCE_USAGE_BOOKKEEP);
  EXPECT_EQ(readers_full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(readers_full.message(), HasSubstr("3 unsignalled READ/BOOKKEEP fences"));
  const uint64_t first = Ids(v1::FENCE_USAGE_WRITE)[0];
  EXPECT_TRUE(table_->Attach(kWriter, kBuffer, first, v1::FENCE_USAGE_WRITE).ok());
  EXPECT_EQ(table_->Attach(kReader, kBuffer, mine, v1::FENCE_USAGE_READ).code(),
            absl::StatusCode::kNotFound)
      << "the fence is checked before the limit";
  status = table_->Attach(kWriter, kBuffer, mine, v1::FENCE_USAGE_WRITE);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("3 unsignalled KERNEL/WRITE fences attached, the "
                                         "limit (max_fences_per_buffer 3)"));
  ASSERT_TRUE(fences_->Signal(kWriter, first, v1::FENCE_STATUS_OK, "").ok());
  EXPECT_TRUE(table_->Attach(kWriter, kBuffer, mine, v1::FENCE_USAGE_WRITE).ok())
      << "a signalled fence frees its place";
  // A fence signalled already is not kept.
  const uint64_t done = NewFence(kWriter);
  ASSERT_TRUE(fences_->Signal(kWriter, done, v1::FENCE_STATUS_OK, "").ok());
  EXPECT_TRUE(table_->Attach(kWriter, 8, done, v1::FENCE_USAGE_WRITE).ok());
  EXPECT_TRUE(table_->Pending(8, v1::FENCE_USAGE_WRITE)->empty());
}

TEST_F(ReservationTableTest, AGoneBufferGoesWithItsReservation) {
  const uint64_t fence = NewFence(kWriter);
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, fence, v1::FENCE_USAGE_WRITE).ok());
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, fence, v1::FENCE_USAGE_KERNEL).ok());
  EXPECT_THAT(Ids(v1::FENCE_USAGE_WRITE), ElementsAre(fence)) << "listed once";
  EXPECT_EQ(table_->List().at(kBuffer).size(), 2u);
  table_->DropBuffer(kBuffer);
  EXPECT_TRUE(table_->List().empty());
  // A fence gone from the fence table (signalled, held by nobody) is gone
  // from every reservation too.
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, fence, v1::FENCE_USAGE_WRITE).ok());
  fences_->Forget(kWriter, fence);  // its owner lets go: cancelled, erased
  EXPECT_FALSE(fences_->Peek(fence).has_value());
  EXPECT_TRUE(Ids(v1::FENCE_USAGE_WRITE).empty());
}

// The session's status page, as the client library maps it.
class StatusPageTest : public ReservationTableTest {
 protected:
  // Subscribes kReader to kBuffer; returns its slot.
  uint32_t Subscribe() {
    absl::StatusOr<ReservationTable::Subscription> sub = table_->Subscribe(kReader, kBuffer);
    EXPECT_TRUE(sub.ok()) << sub.status();
    if (!sub.ok()) return 0;
    if (sub->page.valid()) {
      page_fd_ = std::move(sub->page);
      absl::StatusOr<Mapping> map =
          Mapping::Create(page_fd_.get(), reservation::kPageSize, Mapping::Protection::kReadOnly);
      EXPECT_TRUE(map.ok()) << map.status();
      if (map.ok()) map_ = *std::move(map);
    }
    return sub->slot;
  }
  reservation::SlotState Slot(uint32_t index) {
    reservation::SlotState state;
    EXPECT_TRUE(reservation::Read(reinterpret_cast<const reservation::Slot*>(map_.data())[index],
                                  &state));
    return state;
  }

  UniqueFd page_fd_;
  Mapping map_;
};

TEST_F(StatusPageTest, PublishesPendingSidesAtAttachAndSignal) {
  const uint32_t slot = Subscribe();
  ASSERT_NE(slot, 0u);
  ASSERT_TRUE(map_.valid());
  const auto& header = *reinterpret_cast<const reservation::Header*>(map_.data());
  EXPECT_EQ(header.magic, reservation::kMagic);
  EXPECT_EQ(header.slots, reservation::kSlots);
  reservation::SlotState state = Slot(slot);
  EXPECT_EQ(state.buffer_id, kBuffer);
  EXPECT_TRUE(reservation::Clear(state, /*write=*/true, UINT64_MAX));

  const uint64_t write = NewFence(kWriter);
  const uint64_t read = NewFence(kReader);
  const uint64_t bookkeep = NewFence(kWriter);
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, write, v1::FENCE_USAGE_WRITE).ok());
  ASSERT_TRUE(table_->Attach(kReader, kBuffer, read, v1::FENCE_USAGE_READ).ok());
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, bookkeep, v1::FENCE_USAGE_BOOKKEEP).ok());
  state = Slot(slot);
  EXPECT_EQ(state.writers_low, 1u);
  EXPECT_EQ(state.readers_low, 2u);
  EXPECT_FALSE(reservation::Clear(state, false, UINT64_MAX));
  // A waiter told "up to 0" (nothing was attached when it asked) is clear.
  EXPECT_TRUE(reservation::Clear(state, true, 0));

  const uint32_t seq = state.seq;
  ASSERT_TRUE(fences_->Signal(kWriter, write, v1::FENCE_STATUS_OK, "").ok());
  state = Slot(slot);
  EXPECT_NE(state.seq, seq) << "a signal of an attached fence bumps the slot";
  EXPECT_EQ(state.writers_low, 0u);
  EXPECT_TRUE(reservation::Clear(state, false, UINT64_MAX)) << "BOOKKEEP is never waited for";
  EXPECT_FALSE(reservation::Clear(state, true, UINT64_MAX));
  EXPECT_EQ(state.failures, 0u);

  ASSERT_TRUE(fences_->Signal(kReader, read, v1::FENCE_STATUS_ERROR, "bad read").ok());
  state = Slot(slot);
  EXPECT_TRUE(reservation::Clear(state, true, UINT64_MAX));
  EXPECT_EQ(state.failures, 1u) << "a failed waited-for fence is counted";
  ASSERT_TRUE(fences_->Signal(kWriter, bookkeep, v1::FENCE_STATUS_ERROR, "x").ok());
  EXPECT_EQ(Slot(slot).failures, 1u) << "BOOKKEEP failures are not";
  // How it failed, for a waiter that saw the count move.
  std::vector<ReservationTable::Failure> failed = table_->FailuresSince(kBuffer, 0);
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_EQ(failed[0].number, 1u);
  EXPECT_EQ(failed[0].fence_id, read);
  EXPECT_EQ(failed[0].status, v1::FENCE_STATUS_ERROR);
  EXPECT_EQ(failed[0].message, "bad read");
  EXPECT_TRUE(table_->FailuresSince(kBuffer, 1).empty());
}

TEST_F(StatusPageTest, DetachTakesBackOnlyItsOwnAttachment) {
  // The same fence attached again with the same usage (another session
  // holding it) adds nothing: taking that attach back must not take the
  // first one with it.
  const uint32_t slot = Subscribe();
  const uint64_t write = NewFence(kWriter);
  uint64_t first = 0, again = 0;
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, write, v1::FENCE_USAGE_WRITE, &first).ok());
  EXPECT_NE(first, 0u);
  ASSERT_TRUE(fences_->HoldFor(kReader, write).ok());
  ASSERT_TRUE(table_->Attach(kReader, kBuffer, write, v1::FENCE_USAGE_WRITE, &again).ok());
  EXPECT_EQ(again, 0u) << "a repeat adds nothing";
  table_->Detach(kBuffer, again);
  EXPECT_THAT(Ids(v1::FENCE_USAGE_READ), ElementsAre(write));
  EXPECT_FALSE(reservation::Clear(Slot(slot), false, UINT64_MAX));
  table_->Detach(kBuffer, first);
  EXPECT_TRUE(Ids(v1::FENCE_USAGE_READ).empty());
  EXPECT_TRUE(reservation::Clear(Slot(slot), false, UINT64_MAX));
  // Taken back: its failure is no failure of this buffer's.
  ASSERT_TRUE(fences_->Signal(kWriter, write, v1::FENCE_STATUS_ERROR, "x").ok());
  EXPECT_EQ(Slot(slot).failures, 0u);
  fences_->Forget(kReader, write);
}

TEST_F(StatusPageTest, UnsubscribeAndANewPageClearTheSlots) {
  const uint32_t slot = Subscribe();
  table_->Unsubscribe(kReader, kBuffer);
  EXPECT_EQ(Slot(slot).buffer_id, 0u) << "cleared (and woken) before it is free";
  EXPECT_EQ(Subscribe(), slot) << "free again";
  // The client never got its page: a new one, and the old one's slots
  // cleared so nobody keeps reading them.
  absl::StatusOr<ReservationTable::Subscription> again =
      table_->Subscribe(kReader, kBuffer, /*new_page=*/true);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->page.valid());
  EXPECT_EQ(Slot(slot).buffer_id, 0u);
  EXPECT_EQ(table_->pages(), 1u);
}

TEST_F(StatusPageTest, KeepsTheLatestFailures) {
  Subscribe();
  for (size_t i = 0; i < ReservationTable::kFailuresKept + 3; ++i) {
    const uint64_t fence = NewFence(kWriter);
    ASSERT_TRUE(table_->Attach(kWriter, kBuffer, fence, v1::FENCE_USAGE_WRITE).ok());
    ASSERT_TRUE(fences_->Signal(kWriter, fence, v1::FENCE_STATUS_CANCELLED, "").ok());
  }
  std::vector<ReservationTable::Failure> failed = table_->FailuresSince(kBuffer, 0);
  ASSERT_EQ(failed.size(), ReservationTable::kFailuresKept);
  EXPECT_EQ(failed.front().number, 4u);
  EXPECT_EQ(failed.back().number, ReservationTable::kFailuresKept + 3);
}

TEST_F(StatusPageTest, SignalledFencesLeaveEveryBuffer) {
  // One fence on two buffers and both sides: its signal takes it out of
  // all of them (no pruning needed), and an unsubscribed buffer's
  // reservation goes when its last fence does.
  const uint64_t fence = NewFence(kWriter);
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, fence, v1::FENCE_USAGE_WRITE).ok());
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, fence, v1::FENCE_USAGE_READ).ok());
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer + 1, fence, v1::FENCE_USAGE_KERNEL).ok());
  EXPECT_EQ(table_->List().size(), 2u);
  ASSERT_TRUE(fences_->Signal(kWriter, fence, v1::FENCE_STATUS_OK, "").ok());
  EXPECT_TRUE(table_->List().empty());
  // Attaching a fence signalled already leaves nothing behind either.
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, fence, v1::FENCE_USAGE_WRITE).ok());
  EXPECT_TRUE(table_->List().empty());
}

TEST_F(StatusPageTest, LaterFencesDoNotHoldAnEarlierWaiter) {
  const uint32_t slot = Subscribe();
  const uint64_t first = NewFence(kWriter);
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, first, v1::FENCE_USAGE_WRITE).ok());
  ReservationTable::Snapshot snapshot;
  ASSERT_TRUE(table_->Pending(kBuffer, v1::FENCE_USAGE_READ, &snapshot).ok());
  EXPECT_EQ(snapshot.seq, 1u);
  const uint64_t second = NewFence(kWriter);
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, second, v1::FENCE_USAGE_WRITE).ok());
  EXPECT_FALSE(reservation::Clear(Slot(slot), false, snapshot.seq));
  ASSERT_TRUE(fences_->Signal(kWriter, first, v1::FENCE_STATUS_OK, "").ok());
  EXPECT_TRUE(reservation::Clear(Slot(slot), false, snapshot.seq));
  EXPECT_FALSE(reservation::Clear(Slot(slot), false, UINT64_MAX));
}

TEST_F(StatusPageTest, OwnerDeathCountsAsAFailureAndClears) {
  const uint32_t slot = Subscribe();
  const uint64_t write = NewFence(kWriter);
  ASSERT_TRUE(table_->Attach(kWriter, kBuffer, write, v1::FENCE_USAGE_WRITE).ok());
  fences_->CloseSession(kWriter);
  const reservation::SlotState state = Slot(slot);
  EXPECT_TRUE(reservation::Clear(state, true, UINT64_MAX));
  EXPECT_EQ(state.failures, 1u);
}

TEST_F(StatusPageTest, PageIsReadOnlyAndSlotsAreReused) {
  const uint32_t slot = Subscribe();
  ASSERT_NE(slot, 0u);
  EXPECT_EQ(Subscribe(), slot) << "one slot per buffer and session";
  // Nobody but the daemon writes it: not a writable mapping, not a new
  // writable open, not write().
  EXPECT_FALSE(
      Mapping::Create(page_fd_.get(), reservation::kPageSize, Mapping::Protection::kReadWrite)
          .ok());
  const std::string path = absl::StrCat("/proc/self/fd/", page_fd_.get());
  // (0400, but root opens it anyway: F_SEAL_FUTURE_WRITE still refuses.)
  UniqueFd reopened(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (reopened.valid()) {
    const char byte = 1;
    EXPECT_LT(::pwrite(reopened.get(), &byte, 1, 64), 0);
    EXPECT_EQ(::mmap(nullptr, reservation::kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED,
                     reopened.get(), 0),
              MAP_FAILED);
  }
  EXPECT_EQ(::fcntl(page_fd_.get(), F_ADD_SEALS, F_SEAL_WRITE), -1) << "sealed F_SEAL_SEAL";
  const int seals = ::fcntl(page_fd_.get(), F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
            F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
      << "no writable mapping or write, whoever reopens it";

  table_->DropBuffer(kBuffer);
  EXPECT_EQ(Slot(slot).buffer_id, 0u) << "a freed buffer's slot is cleared";
  absl::StatusOr<ReservationTable::Subscription> again = table_->Subscribe(kReader, kBuffer + 1);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->page.valid()) << "the page is made once per session";
  EXPECT_EQ(again->slot, slot) << "the freed slot is reused";
  table_->CloseSession(kReader);
  EXPECT_EQ(table_->pages(), 0u);
}

TEST_F(StatusPageTest, AFullPageSaysAskTheDaemon) {
  uint32_t last = 0;
  for (uint64_t buffer = 100; buffer < 100 + reservation::kSlots - 1; ++buffer) {
    absl::StatusOr<ReservationTable::Subscription> sub = table_->Subscribe(kReader, buffer);
    ASSERT_TRUE(sub.ok());
    ASSERT_NE(sub->slot, 0u);
    last = sub->slot;
  }
  EXPECT_GT(last, 0u);
  absl::StatusOr<ReservationTable::Subscription> full = table_->Subscribe(kReader, 99);
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(full->slot, 0u);
}

}  // namespace
}  // namespace bufferd
