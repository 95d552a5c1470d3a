// Operator views through a real daemon, bufctl and tests/peer: who holds
// memory (bufctl holders, from /proc, released buffers included), ending a
// stuck session, share tokens listed without the token, creators that
// exited, bytes charged against bytes held, and --json on every command.
// After each, the daemon is back at its baseline.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/unique_fd.h"
#include "bufferd/v1/debug.pb.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/json_util.h"
#include "testing/daemon_test.h"

namespace bufferd {
namespace {

using ::bufferd::testing::ChildProcess;
using ::bufferd::testing::DaemonTest;
using ::bufferd::testing::Eventually;
using ::bufferd::testing::Field;
using ::bufferd::testing::SpawnPeer;
using ::testing::ContainsRegex;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr uint64_t kMiB = uint64_t{1} << 20;

// bufctl's exit code and everything it printed (stdout and stderr).
struct BufctlRun {
  int code = -1;
  std::string out;
};
BufctlRun Bufctl(const std::string& dir, const std::string& command) {
  const std::string line = absl::StrCat(testing::BinaryPath("tools/bufctl"), " --socket-dir ", dir,
                                        " ", command, " 2>&1");
  BufctlRun run;
  FILE* pipe = ::popen(line.c_str(), "r");
  if (pipe == nullptr) return run;
  char chunk[4096];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof(chunk), pipe)) > 0) run.out.append(chunk, n);
  const int status = ::pclose(pipe);
  run.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

template <typename Message>
Message FromJson(const std::string& json) {
  Message message;
  EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(json, &message).ok()) << json;
  return message;
}

// What `report` says `pid` holds (nullptr if nothing).
const v1::ProcessHolding* HoldingOf(const v1::HoldersReport& report, pid_t pid) {
  for (const v1::ProcessHolding& h : report.holdings()) {
    if (h.pid() == static_cast<uint32_t>(pid)) return &h;
  }
  return nullptr;
}

class OpsTest : public DaemonTest {
 protected:
  void SetUp() override { StartDaemon(); }
  const std::string& dir() const { return daemon_->socket_dir(); }

  v1::HoldersReport Holders() {
    const BufctlRun run = Bufctl(dir(), "holders --json");
    EXPECT_EQ(run.code, 0) << run.out;
    return FromJson<v1::HoldersReport>(run.out);
  }
};

// Tests that bufctl holders finds memory the daemon no longer counts: a
// process that released its only handle and closed its client but keeps a
// 32 MiB mapping it wrote (~32 MiB resident, "released"), one that keeps
// only an fd ("fd only"), a live buffer this process maps, and a memfd a
// client named like bufferd's ("not verified by the daemon").
TEST_F(OpsTest, HoldersFindsMappingsAndFdsOfReleasedBuffers) {
  absl::StatusOr<ChildProcess> mapper =
      SpawnPeer({"keep-map", dir(), "system", absl::StrCat(32 * kMiB)});
  ASSERT_TRUE(mapper.ok()) << mapper.status();
  const std::string mapped = mapper->ReadLine();
  ASSERT_TRUE(absl::StartsWith(mapped, "ready ")) << mapped;
  absl::StatusOr<ChildProcess> fd_keeper = SpawnPeer({"keep-fd", dir(), "system", "65536"});
  ASSERT_TRUE(fd_keeper.ok()) << fd_keeper.status();
  const std::string kept = fd_keeper->ReadLine();
  ASSERT_TRUE(absl::StartsWith(kept, "ready ")) << kept;
  // The daemon counts none of it: every handle is gone.
  EXPECT_TRUE(Eventually([&] { return LiveBuffers() == 0; }));
  auto heaps = client_->ListHeaps();
  ASSERT_TRUE(heaps.ok());
  for (const auto& heap : heaps->heaps()) EXPECT_EQ(heap.used(), 0u) << heap.name();

  // A live buffer this process maps, and a look-alike memfd of its own.
  absl::StatusOr<Buffer> live = client_->Allocate({.heap = "system", .size = kMiB, .name = "mine"});
  ASSERT_TRUE(live.ok()) << live.status();
  absl::StatusOr<Mapping> live_map = live->Map();
  ASSERT_TRUE(live_map.ok()) << live_map.status();
  std::memset(live_map->data(), 1, live_map->size());
  // A holder punches a hole: its allocated bytes show it (the daemon keeps
  // no fd to measure; bufctl reads it through the holder's).
  ASSERT_EQ(::fallocate(live->fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 256 * 1024), 0);
  UniqueFd fake(::memfd_create("bufferd:system:fake", MFD_CLOEXEC));
  ASSERT_TRUE(fake.valid());
  ASSERT_EQ(::ftruncate(fake.get(), 4096), 0);

  const v1::HoldersReport report = Holders();
  const v1::ProcessHolding* by_map = HoldingOf(report, mapper->pid());
  ASSERT_NE(by_map, nullptr) << report.DebugString();
  EXPECT_EQ(by_map->state(), v1::ProcessHolding::STATE_RELEASED);
  EXPECT_EQ(absl::StrCat(by_map->buffer_id()), Field(mapped, "buffer"));
  EXPECT_EQ(by_map->fds(), 0u);
  EXPECT_GE(by_map->mappings(), 1u);
  EXPECT_EQ(by_map->mapped_bytes(), 32 * kMiB);
  EXPECT_GE(by_map->resident_bytes(), 31 * kMiB) << "the peer wrote every page";
  EXPECT_LE(by_map->resident_bytes(), 32 * kMiB);
  const v1::ProcessHolding* by_fd = HoldingOf(report, fd_keeper->pid());
  ASSERT_NE(by_fd, nullptr) << report.DebugString();
  EXPECT_EQ(by_fd->state(), v1::ProcessHolding::STATE_RELEASED);
  EXPECT_EQ(by_fd->fds(), 1u);
  EXPECT_EQ(by_fd->mappings(), 0u);
  int own_live = 0, own_fake = 0;
  for (const v1::ProcessHolding& h : report.holdings()) {
    if (h.pid() != static_cast<uint32_t>(::getpid())) continue;
    if (h.state() == v1::ProcessHolding::STATE_LIVE && h.buffer_id() == live->id()) {
      ++own_live;
      EXPECT_EQ(h.fds(), 1u);
      EXPECT_EQ(h.resident_bytes(), kMiB - 256 * 1024);
      EXPECT_EQ(h.allocated_bytes(), kMiB - 256 * 1024);
    }
    if (h.state() == v1::ProcessHolding::STATE_UNVERIFIED && h.heap() == "system" &&
        h.name() == "fake") {
      ++own_fake;
    }
  }
  EXPECT_EQ(own_live, 1) << report.DebugString();
  EXPECT_EQ(own_fake, 1) << report.DebugString();
  EXPECT_EQ(report.daemon_pid(), static_cast<uint32_t>(daemon_->pid()));
  EXPECT_EQ(HoldingOf(report, daemon_->pid()), nullptr) << "the daemon is left out";

  const BufctlRun table = Bufctl(dir(), "holders");
  EXPECT_EQ(table.code, 0) << table.out;
  EXPECT_THAT(table.out, ContainsRegex(absl::StrCat("\n", mapper->pid(), " +peer +[0-9]+ +",
                                                    Field(mapped, "buffer"),
                                                    " +system +kept +32 MiB +3[12][.0-9]* MiB "
                                                    "+32 MiB +0 +- +released")))
      << table.out;
  EXPECT_THAT(table.out,
              ContainsRegex(absl::StrCat("\n", fd_keeper->pid(),
                                         " +peer .* 64 KiB +fd only +- +1 +0 B +released")))
      << table.out;
  EXPECT_THAT(table.out, HasSubstr("not verified by the daemon")) << table.out;
  EXPECT_THAT(table.out, HasSubstr(absl::StrCat("The daemon (pid ", daemon_->pid(), ")")));

  // Gone with the processes.
  const pid_t mapper_pid = mapper->pid();
  const pid_t fd_keeper_pid = fd_keeper->pid();
  mapper->Kill(SIGKILL);
  mapper->Wait();
  fd_keeper->Kill(SIGKILL);
  fd_keeper->Wait();
  const v1::HoldersReport after = Holders();
  EXPECT_EQ(HoldingOf(after, mapper_pid), nullptr);
  EXPECT_EQ(HoldingOf(after, fd_keeper_pid), nullptr);
  live_map = absl::CancelledError("unmapped");
  live = absl::CancelledError("released");
  ExpectBaseline();
}

// Tests EndSession through bufctl: the victim's buffers and token go (heap
// used back to where it was, ListBuffers empty), its client's next call is
// UNAUTHENTICATED, and unknown sessions are NOT_FOUND.
TEST_F(OpsTest, EndSessionReleasesWhatTheSessionHeld) {
  absl::StatusOr<Client> victim = Client::Connect(dir());
  ASSERT_TRUE(victim.ok()) << victim.status();
  std::vector<Buffer> held;
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<Buffer> buffer = victim->Allocate({.heap = "system", .size = 8 * kMiB});
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    held.push_back(*std::move(buffer));
  }
  ASSERT_TRUE(held[0].Export(Access::kReadOnly).ok());
  absl::StatusOr<Fence> fence = victim->CreateFence({.name = "stuck"});
  ASSERT_TRUE(fence.ok()) << fence.status();
  auto listed = client_->ListBuffers();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->buffers_size(), 2);

  const BufctlRun ended = Bufctl(dir(), absl::StrCat("end-session ", victim->session_id()));
  EXPECT_EQ(ended.code, 0) << ended.out;
  EXPECT_THAT(ended.out, HasSubstr(absl::StrCat("ended session ", victim->session_id(), " (")))
      << ended.out;
  EXPECT_THAT(ended.out, HasSubstr("its 2 handles are released")) << ended.out;
  EXPECT_TRUE(Eventually([&] {
    auto buffers = client_->ListBuffers();
    auto heaps = client_->ListHeaps();
    if (!buffers.ok() || !heaps.ok() || buffers->buffers_size() != 0) return false;
    if (heaps->pending_tokens() != 0) return false;
    for (const auto& heap : heaps->heaps()) {
      if (heap.used() != 0) return false;
    }
    return true;
  }));
  auto fences = client_->ListFences();
  ASSERT_TRUE(fences.ok());
  for (const auto& f : fences->fences()) {
    EXPECT_EQ(f.status(), v1::FENCE_STATUS_OWNER_DIED) << f.DebugString();
  }
  // The victim's client sees its session over.
  auto after = victim->ListHeaps();
  EXPECT_EQ(after.status().code(), absl::StatusCode::kUnauthenticated) << after.status();
  EXPECT_FALSE(victim->Allocate({.heap = "system", .size = 4096}).ok());
  EXPECT_THAT(Bufctl(dir(), "clients").out,
              Not(ContainsRegex(absl::StrCat("\n", victim->session_id(), " "))));

  const BufctlRun unknown = Bufctl(dir(), "end-session 999999");
  EXPECT_EQ(unknown.code, 1) << unknown.out;
  EXPECT_THAT(unknown.out, HasSubstr("NOT_FOUND: no session 999999 is open")) << unknown.out;
  const BufctlRun json = Bufctl(dir(), absl::StrCat("--json end-session ", victim->session_id()));
  EXPECT_EQ(json.code, 1) << "already ended: " << json.out;
  // Through the client library, each refusal's exact code.
  absl::StatusOr<v1::EndSessionResponse> own = client_->EndSession(client_->session_id());
  EXPECT_EQ(own.status().code(), absl::StatusCode::kInvalidArgument) << own.status();
  EXPECT_THAT(std::string(own.status().message()), HasSubstr("is the caller's own session"));
  EXPECT_EQ(client_->EndSession(victim->session_id()).status().code(), absl::StatusCode::kNotFound);
  v1::ListBuffersRequest of_nobody;
  of_nobody.set_session_id(999999);
  absl::StatusOr<v1::ListBuffersResponse> none = client_->ListBuffers(of_nobody);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound) << none.status();
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("no session 999999 is open"));
  fence = absl::CancelledError("dropped");
  held.clear();
  victim = absl::CancelledError("closed");
  ExpectBaseline();
}

// Tests EndSession of a client that has fds the daemon sent it unread (a
// raw session that never reads fd.sock): bufctl says the session ended but
// lingers, and keeps its handles until its client reads or drops the fds;
// ending it again is FAILED_PRECONDITION; once the client closes,
// everything is back at the baseline.
TEST_F(OpsTest, EndSessionOfAClientWithUnreadFdsSaysItLingers) {
  auto raw = testing::OpenRawSession(dir());
  ASSERT_TRUE(raw.ok()) << raw.status();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(raw->Allocate("system", 4096).ok());
  const std::string id = raw->metadata.substr(0, raw->metadata.find(':'));
  const BufctlRun ended = Bufctl(dir(), "end-session " + id);
  EXPECT_EQ(ended.code, 0) << ended.out;
  EXPECT_THAT(ended.out, HasSubstr("ended session " + id + " (")) << ended.out;
  EXPECT_THAT(ended.out, HasSubstr("fds the daemon sent it are still unread, so its 3 handles are "
                                   "released only once its client reads or drops them"))
      << ended.out;
  const BufctlRun again = Bufctl(dir(), "--json end-session " + id);
  EXPECT_EQ(again.code, 1) << again.out;
  EXPECT_THAT(again.out, HasSubstr("FAILED_PRECONDITION")) << again.out;
  EXPECT_THAT(again.out, HasSubstr("lingers until its client reads or drops the fds")) << again.out;
  raw->socket = UnixSocket();  // the client closes: its unread fds go
  raw->stub.reset();
  ExpectBaseline();
}

// Tests the token listing: buffer, access, expiry and exporter (pid, comm,
// and "exited" once it is gone), never the token itself; and a buffer's
// creator shown as exited while another session keeps the buffer.
TEST_F(OpsTest, TokensAndCreatorsWithoutTheToken) {
  absl::StatusOr<ChildProcess> exporter = SpawnPeer({"export", dir(), "system", "65536", "2"});
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  const std::string ready = exporter->ReadLine();
  ASSERT_TRUE(absl::StartsWith(ready, "ready ")) << ready;
  const std::vector<std::string> tokens = absl::StrSplit(Field(ready, "tokens"), ',');
  ASSERT_EQ(tokens.size(), 2u) << ready;
  const std::string buffer = Field(ready, "buffer");
  const pid_t exporter_pid = exporter->pid();
  const std::string who = absl::StrCat("peer[", exporter_pid, "]");

  BufctlRun listed = Bufctl(dir(), "tokens");
  EXPECT_EQ(listed.code, 0) << listed.out;
  EXPECT_THAT(listed.out, ContainsRegex(absl::StrCat("\n", buffer,
                                                     " +system +64 KiB +exported +read_only +"
                                                     "[0-9.]+s +[0-9]+ peer\\[",
                                                     exporter->pid(), "\\]\n")))
      << listed.out;
  auto tokens_json = FromJson<v1::ListTokensResponse>(Bufctl(dir(), "--json tokens").out);
  ASSERT_EQ(tokens_json.tokens_size(), 2);
  EXPECT_EQ(tokens_json.tokens(0).exporter_pid(), static_cast<uint32_t>(exporter->pid()));
  EXPECT_FALSE(tokens_json.tokens(0).exporter_exited());

  // This session keeps the buffer; its creator exits.
  absl::StatusOr<Buffer> imported = client_->Import(tokens[0]);
  ASSERT_TRUE(imported.ok()) << imported.status();
  exporter->Kill(SIGKILL);
  exporter->Wait();
  EXPECT_TRUE(Eventually([&] {
    return absl::StrContains(Bufctl(dir(), "buffers").out, absl::StrCat(who, " exited"));
  })) << Bufctl(dir(), "buffers").out;
  listed = Bufctl(dir(), "tokens");
  EXPECT_THAT(listed.out, HasSubstr(absl::StrCat(who, " exited"))) << listed.out;
  auto buffers_json = FromJson<v1::ListBuffersResponse>(Bufctl(dir(), "--json buffers").out);
  ASSERT_EQ(buffers_json.buffers_size(), 1);
  EXPECT_EQ(buffers_json.buffers(0).creator_pid(), static_cast<uint32_t>(exporter_pid));
  EXPECT_EQ(buffers_json.buffers(0).creator_comm(), "peer");
  EXPECT_TRUE(buffers_json.buffers(0).creator_exited());

  // The tokens appear in no output of any command.
  std::string all;
  const std::vector<std::string> commands = {"heaps",
                                             "clients",
                                             "buffers",
                                             "holders",
                                             "tokens",
                                             "fences",
                                             "metrics",
                                             absl::StrCat("why ", buffer),
                                             "can-allocate --heap system --size 4096"};
  for (const std::string& command : commands) {
    absl::StrAppend(&all, Bufctl(dir(), command).out,
                    Bufctl(dir(), absl::StrCat("--json ", command)).out);
  }
  EXPECT_THAT(all, HasSubstr("exported")) << "the buffer is listed";
  for (const std::string& token : tokens) {
    ASSERT_GE(token.size(), 16u);
    EXPECT_THAT(all, Not(HasSubstr(token)));
  }
  imported = absl::CancelledError("released");
  ExpectBaseline();
}

// Tests that --json works on every command and prints zero-valued fields
// (a daemon at rest: used 0, this session's 0 fences), and what clients
// says about bytes charged against bytes held: one 8 MiB buffer held by
// two sessions of one uid is charged 16 MiB to the uid and held once.
TEST_F(OpsTest, JsonEverywhereWithZerosAndChargedAgainstHeld) {
  for (const std::string command : {"heaps", "clients", "buffers", "holders", "tokens", "fences",
                                    "metrics", "can-allocate --heap system --size 4096"}) {
    SCOPED_TRACE(command);
    const BufctlRun run = Bufctl(dir(), absl::StrCat(command, " --json"));
    EXPECT_EQ(run.code, 0) << run.out;
    EXPECT_TRUE(absl::StartsWith(run.out, "{")) << run.out;
  }
  const std::string heaps = Bufctl(dir(), "--json heaps").out;
  EXPECT_THAT(heaps, HasSubstr("\"used\": \"0\"")) << heaps;
  EXPECT_THAT(heaps, HasSubstr("\"live_buffers\": \"0\"")) << heaps;
  const std::string clients = Bufctl(dir(), "--json clients").out;
  EXPECT_THAT(clients, HasSubstr("\"fences\": 0")) << clients;
  EXPECT_THAT(clients, HasSubstr(absl::StrCat("\"uid\": ", ::geteuid(), ","))) << clients;
  EXPECT_THAT(Bufctl(dir(), "--json metrics").out, HasSubstr("\"text\": \"# HELP"));

  absl::StatusOr<Buffer> shared = client_->Allocate({.heap = "system", .size = 8 * kMiB});
  ASSERT_TRUE(shared.ok()) << shared.status();
  absl::StatusOr<std::string> token = shared->Export(Access::kReadOnly);
  ASSERT_TRUE(token.ok());
  absl::StatusOr<Client> second = Client::Connect(dir());
  ASSERT_TRUE(second.ok()) << second.status();
  absl::StatusOr<Buffer> imported = second->Import(*token);
  ASSERT_TRUE(imported.ok()) << imported.status();
  auto listed = client_->ListClients();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->uids_size(), 1) << listed->DebugString();
  EXPECT_EQ(listed->uids(0).charged(), 16 * kMiB);
  EXPECT_EQ(listed->uids(0).held(), 8 * kMiB);
  EXPECT_EQ(listed->uids(0).sessions(), 2u);
  const BufctlRun table = Bufctl(dir(), "clients");
  EXPECT_THAT(table.out, ContainsRegex(absl::StrCat("\n", ::geteuid(), " +3 +16 MiB +8 MiB")))
      << "bufctl's own session is the third: " << table.out;
  EXPECT_THAT(table.out, HasSubstr("charged > held")) << table.out;
  // Filters on what does not exist are errors, not empty tables.
  for (const char* command : {"buffers --session 999999", "fences --owner 999999"}) {
    SCOPED_TRACE(command);
    const BufctlRun run = Bufctl(dir(), command);
    EXPECT_EQ(run.code, 1) << run.out;
    EXPECT_THAT(run.out, HasSubstr("NOT_FOUND: no session 999999 is open")) << run.out;
  }
  imported = absl::CancelledError("released");
  second = absl::CancelledError("closed");
  shared = absl::CancelledError("released");
  ExpectBaseline();
}

// Tests that ListBuffers pages in id order: 25 buffers in pages of 10, 10
// and 5, none twice, one allocated between pages on a later page, a
// session's own buffers paged the same, a page of one starting anywhere
// (what `bufctl why` asks), and a page token that is not one refused with
// INVALID_ARGUMENT; bufctl buffers lists every page.
TEST_F(OpsTest, ListBuffersPages) {
  std::vector<Buffer> held;
  for (int i = 0; i < 25; ++i) {
    absl::StatusOr<Buffer> buffer = client_->Allocate({.heap = "system", .size = 4096});
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    held.push_back(*std::move(buffer));
  }
  v1::ListBuffersRequest request;
  request.set_page_size(10);
  std::vector<uint64_t> listed;
  std::vector<int> page_sizes;
  while (true) {
    absl::StatusOr<v1::ListBuffersResponse> page = client_->ListBuffers(request);
    ASSERT_TRUE(page.ok()) << page.status();
    page_sizes.push_back(page->buffers_size());
    for (const auto& b : page->buffers()) listed.push_back(b.buffer().buffer_id());
    if (page_sizes.size() == 1) {
      // Made after the first page: listed on a later one.
      absl::StatusOr<Buffer> late = client_->Allocate({.heap = "system", .size = 4096});
      ASSERT_TRUE(late.ok());
      held.push_back(*std::move(late));
    }
    if (page->next_page_token().empty()) break;
    EXPECT_EQ(page->next_page_token(), absl::StrCat(listed.back()));
    request.set_page_token(page->next_page_token());
  }
  EXPECT_EQ(page_sizes, (std::vector<int>{10, 10, 6}));
  std::vector<uint64_t> expected;
  for (const Buffer& b : held) expected.push_back(b.id());
  EXPECT_EQ(listed, expected) << "every buffer once, in id order";

  // One session's buffers page from its own index.
  absl::StatusOr<Client> other = daemon_->Connect();
  ASSERT_TRUE(other.ok());
  absl::StatusOr<Buffer> theirs = other->Allocate({.heap = "system", .size = 4096});
  ASSERT_TRUE(theirs.ok());
  v1::ListBuffersRequest mine;
  mine.set_session_id(client_->session_id());
  mine.set_page_size(7);
  absl::StatusOr<v1::ListBuffersResponse> all = client_->ListAllBuffers(mine);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->buffers_size(), 26);
  EXPECT_TRUE(all->next_page_token().empty());

  // A page of one, right where it is asked to start.
  v1::ListBuffersRequest one;
  one.set_page_size(1);
  one.set_page_token(absl::StrCat(held[12].id() - 1));
  absl::StatusOr<v1::ListBuffersResponse> single = client_->ListBuffers(one);
  ASSERT_TRUE(single.ok());
  ASSERT_EQ(single->buffers_size(), 1);
  EXPECT_EQ(single->buffers(0).buffer().buffer_id(), held[12].id());

  for (const std::string bad : {"x", "-1", "123456789012345678901234", "1e3"}) {
    v1::ListBuffersRequest wrong;
    wrong.set_page_token(bad);
    absl::StatusOr<v1::ListBuffersResponse> refused = client_->ListBuffers(wrong);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(refused.status().message()),
                HasSubstr("is not one ListBuffers gave (pass next_page_token back unchanged)"));
  }
  // A heap's page comes from the heap's own index: one carveout buffer
  // behind 1,100 system ones and one after them make one page. Filtered by
  // session too, a page looks at a bounded number of the session's buffers
  // (1,000 here): pages may come empty with a token; following them finds
  // both.
  absl::StatusOr<Buffer> carved = client_->Allocate({.heap = "carveout", .size = 4096});
  ASSERT_TRUE(carved.ok()) << carved.status();
  for (int i = 0; i < 1100; ++i) {
    absl::StatusOr<Buffer> buffer = client_->Allocate({.heap = "system", .size = 4096});
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    held.push_back(*std::move(buffer));
  }
  absl::StatusOr<Buffer> carved_last = client_->Allocate({.heap = "carveout", .size = 4096});
  ASSERT_TRUE(carved_last.ok()) << carved_last.status();
  // Every page of `request`: the ids listed and how many pages it took.
  auto page_through = [&](v1::ListBuffersRequest request) {
    std::pair<std::vector<uint64_t>, int> listed;
    while (true) {
      absl::StatusOr<v1::ListBuffersResponse> page = client_->ListBuffers(request);
      EXPECT_TRUE(page.ok()) << page.status();
      if (!page.ok()) break;
      ++listed.second;
      for (const auto& b : page->buffers()) listed.first.push_back(b.buffer().buffer_id());
      if (page->next_page_token().empty()) break;
      request.set_page_token(page->next_page_token());
    }
    return listed;
  };
  const std::vector<uint64_t> carveout_ids{carved->id(), carved_last->id()};
  v1::ListBuffersRequest by_heap;
  by_heap.set_heap("carveout");
  by_heap.set_page_size(10);
  EXPECT_EQ(page_through(by_heap), std::make_pair(carveout_ids, 1));
  by_heap.set_session_id(client_->session_id());
  EXPECT_EQ(page_through(by_heap), std::make_pair(carveout_ids, 2))
      << "1,000 of the session's buffers looked at per page";
  carved = absl::CancelledError("released");
  carved_last = absl::CancelledError("released");
  const BufctlRun table = Bufctl(dir(), "buffers");
  EXPECT_EQ(table.code, 0) << table.out;
  EXPECT_EQ(std::count(table.out.begin(), table.out.end(), '\n') >= 27, true) << table.out;
  EXPECT_EQ(Bufctl(dir(), absl::StrCat("why ", held[12].id())).code, 0);
  held.clear();
  theirs = absl::CancelledError("released");
  other = absl::CancelledError("closed");
  ExpectBaseline();
}

// Tests that ListFences pages in its order (pending oldest first, then
// signalled newest first): 15 fences, 5 of them signalled, in pages of 4,
// each once; timelines on the first page only; a bad token refused.
TEST_F(OpsTest, ListFencesPages) {
  std::vector<Fence> fences;
  for (int i = 0; i < 15; ++i) {
    absl::StatusOr<Fence> fence = client_->CreateFence({.name = absl::StrCat("f", i)});
    ASSERT_TRUE(fence.ok()) << fence.status();
    fences.push_back(*std::move(fence));
  }
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(fences[i].Signal().ok());
  v1::ListFencesRequest request;
  request.set_owner_session(client_->session_id());
  request.set_limit(4);
  std::vector<std::string> names;
  int pages = 0;
  while (true) {
    absl::StatusOr<v1::ListFencesResponse> page = client_->ListFences(request);
    ASSERT_TRUE(page.ok()) << page.status();
    ++pages;
    EXPECT_LE(page->fences_size(), 4);
    for (const auto& f : page->fences()) names.push_back(f.name());
    if (page->next_page_token().empty()) break;
    request.set_page_token(page->next_page_token());
  }
  EXPECT_EQ(pages, 4);
  std::vector<std::string> expected;
  for (int i = 5; i < 15; ++i) expected.push_back(absl::StrCat("f", i));  // pending, oldest first
  for (int i = 4; i >= 0; --i) expected.push_back(absl::StrCat("f", i));  // signalled, newest first
  EXPECT_EQ(names, expected);
  v1::ListFencesRequest wrong;
  wrong.set_page_token("q12");
  absl::StatusOr<v1::ListFencesResponse> refused = client_->ListFences(wrong);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("'q12' is not one ListFences gave"));
  for (int i = 5; i < 15; ++i) ASSERT_TRUE(fences[i].Signal().ok());
  fences.clear();
  ExpectBaseline();
}

// Tests that bufctl fences lists every fence, past the first page (it
// asks for pages of 1,000), and the first N with --limit N.
TEST_F(OpsTest, BufctlFencesFollowsEveryPage) {
  constexpr int kFences = 1005;
  std::vector<Fence> fences;
  for (int i = 0; i < kFences; ++i) {
    absl::StatusOr<Fence> fence = client_->CreateFence({.name = absl::StrCat("page-", i)});
    ASSERT_TRUE(fence.ok()) << fence.status();
    fences.push_back(*std::move(fence));
  }
  const std::string owner = absl::StrCat(" --owner ", client_->session_id());
  const BufctlRun json = Bufctl(dir(), "--json fences" + owner);
  ASSERT_EQ(json.code, 0) << json.out;
  size_t listed = 0;
  for (size_t at = json.out.find("\"fence_id\""); at != std::string::npos;
       at = json.out.find("\"fence_id\"", at + 1)) {
    ++listed;
  }
  EXPECT_EQ(listed, size_t{kFences});
  EXPECT_THAT(json.out, HasSubstr("\"next_page_token\": \"\""));
  const BufctlRun table = Bufctl(dir(), "fences" + owner);
  ASSERT_EQ(table.code, 0) << table.out;
  EXPECT_THAT(table.out, HasSubstr("page-0 "));
  EXPECT_THAT(table.out, HasSubstr("page-1004 "));
  EXPECT_THAT(table.out, Not(HasSubstr("(the first")));
  const BufctlRun cut = Bufctl(dir(), "fences --limit 3" + owner);
  ASSERT_EQ(cut.code, 0) << cut.out;
  EXPECT_THAT(cut.out, HasSubstr("page-2 "));
  EXPECT_THAT(cut.out, Not(HasSubstr("page-3 ")));
  EXPECT_THAT(cut.out, HasSubstr("(the first 3 fences; --limit N for another cut)"));
  for (Fence& fence : fences) ASSERT_TRUE(fence.Signal().ok());
  fences.clear();
  ExpectBaseline();
}

}  // namespace
}  // namespace bufferd
