// Hostile clients, one test each, against a real daemon: records that are
// garbage, truncated, oversized or of a kind only the daemon sends; records
// carrying fds nobody asked for (1 and 250); a client that never reads
// fd.sock while it allocates thousands of buffers; 2,000 fd.sock connections
// at once; clients that connect and say nothing; malformed and oversized
// gRPC metadata; another client's session id with wrong secrets under load;
// RPCs racing the end of their session.
//
// Each test ends with the same three checks:
//   1. a well-behaved client connected before the attack (the bystander)
//      still allocates, maps, exports (another session imports and reads
//      what it wrote) and lists;
//   2. nothing leaked: ExpectBaseline (daemon fds, fd budget, heaps,
//      buffers, handles, fences), plus no share token pending and no session
//      but the fixture's;
//   3. the daemon's log (at info, what an operator reads) has at most one
//      line about each hostile client, naming what was wrong, and what
//      several clients cause stays within the rate limit of its kind (10
//      lines per 10 s).
//
// Covered elsewhere, and not repeated here: a record flood starving others
// (AvailabilityTest.RecordFloodDoesNotStarveOtherSessions), the fd-budget
// flood from fd.sock and control.sock at RLIMIT_NOFILE 256
// (AvailabilityTest.FloodOfConnectionsNeverLocksOutControlSock), a 40-fd
// upload at the FdChannel level (FdChannelTest.
// ARecordWithManyFdsEndsTheSessionAndKeepsNone), unparsable request bodies
// (AvailabilityTest.LogStaysBoundedUnderFloods).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/errno_status.h"
#include "base/protocol.h"
#include "base/unique_fd.h"
#include "base/unix_socket.h"
#include "bufferd/v1/buffer.grpc.pb.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "bufferd/v1/fence.grpc.pb.h"
#include "client/client.h"
#include "grpcpp/client_context.h"
#include "testing/daemon_test.h"

namespace bufferd {
namespace {

using ::bufferd::testing::Eventually;
using ::bufferd::testing::OpenRawSession;
using ::bufferd::testing::RawSession;
using ::bufferd::testing::TestDaemon;

// Every call a test makes gives up after this: a call that takes it is a
// hang, never an answer.
constexpr std::chrono::seconds kCallDeadline(10);

std::unique_ptr<grpc::ClientContext> ContextWithDeadline() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + kCallDeadline);
  return context;
}

// A raw session's context, with a deadline.
std::unique_ptr<grpc::ClientContext> SessionContext(const RawSession& raw) {
  auto context = ContextWithDeadline();
  context->AddMetadata(kSessionMetadataKey, raw.metadata);
  return context;
}

uint64_t SessionIdOf(const RawSession& raw) {
  uint64_t id = 0;
  EXPECT_TRUE(absl::SimpleAtoi(raw.metadata.substr(0, raw.metadata.find(':')), &id))
      << raw.metadata;
  return id;
}

// A cheap authenticated call: UNAUTHENTICATED once the session is over,
// NOT_FOUND (handle 0) while it lives.
grpc::Status Probe(const RawSession& raw) {
  v1::GetBufferRequest request;
  v1::GetBufferResponse response;
  return raw.stub->GetBuffer(SessionContext(raw).get(), request, &response);
}

bool SessionLive(const RawSession& raw) {
  return Probe(raw).error_code() != grpc::StatusCode::UNAUTHENTICATED;
}

// Whether the daemon has closed its end of `socket` (EOF), within 5 s;
// records still queued for the client (a hello, deliveries) are read first.
bool DaemonHungUp(const UnixSocket& socket) {
  for (int i = 0; i < 50; ++i) {
    pollfd p{socket.fd(), POLLIN, 0};
    if (::poll(&p, 1, 100) != 1) continue;
    absl::StatusOr<UnixSocket::Received> got = socket.RecvWithFds(4096, /*dont_wait=*/true);
    if (!got.ok()) return !IsWouldBlock(got.status());  // ECONNRESET and the like
    if (got->eof) return true;
  }
  return false;
}

// A record with `fds` attached, past UnixSocket::Send's limit of 64: no
// honest sender needs it (base/unix_socket owns SCM_RIGHTS for everyone
// else), but a hostile client may attach up to the kernel's 253
// (SCM_MAX_FD).
absl::Status SendWithManyFds(int socket_fd, const std::string& bytes, std::span<const int> fds) {
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  if (::sendmsg(socket_fd, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(bytes.size())) {
    return ErrnoError("sendmsg", errno);
  }
  return absl::OkStatus();
}

// Polls `condition` every 50 ms until it holds or `limit` has passed.
template <typename F>
bool WaitUpTo(std::chrono::seconds limit, F condition) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return condition();
}

// The next record the daemon sends on `socket`, within 5 s; nullopt at EOF,
// on an error or a timeout.
std::optional<v1::FdChannelMessage> NextRecord(const UnixSocket& socket) {
  pollfd p{socket.fd(), POLLIN, 0};
  if (::poll(&p, 1, 5000) != 1) return std::nullopt;
  absl::StatusOr<UnixSocket::Received> got = socket.RecvWithFds();
  if (!got.ok() || got->eof) return std::nullopt;
  v1::FdChannelMessage message;
  if (!message.ParseFromString(got->bytes)) return std::nullopt;
  return message;
}

// A pipe; tests hand one end to the daemon and watch the other.
struct Pipe {
  UniqueFd read;
  UniqueFd write;
};

Pipe MakePipe() {
  int fds[2] = {-1, -1};
  EXPECT_EQ(::pipe2(fds, O_CLOEXEC | O_NONBLOCK), 0) << std::strerror(errno);
  return Pipe{UniqueFd(fds[0]), UniqueFd(fds[1])};
}

// Every copy of the pipe's write end is closed (ours was closed before):
// its read end reads EOF.
bool WriteEndsGone(const Pipe& pipe) {
  char byte;
  return ::read(pipe.read.get(), &byte, 1) == 0;
}

// Every copy of the pipe's read end is closed (ours was closed before): its
// write end reports an error (a write would get EPIPE).
bool ReadEndsGone(const Pipe& pipe) {
  pollfd p{pipe.write.get(), POLLOUT, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & POLLERR) != 0;
}

std::string Serialized(const v1::FdChannelMessage& message) { return message.SerializeAsString(); }

// Whether `line` names session `id` ("session 12 ended: ..."; never
// "session 123").
bool NamesSession(const std::string& line, uint64_t id) {
  const std::string key = absl::StrCat("session ", id);
  for (size_t at = line.find(key); at != std::string::npos; at = line.find(key, at + 1)) {
    const size_t end = at + key.size();
    if (end == line.size() || !absl::ascii_isdigit(line[end])) return true;
  }
  return false;
}

// The client side of a raw session for tests that race its end: a reader
// thread files the fds the daemon delivers by transfer id (as the client
// library does), callers take theirs, upload fds (counting the records they
// send, for bufferd-records) and call through their own stubs.
class RacingSession {
 public:
  RacingSession(RawSession raw, const std::string& socket_dir)
      : raw_(std::move(raw)), fence_(testing::FenceStub(socket_dir)) {
    reader_ = std::thread([this] { Read(); });
  }
  ~RacingSession() { Finish(); }

  const RawSession& raw() const { return raw_; }
  v1::Fence::Stub& fence() const { return *fence_; }

  // The fd delivered for `transfer_id`; invalid if it did not come within
  // 5 s, or the connection ended first.
  UniqueFd Take(uint64_t transfer_id) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(5),
                 [&] { return done_ || fds_.count(transfer_id) != 0; });
    auto it = fds_.find(transfer_id);
    if (it == fds_.end()) return UniqueFd();
    UniqueFd fd = std::move(it->second);
    fds_.erase(it);
    return fd;
  }

  // Sends an FdUpload of `fd` as `upload_id`: the count of records sent so
  // far (for bufferd-records), or nullopt if the socket refused it.
  std::optional<uint64_t> Upload(int fd, uint64_t upload_id) {
    std::lock_guard<std::mutex> lock(send_mu_);
    v1::FdChannelMessage message;
    message.mutable_upload()->set_upload_id(upload_id);
    if (!raw_.socket.Send(Serialized(message), std::span<const int>(&fd, 1)).ok()) {
      return std::nullopt;
    }
    return ++records_;
  }

  // Ends the session from the client's side while calls are in flight:
  // `hard` shuts the socket both ways (as an exit would; the reader reads
  // what is queued, then EOF), else only for writing (the daemon reads EOF;
  // the reader goes on until the daemon hangs up).
  void End(bool hard) { ::shutdown(raw_.socket.fd(), hard ? SHUT_RDWR : SHUT_WR); }

  // Waits (up to 10 s) for the reader to see the end, then closes the
  // socket: fds still queued in it close with it. False if the daemon never
  // hung up.
  bool Finish() {
    if (!reader_.joinable()) return true;
    bool hung_up;
    {
      std::unique_lock<std::mutex> lock(mu_);
      hung_up = cv_.wait_for(lock, std::chrono::seconds(10), [&] { return done_; });
    }
    if (!hung_up) ::shutdown(raw_.socket.fd(), SHUT_RDWR);
    reader_.join();
    raw_.socket = UnixSocket();
    raw_.stub.reset();
    fence_.reset();
    return hung_up;
  }

 private:
  void Read() {
    while (true) {
      absl::StatusOr<UnixSocket::Received> got = raw_.socket.RecvWithFds();
      if (!got.ok() || got->eof) break;
      v1::FdChannelMessage message;
      if (!message.ParseFromString(got->bytes)) continue;
      std::lock_guard<std::mutex> lock(mu_);
      if (message.has_delivery() && got->fds.size() == 1) {
        fds_[message.delivery().transfer_id()] = std::move(got->fds[0]);
      }
      for (int i = 0; message.has_deliveries() && i < message.deliveries().deliveries_size() &&
                      i < static_cast<int>(got->fds.size());
           ++i) {
        fds_[message.deliveries().deliveries(i).transfer_id()] = std::move(got->fds[i]);
      }
      cv_.notify_all();
    }
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    cv_.notify_all();
  }

  RawSession raw_;
  std::unique_ptr<v1::Fence::Stub> fence_;
  std::thread reader_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, UniqueFd> fds_;  // guarded by mu_
  bool done_ = false;                 // guarded by mu_
  std::mutex send_mu_;
  uint64_t records_ = 0;  // guarded by send_mu_
};

class HostileTest : public testing::DaemonTest {
 protected:
  // The daemon logs at info, as it runs for an operator: every line counted
  // is one an operator would read. Then the bystander connects, and what
  // the log holds from here on is the attack's.
  void Start(const std::string& config = "") {
    Start(TestDaemon::Options{.config = config, .log_level = "info"});
  }
  void Start(const TestDaemon::Options& options) {
    StartDaemon(options);
    if (HasFatalFailure()) return;
    ConnectBystander();
    log_from_ = std::filesystem::file_size(daemon_->log_path());
  }

  // The daemon survived the attack whole: it stops cleanly, and (under
  // --config=asan, where it is instrumented too) reported nothing.
  void TearDown() override {
    if (daemon_ == nullptr) return;
    held_map_.reset();
    held_.reset();
    bystander_.reset();
    client_.reset();
    EXPECT_EQ(daemon_->Stop(), 0) << "the daemon must stop cleanly";
    const std::string log = testing::ReadFile(daemon_->log_path());
    for (const char* report : {"AddressSanitizer", "LeakSanitizer", "runtime error:"}) {
      EXPECT_FALSE(absl::StrContains(log, report)) << report;
    }
  }

  // A well-behaved client: its own session, a buffer it wrote and maps.
  void ConnectBystander() {
    auto client = daemon_->Connect();
    ASSERT_TRUE(client.ok()) << client.status();
    bystander_.emplace(*std::move(client));
    auto buffer = bystander_->Allocate({.heap = "system", .size = 64 * 1024, .name = "bystander"});
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    held_.emplace(*std::move(buffer));
    auto mapping = held_->Map();
    ASSERT_TRUE(mapping.ok()) << mapping.status();
    held_map_.emplace(*std::move(mapping));
    std::fill(held_map_->bytes().begin(), held_map_->bytes().end(), 0x5a);
  }

  // Check 1: the bystander's mapping still holds what it wrote; it
  // allocates, maps and writes a new buffer, exports it read-only, and
  // another session (the fixture's) imports it and reads what it wrote; it
  // lists heaps, its clients and its buffers.
  void ExpectBystanderWorks() {
    ASSERT_TRUE(bystander_.has_value());
    EXPECT_TRUE(std::all_of(held_map_->bytes().begin(), held_map_->bytes().end(),
                            [](uint8_t b) { return b == 0x5a; }));
    auto fresh = bystander_->Allocate({.heap = "system", .size = 4096, .name = "after attack"});
    ASSERT_TRUE(fresh.ok()) << fresh.status();
    {
      auto mapping = fresh->Map();
      ASSERT_TRUE(mapping.ok()) << mapping.status();
      std::memcpy(mapping->data(), "still served", 12);
    }
    auto token = fresh->Export(Access::kReadOnly);
    ASSERT_TRUE(token.ok()) << token.status();
    auto imported = client_->Import(*token);
    ASSERT_TRUE(imported.ok()) << imported.status();
    {
      auto mapping = imported->MapReadOnly();
      ASSERT_TRUE(mapping.ok()) << mapping.status();
      EXPECT_EQ(std::memcmp(mapping->data(), "still served", 12), 0);
    }
    EXPECT_TRUE(bystander_->ListHeaps().ok());
    EXPECT_TRUE(bystander_->ListClients().ok());
    v1::ListBuffersRequest mine;
    mine.set_session_id(bystander_->session_id());
    auto listed = bystander_->ListBuffers(mine);
    ASSERT_TRUE(listed.ok()) << listed.status();
    EXPECT_EQ(listed->buffers_size(), 2) << "the held buffer and the fresh one";
    EXPECT_TRUE(imported->Release().ok());
    EXPECT_TRUE(fresh->Release().ok());
  }

  // Check 2: everything is back as it was before the attack, the bystander
  // gone too.
  void ExpectAllBack() {
    held_map_.reset();
    held_.reset();
    bystander_.reset();
    ExpectBaseline();
    auto tokens = client_->ListTokens();
    ASSERT_TRUE(tokens.ok()) << tokens.status();
    EXPECT_EQ(tokens->tokens_size(), 0) << "share tokens left pending";
    EXPECT_TRUE(Eventually([&] {
      auto clients = client_->ListClients();
      return clients.ok() && clients->clients_size() == 1;
    })) << "sessions left behind";
    auto heaps = client_->ListHeaps();
    ASSERT_TRUE(heaps.ok());
    EXPECT_EQ(heaps->fds().sessions(), 1u);
    EXPECT_EQ(heaps->fds().control_connections(), 1u);
  }

  // ListHeaps once the fds the daemon sent have been seen read (the budget
  // counts a delivery until then): only sessions and control connections
  // hold places.
  absl::StatusOr<v1::ListHeapsResponse> SettledHeaps() {
    absl::StatusOr<v1::ListHeapsResponse> heaps;
    EXPECT_TRUE(Eventually([&] {
      heaps = client_->ListHeaps();
      return heaps.ok() &&
             heaps->fds().in_use() == heaps->fds().sessions() + heaps->fds().control_connections();
    })) << heaps->fds().ShortDebugString();
    return heaps;
  }

  // The daemon's log since the attack began, line by line.
  std::vector<std::string> AttackLog() const {
    std::ifstream log(daemon_->log_path());
    log.seekg(static_cast<std::streamoff>(log_from_));
    std::vector<std::string> lines;
    for (std::string line; std::getline(log, line);) lines.push_back(line);
    return lines;
  }

  std::vector<std::string> LinesAbout(uint64_t session) const {
    std::vector<std::string> about;
    for (const std::string& line : AttackLog()) {
      if (NamesSession(line, session)) about.push_back(line);
    }
    return about;
  }

  std::vector<std::string> LinesContaining(absl::string_view part) const {
    std::vector<std::string> found;
    for (const std::string& line : AttackLog()) {
      if (absl::StrContains(line, part)) found.push_back(line);
    }
    return found;
  }

  // Check 3 for one hostile session: exactly one line names it (at most
  // one, and the attack was one the daemon logs), a warning that says
  // `why`. Waits for the line (the loop may log a moment after the client
  // sees the hang-up).
  void ExpectOneLineAbout(uint64_t session, absl::string_view why) {
    Eventually([&] { return !LinesAbout(session).empty(); });
    const std::vector<std::string> lines = LinesAbout(session);
    ASSERT_EQ(lines.size(), 1u) << absl::StrJoin(lines, "\n");
    EXPECT_TRUE(absl::StrContains(lines[0], " warning ")) << lines[0];
    EXPECT_TRUE(absl::StrContains(lines[0], why)) << lines[0];
  }

  // Check 3 where the daemon logs nothing: no line names the session.
  void ExpectNoLineAbout(uint64_t session) {
    const std::vector<std::string> lines = LinesAbout(session);
    EXPECT_TRUE(lines.empty()) << absl::StrJoin(lines, "\n");
  }

  // Lines at warning or above since the attack began.
  std::vector<std::string> Warnings() const {
    std::vector<std::string> found;
    for (const std::string& line : AttackLog()) {
      if (absl::StrContains(line, " warning ") || absl::StrContains(line, " error ") ||
          absl::StrContains(line, " critical ")) {
        found.push_back(line);
      }
    }
    return found;
  }

  std::optional<Client> bystander_;
  std::optional<Buffer> held_;
  std::optional<Mapping> held_map_;
  uintmax_t log_from_ = 0;
};

// Tests records no honest client sends: garbage, a record cut short, records
// over the 4,096-byte limit (garbage and a well-formed one), a record with
// no known kind, an FdUpload without its fd, and each kind only the daemon
// sends (Hello, FdDelivery, Refused, FdDeliveries). Each ends its own
// session, and only it: the daemon hangs up, the session's calls are
// UNAUTHENTICATED, one warning names the session and what was wrong. An
// empty record reads as the client closing (recvmsg returns 0 either way):
// that session ends quietly. The daemon stays up for the bystander.
TEST_F(HostileTest, GarbageTruncatedOversizedAndDaemonOnlyRecords) {
  Start();
  v1::FdChannelMessage signal;
  signal.mutable_signal()->set_fence_id(1);
  signal.mutable_signal()->set_message(std::string(100, 'm'));
  const std::string whole_signal = Serialized(signal);
  v1::FdChannelMessage forget;
  for (uint64_t id = 1; id <= 1000; ++id) forget.mutable_forget()->add_fence_ids(id << 40);
  v1::FdChannelMessage hello;
  hello.mutable_hello()->set_protocol_version(kProtocolVersion);
  hello.mutable_hello()->set_session_id(1);
  hello.mutable_hello()->set_secret(std::string(16, 's'));
  v1::FdChannelMessage delivery;
  delivery.mutable_delivery()->set_transfer_id(1);
  delivery.mutable_delivery()->set_kind(v1::FD_KIND_BUFFER);
  v1::FdChannelMessage refused;
  refused.mutable_refused()->set_code(8);
  refused.mutable_refused()->set_message("go away");
  v1::FdChannelMessage deliveries;
  deliveries.mutable_deliveries()->add_deliveries()->set_transfer_id(1);
  v1::FdChannelMessage upload;
  upload.mutable_upload()->set_upload_id(1);
  struct Case {
    std::string what;
    std::string record;
    // What the warning says; empty: the session ends quietly.
    std::string why;
  } cases[] = {
      {"garbage", "\xff\xff\xff garbage", "client sent a malformed record on fd.sock"},
      {"truncated", whole_signal.substr(0, whole_signal.size() - 10),
       "client sent a malformed record on fd.sock"},
      {"oversized garbage", std::string(64 * 1024, '\xee'),
       "record longer than 4096 bytes (MSG_TRUNC)"},
      {"oversized well-formed", Serialized(forget), "record longer than 4096 bytes (MSG_TRUNC)"},
      {"unknown kind", std::string("\xa0\x06\x01", 3),
       "bad record on fd.sock: record of kind 0 is not one a client sends"},
      {"upload without its fd", Serialized(upload),
       "bad record on fd.sock: FdUpload carries 0 fds; exactly one expected"},
      {"hello", Serialized(hello), "record of kind 1 is not one a client sends"},
      {"delivery", Serialized(delivery), "record of kind 2 is not one a client sends"},
      {"refused", Serialized(refused), "record of kind 5 is not one a client sends"},
      {"deliveries", Serialized(deliveries), "record of kind 9 is not one a client sends"},
      {"empty", "", ""},
  };
  ASSERT_GT(Serialized(forget).size(), kMaxRecordBytes);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    auto raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok()) << raw.status();
    const uint64_t session = SessionIdOf(*raw);
    ASSERT_TRUE(SessionLive(*raw));
    ASSERT_TRUE(raw->socket.Send(c.record).ok());
    EXPECT_TRUE(DaemonHungUp(raw->socket)) << "the daemon must end the session";
    // It hangs up a moment before the session leaves its table.
    grpc::Status after;
    EXPECT_TRUE(Eventually([&] {
      after = Probe(*raw);
      return after.error_code() == grpc::StatusCode::UNAUTHENTICATED;
    }));
    EXPECT_EQ(after.error_code(), grpc::StatusCode::UNAUTHENTICATED) << after.error_message();
    EXPECT_EQ(after.error_message(),
              absl::StrCat("session ", session, " is not live (it ended or never existed)"));
    if (c.why.empty()) {
      ExpectNoLineAbout(session);
    } else {
      ExpectOneLineAbout(session, c.why);
    }
  }
  // Ten sessions ended badly within a second: the rate limit of the kind
  // (10 per 10 s) let each through, and nothing else was logged.
  EXPECT_EQ(Warnings().size(), 10u) << absl::StrJoin(Warnings(), "\n");
  ExpectBystanderWorks();
  ExpectAllBack();
}

// Tests records that carry fds nobody asked for: a ReleaseHandle with one,
// garbage with one, a ReleaseHandle and an FdUpload with 250 (the kernel
// allows 253 a message), an FdUpload with two, a record over 4,096 bytes
// with one. Each ends its session, and
// every one of those fds is closed in the daemon: each is a pipe's write
// end whose read end this test keeps, and reads EOF only once every copy is
// closed (the ones the kernel dropped for MSG_CTRUNC, and the ones the
// daemon received). Then uploads the daemon never keeps: a pipe's write end
// and the client's own fd.sock (which would keep its session from ever
// ending), both closed at once while the session goes on; and an unclaimed
// upload it does keep (a pipe's read end) is closed when the session ends.
TEST_F(HostileTest, UnexpectedScmRightsFdsAreAllClosed) {
  Start();
  v1::FdChannelMessage release;
  release.mutable_release()->set_handle(424242);
  v1::FdChannelMessage upload;
  upload.mutable_upload()->set_upload_id(7);
  struct Case {
    std::string what;
    std::string record;
    int fds;
    std::string why;
  } cases[] = {
      {"release with 1 fd", Serialized(release), 1,
       "bad record on fd.sock: only an FdUpload carries an fd"},
      {"garbage with 1 fd", "\xff\xff\xff garbage", 1, "client sent a malformed record on fd.sock"},
      {"release with 250 fds", Serialized(release), 250,
       "recvmsg: ancillary data truncated (MSG_CTRUNC); fds lost"},
      {"upload with 250 fds", Serialized(upload), 250,
       "recvmsg: ancillary data truncated (MSG_CTRUNC); fds lost"},
      // Two fds fit the room the daemon gives one (CMSG_SPACE rounds up).
      {"upload with 2 fds", Serialized(upload), 2,
       "bad record on fd.sock: FdUpload carries 2 fds; exactly one expected"},
      {"oversized record with 1 fd", std::string(8 * 1024, '\xee'), 1,
       "record longer than 4096 bytes (MSG_TRUNC)"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    auto raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok()) << raw.status();
    const uint64_t session = SessionIdOf(*raw);
    std::vector<Pipe> pipes;
    std::vector<int> sent;
    for (int i = 0; i < c.fds; ++i) {
      pipes.push_back(MakePipe());
      sent.push_back(pipes.back().write.get());
    }
    ASSERT_TRUE(SendWithManyFds(raw->socket.fd(), c.record, sent).ok());
    for (Pipe& pipe : pipes) pipe.write.Reset();  // only the daemon's copies are left
    EXPECT_TRUE(DaemonHungUp(raw->socket));
    EXPECT_TRUE(Eventually([&] { return !SessionLive(*raw); }));
    int closed = 0;
    EXPECT_TRUE(Eventually([&] {
      closed = static_cast<int>(std::count_if(pipes.begin(), pipes.end(), WriteEndsGone));
      return closed == c.fds;
    })) << closed
        << " of " << c.fds << " fds closed by the daemon";
    ExpectOneLineAbout(session, c.why);
  }

  // Uploads the daemon never keeps: closed at once, and the session goes on.
  {
    auto raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok()) << raw.status();
    const uint64_t session = SessionIdOf(*raw);
    Pipe pipe = MakePipe();
    const int write_end = pipe.write.get();
    ASSERT_TRUE(raw->socket.Send(Serialized(upload), std::span<const int>(&write_end, 1)).ok());
    pipe.write.Reset();
    EXPECT_TRUE(Eventually([&] { return WriteEndsGone(pipe); }))
        << "a pipe's write end is not kept";
    v1::FdChannelMessage own;
    own.mutable_upload()->set_upload_id(8);
    const int own_fd = raw->socket.fd();
    ASSERT_TRUE(raw->socket.Send(Serialized(own), std::span<const int>(&own_fd, 1)).ok());
    EXPECT_TRUE(SessionLive(*raw)) << "an upload the daemon refuses to keep ends nothing";
    // The session's own socket was not kept either: closing it ends the session.
    raw->socket = UnixSocket();
    EXPECT_TRUE(Eventually([&] { return !SessionLive(*raw); }));
    ExpectNoLineAbout(session);
  }
  // An upload it keeps (unclaimed, counted in `fences`) until the session ends.
  {
    auto raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok()) << raw.status();
    const uint64_t session = SessionIdOf(*raw);
    Pipe pipe = MakePipe();
    const int read_end = pipe.read.get();
    ASSERT_TRUE(raw->socket.Send(Serialized(upload), std::span<const int>(&read_end, 1)).ok());
    pipe.read.Reset();
    EXPECT_TRUE(Eventually([&] {
      auto heaps = client_->ListHeaps();
      return heaps.ok() && heaps->fds().fences() == 1;
    })) << "the unclaimed upload is counted";
    EXPECT_FALSE(ReadEndsGone(pipe)) << "kept while the session lives";
    raw->socket = UnixSocket();
    EXPECT_TRUE(Eventually([&] { return ReadEndsGone(pipe); })) << "closed with the session";
    ExpectNoLineAbout(session);
  }
  EXPECT_EQ(Warnings().size(), 6u) << absl::StrJoin(Warnings(), "\n");
  ExpectBystanderWorks();
  ExpectAllBack();
}

// Tests a client that never reads fd.sock while it asks for thousands of
// buffers: each Allocate's fd waits for it, first in its socket (until the
// socket buffer is full), then in the daemon's queue, up to
// max_queued_deliveries (1,024); past that every Allocate is
// RESOURCE_EXHAUSTED saying why, the bystander allocates meanwhile, and
// after stalled_session_timeout_ms (the default 10 s) the session is ended
// as stalled, in one warning. It lingers (answering no call) while fds it was
// sent sit unread in its socket; once it closes the socket everything comes
// back. (As of the daemon keeping no fd per live buffer, only fds on their
// way count; AvailabilityTest.UnreadDeliveriesCountAgainstTheirUid covers
// the uid's share at RLIMIT_NOFILE 256.)
TEST_F(HostileTest, NeverReadingClientAllocatingThousands) {
  Start(R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM })pb");
  auto raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok()) << raw.status();
  const uint64_t session = SessionIdOf(*raw);
  int granted = 0;
  int refused = 0;
  bool ended_during = false;
  grpc::Status first_refusal;
  for (int i = 0; i < 5000; ++i) {
    v1::AllocateRequest request;
    request.set_heap("system");
    request.set_size(4096);
    v1::AllocateResponse response;
    grpc::Status status = raw->stub->Allocate(SessionContext(*raw).get(), request, &response);
    if (status.ok()) {
      ++granted;
      continue;
    }
    if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED && refused > 0) {
      ended_during = true;  // a slow run reached the stall timeout: ended as stalled
      break;
    }
    if (refused++ == 0) first_refusal = status;
    ASSERT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
        << i << ": " << status.error_message();
  }
  std::printf("never-reading client: %d Allocates granted, %d refused%s; first refusal: %s\n",
              granted, refused, ended_during ? ", then ended as stalled" : "",
              first_refusal.error_message().c_str());
  EXPECT_GT(refused, 0) << "it must be stopped";
  EXPECT_TRUE(absl::StrContains(first_refusal.error_message(),
                                "fd deliveries queued (client is not reading fd.sock)") ||
              absl::StartsWith(first_refusal.error_message(), "fd budget of uid "))
      << first_refusal.error_message();
  // Refused Allocates leave nothing (their grants undid themselves); the
  // granted ones stay until the client goes, even once it is ended.
  auto heaps = client_->ListHeaps();
  ASSERT_TRUE(heaps.ok());
  EXPECT_EQ(heaps->live_buffers(), static_cast<uint64_t>(granted) + 1) << "+ the bystander's";
  if (SessionLive(*raw)) {
    // Not ended yet when the heaps were listed: every fd is still on its way.
    EXPECT_EQ(heaps->fds().deliveries(), static_cast<uint64_t>(granted));
  }
  ExpectBystanderWorks();  // during the attack, too

  // Stalled: ended after the timeout (10 s) and a tick; it lingers with the
  // fds it was sent.
  EXPECT_TRUE(WaitUpTo(std::chrono::seconds(20), [&] { return !SessionLive(*raw); }));
  ExpectOneLineAbout(session, "client stopped reading fd.sock");
  heaps = client_->ListHeaps();
  ASSERT_TRUE(heaps.ok());
  EXPECT_GT(heaps->fds().deliveries(), 0u) << "unread fds stay charged while it lingers";
  EXPECT_EQ(heaps->live_buffers(), static_cast<uint64_t>(granted) + 1);

  raw->socket = UnixSocket();
  raw->stub.reset();
  ExpectBystanderWorks();
  EXPECT_EQ(Warnings().size(), 1u) << absl::StrJoin(Warnings(), "\n");
  ExpectAllBack();
}

// Tests 2,000 fd.sock connections held at once (limits raised so that one
// uid may: the default of 1,024 per uid is the next test's): every one gets
// its Hello, each costs the daemon one fd and one place in the budget, the
// bystander works while they are held, nothing is logged at info, and once
// they close everything is as before.
TEST_F(HostileTest, TwoThousandFdSockConnectionsHeldAtOnce) {
  Start(R"pb(
    heaps { name: "system" type: HEAP_TYPE_SYSTEM }
    limits { max_sessions_per_uid: 2100 }
  )pb");
  absl::StatusOr<v1::ListHeapsResponse> before = SettledHeaps();
  ASSERT_TRUE(before.ok());
  const int daemon_fds = daemon_->OpenFds();
  std::vector<UnixSocket> held;
  for (int i = 0; i < 2000; ++i) {
    auto socket = UnixSocket::ConnectSeqPacket(FdSocketPath(daemon_->socket_dir()));
    ASSERT_TRUE(socket.ok()) << i << ": " << socket.status();
    held.push_back(*std::move(socket));
  }
  int hellos = 0;
  for (const UnixSocket& socket : held) {
    std::optional<v1::FdChannelMessage> record = NextRecord(socket);
    hellos += record.has_value() && record->has_hello();
  }
  EXPECT_EQ(hellos, 2000);
  auto during = client_->ListHeaps();
  ASSERT_TRUE(during.ok());
  EXPECT_EQ(during->fds().sessions(), before->fds().sessions() + 2000);
  EXPECT_EQ(during->fds_in_use(), before->fds_in_use() + 2000);
  EXPECT_EQ(daemon_->OpenFds(), daemon_fds + 2000) << "one fd per connection, nothing more";
  ExpectBystanderWorks();
  held.clear();
  EXPECT_TRUE(Eventually([&] {
    auto heaps = client_->ListHeaps();
    return heaps.ok() && heaps->fds().sessions() == before->fds().sessions();
  }));
  EXPECT_TRUE(Warnings().empty()) << absl::StrJoin(Warnings(), "\n");
  ExpectBystanderWorks();
  ExpectAllBack();
}

// Tests 2,000 fd.sock connections of one uid at the default caps: the first
// 1,022 get their Hello (the fixture's client and the bystander hold the
// other two of the uid's 1,024), every later one a Refused record naming
// the cap and then EOF; the bystander works meanwhile; the refusals are
// logged within the rate limit of their kind (10 lines per 10 s), each
// naming the client's pid and the cap; once they close, everything is as
// before.
TEST_F(HostileTest, TwoThousandFdSockConnectionsPastTheUidCap) {
  Start(R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM })pb");
  std::vector<UnixSocket> held;
  int hellos = 0;
  int refusals = 0;
  std::string refusal;
  for (int i = 0; i < 2000; ++i) {
    auto socket = UnixSocket::ConnectSeqPacket(FdSocketPath(daemon_->socket_dir()));
    ASSERT_TRUE(socket.ok()) << i << ": " << socket.status();
    std::optional<v1::FdChannelMessage> record = NextRecord(*socket);
    ASSERT_TRUE(record.has_value()) << i;
    if (record->has_hello()) {
      ++hellos;
    } else if (record->has_refused()) {
      ++refusals;
      EXPECT_EQ(record->refused().code(), static_cast<int>(absl::StatusCode::kResourceExhausted));
      refusal = record->refused().message();
      EXPECT_TRUE(DaemonHungUp(*socket)) << "refused, then closed";
    }
    held.push_back(*std::move(socket));
  }
  EXPECT_EQ(hellos, 1022);
  EXPECT_EQ(refusals, 978);
  EXPECT_EQ(refusal, "uid 0 has 1024 sessions open (limits.max_sessions_per_uid)") << "(as root)";
  ExpectBystanderWorks();
  held.clear();
  const std::vector<std::string> lines =
      LinesContaining(absl::StrCat("fd.sock: refused pid ", ::getpid(), " uid "));
  EXPECT_GE(lines.size(), 1u) << "a refusal is logged";
  EXPECT_LE(lines.size(), 10u) << absl::StrJoin(lines, "\n");
  for (const std::string& line : lines) {
    EXPECT_TRUE(absl::StrContains(line, "(limits.max_sessions_per_uid)")) << line;
  }
  EXPECT_EQ(Warnings().size(), lines.size()) << absl::StrJoin(Warnings(), "\n");
  ExpectBystanderWorks();
  ExpectAllBack();
}

// Tests clients that connect and say nothing. On fd.sock, one that never
// reads its Hello and never calls: it holds one session, one place in the
// budget and one daemon fd, no more as time passes (an idle client is not a
// fault: it is not ended), and all of it goes when it closes. On
// control.sock, one that sends nothing: one control connection, one fd,
// gone within the listener's sweep after it closes; and one that sends
// bytes that are not HTTP/2: gRPC drops it and the daemon forgets it while
// the client still holds its end. The bystander works throughout; the log
// says nothing about any of them at warning.
TEST_F(HostileTest, ClientsThatConnectAndSendNothing) {
  Start(R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM })pb");
  absl::StatusOr<v1::ListHeapsResponse> before = SettledHeaps();
  ASSERT_TRUE(before.ok());
  const int daemon_fds = daemon_->OpenFds();
  auto fds = [&] {
    auto heaps = client_->ListHeaps();
    EXPECT_TRUE(heaps.ok()) << heaps.status();
    return heaps.ok() ? heaps->fds() : v1::FdUsage();
  };

  // fd.sock: connected, its Hello never read.
  {
    auto silent = UnixSocket::ConnectSeqPacket(FdSocketPath(daemon_->socket_dir()));
    ASSERT_TRUE(silent.ok()) << silent.status();
    EXPECT_TRUE(Eventually([&] { return fds().sessions() == before->fds().sessions() + 1; }));
    EXPECT_EQ(daemon_->OpenFds(), daemon_fds + 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // three ticks
    EXPECT_EQ(fds().sessions(), before->fds().sessions() + 1) << "idle is no fault";
    EXPECT_EQ(fds().in_use(), before->fds().in_use() + 1) << "its session, nothing more";
    EXPECT_EQ(daemon_->OpenFds(), daemon_fds + 1);
    auto clients = client_->ListClients();
    ASSERT_TRUE(clients.ok());
    EXPECT_EQ(clients->clients_size(), 3) << "the fixture's, the bystander's, the silent one";
    ExpectBystanderWorks();
  }
  EXPECT_TRUE(Eventually([&] { return fds().sessions() == before->fds().sessions(); }));

  // control.sock: connected, nothing sent.
  {
    auto silent =
        UnixSocket::ConnectStream(ControlSocketPath(daemon_->socket_dir()), absl::Seconds(5));
    ASSERT_TRUE(silent.ok()) << silent.status();
    EXPECT_TRUE(Eventually(
        [&] { return fds().control_connections() == before->fds().control_connections() + 1; }));
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    EXPECT_EQ(fds().control_connections(), before->fds().control_connections() + 1);
    EXPECT_EQ(daemon_->OpenFds(), daemon_fds + 1);
    ExpectBystanderWorks();
  }
  EXPECT_TRUE(Eventually([&] {
    return fds().control_connections() == before->fds().control_connections();
  })) << "forgotten within the sweep";

  // control.sock: bytes that are not HTTP/2.
  {
    auto junk =
        UnixSocket::ConnectStream(ControlSocketPath(daemon_->socket_dir()), absl::Seconds(5));
    ASSERT_TRUE(junk.ok()) << junk.status();
    const std::string request = "GET / HTTP/1.1\r\nHost: bufferd\r\n\r\n";
    ASSERT_EQ(::send(junk->fd(), request.data(), request.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(request.size()));
    EXPECT_TRUE(Eventually([&] {
      return fds().control_connections() == before->fds().control_connections();
    })) << "gRPC drops it; the daemon forgets it, though the client still holds its end";
    ExpectBystanderWorks();
  }
  EXPECT_TRUE(Eventually([&] { return daemon_->OpenFds() == daemon_fds; }));
  EXPECT_TRUE(Warnings().empty()) << absl::StrJoin(Warnings(), "\n");
  ExpectAllBack();
}

// Tests malformed and oversized gRPC metadata on calls of a live session:
// bufferd-session garbage, cut, overlong, with a bad id or secret, under a
// -bin key, and 6 KiB of it; bufferd-records and bufferd-release that are
// not what they must be, 6 KiB of each, 257 releases; and values and header
// sets past gRPC's own 8 KiB limit (64 KiB of one value, 20 KiB over 200
// headers), which gRPC refuses before the daemon sees them. Each call gets
// a clear status in time (UNAUTHENTICATED for the credential,
// INVALID_ARGUMENT for the rest, naming the key, never echoing more than a
// short quote; from gRPC, RESOURCE_EXHAUSTED for one value over its limit,
// and UNAVAILABLE for headers over it in total, where it drops the caller's
// own connection); the session goes on; the largest legal count of records is applied (none sent)
// and the call runs; nothing is logged about the session.
TEST_F(HostileTest, MalformedAndOversizedMetadata) {
  Start(R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM })pb");
  auto raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok()) << raw.status();
  const uint64_t session = SessionIdOf(*raw);
  const std::string secret = raw->metadata.substr(raw->metadata.find(':') + 1);
  const std::string id = absl::StrCat(session);
  const std::string kMalformed =
      "malformed 'bufferd-session' metadata; want <session id>:<32 hex digits>";
  const std::string kRecords = "bufferd-records metadata must be a decimal count";
  const std::string kRelease = "metadata bufferd-release: expected up to 256 comma-separated";
  std::vector<std::string> many_ids;
  for (int i = 1; i <= 257; ++i) many_ids.push_back(absl::StrCat(i));
  struct Case {
    std::string what;
    // Replaces the session's own credential when set.
    std::optional<std::string> session;
    std::vector<std::pair<std::string, std::string>> extra;
    grpc::StatusCode code;
    // The status message starts with this.
    std::string message;
  } cases[] = {
      {"garbage credential", "garbage", {}, grpc::StatusCode::UNAUTHENTICATED, kMalformed},
      {"empty credential",
       "",
       {},
       grpc::StatusCode::UNAUTHENTICATED,
       "missing 'bufferd-session' metadata"},
      {"no secret", id + ":", {}, grpc::StatusCode::UNAUTHENTICATED, kMalformed},
      {"secret cut short",
       id + ":" + secret.substr(1),
       {},
       grpc::StatusCode::UNAUTHENTICATED,
       kMalformed},
      {"secret too long",
       id + ":" + secret + "0",
       {},
       grpc::StatusCode::UNAUTHENTICATED,
       kMalformed},
      {"secret not hex",
       id + ":" + std::string(32, 'g'),
       {},
       grpc::StatusCode::UNAUTHENTICATED,
       kMalformed},
      {"id past 2^64",
       "99999999999999999999999:" + secret,
       {},
       grpc::StatusCode::UNAUTHENTICATED,
       kMalformed},
      {"negative id", "-1:" + secret, {}, grpc::StatusCode::UNAUTHENTICATED, kMalformed},
      {"6 KiB credential",
       id + ":" + std::string(6 * 1024, 'a'),
       {},
       grpc::StatusCode::UNAUTHENTICATED,
       kMalformed},
      {"credential under a -bin key",
       std::string(),
       {{"bufferd-session-bin", raw->metadata}},
       grpc::StatusCode::UNAUTHENTICATED,
       "missing 'bufferd-session' metadata"},
      {"records not a number",
       std::nullopt,
       {{"bufferd-records", "abc"}},
       grpc::StatusCode::INVALID_ARGUMENT,
       kRecords},
      {"records negative",
       std::nullopt,
       {{"bufferd-records", "-1"}},
       grpc::StatusCode::INVALID_ARGUMENT,
       kRecords},
      {"records empty",
       std::nullopt,
       {{"bufferd-records", ""}},
       grpc::StatusCode::INVALID_ARGUMENT,
       kRecords},
      {"records past 2^64",
       std::nullopt,
       {{"bufferd-records", "18446744073709551616"}},
       grpc::StatusCode::INVALID_ARGUMENT,
       kRecords},
      {"records 6 KiB",
       std::nullopt,
       {{"bufferd-records", std::string(6 * 1024, '9')}},
       grpc::StatusCode::INVALID_ARGUMENT,
       kRecords},
      {"records 2^64-1, none sent",
       std::nullopt,
       {{"bufferd-records", "18446744073709551615"}},
       grpc::StatusCode::NOT_FOUND,
       "no handle 0"},
      {"release garbage",
       std::nullopt,
       {{"bufferd-release", "a,b,c"}},
       grpc::StatusCode::INVALID_ARGUMENT,
       kRelease},
      {"release 0",
       std::nullopt,
       {{"bufferd-release", "0"}},
       grpc::StatusCode::INVALID_ARGUMENT,
       kRelease},
      {"release 6 KiB",
       std::nullopt,
       {{"bufferd-release", std::string(6 * 1024, '7') + "x"}},
       grpc::StatusCode::INVALID_ARGUMENT,
       kRelease},
      {"257 releases",
       std::nullopt,
       {{"bufferd-release", absl::StrJoin(many_ids, ",")}},
       grpc::StatusCode::INVALID_ARGUMENT,
       kRelease},
      {"64 KiB credential",
       id + ":" + std::string(64 * 1024, 'a'),
       {},
       grpc::StatusCode::RESOURCE_EXHAUSTED,
       ""},
      {"64 KiB release",
       std::nullopt,
       {{"bufferd-release", std::string(64 * 1024, '7')}},
       grpc::StatusCode::RESOURCE_EXHAUSTED,
       ""},
  };
  std::vector<Case> all(std::begin(cases), std::end(cases));
  Case headers{
      "200 headers of 100 bytes", std::nullopt, {}, grpc::StatusCode::RESOURCE_EXHAUSTED, ""};
  for (int i = 0; i < 200; ++i) {
    headers.extra.push_back({absl::StrCat("x-junk-", i), std::string(100, 'j')});
  }
  all.push_back(headers);
  for (const Case& c : all) {
    SCOPED_TRACE(c.what);
    auto context = ContextWithDeadline();
    if (!c.session.has_value()) {
      context->AddMetadata(kSessionMetadataKey, raw->metadata);
    } else if (!c.session->empty()) {
      context->AddMetadata(kSessionMetadataKey, *c.session);
    }
    for (const auto& [key, value] : c.extra) context->AddMetadata(key, value);
    v1::GetBufferRequest request;
    v1::GetBufferResponse response;
    grpc::Status status = raw->stub->GetBuffer(context.get(), request, &response);
    std::printf("%-28s -> %d %.120s\n", c.what.c_str(), status.error_code(),
                status.error_message().c_str());
    if (c.message.empty()) {
      // Refused by gRPC before the daemon sees the call: one value over the
      // limit is RESOURCE_EXHAUSTED; headers over it in total make gRPC
      // drop the caller's connection (UNAVAILABLE, "Broken pipe"), that
      // client's own channel, which reconnects for the next call.
      EXPECT_TRUE(status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
                  status.error_code() == grpc::StatusCode::UNAVAILABLE)
          << status.error_code() << ": " << status.error_message();
    } else {
      EXPECT_EQ(status.error_code(), c.code) << status.error_message();
      EXPECT_TRUE(absl::StartsWith(status.error_message(), c.message)) << status.error_message();
    }
    EXPECT_LE(status.error_message().size(), 1024u);
    EXPECT_TRUE(SessionLive(*raw)) << "a bad call ends nothing";
  }
  ExpectNoLineAbout(session);
  const std::vector<std::string> warnings = Warnings();
  EXPECT_LE(warnings.size(), 10u) << absl::StrJoin(warnings, "\n");
  for (const std::string& line : warnings) std::printf("log: %s\n", line.c_str());
  raw->socket = UnixSocket();
  raw->stub.reset();
  ExpectBystanderWorks();
  ExpectAllBack();
}

// Tests another client's session id with wrong secrets, under load: while
// the bystander allocates, maps and lists from two threads, an attacker
// (its own control connection) makes 3,000 calls with the bystander's
// session id and random secrets. Every one is UNAUTHENTICATED naming the
// wrong secret, every one of the bystander's calls succeeds, its session
// lives on, and nothing is logged about it (a failed authentication is the
// caller's answer, not a log line).
//
// Timing: SessionTable::Authenticate compares the secret with
// ConstantTimeEquals (daemon/sessions.cc): the length first (always 16
// bytes once the 32 hex digits parsed, so it tells nothing), then an OR of
// XORs over every byte, with no early exit. The test measures calls whose
// secret is wrong in its first byte against calls wrong in its last, and
// only prints the figures: the compare costs nanoseconds, a call tens of
// microseconds, so no difference worth a note can show, and none is
// asserted.
TEST_F(HostileTest, WrongSecretsForAnotherSessionUnderLoad) {
  Start(R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM })pb");
  const uint64_t victim = bystander_->session_id();
  std::atomic<bool> stop{false};
  std::atomic<int> victim_calls{0};
  std::atomic<int> victim_failures{0};
  std::vector<std::thread> load;
  for (int t = 0; t < 2; ++t) {
    load.emplace_back([&] {
      while (!stop.load()) {
        auto buffer = bystander_->Allocate({.heap = "system", .size = 4096, .name = "load"});
        if (!buffer.ok()) {
          ADD_FAILURE() << buffer.status();
          ++victim_failures;
          continue;
        }
        auto mapping = buffer->Map();
        if (!mapping.ok()) {
          ++victim_failures;
          continue;
        }
        mapping->data()[0] = 1;
        victim_failures += !bystander_->ListHeaps().ok();
        victim_calls += 3;
      }
    });
  }
  auto attacker = testing::NewAllocatorStub(daemon_->socket_dir());
  int refused = 0;
  for (int i = 0; i < 3000; ++i) {
    auto context = ContextWithDeadline();
    context->AddMetadata(kSessionMetadataKey,
                         FormatSessionCredential(victim, RandomBytes(kSessionSecretBytes)));
    v1::GetBufferRequest request;
    request.set_handle(held_->handle());
    v1::GetBufferResponse response;
    grpc::Status status = attacker->GetBuffer(context.get(), request, &response);
    refused += status.error_code() == grpc::StatusCode::UNAUTHENTICATED &&
               status.error_message() == absl::StrCat("wrong secret for session ", victim);
  }
  stop = true;
  for (std::thread& thread : load) thread.join();
  EXPECT_EQ(refused, 3000);
  EXPECT_EQ(victim_failures.load(), 0);
  EXPECT_GT(victim_calls.load(), 0) << "the load must really have run";
  std::printf("3,000 wrong secrets while the victim made %d calls\n", victim_calls.load());

  // Wrong first byte against wrong last byte, of a secret the test knows.
  auto target = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(target.ok()) << target.status();
  const uint64_t target_id = SessionIdOf(*target);
  std::string secret =
      absl::HexStringToBytes(target->metadata.substr(target->metadata.find(':') + 1));
  std::string first_wrong = secret;
  first_wrong.front() ^= 0x01;
  std::string last_wrong = secret;
  last_wrong.back() ^= 0x01;
  std::vector<double> first_us;
  std::vector<double> last_us;
  for (int i = 0; i < 4000; ++i) {
    const bool first = i % 2 == 0;
    auto context = ContextWithDeadline();
    context->AddMetadata(kSessionMetadataKey,
                         FormatSessionCredential(target_id, first ? first_wrong : last_wrong));
    v1::GetBufferRequest request;
    v1::GetBufferResponse response;
    const auto began = std::chrono::steady_clock::now();
    grpc::Status status = attacker->GetBuffer(context.get(), request, &response);
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - began).count();
    ASSERT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << status.error_message();
    (first ? first_us : last_us).push_back(us);
  }
  auto summary = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
    return absl::StrCat("mean ", static_cast<int>(mean * 10) / 10.0, " us, median ",
                        static_cast<int>(v[v.size() / 2] * 10) / 10.0, " us");
  };
  std::printf("wrong secret, first byte: %s; last byte: %s (2,000 calls each; not asserted)\n",
              summary(first_us).c_str(), summary(last_us).c_str());
  EXPECT_TRUE(SessionLive(*target));
  attacker.reset();
  target = absl::CancelledError("closed");

  ExpectNoLineAbout(victim);
  ExpectNoLineAbout(target_id);
  EXPECT_TRUE(Warnings().empty()) << absl::StrJoin(Warnings(), "\n");
  ExpectBystanderWorks();
  ExpectAllBack();
}

// Tests RPCs racing the end of their session: in each of 12 rounds a raw
// session (with a reader thread filing its fds, as the client library
// does) runs 9 threads calling Allocate, Export + Import, and CreateFence
// in loops, and the client shuts its fd.sock mid-way (both ways, or for
// writing only, in turn), a little later each round. Every call returns
// before its deadline (no hang), with OK or a code that says the session is
// gone (UNAUTHENTICATED, ABORTED; NOT_FOUND for a handle, upload or token
// that went with it); the daemon hangs up on every one; at most one log line
// names each session; nothing leaks.
TEST_F(HostileTest, RpcsRacingTheSessionsEnd) {
  Start(R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM })pb");
  std::mutex mu;
  std::map<std::string, std::map<grpc::StatusCode, int>> codes;  // guarded by mu
  std::vector<std::string> unexpected;                           // guarded by mu
  auto note = [&](const std::string& call, const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu);
    ++codes[call][status.error_code()];
    const grpc::StatusCode code = status.error_code();
    const bool gone = code == grpc::StatusCode::OK || code == grpc::StatusCode::UNAUTHENTICATED ||
                      code == grpc::StatusCode::ABORTED;
    const bool went_with_it =
        code == grpc::StatusCode::NOT_FOUND && call != "Allocate" && call != "CreateFence";
    if (!gone && !went_with_it) {
      unexpected.push_back(absl::StrCat(call, ": ", code, ": ", status.error_message()));
    }
  };
  std::vector<uint64_t> sessions;
  for (int round = 0; round < 12; ++round) {
    SCOPED_TRACE(round);
    auto raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok()) << raw.status();
    sessions.push_back(SessionIdOf(*raw));
    RacingSession racing(*std::move(raw), daemon_->socket_dir());
    std::atomic<uint64_t> next_upload{1};
    std::vector<std::thread> callers;
    for (int t = 0; t < 9; ++t) {
      callers.emplace_back([&, t] {
        const RawSession& session = racing.raw();
        for (int i = 0; i < 40; ++i) {
          grpc::Status status;
          if (t % 3 == 2) {
            v1::CreateFenceRequest request;
            v1::CreateFenceResponse response;
            status = racing.fence().CreateFence(SessionContext(session).get(), request, &response);
            note("CreateFence", status);
            if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED) return;
            continue;
          }
          v1::AllocateRequest allocate;
          allocate.set_heap("system");
          allocate.set_size(64 * 1024);
          v1::AllocateResponse allocated;
          status = session.stub->Allocate(SessionContext(session).get(), allocate, &allocated);
          note("Allocate", status);
          if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED) return;
          if (!status.ok() || t % 3 == 0) continue;
          UniqueFd fd = racing.Take(allocated.transfer_id());
          if (!fd.valid()) continue;  // the connection ended first
          const uint64_t upload_id = next_upload++;
          std::optional<uint64_t> records = racing.Upload(fd.get(), upload_id);
          if (!records.has_value()) continue;  // shut for writing already
          auto context = SessionContext(session);
          context->AddMetadata(kRecordsMetadataKey, absl::StrCat(*records));
          v1::ExportRequest export_request;
          export_request.set_handle(allocated.handle());
          export_request.set_access(v1::ACCESS_READ_ONLY);
          export_request.set_upload_id(upload_id);
          v1::ExportResponse exported;
          status = session.stub->Export(context.get(), export_request, &exported);
          note("Export", status);
          if (!status.ok()) continue;
          v1::ImportRequest import_request;
          import_request.set_token(exported.token());
          v1::ImportResponse imported;
          status = session.stub->Import(SessionContext(session).get(), import_request, &imported);
          note("Import", status);
          if (status.ok()) racing.Take(imported.transfer_id());
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2 + 3 * round));
    racing.End(/*hard=*/round % 2 == 0);
    for (std::thread& caller : callers) caller.join();
    EXPECT_TRUE(racing.Finish()) << "the daemon must hang up";
  }
  for (const auto& [call, by_code] : codes) {
    std::string line = call + ":";
    for (const auto& [code, count] : by_code) absl::StrAppend(&line, " ", code, "x", count);
    std::printf("%s\n", line.c_str());
  }
  EXPECT_TRUE(unexpected.empty()) << absl::StrJoin(unexpected, "\n");
  EXPECT_EQ(codes["Allocate"][grpc::StatusCode::DEADLINE_EXCEEDED], 0);
  EXPECT_GT(codes["Allocate"][grpc::StatusCode::OK], 0) << "calls must have run before the end";
  EXPECT_GT(codes["Allocate"][grpc::StatusCode::UNAUTHENTICATED] +
                codes["CreateFence"][grpc::StatusCode::UNAUTHENTICATED],
            0)
      << "and after it";
  for (uint64_t session : sessions) {
    const std::vector<std::string> lines = LinesAbout(session);
    EXPECT_LE(lines.size(), 1u) << absl::StrJoin(lines, "\n");
  }
  EXPECT_LE(Warnings().size(), 10u) << absl::StrJoin(Warnings(), "\n");
  for (const std::string& line : AttackLog()) std::printf("log: %s\n", line.c_str());
  ExpectBystanderWorks();
  ExpectAllBack();
}

// Tests the never-reading client of NeverReadingClientAllocatingThousands
// at a daemon whose fd budget is small (RLIMIT_NOFILE 256: 89 fds per uid),
// where it stops at its uid's share before its queue fills: every Allocate
// past it is RESOURCE_EXHAUSTED naming the share, and once it goes, the
// bystander (of the same uid, so held at the same share meanwhile, by
// design) allocates again and everything is back.
//
// The log says it once: a refusal is logged once per session and reason
// (and within a limit of 5 lines per 10 s per reason across sessions);
// before, one client got 5 identical lines within milliseconds and 5 more
// every 10 s while it kept on.
TEST_F(HostileTest, ClientAtItsUidFdShareIsLoggedOnce) {
  Start(TestDaemon::Options{.config = R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM })pb",
                            .nofile = 256,
                            .log_level = "info"});
  std::vector<std::string> lines;
  uint64_t session = 0;
  {
    auto raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok()) << raw.status();
    session = SessionIdOf(*raw);
    int granted = 0;
    grpc::Status refusal;
    for (int i = 0; i < 3000; ++i) {
      grpc::Status status = raw->Allocate("system", 4096);
      if (status.ok()) {
        ++granted;
        continue;
      }
      refusal = status;
      ASSERT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << i << ": " << status.error_message();
    }
    EXPECT_TRUE(absl::StartsWith(refusal.error_message(), "fd budget of uid 0 reached: "))
        << refusal.error_message();
    // The dry run says so too, rather than "yes".
    v1::CanAllocateRequest dry;
    dry.mutable_request()->set_heap("system");
    dry.mutable_request()->set_size(4096);
    v1::CanAllocateResponse answer;
    grpc::Status asked = raw->stub->CanAllocate(raw->Context().get(), dry, &answer);
    ASSERT_TRUE(asked.ok()) << asked.error_message();
    EXPECT_FALSE(answer.ok());
    EXPECT_TRUE(absl::StartsWith(answer.message(), "fd budget of uid 0 reached: "))
        << answer.message();
    std::printf("at its uid's share: %d granted, %d refused\n", granted, 3000 - granted);
    EXPECT_TRUE(SessionLive(*raw)) << "refused, not ended: it may read and go on";
    lines = LinesAbout(session);
  }
  // Its places come back once the daemon has seen its connections close
  // (its fd.sock at once on the loop, its control connection within the
  // listener's sweep).
  const auto closed = std::chrono::steady_clock::now();
  EXPECT_TRUE(Eventually([&] {
    auto heaps = client_->ListHeaps();
    return heaps.ok() && heaps->fds().sessions() == 2 && heaps->fds().deliveries() == 0 &&
           heaps->fds().control_connections() == 2;
  }));
  std::printf("its places were back %lld ms after it closed\n",
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                         std::chrono::steady_clock::now() - closed)
                                         .count()));
  ExpectBystanderWorks();
  ExpectAllBack();
  ASSERT_GE(lines.size(), 1u) << "the refusal is logged";
  for (const std::string& line : lines) {
    EXPECT_TRUE(absl::StrContains(line, "refused (fd_budget): fd budget of uid 0 reached")) << line;
  }
  EXPECT_EQ(lines.size(), 1u) << absl::StrJoin(lines, "\n");
}

// Tests what a client sees the moment the daemon hangs up on it for a bad
// record: its next call should be UNAUTHENTICATED (README, Errors: "session
// ended"). 20 rounds: a raw session creates 1,000 fences (so that ending
// it takes the daemon a moment), sends garbage, waits for the daemon's EOF
// and calls at once. Afterwards the usual three checks (the bad ends are
// logged within the rate limit of their kind, at most one line each).
//
// FdChannel::EndConnection closes the socket only once SessionHub has
// closed the session everywhere (fences failed, handles dropped, out of the
// SessionTable). Before, it closed it first, and a call made as soon as the
// client read the EOF still authenticated: GetBuffer of handle 0 answered
// NOT_FOUND "no handle 0" in 19 of 20 rounds.
TEST_F(HostileTest, CallsRightAfterTheHangUpAreUnauthenticated) {
  Start(R"pb(heaps { name: "system" type: HEAP_TYPE_SYSTEM })pb");
  std::vector<uint64_t> sessions;
  std::map<grpc::StatusCode, int> codes;
  std::map<grpc::StatusCode, std::string> samples;
  auto fence_stub = testing::FenceStub(daemon_->socket_dir());
  const auto began = std::chrono::steady_clock::now();
  for (int round = 0; round < 20; ++round) {
    auto raw = OpenRawSession(daemon_->socket_dir());
    ASSERT_TRUE(raw.ok()) << raw.status();
    sessions.push_back(SessionIdOf(*raw));
    for (int i = 0; i < 1000; ++i) {
      v1::CreateFenceRequest request;
      v1::CreateFenceResponse response;
      ASSERT_TRUE(fence_stub->CreateFence(SessionContext(*raw).get(), request, &response).ok());
    }
    ASSERT_TRUE(raw->socket.Send("\xff\xff\xff garbage").ok());
    ASSERT_TRUE(DaemonHungUp(raw->socket));
    grpc::Status status = Probe(*raw);
    ++codes[status.error_code()];
    samples[status.error_code()] = status.error_message();
    EXPECT_TRUE(Eventually([&] { return !SessionLive(*raw); }));
  }
  fence_stub.reset();
  int wrong = 0;
  std::string summary;
  for (const auto& [code, count] : codes) {
    absl::StrAppend(&summary, "\n  ", count, " x ", code, ": ", samples[code]);
    if (code != grpc::StatusCode::UNAUTHENTICATED) wrong += count;
  }
  std::printf("calls right after the hang-up:%s\n", summary.c_str());
  for (uint64_t session : sessions) {
    const std::vector<std::string> lines = LinesAbout(session);
    EXPECT_LE(lines.size(), 1u) << absl::StrJoin(lines, "\n");
    for (const std::string& line : lines) {
      EXPECT_TRUE(absl::StrContains(line, "client sent a malformed record on fd.sock")) << line;
    }
  }
  // Ten lines in each 10 s window (the first after a window says how many
  // were dropped).
  const auto windows =
      std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - began)
              .count() /
          10 +
      1;
  EXPECT_LE(Warnings().size(), static_cast<size_t>(10 * windows))
      << absl::StrJoin(Warnings(), "\n");
  ExpectBystanderWorks();
  ExpectAllBack();
  EXPECT_EQ(wrong, 0) << "calls made right after the daemon hung up:" << summary;
}

}  // namespace
}  // namespace bufferd
