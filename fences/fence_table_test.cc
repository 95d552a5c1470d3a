#include "fences/fence_table.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/await.h"
#include "base/fd_count.h"
#include "base/mapping.h"
#include "fences/fence_page.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace bufferd {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kOwner = 1;
constexpr uint64_t kOther = 2;

bool Readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1;
}

// Collects the result of one Wait.
struct WaitBox {
  absl::Mutex mu;
  std::optional<absl::StatusOr<FenceTable::WaitResult>> result ABSL_GUARDED_BY(mu);
  FenceTable::WaitDone Done() {
    return [this](absl::StatusOr<FenceTable::WaitResult> r) {
      absl::MutexLock lock(&mu);
      result = std::move(r);
    };
  }
  // The result, once it came (within `timeout`).
  std::optional<absl::StatusOr<FenceTable::WaitResult>> Get(
      absl::Duration timeout = absl::Seconds(10)) {
    absl::MutexLock lock(&mu);
    AwaitWithTimeout(
        mu, [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return result.has_value(); }, timeout);
    return result;
  }
};

class FenceTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    baseline_fds_ = CountOpenFds();
    ASSERT_TRUE(loop_.Init().ok());
    loop_.Start();
    NewTable(FenceLimits{});
  }
  void TearDown() override {
    table_->CloseSession(kOwner);
    table_->CloseSession(kOther);
    loop_.Stop();
    table_->Stop();
    table_.reset();
    EXPECT_EQ(budget_.usage().total, 0u) << "every fence fd's lease is back";
  }
  void NewTable(FenceLimits limits) {
    if (table_) table_->Stop();
    table_ = std::make_unique<FenceTable>(&loop_, &budget_, limits);
    table_->AddSession(kOwner, 1000);
    table_->AddSession(kOther, 1001);
  }
  uint64_t NewFence(absl::Duration deadline = absl::ZeroDuration()) {
    absl::StatusOr<FenceView> fence = table_->Create(kOwner, "frame", "render", deadline);
    EXPECT_TRUE(fence.ok()) << fence.status();
    return fence.ok() ? fence->id : 0;
  }
  // Waits with a timeout; returns the box the result lands in.
  std::unique_ptr<WaitBox> StartWait(uint64_t session, std::vector<uint64_t> ids, bool all,
                                     absl::Duration timeout) {
    auto box = std::make_unique<WaitBox>();
    auto now =
        table_->Wait(session, table_->NewWaitId(), {ids, all, timeout, std::nullopt}, box->Done());
    EXPECT_TRUE(now.ok()) << now.status();
    if (now.ok() && now->has_value()) box->Done()(**now);
    return box;
  }

  int baseline_fds_ = 0;
  EventLoop loop_;
  FdBudget budget_;
  std::unique_ptr<FenceTable> table_;
};

TEST_F(FenceTableTest, CreateThenSignalOnce) {
  const uint64_t id = NewFence();
  absl::StatusOr<FenceView> info = table_->Info(kOwner, id);
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(info->signaled);
  EXPECT_EQ(info->name, "frame");
  EXPECT_EQ(info->timeline, "render");
  EXPECT_EQ(info->deadline - info->created, absl::Seconds(10)) << "the default deadline";

  absl::StatusOr<FenceView> signalled =
      table_->Signal(kOwner, id, v1::FENCE_STATUS_ERROR, "gpu hang");
  ASSERT_TRUE(signalled.ok()) << signalled.status();
  EXPECT_TRUE(signalled->signaled);
  EXPECT_EQ(signalled->status, v1::FENCE_STATUS_ERROR);
  EXPECT_EQ(signalled->message, "gpu hang");
  EXPECT_GE(signalled->signaled_at, signalled->created);

  absl::StatusOr<FenceView> again = table_->Signal(kOwner, id, v1::FENCE_STATUS_OK, "");
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(again.status().message(), HasSubstr("signalled already (FENCE_STATUS_ERROR"));
  EXPECT_EQ(table_->Info(kOwner, id)->status, v1::FENCE_STATUS_ERROR) << "unchanged";
}

TEST_F(FenceTableTest, ClientsCannotSendDaemonStatuses) {
  const uint64_t id = NewFence();
  for (v1::FenceStatus status :
       {v1::FENCE_STATUS_UNSPECIFIED, v1::FENCE_STATUS_OWNER_DIED,
        v1::FENCE_STATUS_DEADLINE_EXCEEDED, static_cast<v1::FenceStatus>(77)}) {
    absl::StatusOr<FenceView> r = table_->Signal(kOwner, id, status, "");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(r.status().message(), HasSubstr("a client signals OK, ERROR or CANCELLED"));
  }
  EXPECT_FALSE(table_->Info(kOwner, id)->signaled);
}

TEST_F(FenceTableTest, OtherSessionsSeeNotFoundLikeAnUnknownId) {
  const uint64_t id = NewFence();
  absl::Status foreign = table_->Info(kOther, id).status();
  absl::Status unknown = table_->Info(kOther, id + 1000).status();
  EXPECT_EQ(foreign.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(foreign.message(), absl::StrCat("fence ", id, " not found"));
  EXPECT_EQ(unknown.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table_->Signal(kOther, id, v1::FENCE_STATUS_OK, "").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(table_->Export(kOther, id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table_->Merge(kOther, {id}, "").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table_->Wait(kOther, 1, {{id}, true, absl::ZeroDuration(), std::nullopt}, nullptr)
                .status()
                .code(),
            absl::StatusCode::kNotFound);
}

TEST_F(FenceTableTest, AnExportedFdIsTheCapability) {
  const uint64_t id = NewFence();
  absl::StatusOr<LeasedFd> exported = table_->Export(kOwner, id);
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_FALSE(Readable(exported->fd.get()));
  EXPECT_EQ(::write(exported->fd.get(), "x", 1), -1) << "read-only";

  // The other session imports it: the same fence, not a proxy.
  absl::StatusOr<FenceView> imported =
      table_->Import(kOther, UniqueFd(::dup(exported->fd.get())), "", absl::ZeroDuration());
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ(imported->id, id);
  EXPECT_EQ(table_->Info(kOther, id)->id, id);
  absl::Status signal = table_->Signal(kOther, id, v1::FENCE_STATUS_OK, "").status();
  EXPECT_EQ(signal.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(signal.message(), HasSubstr("only its owner signals it"));

  ASSERT_TRUE(table_->Signal(kOwner, id, v1::FENCE_STATUS_OK, "").ok());
  EXPECT_TRUE(Readable(exported->fd.get()));
  char c;
  EXPECT_EQ(::read(exported->fd.get(), &c, 1), 0) << "EOF: nothing to consume";
  EXPECT_TRUE(Readable(exported->fd.get())) << "and stays readable";

  absl::StatusOr<LeasedFd> late = table_->Export(kOther, id);
  ASSERT_TRUE(late.ok());
  EXPECT_TRUE(Readable(late->fd.get())) << "an export of a signalled fence is readable at once";
}

TEST_F(FenceTableTest, WaitAnswersAtOnceWhenSatisfiedOrPolling) {
  const uint64_t a = NewFence();
  const uint64_t b = NewFence();
  auto poll = StartWait(kOwner, {a, b}, true, absl::ZeroDuration());
  ASSERT_TRUE(poll->Get(absl::ZeroDuration()).has_value());
  EXPECT_FALSE((*poll->Get())->satisfied);
  ASSERT_TRUE(table_->Signal(kOwner, a, v1::FENCE_STATUS_OK, "").ok());
  auto any = StartWait(kOwner, {a, b}, false, absl::Seconds(30));
  ASSERT_TRUE(any->Get(absl::ZeroDuration()).has_value()) << "any: a is signalled";
  EXPECT_TRUE((*any->Get())->satisfied);
  EXPECT_EQ((*any->Get())->fences.size(), 2u);
}

TEST_F(FenceTableTest, BlockedWaitWakesOnSignalAndTimesOut) {
  const uint64_t a = NewFence();
  const uint64_t b = NewFence();
  auto all = StartWait(kOwner, {a, b, a}, true, absl::Seconds(30));
  auto any = StartWait(kOwner, {b}, false, absl::Seconds(30));
  EXPECT_EQ(table_->Info(kOwner, b)->waiters, 2u);
  ASSERT_TRUE(table_->Signal(kOwner, a, v1::FENCE_STATUS_OK, "").ok());
  EXPECT_FALSE(all->Get(absl::Milliseconds(20)).has_value()) << "b is still pending";
  // A wait that times out: answered, not satisfied.
  auto timed = StartWait(kOwner, {b}, true, absl::Milliseconds(50));
  auto timed_out = timed->Get();
  ASSERT_TRUE(timed_out.has_value());
  ASSERT_TRUE(timed_out->ok());
  EXPECT_FALSE((*timed_out)->satisfied);
  ASSERT_TRUE(table_->Signal(kOwner, b, v1::FENCE_STATUS_CANCELLED, "").ok());
  auto done = all->Get();
  ASSERT_TRUE(done.has_value() && done->ok());
  EXPECT_TRUE((*done)->satisfied);
  ASSERT_EQ((*done)->fences.size(), 2u) << "duplicates once";
  EXPECT_EQ((*done)->fences[1].status, v1::FENCE_STATUS_CANCELLED);
  ASSERT_TRUE(any->Get().has_value());
  EXPECT_EQ(table_->counts().waits, 0u);
}

TEST_F(FenceTableTest, CancelledWaitNeverCallsBack) {
  const uint64_t a = NewFence();
  WaitBox box;
  const FenceTable::WaitId wait = table_->NewWaitId();
  ASSERT_TRUE(
      table_->Wait(kOwner, wait, {{a}, true, absl::Seconds(30), std::nullopt}, box.Done()).ok());
  EXPECT_TRUE(table_->CancelWait(wait));
  EXPECT_FALSE(table_->CancelWait(wait));
  ASSERT_TRUE(table_->Signal(kOwner, a, v1::FENCE_STATUS_OK, "").ok());
  EXPECT_FALSE(box.Get(absl::Milliseconds(20)).has_value());
  EXPECT_EQ(table_->Info(kOwner, a)->waiters, 0u);
}

TEST_F(FenceTableTest, WaitLimits) {
  const uint64_t a = NewFence();
  absl::Status none =
      table_->Wait(kOwner, 1, {{}, true, absl::ZeroDuration(), {}}, nullptr).status();
  EXPECT_EQ(none.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(none.message(), HasSubstr("fence_ids is empty"));
  absl::Status many =
      table_
          ->Wait(kOwner, 1, {std::vector<uint64_t>(1025, a), true, absl::ZeroDuration(), {}},
                 nullptr)
          .status();
  EXPECT_EQ(many.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(many.message(), HasSubstr("1025 fence ids in one wait; at most 1024"));
  EXPECT_TRUE(table_
                  ->Wait(kOwner, 1,
                         {std::vector<uint64_t>(1024, a), true, absl::ZeroDuration(), {}}, nullptr)
                  .ok());
}

TEST_F(FenceTableTest, MergeCarriesTheFirstErrorBySignalTime) {
  const uint64_t a = NewFence();
  const uint64_t b = NewFence();
  const uint64_t c = NewFence();
  absl::StatusOr<FenceView> merged = table_->Merge(kOwner, {a, b, c, b}, "all three");
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->kind, FenceKind::kMerged);
  absl::StatusOr<LeasedFd> fd = table_->Export(kOwner, merged->id);
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(table_->Signal(kOwner, c, v1::FENCE_STATUS_ERROR, "first").ok());
  ASSERT_TRUE(table_->Signal(kOwner, a, v1::FENCE_STATUS_CANCELLED, "second").ok());
  EXPECT_FALSE(table_->Info(kOwner, merged->id)->signaled);
  EXPECT_FALSE(Readable(fd->fd.get()));
  ASSERT_TRUE(table_->Signal(kOwner, b, v1::FENCE_STATUS_OK, "").ok());
  absl::StatusOr<FenceView> info = table_->Info(kOwner, merged->id);
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->signaled);
  EXPECT_EQ(info->status, v1::FENCE_STATUS_ERROR);
  EXPECT_THAT(info->message, HasSubstr(absl::StrCat("input fence ", c)));
  EXPECT_THAT(info->message, HasSubstr("first"));
  EXPECT_TRUE(Readable(fd->fd.get()));
  EXPECT_EQ(table_->Signal(kOwner, merged->id, v1::FENCE_STATUS_OK, "").status().code(),
            absl::StatusCode::kPermissionDenied);

  // Of signalled inputs, at once; the earliest error wins.
  absl::StatusOr<FenceView> again = table_->Merge(kOwner, {b, a, c}, "");
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->signaled);
  EXPECT_THAT(again->message, HasSubstr("first"));

  EXPECT_EQ(table_->Merge(kOwner, {}, "").status().code(), absl::StatusCode::kInvalidArgument);
  absl::Status many = table_->Merge(kOwner, std::vector<uint64_t>(257, a), "").status();
  EXPECT_EQ(many.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(many.message(), HasSubstr("at most 256"));
}

TEST_F(FenceTableTest, ImportsEventfdsAndPipes) {
  const int efd = ::eventfd(0, EFD_CLOEXEC);
  absl::StatusOr<FenceView> ev =
      table_->Import(kOwner, UniqueFd(::dup(efd)), "ev", absl::ZeroDuration());
  ASSERT_TRUE(ev.ok()) << ev.status();
  int ends[2];
  ASSERT_EQ(::pipe2(ends, O_CLOEXEC), 0);
  absl::StatusOr<FenceView> pipe =
      table_->Import(kOwner, UniqueFd(ends[0]), "pipe", absl::ZeroDuration());
  ASSERT_TRUE(pipe.ok());
  EXPECT_EQ(budget_.usage().of(FdUse::kFence), 2u);
  auto both = StartWait(kOwner, {ev->id, pipe->id}, true, absl::Seconds(30));
  uint64_t one = 1;
  ASSERT_EQ(::write(efd, &one, sizeof(one)), 8);
  ::close(ends[1]);
  auto done = both->Get();
  ASSERT_TRUE(done.has_value() && done->ok());
  EXPECT_TRUE((*done)->satisfied);
  EXPECT_EQ((*done)->fences[0].status, v1::FENCE_STATUS_OK);
  EXPECT_EQ(budget_.usage().of(FdUse::kFence), 0u) << "imported fds are closed at the signal";
  ::close(efd);
}

TEST_F(FenceTableTest, ImportRefusesFilesAndDirectories) {
  absl::Status dir = table_
                         ->Import(kOwner, UniqueFd(::open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC)),
                                  "", absl::ZeroDuration())
                         .status();
  EXPECT_EQ(dir.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dir.message(), HasSubstr("is a directory: only a sync_file, an eventfd"));
  absl::Status file = table_
                          ->Import(kOwner, UniqueFd(::open("/proc/self/exe", O_RDONLY | O_CLOEXEC)),
                                   "", absl::ZeroDuration())
                          .status();
  EXPECT_EQ(file.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(file.message(), HasSubstr("is a regular file"));
  int pair[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair), 0);
  UniqueFd keep(pair[1]);
  absl::Status socket =
      table_->Import(kOwner, UniqueFd(pair[0]), "", absl::ZeroDuration()).status();
  EXPECT_EQ(socket.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(socket.message(), HasSubstr("is a socket"))
      << "it could keep a client's fd.sock alive";
  absl::Status device = table_
                            ->Import(kOwner, UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC)),
                                     "", absl::ZeroDuration())
                            .status();
  EXPECT_THAT(device.message(), HasSubstr("is a character device"));
  int ends[2];
  ASSERT_EQ(::pipe2(ends, O_CLOEXEC), 0);
  UniqueFd read_end(ends[0]);
  absl::Status write_end =
      table_->Import(kOwner, UniqueFd(ends[1]), "", absl::ZeroDuration()).status();
  EXPECT_THAT(write_end.message(), HasSubstr("the write end of a pipe"));
  UniqueFd namespace_fd(::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC));
  EXPECT_EQ(CheckImportable(namespace_fd.get()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(table_->counts().pending, 0u);
  EXPECT_EQ(budget_.usage().total, 0u);
}

TEST_F(FenceTableTest, SessionEndSignalsOwnerDiedAndEndsItsWaits) {
  const uint64_t id = NewFence();
  absl::StatusOr<LeasedFd> fd = table_->Export(kOwner, id);
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(table_->Import(kOther, std::move(fd->fd), "", absl::ZeroDuration()).ok());
  absl::StatusOr<LeasedFd> other_fd = table_->Export(kOther, id);
  ASSERT_TRUE(other_fd.ok());
  auto waiter = StartWait(kOther, {id}, true, absl::Seconds(30));
  auto own_wait = StartWait(kOwner, {id}, true, absl::Seconds(30));
  table_->CloseSession(kOwner);
  auto own = own_wait->Get();
  ASSERT_TRUE(own.has_value());
  EXPECT_EQ(own->status().code(), absl::StatusCode::kAborted);
  auto other = waiter->Get();
  ASSERT_TRUE(other.has_value() && other->ok());
  EXPECT_EQ((*other)->fences[0].status, v1::FENCE_STATUS_OWNER_DIED);
  EXPECT_TRUE(Readable(other_fd->fd.get()));
  EXPECT_EQ(table_->Info(kOther, id)->status, v1::FENCE_STATUS_OWNER_DIED)
      << "still known to a holder";
}

TEST_F(FenceTableTest, DeadlinesAreSignalledByATimer) {
  FenceLimits limits;
  limits.max_deadline = absl::Seconds(1);
  NewTable(limits);
  absl::Status above = table_->Create(kOwner, "", "", absl::Seconds(2)).status();
  EXPECT_EQ(above.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(above.message(), HasSubstr("deadline_ms 2000 is above max_fence_deadline_ms (1000)"));
  const uint64_t id = NewFence(absl::Milliseconds(30));
  auto waiter = StartWait(kOwner, {id}, true, absl::Seconds(30));
  auto done = waiter->Get();
  ASSERT_TRUE(done.has_value() && done->ok());
  EXPECT_EQ((*done)->fences[0].status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  EXPECT_THAT((*done)->fences[0].message, HasSubstr("deadline passed 30 ms after"));
}

TEST_F(FenceTableTest, AnImportHasADeadlineToo) {
  UniqueFd event(::eventfd(0, EFD_CLOEXEC));
  absl::StatusOr<FenceView> imported =
      table_->Import(kOwner, UniqueFd(::dup(event.get())), "late", absl::Milliseconds(30));
  ASSERT_TRUE(imported.ok());
  auto waiter = StartWait(kOwner, {imported->id}, true, absl::Seconds(30));
  auto done = waiter->Get();
  ASSERT_TRUE(done.has_value() && done->ok());
  EXPECT_EQ((*done)->fences[0].status, v1::FENCE_STATUS_DEADLINE_EXCEEDED);
  EXPECT_EQ(budget_.usage().of(FdUse::kFence), 0u) << "the watched fd is closed";
}

TEST_F(FenceTableTest, APipeOfAFenceLongGoneNeverImportsAsOk) {
  const uint64_t id = NewFence();
  absl::StatusOr<LeasedFd> kept = table_->Export(kOwner, id);
  ASSERT_TRUE(kept.ok());
  ASSERT_TRUE(table_->Signal(kOwner, id, v1::FENCE_STATUS_ERROR, "decode").ok());
  table_->Forget(kOwner, id);
  // Anyone can push it out of the memory of gone pipes...
  for (int i = 0; i < 4100; ++i) {
    const uint64_t other = NewFence();
    ASSERT_TRUE(table_->Export(kOwner, other).ok());
    table_->Forget(kOwner, other);
  }
  // ... but the pipe is still known for one of ours: an error, not OK.
  absl::StatusOr<FenceView> imported =
      table_->Import(kOther, std::move(kept->fd), "", absl::ZeroDuration());
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ(imported->status, v1::FENCE_STATUS_ERROR);
  EXPECT_THAT(imported->message, HasSubstr("its status is lost"));
}

TEST_F(FenceTableTest, PerSessionCaps) {
  FenceLimits limits;
  limits.max_pending_per_session = 2;
  limits.max_held_per_session = 3;
  NewTable(limits);
  const uint64_t a = NewFence();
  NewFence();
  absl::Status quota = table_->Create(kOwner, "", "", absl::ZeroDuration()).status();
  EXPECT_EQ(quota.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(quota.message(), HasSubstr("quota max_fences_per_session: the session owns 2"));
  ASSERT_TRUE(table_->Signal(kOwner, a, v1::FENCE_STATUS_OK, "").ok());
  NewFence();
  absl::Status held = table_->Create(kOwner, "", "", absl::ZeroDuration()).status();
  EXPECT_THAT(held.message(), HasSubstr("limit max_held_fences_per_session: the session holds 3"));
  table_->Forget(kOwner, a);
  EXPECT_EQ(table_->Info(kOwner, a).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table_->session_counts(kOwner).held, 2u);
}

TEST_F(FenceTableTest, DaemonWideAndPerUidCaps) {
  FenceLimits limits;
  limits.max_fences = 4;
  limits.max_fences_per_uid = 3;
  NewTable(limits);
  table_->AddSession(3, 1000);  // a second session of the owner's uid
  const uint64_t a = NewFence();
  ASSERT_TRUE(table_->Signal(kOwner, a, v1::FENCE_STATUS_OK, "").ok());
  const uint64_t b = NewFence();
  ASSERT_TRUE(table_->Create(3, "", "", absl::ZeroDuration()).ok());
  // Signalled fences still held count: memory is bounded by what is kept.
  absl::Status uid = table_->Create(3, "", "", absl::ZeroDuration()).status();
  EXPECT_EQ(uid.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(uid.message(), HasSubstr("limit max_fences_per_uid: sessions of uid 1000 hold 3"));
  ASSERT_TRUE(table_->Create(kOther, "", "", absl::ZeroDuration()).ok()) << "another uid has room";
  absl::Status full = table_->Create(kOther, "", "", absl::ZeroDuration()).status();
  EXPECT_THAT(full.message(), HasSubstr("limit max_fences: 4 fences are known daemon-wide"));
  // A consumer keeping the owner's fence answers for it, not the owner.
  absl::StatusOr<LeasedFd> fd = table_->Export(kOwner, b);
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(table_->Import(kOther, std::move(fd->fd), "", absl::ZeroDuration()).ok());
  table_->Forget(kOwner, a);
  EXPECT_TRUE(table_->Create(kOwner, "", "", absl::ZeroDuration()).ok())
      << "uid 1000 holds 2 + 1: another uid's hold on b is not charged to it";
  table_->CloseSession(3);
}

TEST_F(FenceTableTest, WaitsAreCappedByTheFencesTheyName) {
  FenceLimits limits;
  limits.max_waits_per_session = 4;
  limits.max_waits_per_uid = 4;
  NewTable(limits);
  table_->AddSession(3, 1000);  // the owner's uid again
  const uint64_t a = NewFence();
  const uint64_t b = NewFence();
  auto one = StartWait(kOwner, {a}, true, absl::Seconds(30));
  auto two = StartWait(kOwner, {a, b, a}, true, absl::Seconds(30));  // counts 2
  absl::Status session = table_
                             ->Wait(kOwner, table_->NewWaitId(),
                                    {{a, b}, true, absl::Seconds(30), std::nullopt}, nullptr)
                             .status();
  EXPECT_EQ(session.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(session.message(),
              HasSubstr("limit max_fence_waits_per_session: the session's pending waits name 3 "
                        "fences, and this one 2; at most 4"));
  // Another session of the same uid: the uid's share.
  absl::StatusOr<LeasedFd> fd = table_->Export(kOwner, a);
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(table_->Import(3, std::move(fd->fd), "", absl::ZeroDuration()).ok());
  auto three = StartWait(3, {a}, true, absl::Seconds(30));
  absl::Status uid =
      table_->Wait(3, table_->NewWaitId(), {{a}, true, absl::Seconds(30), std::nullopt}, nullptr)
          .status();
  EXPECT_THAT(uid.message(), HasSubstr("limit max_fence_waits_per_uid: pending waits of uid 1000 "
                                       "name 4 fences, and this one 1; at most 4"))
      << uid;
  ASSERT_TRUE(table_->Signal(kOwner, a, v1::FENCE_STATUS_OK, "").ok());
  ASSERT_TRUE(table_->Signal(kOwner, b, v1::FENCE_STATUS_OK, "").ok());
  ASSERT_TRUE(one->Get().has_value() && two->Get().has_value() && three->Get().has_value());
  // Answered waits give their places back.
  EXPECT_TRUE(table_
                  ->Wait(kOwner, table_->NewWaitId(),
                         {{a, b}, true, absl::Seconds(30), std::nullopt}, nullptr)
                  .ok());
  table_->CloseSession(3);
}

TEST_F(FenceTableTest, MergedErrorsNameTheRootCauseAndNeverGrow) {
  const uint64_t root = NewFence();
  ASSERT_TRUE(table_->Signal(kOwner, root, v1::FENCE_STATUS_ERROR, std::string(200, 'x')).ok());
  uint64_t last = root;
  for (int i = 0; i < 50; ++i) {
    absl::StatusOr<FenceView> merged = table_->Merge(kOwner, {last}, std::string(200, 'n'));
    ASSERT_TRUE(merged.ok());
    ASSERT_TRUE(merged->signaled);
    EXPECT_LE(merged->message.size(), 400u);
    EXPECT_THAT(merged->message, HasSubstr(absl::StrCat("input fence ", root, " (")));
    last = merged->id;
  }
}

TEST_F(FenceTableTest, ImportingTwiceHoldsTwice) {
  const uint64_t id = NewFence();
  absl::StatusOr<LeasedFd> fd = table_->Export(kOwner, id);
  ASSERT_TRUE(fd.ok());
  ASSERT_EQ(table_->Import(kOwner, UniqueFd(::dup(fd->fd.get())), "", absl::ZeroDuration())->id,
            id);
  table_->Forget(kOwner, id);  // the imported copy dropped
  EXPECT_FALSE(table_->Info(kOwner, id)->signaled) << "the creator's hold still stands";
  table_->Forget(kOwner, id);
  EXPECT_TRUE(Readable(fd->fd.get())) << "the last hold dropped unsignalled: cancelled";
}

TEST_F(FenceTableTest, APipeOfAFenceGoneImportsWithItsStatus) {
  const uint64_t id = NewFence();
  absl::StatusOr<LeasedFd> fd = table_->Export(kOwner, id);
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(table_->Signal(kOwner, id, v1::FENCE_STATUS_ERROR, "decode").ok());
  table_->Forget(kOwner, id);
  EXPECT_EQ(table_->counts().signaled, 0u) << "gone";
  absl::StatusOr<FenceView> imported =
      table_->Import(kOther, std::move(fd->fd), "", absl::ZeroDuration());
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_NE(imported->id, id);
  EXPECT_TRUE(imported->signaled);
  EXPECT_EQ(imported->status, v1::FENCE_STATUS_ERROR) << "not a fresh OK";
  EXPECT_THAT(imported->message, HasSubstr("decode"));
}

TEST_F(FenceTableTest, ForgettingAPendingFenceCancelsIt) {
  const uint64_t id = NewFence();
  absl::StatusOr<LeasedFd> fd = table_->Export(kOwner, id);
  ASSERT_TRUE(fd.ok());
  table_->Forget(kOwner, id);
  EXPECT_TRUE(Readable(fd->fd.get()));
  EXPECT_EQ(table_->counts().pending, 0u);
  EXPECT_EQ(table_->counts().signaled, 0u) << "forgotten by everyone: gone";
  EXPECT_EQ(table_->counts().signals[v1::FENCE_STATUS_CANCELLED], 1u);
}

TEST_F(FenceTableTest, NeedByShowsTheEarliest) {
  const uint64_t id = NewFence();
  const absl::Time soon = absl::Now() + absl::Milliseconds(5);
  ASSERT_TRUE(
      table_->Wait(kOwner, 1, {{id}, true, absl::ZeroDuration(), soon + absl::Seconds(1)}, nullptr)
          .ok());
  ASSERT_TRUE(table_->Wait(kOwner, 2, {{id}, true, absl::ZeroDuration(), soon}, nullptr).ok());
  EXPECT_EQ(table_->Info(kOwner, id)->need_by, soon);
}

TEST_F(FenceTableTest, TenThousandWaitersOneSignal) {
  const uint64_t id = NewFence();
  std::atomic<int> woken{0};
  for (int i = 0; i < 10000; ++i) {
    auto now =
        table_->Wait(kOwner, table_->NewWaitId(), {{id}, true, absl::Seconds(60), std::nullopt},
                     [&](absl::StatusOr<FenceTable::WaitResult> r) {
                       if (r.ok() && r->satisfied) ++woken;
                     });
    ASSERT_TRUE(now.ok());
  }
  EXPECT_EQ(table_->counts().waits, 10000u);
  ASSERT_TRUE(table_->Signal(kOwner, id, v1::FENCE_STATUS_OK, "").ok());
  EXPECT_EQ(woken.load(), 10000) << "all woken by the signalling call";
  EXPECT_EQ(table_->counts().waits, 0u);
}

TEST_F(FenceTableTest, FdsReturnToBaseline) {
  {
    const uint64_t id = NewFence();
    const int before = CountOpenFds();
    absl::StatusOr<LeasedFd> fd = table_->Export(kOwner, id);
    ASSERT_TRUE(fd.ok());
    EXPECT_EQ(CountOpenFds(), before + 3) << "the pipe's two ends and the copy";
    EXPECT_EQ(budget_.usage().of(FdUse::kFence), 2u);
    ASSERT_TRUE(table_->Export(kOwner, id).ok());
    EXPECT_EQ(budget_.usage().of(FdUse::kFence), 2u) << "one pipe per fence";
  }
  table_->CloseSession(kOwner);
  EXPECT_EQ(budget_.usage().total, 0u);
  EXPECT_EQ(CountOpenFds(), baseline_fds_ + 2) << "only the loop's epoll and eventfd";
}

// An owner's fence page (fences/fence_page.h) as its client library makes
// it: mapped writable, then sealed against any other writable mapping.
struct OwnerPage {
  UniqueFd fd;
  Mapping map;
  uint32_t& word(uint32_t slot) { return reinterpret_cast<uint32_t*>(map.data())[slot]; }
};
OwnerPage NewOwnerPage(int seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE |
                                   F_SEAL_SEAL) {
  OwnerPage page;
  page.fd = UniqueFd(::memfd_create("bufferd-fence-page", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  EXPECT_TRUE(page.fd.valid());
  EXPECT_EQ(::ftruncate(page.fd.get(), fence_page::kPageSize), 0);
  absl::StatusOr<Mapping> map =
      Mapping::Create(page.fd.get(), fence_page::kPageSize, Mapping::Protection::kReadWrite);
  EXPECT_TRUE(map.ok()) << map.status();
  if (map.ok()) page.map = *std::move(map);
  EXPECT_EQ(::fcntl(page.fd.get(), F_ADD_SEALS, seals), 0);
  return page;
}

// Sessions of this process's uid: a fence page must be made by a process of
// the session's uid (the pages below are made here).
constexpr uint64_t kMine = 3;
constexpr uint64_t kMineToo = 4;

// Tests the fence page: created fences get a word and a generation while
// pending (none without a page), words go round the longest free first and
// come back under a new generation, the same page offered again is fine,
// and a page without the seals, of another uid, another session's, or a
// second one is refused naming why; a reader gets a read-only copy of a
// pending fence's page only.
TEST_F(FenceTableTest, CreatedFencesGetAWordOfTheirOwnersPage) {
  table_->AddSession(kMine, ::geteuid());
  table_->AddSession(kMineToo, ::geteuid());
  auto create = [&](uint64_t session) {
    absl::StatusOr<FenceView> fence =
        table_->Create(session, "frame", "render", absl::ZeroDuration());
    EXPECT_TRUE(fence.ok()) << fence.status();
    return fence.ok() ? fence->id : 0;
  };
  EXPECT_EQ(table_->Info(kMine, create(kMine))->page_slot, 0u) << "no page yet";
  OwnerPage unsealed = NewOwnerPage(F_SEAL_SHRINK | F_SEAL_GROW);
  absl::Status refused = table_->SetPage(kMine, DuplicateFd(unsealed.fd.get()).value());
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.message(), HasSubstr("the fence page must be sealed with"));
  OwnerPage page = NewOwnerPage();
  if (::geteuid() != 1000) {
    refused = table_->SetPage(kOwner, DuplicateFd(page.fd.get()).value());
    EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << "another uid's page";
    EXPECT_THAT(refused.message(), HasSubstr("not the session's uid 1000"));
  }
  ASSERT_TRUE(table_->SetPage(kMine, DuplicateFd(page.fd.get()).value()).ok());
  EXPECT_TRUE(table_->SetPage(kMine, DuplicateFd(page.fd.get()).value()).ok())
      << "the same page offered again";
  OwnerPage second = NewOwnerPage();
  refused = table_->SetPage(kMine, DuplicateFd(second.fd.get()).value());
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.message(), HasSubstr("has a fence page already"));
  refused = table_->SetPage(kMineToo, DuplicateFd(page.fd.get()).value());
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << "another session's page";
  EXPECT_THAT(refused.message(), HasSubstr(absl::StrCat("is session ", kMine, "'s")));

  const uint64_t first = create(kMine);
  const FenceView view = *table_->Info(kMine, first);
  EXPECT_NE(view.page_slot, 0u);
  EXPECT_EQ(view.page_generation, 1u);
  // A reader's copy: read-only, and only of a pending fence with a word.
  auto copy = table_->PageOf(kOther, first);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ(copy->second, kMine);
  EXPECT_EQ(::fcntl(copy->first.fd.get(), F_GETFL) & O_ACCMODE, O_RDONLY);
  EXPECT_EQ(::mmap(nullptr, fence_page::kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED,
                   copy->first.fd.get(), 0),
            MAP_FAILED);
  copy = absl::InternalError("dropped");
  ASSERT_TRUE(table_->Signal(kMine, first, v1::FENCE_STATUS_OK, "").ok());
  EXPECT_EQ(table_->Info(kMine, first)->page_slot, 0u) << "its word goes back at the signal";
  EXPECT_EQ(table_->PageOf(kOther, first).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table_->PageOf(kOther, 999999).status().code(), absl::StatusCode::kNotFound);
  // Words go round, the longest free first: the freed one comes back last,
  // under a new generation; beyond the page's words a fence has none.
  std::vector<uint64_t> fences;
  std::optional<FenceView> again;
  for (uint32_t i = 0; i < fence_page::kSlots; ++i) {
    fences.push_back(create(kMine));
    const FenceView made = *table_->Info(kMine, fences.back());
    if (made.page_slot == view.page_slot) again = made;
    if (i + 1 < fence_page::kSlots - 1) {
      EXPECT_NE(made.page_slot, view.page_slot) << "used again before the others";
    }
  }
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->page_generation, 2u) << "under a new generation";
  EXPECT_EQ(table_->Info(kMine, fences.back())->page_slot, 0u) << "no word left";
  table_->CloseSession(kMine);
  table_->CloseSession(kMineToo);
}

// Tests that what the owner wrote in its page is what the fence signals when
// the daemon would otherwise fail it without the owner: at the session's end
// (OK, not OWNER_DIED), at the deadline (ERROR, not DEADLINE_EXCEEDED) and
// when the owner drops it (OK, not CANCELLED); a word of another generation,
// or a status a client cannot signal, counts for nothing.
TEST_F(FenceTableTest, WhatTheOwnerWroteInItsPageStandsAtItsEnd) {
  table_->AddSession(kMine, ::geteuid());
  OwnerPage page = NewOwnerPage();
  ASSERT_TRUE(table_->SetPage(kMine, DuplicateFd(page.fd.get()).value()).ok());
  auto create = [&](absl::Duration deadline = absl::ZeroDuration()) {
    absl::StatusOr<FenceView> fence = table_->Create(kMine, "frame", "render", deadline);
    EXPECT_TRUE(fence.ok()) << fence.status();
    return fence.ok() ? fence->id : 0;
  };
  const uint64_t written = create();
  const uint64_t stale = create();
  const uint64_t bogus = create();
  const uint64_t untouched = create();
  const uint64_t dropped = create();
  const uint64_t timed = create(absl::Seconds(1));
  auto word_of = [&](uint64_t id) -> uint32_t& {
    return page.word(table_->Info(kMine, id)->page_slot);
  };
  const auto generation = [&](uint64_t id) { return table_->Info(kMine, id)->page_generation; };
  word_of(written) = fence_page::Word(generation(written), v1::FENCE_STATUS_OK);
  word_of(stale) = fence_page::Word(generation(stale) + 1, v1::FENCE_STATUS_OK);
  word_of(bogus) = fence_page::Word(generation(bogus), v1::FENCE_STATUS_OWNER_DIED + 40);
  word_of(dropped) = fence_page::Word(generation(dropped), v1::FENCE_STATUS_OK);
  word_of(timed) = fence_page::Word(generation(timed), v1::FENCE_STATUS_ERROR);
  std::vector<uint64_t> ids = {written, stale, bogus, untouched, dropped, timed};
  for (uint64_t id : ids) ASSERT_TRUE(table_->HoldFor(kOther, id).ok());
  table_->Forget(kMine, dropped);
  EXPECT_EQ(table_->Info(kOther, dropped)->status, v1::FENCE_STATUS_OK);
  for (int i = 0; i < 1000 && !table_->Info(kOther, timed)->signaled; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_TRUE(table_->Info(kOther, timed)->signaled);
  EXPECT_EQ(table_->Info(kOther, timed)->status, v1::FENCE_STATUS_ERROR);
  EXPECT_THAT(table_->Info(kOther, timed)->message, HasSubstr("through its owner's fence page"));
  // The owner's own signal, arriving after: that signal, not a second one;
  // another status is one.
  EXPECT_TRUE(table_->Signal(kMine, timed, v1::FENCE_STATUS_ERROR, "late").ok());
  EXPECT_EQ(table_->Signal(kMine, timed, v1::FENCE_STATUS_OK, "").status().code(),
            absl::StatusCode::kFailedPrecondition);
  table_->CloseSession(kMine);
  EXPECT_EQ(table_->Info(kOther, written)->status, v1::FENCE_STATUS_OK);
  for (uint64_t id : {stale, bogus, untouched}) {
    EXPECT_EQ(table_->Info(kOther, id)->status, v1::FENCE_STATUS_OWNER_DIED) << id;
  }
}

// Tests that a call carrying fences its session rang (SignalRung) signals
// those whose words say OK, before anything else: only the carrier's own,
// pending, created fences, and only OK (an error, a stale generation or a
// pending word is skipped); ids carried again, unknown or another session's
// change nothing.
TEST_F(FenceTableTest, ACallCarryingRungFencesSignalsWhatTheirWordsSay) {
  table_->AddSession(kMine, ::geteuid());
  table_->AddSession(kMineToo, ::geteuid());
  OwnerPage page = NewOwnerPage();
  OwnerPage other_page = NewOwnerPage();
  ASSERT_TRUE(table_->SetPage(kMine, DuplicateFd(page.fd.get()).value()).ok());
  ASSERT_TRUE(table_->SetPage(kMineToo, DuplicateFd(other_page.fd.get()).value()).ok());
  auto create = [&](uint64_t session) {
    absl::StatusOr<FenceView> fence =
        table_->Create(session, "frame", "render", absl::ZeroDuration());
    EXPECT_TRUE(fence.ok()) << fence.status();
    return fence.ok() ? *fence : FenceView();
  };
  const FenceView rung = create(kMine);
  const FenceView errored = create(kMine);
  const FenceView stale = create(kMine);
  const FenceView pending = create(kMine);
  const FenceView theirs = create(kMineToo);
  page.word(rung.page_slot) = fence_page::Word(rung.page_generation, v1::FENCE_STATUS_OK);
  page.word(errored.page_slot) = fence_page::Word(errored.page_generation, v1::FENCE_STATUS_ERROR);
  page.word(stale.page_slot) = fence_page::Word(stale.page_generation + 1, v1::FENCE_STATUS_OK);
  other_page.word(theirs.page_slot) = fence_page::Word(theirs.page_generation, v1::FENCE_STATUS_OK);

  table_->SignalRung(kMine, {theirs.id, 999999, errored.id, stale.id, pending.id, rung.id});
  const absl::StatusOr<FenceView> signalled = table_->Info(kMine, rung.id);
  ASSERT_TRUE(signalled.ok());
  EXPECT_TRUE(signalled->signaled);
  EXPECT_EQ(signalled->status, v1::FENCE_STATUS_OK);
  for (const FenceView& skipped : {errored, stale, pending}) {
    EXPECT_FALSE(table_->Info(kMine, skipped.id)->signaled) << skipped.id;
  }
  EXPECT_FALSE(table_->Info(kMineToo, theirs.id)->signaled) << "another session's fence";
  // Carried again (the call before failed, say): the same signal.
  table_->SignalRung(kMine, {rung.id});
  EXPECT_EQ(table_->Info(kMine, rung.id)->status, v1::FENCE_STATUS_OK);
  EXPECT_EQ(table_->Info(kMine, rung.id)->signaled_at, signalled->signaled_at);
  // Its owner's record, after: taken as that signal.
  EXPECT_TRUE(table_->Signal(kMine, rung.id, v1::FENCE_STATUS_OK, "").ok());
  table_->SignalRung(kMineToo, {theirs.id});
  EXPECT_EQ(table_->Info(kMineToo, theirs.id)->status, v1::FENCE_STATUS_OK) << "by its own";
  table_->CloseSession(kMine);
  table_->CloseSession(kMineToo);
}

}  // namespace
}  // namespace bufferd
