#include "fences/reservations.h"

#include <memory>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace bufferd {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr uint64_t kWriter = 1;
constexpr uint64_t kReader = 2;
constexpr uint64_t kBuffer = 7;

class ReservationTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(loop_.Init().ok());
    fences_ = std::make_unique<FenceTable>(&loop_, &budget_, FenceLimits{});
    fences_->AddSession(kWriter, 1000);
    fences_->AddSession(kReader, 1001);
    table_ = std::make_unique<ReservationTable>(fences_.get(),
                                                ReservationLimits{.max_fences_per_buffer = 3});
  }
  void TearDown() override {
    table_.reset();
    fences_->CloseSession(kWriter);
    fences_->CloseSession(kReader);
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
  // The readers' side is its own: readers never crowd out the writer.
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(table_->Attach(kReader, kBuffer, NewFence(kReader), v1::FENCE_USAGE_READ).ok());
  }
  absl::Status readers_full =
      table_->Attach(kReader, kBuffer, NewFence(kReader), v1::FENCE_USAGE_BOOKKEEP);
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

}  // namespace
}  // namespace bufferd
