#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "base/await.h"
#include "base/client_text.h"
#include "base/errno_status.h"
#include "base/event_loop.h"
#include "base/fd_budget.h"
#include "base/fd_count.h"
#include "base/lazy.h"
#include "base/mapping.h"
#include "base/protocol.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"

namespace bufferd {
namespace {

UniqueFd NewMemfd(size_t size) {
  UniqueFd fd(::memfd_create("base_test", MFD_CLOEXEC));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
  return fd;
}

bool IsOpen(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

// Tests that UniqueFd closes on destruction and on Reset, and not after Release.
TEST(UniqueFdTest, OwnsExactlyOneFd) {
  const int baseline = CountOpenFds();
  int raw;
  {
    UniqueFd fd = NewMemfd(4096);
    raw = fd.get();
    EXPECT_TRUE(IsOpen(raw));
    UniqueFd moved = std::move(fd);
    EXPECT_FALSE(fd.valid());
    EXPECT_EQ(moved.get(), raw);
  }
  EXPECT_FALSE(IsOpen(raw));

  UniqueFd fd = NewMemfd(4096);
  int released = fd.Release();
  EXPECT_FALSE(fd.valid());
  EXPECT_TRUE(IsOpen(released));
  ::close(released);
  EXPECT_EQ(CountOpenFds(), baseline);
}

// Tests that Duplicate gives a second close-on-exec fd for the same file.
TEST(UniqueFdTest, DuplicateIsCloexec) {
  UniqueFd fd = NewMemfd(4096);
  absl::StatusOr<UniqueFd> dup = fd.Duplicate();
  ASSERT_TRUE(dup.ok()) << dup.status();
  EXPECT_NE(dup->get(), fd.get());
  EXPECT_TRUE(::fcntl(dup->get(), F_GETFD) & FD_CLOEXEC);
  UniqueFd bad;
  EXPECT_EQ(bad.Duplicate().status().code(), absl::StatusCode::kInvalidArgument);
}

// Tests that errno values map to the codes callers rely on, with a message
// naming the call.
TEST(ErrnoErrorTest, MapsCodesAndNamesTheCall) {
  struct Case {
    int err;
    absl::StatusCode code;
  } cases[] = {
      {ENOMEM, absl::StatusCode::kResourceExhausted},
      {ENOSPC, absl::StatusCode::kResourceExhausted},
      {EMFILE, absl::StatusCode::kResourceExhausted},
      {EACCES, absl::StatusCode::kPermissionDenied},
      {ENOENT, absl::StatusCode::kNotFound},
      {EINVAL, absl::StatusCode::kInvalidArgument},
      {EAGAIN, absl::StatusCode::kUnavailable},
      {EIO, absl::StatusCode::kInternal},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.err);
    absl::Status status = ErrnoError("memfd_create", c.err);
    EXPECT_EQ(status.code(), c.code);
    EXPECT_NE(status.message().find("memfd_create: "), std::string::npos) << status;
    EXPECT_NE(status.message().find(std::strerror(c.err)), std::string::npos) << status;
  }
}

// Tests that byte counts read naturally in messages.
TEST(FormatBytesTest, Units) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(1023), "1023 B");
  EXPECT_EQ(FormatBytes(4096), "4 KiB");
  EXPECT_EQ(FormatBytes(2 << 20), "2 MiB");
  EXPECT_EQ(FormatBytes(3 << 29), "1.5 GiB");
  EXPECT_EQ(FormatBytes(uint64_t{1} << 62), "4 EiB");
  EXPECT_EQ(FormatBytes(~uint64_t{0}), "16.0 EiB (18446744073709551615 bytes)");
  EXPECT_EQ(FormatBytes((64 << 20) + 4096), "64.0 MiB (67112960 bytes)") << "never looks exact";
}

// Tests that a mapping writes through to the file and unmaps itself.
TEST(MappingTest, SharedReadWriteAndReadOnly) {
  UniqueFd fd = NewMemfd(8192);
  {
    absl::StatusOr<Mapping> rw = Mapping::Create(fd.get(), 8192, Mapping::Protection::kReadWrite);
    ASSERT_TRUE(rw.ok()) << rw.status();
    EXPECT_TRUE(rw->writable());
    std::memset(rw->data(), 0xab, rw->size());
  }
  absl::StatusOr<Mapping> ro = Mapping::Create(fd.get(), 8192, Mapping::Protection::kReadOnly);
  ASSERT_TRUE(ro.ok()) << ro.status();
  EXPECT_EQ(ro->data()[8191], 0xab);
  EXPECT_EQ(Mapping::Create(fd.get(), 0, Mapping::Protection::kReadOnly).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Tests that an O_RDONLY reopen of a memfd cannot be mapped writable.
TEST(MappingTest, ReadOnlyFdCannotMapWritable) {
  UniqueFd fd = NewMemfd(4096);
  std::string path = "/proc/self/fd/" + std::to_string(fd.get());
  UniqueFd ro(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(ro.valid());
  absl::StatusOr<Mapping> mapping =
      Mapping::Create(ro.get(), 4096, Mapping::Protection::kReadWrite);
  EXPECT_EQ(mapping.status().code(), absl::StatusCode::kPermissionDenied) << mapping.status();
  EXPECT_TRUE(Mapping::Create(ro.get(), 4096, Mapping::Protection::kReadOnly).ok());
}

// Tests that fds sent with a record arrive owned, cloexec, and referring to the
// same file, and that the /proc/self/fd count returns to baseline.
TEST(UnixSocketTest, PassesFdsWithRecord) {
  const int baseline = CountOpenFds();
  {
    auto pair = UnixSocket::SeqPacketPair();
    ASSERT_TRUE(pair.ok()) << pair.status();
    auto& [a, b] = *pair;
    UniqueFd file1 = NewMemfd(4096);
    UniqueFd file2 = NewMemfd(8192);
    int fds[] = {file1.get(), file2.get()};
    ASSERT_TRUE(a.Send("hello", fds).ok());
    absl::StatusOr<UnixSocket::Received> got = b.RecvWithFds();
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->bytes, "hello");
    ASSERT_EQ(got->fds.size(), 2u);
    struct stat st;
    ASSERT_EQ(::fstat(got->fds[1].get(), &st), 0);
    EXPECT_EQ(st.st_size, 8192);
    EXPECT_TRUE(::fcntl(got->fds[0].get(), F_GETFD) & FD_CLOEXEC);
  }
  EXPECT_EQ(CountOpenFds(), baseline);
}

// Tests that a record longer than the receive buffer is an error, not a
// silently cut message, and that its fds are not leaked.
TEST(UnixSocketTest, TruncatedRecordIsAnError) {
  const int baseline = CountOpenFds();
  {
    auto pair = UnixSocket::SeqPacketPair();
    ASSERT_TRUE(pair.ok());
    auto& [a, b] = *pair;
    UniqueFd file = NewMemfd(4096);
    int fds[] = {file.get()};
    ASSERT_TRUE(a.Send(std::string(100, 'x'), fds).ok());
    absl::StatusOr<UnixSocket::Received> got = b.RecvWithFds(10);
    EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
  }
  EXPECT_EQ(CountOpenFds(), baseline);
}

// Tests end-of-stream, non-blocking receive and peer credentials.
TEST(UnixSocketTest, EofWouldBlockAndCredentials) {
  auto pair = UnixSocket::SeqPacketPair();
  ASSERT_TRUE(pair.ok());
  auto& [a, b] = *pair;
  absl::StatusOr<PeerCredentials> cred = b.GetPeerCredentials();
  ASSERT_TRUE(cred.ok());
  EXPECT_EQ(cred->pid, ::getpid());
  EXPECT_EQ(cred->uid, ::getuid());
  EXPECT_EQ(b.RecvWithFds(64, /*dont_wait=*/true).status().code(), absl::StatusCode::kUnavailable);
  a = UnixSocket();
  absl::StatusOr<UnixSocket::Received> got = b.RecvWithFds();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(got->eof);
}

// Tests listen/connect/accept over a real path.
TEST(UnixSocketTest, ListenConnectAccept) {
  char dir_template[] = "/tmp/bufferd-base-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  std::string path = FdSocketPath(dir_template);
  absl::StatusOr<UnixSocket> listener = UnixSocket::ListenSeqPacket(path);
  ASSERT_TRUE(listener.ok()) << listener.status();
  EXPECT_EQ(UnixSocket::ListenSeqPacket(path).status().code(), absl::StatusCode::kAlreadyExists);
  absl::StatusOr<UnixSocket> client = UnixSocket::ConnectSeqPacket(path);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<UnixSocket> server = listener->Accept(/*nonblocking=*/true);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE(server->Send("x").ok());
  EXPECT_EQ(client->RecvWithFds()->bytes, "x");
  EXPECT_EQ(UnixSocket::ConnectSeqPacket(std::string(200, 'a')).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Listening: yes; once the listener is gone (a stale socket file), a path
  // too long, nothing there: no.
  EXPECT_TRUE(UnixSocket::SeqPacketListening(path));
  *listener = UnixSocket();
  EXPECT_TRUE(std::filesystem::exists(path));
  EXPECT_FALSE(UnixSocket::SeqPacketListening(path));
  EXPECT_FALSE(UnixSocket::SeqPacketListening(std::string(200, 'a')));
  ::unlink(path.c_str());
  EXPECT_FALSE(UnixSocket::SeqPacketListening(path));
  ::rmdir(dir_template);
}

// Tests the budget's total and per-uid limits, the messages naming them, and
// that a destroyed (or moved-from, then destroyed) lease gives its place back
// exactly once.
TEST(FdBudgetTest, TotalAndPerUidLimits) {
  FdBudget budget({.total = 4, .per_uid = 3});
  std::vector<FdBudget::Lease> leases;
  for (int i = 0; i < 3; ++i) {
    auto lease = budget.Acquire(FdUse::kExport, 1);
    ASSERT_TRUE(lease.ok()) << lease.status();
    leases.push_back(*std::move(lease));
  }
  auto fourth = budget.Acquire(FdUse::kSession, 1);
  EXPECT_EQ(fourth.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(fourth.status().message(),
            "fd budget of uid 1 reached: it holds 3 of 3 fds (limits.max_fds_per_uid): "
            "buffers it exported (share tokens not yet redeemed), sessions, control connections, "
            "fences and timelines (their pipes and pages) and fds not yet read; let tokens be "
            "redeemed or expire, drop fences and timelines or close sessions");
  EXPECT_EQ(budget.CheckRoom(1, 1).message(), fourth.status().message());
  EXPECT_TRUE(budget.CheckRoom(2, 1).ok());
  auto other = budget.Acquire(FdUse::kSession, 2);
  ASSERT_TRUE(other.ok());
  auto full = budget.Acquire(FdUse::kControlConnection, 3);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(full.status().message(),
            "daemon fd budget reached: 4 of 4 fds in use (3 exported buffers (share tokens not yet "
            "redeemed), 1 sessions); try again when "
            "some close");
  EXPECT_EQ(budget.usage().total, 4u);
  EXPECT_EQ(budget.usage().of(FdUse::kExport), 3u);
  EXPECT_EQ(budget.UsedBy(1), 3u);
  // The dry run's answer: the refusal Acquire gives, taking nothing.
  EXPECT_EQ(budget.CheckRoom(3, 1).message(), full.status().message());
  EXPECT_EQ(budget.usage().total, 4u);

  FdBudget::Lease moved = std::move(leases[0]);
  EXPECT_FALSE(leases[0].held());
  leases.clear();
  EXPECT_EQ(budget.UsedBy(1), 1u) << "the moved-from lease returned nothing";
  moved.Reset();
  moved.Reset();
  EXPECT_EQ(budget.UsedBy(1), 0u);
  EXPECT_EQ(budget.usage().total, 1u);
  EXPECT_TRUE(budget.Acquire(FdUse::kDelivery, 3).ok());
  EXPECT_EQ(budget.usage().total, 1u) << "that temporary lease went at once";
  // Room for several at once (a set): the uid's share of 3, the total of 4
  // (uid 2's session still holds one).
  EXPECT_TRUE(budget.CheckRoom(5, 3).ok());
  EXPECT_EQ(budget.CheckRoom(2, 3).message(),
            "fd budget of uid 2 reached: it holds 1 of 3 fds (limits.max_fds_per_uid); 3 more "
            "asked for: buffers it exported (share tokens not yet redeemed), sessions, control "
            "connections, fences and timelines (their pipes and pages) and fds not yet read; let "
            "tokens be redeemed or expire, drop fences and timelines or close sessions");
  EXPECT_EQ(budget.CheckRoom(kNoUid, 4).message(),
            "daemon fd budget reached: 1 of 4 fds in use (1 sessions); 4 more asked for; try "
            "again when some close");
  EXPECT_EQ(budget.usage().total, 1u);
}

// Tests that the limits hold exactly when 8 threads race for the last places.
TEST(FdBudgetTest, ExactUnderConcurrency) {
  FdBudget budget({.total = 1000, .per_uid = 300});
  std::vector<std::vector<FdBudget::Lease>> held(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 400; ++i) {
        auto lease = budget.Acquire(FdUse::kExport, static_cast<uid_t>(t % 4));
        if (lease.ok()) held[t].push_back(*std::move(lease));
      }
    });
  }
  for (auto& thread : threads) thread.join();
  size_t total = 0;
  for (const auto& leases : held) total += leases.size();
  EXPECT_EQ(total, 1000u);
  EXPECT_EQ(budget.usage().total, 1000u);
  for (uid_t uid = 0; uid < 4; ++uid) EXPECT_LE(budget.UsedBy(uid), 300u) << uid;
  held.clear();
  EXPECT_EQ(budget.usage().total, 0u);
}

// Tests that client text is escaped (no control byte, quote or newline gets
// through raw) and cut to a prefix with the full length.
TEST(ClientTextTest, QuotesEscapedAndShort) {
  EXPECT_EQ(QuoteClientText("system"), "'system'");
  EXPECT_EQ(QuoteClientText("a\x1b[2J\nb'c\\"), "'a\\x1b[2J\\nb\\'c\\\\'");
  EXPECT_EQ(QuoteClientText(std::string("\xff\0", 2)), "'\\xff\\x00'");
  EXPECT_EQ(QuoteClientText(std::string(100000, 'x')),
            "'" + std::string(64, 'x') + "...' (100000 bytes)");
  EXPECT_EQ(QuoteClientText("abcdef", 3), "'abc...' (6 bytes)");
  const std::string quoted = QuoteClientText(std::string(1000, '\x07'));
  EXPECT_EQ(quoted.find('\x07'), std::string::npos);
  EXPECT_LT(quoted.size(), 300u);
}

// Tests that a session credential survives format and parse, and that every
// malformed credential is UNAUTHENTICATED naming the expected shape.
TEST(ProtocolTest, SessionCredentialRoundTripsAndRejectsMalformed) {
  const std::string secret(
      "\x00\x01\xfe\xff"
      "abcdefghijkl",
      kSessionSecretBytes);
  const std::string text = FormatSessionCredential(42, secret);
  EXPECT_EQ(text, "42:0001feff6162636465666768696a6b6c");
  absl::StatusOr<SessionCredential> parsed = ParseSessionCredential(text);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->session_id, 42u);
  EXPECT_EQ(parsed->secret, secret);
  EXPECT_THAT(ParseSessionCredential("").status().message(), ::testing::HasSubstr("missing"));
  for (const char* bad :
       {"42", "42:", "x:0001feff6162636465666768696a6b6c", "42:0001feff6162636465666768696a6b6",
        "42:zz01feff6162636465666768696a6b6c", "-1:0001feff6162636465666768696a6b6c"}) {
    SCOPED_TRACE(bad);
    absl::Status status = ParseSessionCredential(bad).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated);
    EXPECT_THAT(status.message(), ::testing::HasSubstr("<session id>:<32 hex digits>"));
  }
}

// Tests that a release list parses back, and that zero ids, garbage and more
// than kMaxCarriedReleases ids are INVALID_ARGUMENT.
TEST(ProtocolTest, ReleaseListRoundTripsAndIsBounded) {
  const std::vector<uint64_t> handles = {1, 7, 18446744073709551615u};
  absl::StatusOr<std::vector<uint64_t>> parsed = ParseReleaseList(FormatIdList(handles));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(*parsed, handles);
  std::vector<uint64_t> too_many(kMaxCarriedReleases + 1, 5);
  for (const std::string& bad :
       {std::string("0"), std::string("1,,2"), std::string("1,x"), FormatIdList(too_many)}) {
    SCOPED_TRACE(bad.substr(0, 20));
    EXPECT_EQ(ParseReleaseList(bad).status().code(), absl::StatusCode::kInvalidArgument);
  }
  std::vector<uint64_t> most(kMaxCarriedReleases, 5);
  EXPECT_TRUE(ParseReleaseList(FormatIdList(most)).ok());
}

// Tests that a rung-fence list is bounded at kMaxCarriedRung and names its
// key when refused.
TEST(ProtocolTest, RungListIsBoundedAndNamesItsKey) {
  std::vector<uint64_t> most(kMaxCarriedRung, 9);
  EXPECT_TRUE(ParseRungList(FormatIdList(most)).ok());
  most.push_back(9);
  const absl::Status too_many = ParseRungList(FormatIdList(most)).status();
  EXPECT_EQ(too_many.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(too_many.message(), ::testing::HasSubstr("metadata bufferd-rung: expected up to 64 "
                                                       "comma-separated fence ids"));
  EXPECT_EQ(ParseRungList("3,0").status().code(), absl::StatusCode::kInvalidArgument);
}

// Tests that EventLoop timers run in time order on the loop thread, that a
// cancelled one never runs, and that a periodic one repeats until cancelled.
TEST(EventLoopTest, TimersRunInOrderAndCancel) {
  EventLoop loop;
  ASSERT_TRUE(loop.Init().ok());
  loop.Start();
  absl::Mutex mu;
  std::vector<int> ran;
  int ticks = 0;
  auto record = [&](int n) {
    return [&, n] {
      absl::MutexLock lock(&mu);
      ran.push_back(n);
    };
  };
  loop.RunAfter(absl::Milliseconds(60), record(3));
  loop.RunAfter(absl::Milliseconds(20), record(2));
  loop.RunAfter(-absl::Seconds(1), record(1));  // past: at once
  const EventLoop::TimerId cancelled = loop.RunAfter(absl::Milliseconds(40), record(99));
  loop.Cancel(cancelled);
  const EventLoop::TimerId every = loop.RunEvery(absl::Milliseconds(5), [&] {
    absl::MutexLock lock(&mu);
    ++ticks;
  });
  {
    absl::MutexLock lock(&mu);
    auto all_ran = [&]()
                       ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return ran.size() >= 3 && ticks >= 3; };
    EXPECT_TRUE(AwaitWithTimeout(mu, all_ran, absl::Seconds(10)));
  }
  loop.Cancel(every);
  loop.Stop();
  EXPECT_EQ(ran, (std::vector<int>{1, 2, 3}));
  EXPECT_GE(ticks, 3);
}

// Tests that a watched fd's callback gets its events on the loop thread,
// that Modify changes what is watched, and that after Unwatch no callback
// runs for it.
TEST(EventLoopTest, WatchModifyUnwatch) {
  EventLoop loop;
  ASSERT_TRUE(loop.Init().ok());
  loop.Start();
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK), 0);
  UniqueFd read_end(pipe_fds[0]), write_end(pipe_fds[1]);
  absl::Mutex mu;
  int readable = 0;
  ASSERT_TRUE(loop.Watch(read_end.get(), EPOLLIN,
                         [&](uint32_t events) {
                           char byte;
                           while (::read(read_end.get(), &byte, 1) == 1) {
                           }
                           absl::MutexLock lock(&mu);
                           if (events & EPOLLIN) ++readable;
                         })
                  .ok());
  EXPECT_EQ(loop.Watch(read_end.get(), EPOLLIN, [](uint32_t) {}).code(),
            absl::StatusCode::kAlreadyExists);
  auto await_readable = [&](int n) {
    absl::MutexLock lock(&mu);
    auto seen = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return readable >= n; };
    return AwaitWithTimeout(mu, seen, absl::Seconds(10));
  };
  ASSERT_EQ(::write(write_end.get(), "x", 1), 1);
  EXPECT_TRUE(await_readable(1));
  ASSERT_TRUE(loop.Modify(read_end.get(), 0).ok());
  ASSERT_EQ(::write(write_end.get(), "x", 1), 1);
  ASSERT_TRUE(loop.Modify(read_end.get(), EPOLLIN).ok());
  EXPECT_TRUE(await_readable(2)) << "watched again: the waiting byte is seen";
  loop.Unwatch(read_end.get());
  ASSERT_EQ(::write(write_end.get(), "x", 1), 1);
  // A timer after the write proves the loop went round without the callback.
  absl::Notification went_round;
  loop.RunAfter(absl::Milliseconds(50), [&] { went_round.Notify(); });
  EXPECT_TRUE(went_round.WaitForNotificationWithTimeout(absl::Seconds(10)));
  loop.Stop();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(readable, 2);
  EXPECT_EQ(loop.Modify(read_end.get(), EPOLLIN).code(), absl::StatusCode::kNotFound);
}

// Tests that an event read in the same epoll batch as the callback that
// unwatched its fd, closed it and watched a new fd of the same number is
// dropped: the new watch's callback never sees the old fd's event.
TEST(EventLoopTest, AnEventOfAnUnwatchedFdNeverReachesTheNumbersNextWatch) {
  EventLoop loop;
  ASSERT_TRUE(loop.Init().ok());
  loop.Start();
  int first[2], second[2];
  ASSERT_EQ(::pipe2(first, O_CLOEXEC | O_NONBLOCK), 0);
  ASSERT_EQ(::pipe2(second, O_CLOEXEC | O_NONBLOCK), 0);
  UniqueFd first_write(first[1]), second_write(second[1]);
  int read_ends[2] = {first[0], second[0]};
  absl::Mutex mu;
  int handled = 0;          // callbacks of the two first watches
  int stale = 0;            // calls of the new watch's callback
  UniqueFd replacement[2];  // the pipe that took the other's number
  auto on_event = [&](int self) {
    return [&, self](uint32_t) {
      char byte;
      while (::read(read_ends[self], &byte, 1) == 1) {
      }
      absl::MutexLock lock(&mu);
      if (handled++ != 0) return;
      // The first callback of the batch: the other fd goes, and its number
      // is watched again for a pipe nothing is written to.
      const int other = read_ends[1 - self];
      loop.Unwatch(other);
      ::close(other);
      int fresh[2];
      ASSERT_EQ(::pipe2(fresh, O_CLOEXEC | O_NONBLOCK), 0);
      replacement[0].Reset(fresh[0]);
      replacement[1].Reset(fresh[1]);
      ASSERT_EQ(fresh[0], other) << "the kernel did not reuse the number";
      ASSERT_TRUE(loop.Watch(fresh[0], EPOLLIN,
                             [&](uint32_t) {
                               absl::MutexLock inner(&mu);
                               ++stale;
                             })
                      .ok());
    };
  };
  // Both fds become readable while the loop is held in a timer, so one
  // epoll_wait reads both events.
  absl::Notification holding, release;
  loop.RunAfter(absl::ZeroDuration(), [&] {
    holding.Notify();
    release.WaitForNotification();
  });
  ASSERT_TRUE(holding.WaitForNotificationWithTimeout(absl::Seconds(10)));
  ASSERT_TRUE(loop.Watch(read_ends[0], EPOLLIN, on_event(0)).ok());
  ASSERT_TRUE(loop.Watch(read_ends[1], EPOLLIN, on_event(1)).ok());
  ASSERT_EQ(::write(first_write.get(), "x", 1), 1);
  ASSERT_EQ(::write(second_write.get(), "x", 1), 1);
  release.Notify();
  absl::Notification went_round;
  loop.RunAfter(absl::Milliseconds(50), [&] { went_round.Notify(); });
  EXPECT_TRUE(went_round.WaitForNotificationWithTimeout(absl::Seconds(10)));
  loop.Stop();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(handled, 1) << "both callbacks of the first watches ran";
  EXPECT_EQ(stale, 0) << "the old fd's event reached the new watch";
  for (int fd : read_ends) {
    if (fd != replacement[0].get()) ::close(fd);
  }
}

// Tests that a Lazy reads as an empty value without allocating, that the
// first Use() makes the one value every later Read() and Use() sees, and
// that Read() of another Lazy stays empty.
TEST(LazyTest, ReadNeverAllocatesUseMakesOne) {
  Lazy<std::vector<int>> lazy, other;
  EXPECT_TRUE(lazy.Read().empty());
  EXPECT_EQ(lazy.get(), nullptr) << "a Read() made it";
  lazy.Use().push_back(7);
  ASSERT_NE(lazy.get(), nullptr);
  EXPECT_EQ(&lazy.Use(), lazy.get());
  EXPECT_EQ(&lazy.Read(), lazy.get());
  EXPECT_THAT(lazy.Read(), ::testing::ElementsAre(7));
  EXPECT_TRUE(other.Read().empty()) << "the shared empty value was changed";
  EXPECT_EQ(other.get(), nullptr);
}

}  // namespace
}  // namespace bufferd
