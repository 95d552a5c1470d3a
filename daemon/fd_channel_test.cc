// FdChannel's ordering promise, with the loop held still: a call that says
// N records came before it gets them applied by its own thread
// (DrainSession), even while the loop is busy.
#include "daemon/fd_channel.h"

#include <poll.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <filesystem>
#include <vector>

#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "base/await.h"
#include "base/fd_count.h"
#include "gtest/gtest.h"
#include "testing/eventually.h"

namespace bufferd {
namespace {

constexpr uint64_t kSession = 7;

// Admits every connection as kSession; records what it is sent.
class Recorder final : public FdChannel::Delegate {
 public:
  absl::StatusOr<FdChannel::Admission> OnConnect(const PeerCredentials&) override {
    return FdChannel::Admission{kSession, std::string(16, 's')};
  }
  absl::Status OnRecord(uint64_t, const v1::FdChannelMessage& message,
                        std::vector<UniqueFd>) override {
    absl::MutexLock lock(&mu_);
    handles_.push_back(message.release().handle());
    if (message.release().handle() == 666) return absl::InvalidArgumentError("bad record");
    return absl::OkStatus();
  }
  void OnDetach(uint64_t) override {
    absl::MutexLock lock(&mu_);
    ++detaches_;
  }
  void OnDisconnect(uint64_t) override {
    absl::MutexLock lock(&mu_);
    ++disconnects_;
  }
  std::vector<uint64_t> handles() {
    absl::MutexLock lock(&mu_);
    return handles_;
  }
  bool AwaitDisconnect() {
    absl::MutexLock lock(&mu_);
    return AwaitWithTimeout(
        mu_, [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return disconnects_ > 0; },
        absl::Seconds(10));
  }
  bool AwaitDetach() {
    absl::MutexLock lock(&mu_);
    return AwaitWithTimeout(
        mu_, [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return detaches_ > 0; }, absl::Seconds(10));
  }
  int disconnects() {
    absl::MutexLock lock(&mu_);
    return disconnects_;
  }

 private:
  absl::Mutex mu_;
  std::vector<uint64_t> handles_ ABSL_GUARDED_BY(mu_);
  int disconnects_ ABSL_GUARDED_BY(mu_) = 0;
  int detaches_ ABSL_GUARDED_BY(mu_) = 0;
};

class FdChannelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir[] = "/tmp/fd-channel-test-XXXXXX";
    ASSERT_NE(::mkdtemp(dir), nullptr);
    dir_ = dir;
    ASSERT_TRUE(loop_.Init().ok());
    channel_ = std::make_unique<FdChannel>(&loop_, &budget_, &recorder_, ChannelOptions());
    auto listener = UnixSocket::ListenSeqPacket(dir_ + "/fd.sock");
    ASSERT_TRUE(listener.ok());
    ASSERT_TRUE(channel_->Listen(*std::move(listener)).ok());
    loop_.Start();
    auto client = UnixSocket::ConnectSeqPacket(dir_ + "/fd.sock");
    ASSERT_TRUE(client.ok());
    client_ = *std::move(client);
    ASSERT_TRUE(client_.RecvWithFds().ok()) << "the hello";
  }
  void TearDown() override {
    if (!release_loop_.HasBeenNotified()) release_loop_.Notify();
    loop_.Stop();
    channel_->Stop();
    std::filesystem::remove_all(dir_);
  }
  virtual FdChannel::Options ChannelOptions() { return {}; }
  // Holds the loop thread in a callback until TearDown (or Release).
  void HoldLoop() {
    absl::Notification held;
    loop_.RunAfter(absl::ZeroDuration(), [&held, this] {
      held.Notify();
      release_loop_.WaitForNotification();
    });
    held.WaitForNotification();
  }
  // An fd to deliver, in the budget.
  LeasedFd DeliveryFd() {
    absl::StatusOr<FdBudget::Lease> lease = budget_.Acquire(FdUse::kDelivery, 0);
    EXPECT_TRUE(lease.ok()) << lease.status();
    return LeasedFd{UniqueFd(::dup(0)), lease.ok() ? *std::move(lease) : FdBudget::Lease()};
  }
  // EndSessionSoon's outcome.
  FdChannel::Ended EndSoon() {
    absl::Notification done;
    FdChannel::Ended outcome = FdChannel::Ended::kNotFound;
    channel_->EndSessionSoon(kSession, "ended by the test", [&](FdChannel::Ended ended) {
      outcome = ended;
      done.Notify();
    });
    EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
    return outcome;
  }
  void Send(uint64_t handle) {
    v1::FdChannelMessage message;
    message.mutable_release()->set_handle(handle);
    ASSERT_TRUE(client_.Send(message.SerializeAsString()).ok());
  }

  std::string dir_;
  EventLoop loop_;
  FdBudget budget_;
  Recorder recorder_;
  std::unique_ptr<FdChannel> channel_;
  UnixSocket client_;
  absl::Notification release_loop_;
};

TEST_F(FdChannelTest, ACallAppliesTheRecordsSentBeforeIt) {
  HoldLoop();
  Send(1);
  Send(2);
  Send(3);
  EXPECT_TRUE(recorder_.handles().empty()) << "the loop is held: nobody read them";
  EXPECT_EQ(channel_->DrainSession(kSession, 2), FdChannel::Drained::kApplied);
  EXPECT_EQ(recorder_.handles(), (std::vector<uint64_t>{1, 2})) << "up to the count, in order";
  EXPECT_EQ(channel_->DrainSession(kSession, 2), FdChannel::Drained::kApplied);
  EXPECT_EQ(recorder_.handles().size(), 2u) << "nothing more was owed";
  EXPECT_EQ(channel_->DrainSession(kSession, 10), FdChannel::Drained::kApplied);
  EXPECT_EQ(recorder_.handles(), (std::vector<uint64_t>{1, 2, 3})) << "a count too high drains";
  EXPECT_EQ(channel_->DrainSession(kSession + 1, 10), FdChannel::Drained::kEnded)
      << "no such session";
}

TEST_F(FdChannelTest, ABadRecordADrainReadsEndsTheSession) {
  HoldLoop();
  Send(666);
  Send(8);
  EXPECT_EQ(channel_->DrainSession(kSession, 2), FdChannel::Drained::kEnded)
      << "the call must not run";
  EXPECT_EQ(recorder_.handles(), (std::vector<uint64_t>{666})) << "nothing after the bad record";
  EXPECT_EQ(channel_->DrainSession(kSession, 2), FdChannel::Drained::kEnded) << "still ending";
  release_loop_.Notify();
  EXPECT_TRUE(recorder_.AwaitDisconnect()) << "the loop ends it";
  pollfd p{client_.fd(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  auto end = client_.RecvWithFds();
  EXPECT_TRUE(!end.ok() || end->eof);
}

TEST_F(FdChannelTest, ABadRecordTheLoopReadsFailsTheNextCall) {
  Send(666);
  ASSERT_TRUE(recorder_.AwaitDisconnect());
  EXPECT_EQ(channel_->DrainSession(kSession, 1), FdChannel::Drained::kEnded);
}

TEST_F(FdChannelTest, RecordsQueuedBeforeAResetAreApplied) {
  // A client that sends a record and exits with an fd it was sent unread:
  // the kernel reports ECONNRESET first; the record still counts.
  HoldLoop();
  int fds[] = {0};
  ASSERT_TRUE(
      channel_->Deliver(kSession, 1, v1::FD_KIND_FENCE, 1, LeasedFd{UniqueFd(::dup(fds[0])), {}})
          .ok());
  Send(9);
  client_ = UnixSocket();  // gone, with the delivery unread
  release_loop_.Notify();
  EXPECT_TRUE(recorder_.AwaitDisconnect());
  EXPECT_EQ(recorder_.handles(), (std::vector<uint64_t>{9}));
}

TEST_F(FdChannelTest, TheLoopReadsRecordsByItself) {
  Send(5);
  Send(6);
  for (int i = 0; i < 500 && recorder_.handles().size() < 2; ++i) ::usleep(10000);
  EXPECT_EQ(recorder_.handles(), (std::vector<uint64_t>{5, 6}));
}

// Tests EndSessionSoon's outcomes: a session with nothing in flight ends
// at once; one whose client has a delivered fd unread ends but lingers
// (told so), is told it lingers when ended again, and is gone once its
// client reads the fd.
TEST_F(FdChannelTest, EndingASessionSaysWhetherItLingers) {
  ASSERT_TRUE(channel_->Deliver(kSession, 1, v1::FD_KIND_FENCE, 1, DeliveryFd()).ok());
  EXPECT_EQ(EndSoon(), FdChannel::Ended::kEndedLingering);
  EXPECT_TRUE(recorder_.AwaitDetach());
  EXPECT_EQ(recorder_.disconnects(), 0) << "it lingers with its fd unread";
  EXPECT_EQ(EndSoon(), FdChannel::Ended::kLingering);
  EXPECT_EQ(channel_->DrainSession(kSession, 0), FdChannel::Drained::kEnded);
  auto delivery = client_.RecvWithFds();  // the client reads it: the session can go
  ASSERT_TRUE(delivery.ok()) << delivery.status();
  EXPECT_EQ(delivery->fds.size(), 1u);
  EXPECT_TRUE(recorder_.AwaitDisconnect());
  EXPECT_EQ(EndSoon(), FdChannel::Ended::kNotFound);
  EXPECT_TRUE(testing::Eventually([&] { return budget_.usage().total == 0; }, absl::Seconds(10)))
      << "the delivered fd's place in the budget came back";
}

TEST_F(FdChannelTest, EndingASessionWithNothingInFlightEndsIt) {
  EXPECT_EQ(EndSoon(), FdChannel::Ended::kEnded);
  EXPECT_TRUE(recorder_.AwaitDisconnect());
  EXPECT_EQ(EndSoon(), FdChannel::Ended::kNotFound);
  auto end = client_.RecvWithFds();
  EXPECT_TRUE(!end.ok() || end->eof) << "the client sees its socket close";
}

class StallingFdChannelTest : public FdChannelTest {
 protected:
  FdChannel::Options ChannelOptions() override {
    return {.max_queued_deliveries = 4,
            .max_total_queued_deliveries = 100,
            .stalled_session_timeout = absl::Milliseconds(100)};
  }
};

// Tests the delivery queue of a client that never reads fd.sock: what its
// socket does not take is queued, up to the session's cap (named); past the
// stall timeout the session ends and lingers with its sent fds unread (its
// queue gone, no more deliveries); once the client closes, everything it
// was sent is back in the budget.
TEST_F(StallingFdChannelTest, AClientThatNeverReadsIsQueuedThenEnded) {
  absl::Status delivered;
  int sent = 0;
  while (delivered.ok() && sent < 100000) {
    delivered = channel_->Deliver(kSession, ++sent, v1::FD_KIND_FENCE, 1, DeliveryFd());
  }
  ASSERT_EQ(delivered.code(), absl::StatusCode::kResourceExhausted) << delivered;
  EXPECT_TRUE(absl::StrContains(delivered.message(),
                                "has 4 fd deliveries queued (client is not reading fd.sock)"))
      << delivered;
  EXPECT_EQ(channel_->QueuedDeliveries(kSession), 4u);
  ASSERT_TRUE(recorder_.AwaitDetach()) << "the stall ended it";
  EXPECT_EQ(recorder_.disconnects(), 0) << "it lingers: fds it was sent are unread";
  EXPECT_EQ(channel_->QueuedDeliveries(kSession), 0u) << "its queue went with its end";
  EXPECT_EQ(channel_->Deliver(kSession, 0, v1::FD_KIND_FENCE, 1, DeliveryFd()).code(),
            absl::StatusCode::kAborted);
  EXPECT_EQ(EndSoon(), FdChannel::Ended::kLingering);
  client_ = UnixSocket();  // the client goes: its unread fds with it
  EXPECT_TRUE(recorder_.AwaitDisconnect());
  EXPECT_TRUE(testing::Eventually([&] { return budget_.usage().total == 0; }, absl::Seconds(10)))
      << budget_.usage().total << " places still taken";
}

}  // namespace
// A client's record carries at most one fd: one with 40 ends the session,
// and none of them ever stays open in the daemon (a record could otherwise
// install as many fds as a delivery carries, past the budget's reserve).
TEST_F(FdChannelTest, ARecordWithManyFdsEndsTheSessionAndKeepsNone) {
  std::vector<UniqueFd> files;
  std::vector<int> raw;
  for (int i = 0; i < 40; ++i) {
    files.emplace_back(::memfd_create("extra", MFD_CLOEXEC));
    raw.push_back(files.back().get());
  }
  // Counted once they exist here, so only the daemon side's fds count.
  const int before = CountOpenFds();
  v1::FdChannelMessage message;
  message.mutable_upload()->set_upload_id(1);
  ASSERT_TRUE(client_.Send(message.SerializeAsString(), raw).ok());
  ASSERT_TRUE(recorder_.AwaitDisconnect());
  EXPECT_TRUE(recorder_.handles().empty()) << "the record never reached the delegate";
  // The session's own socket closes too.
  for (int i = 0; i < 500 && CountOpenFds() != before - 1; ++i) ::usleep(10000);
  EXPECT_EQ(CountOpenFds(), before - 1) << "none of the 40 fds was kept";
}

}  // namespace bufferd
