#include "daemon/state.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <libdrm/drm_fourcc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"
#include "base/fd_count.h"
#include "base/frame_format.h"
#include "base/frame_format_proto.h"
#include "daemon/debug_views.h"
#include "heaps/contiguous_heap.h"
#include "heaps/system_heap.h"
#include "testing/fake_heap.h"

namespace bufferd {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class StateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(heaps_.Add(std::make_unique<SystemHeap>("system")).ok());
    // A carveout as DaemonState sees one: bounded, slow to allocate and to
    // free (its pages are not reserved here: nothing in these tests needs
    // them).
    ASSERT_TRUE(heaps_
                    .Add(std::make_unique<testing::FakeHeap>(
                        testing::FakeHeap::Options{.name = "carveout",
                                                   .kind = HeapKind::kCarveout,
                                                   .capacity = 16 * kMiB,
                                                   .may_block = true,
                                                   .expensive_to_free = true}))
                    .ok());
    fds_before_ = CountOpenFds();
  }

  std::unique_ptr<DaemonState> NewState(v1::QuotaConfig quotas = {}) {
    DaemonState::Options options;
    options.quotas = quotas;
    return std::make_unique<DaemonState>(&heaps_, options);
  }

  static v1::AllocateRequest Request(const std::string& heap, uint64_t size) {
    v1::AllocateRequest request;
    request.set_heap(heap);
    request.set_size(size);
    request.set_name("t");
    return request;
  }

  // A new session of `uid` (SessionTable gives out ids in the daemon).
  uint64_t Open(DaemonState& state, uid_t uid) {
    state.AddSession(next_session_, uid);
    return next_session_++;
  }

  // Allocate and Import as the services do once the fd is delivered:
  // committed.
  static absl::StatusOr<DaemonState::Grant> Allocate(DaemonState& state, uint64_t session,
                                                     const v1::AllocateRequest& request) {
    ASSIGN_OR_RETURN(DaemonState::PendingGrant pending, state.Allocate(session, request));
    return std::move(pending).Commit();
  }
  static absl::StatusOr<DaemonState::Grant> Import(DaemonState& state, uint64_t session,
                                                   const std::string& token) {
    ASSIGN_OR_RETURN(DaemonState::PendingGrant pending, state.Import(session, token));
    return std::move(pending).Commit();
  }

  // Export as the service does: with an fd of the buffer (a dup of
  // `fd`), as a client uploads its own.
  static absl::StatusOr<v1::ExportResponse> Export(DaemonState& state, uint64_t session,
                                                   const v1::ExportRequest& request, int fd) {
    ASSIGN_OR_RETURN(UniqueFd copy, DuplicateFd(fd));
    return state.Export(session, request, std::move(copy));
  }

  static uint64_t SessionBytes(DaemonState& state, uint64_t session, const std::string& heap) {
    for (const auto& holdings : state.ListHoldings()) {
      if (holdings.session_id != session) continue;
      auto it = holdings.bytes.find(heap);
      return it == holdings.bytes.end() ? 0 : it->second;
    }
    return 0;
  }

  HeapRegistry heaps_;
  int fds_before_ = 0;
  uint64_t next_session_ = 1;
};

// Tests that a session's handles and charges follow Allocate / Import /
// Release, that a buffer dies with its last handle, and that closing a
// session releases everything it held.
TEST_F(StateTest, HandlesChargesAndSessionEnd) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1000);
  const uint64_t b = Open(*state, 1000);
  EXPECT_NE(a, b);

  auto grant = Allocate(*state, a, Request("system", 5000));
  ASSERT_TRUE(grant.ok()) << grant.status();
  EXPECT_EQ(grant->buffer->size(), 8192u);
  EXPECT_EQ(SessionBytes(*state, a, "system"), 8192u);

  v1::ExportRequest export_request;
  export_request.set_handle(grant->handle);
  export_request.set_access(v1::ACCESS_READ_ONLY);
  auto token = Export(*state, a, export_request, grant->fd.fd.get());
  ASSERT_TRUE(token.ok()) << token.status();
  auto imported = Import(*state, b, token->token());
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ(imported->access, v1::ACCESS_READ_ONLY);
  EXPECT_EQ(::fcntl(imported->fd.fd.get(), F_GETFL) & O_ACCMODE, O_RDONLY);
  EXPECT_EQ(SessionBytes(*state, b, "system"), 8192u);

  // The creator lets go; the importer keeps the buffer alive.
  auto destroyed = state->Release(a, grant->handle);
  ASSERT_TRUE(destroyed.ok());
  EXPECT_TRUE(destroyed->empty());
  EXPECT_EQ(SessionBytes(*state, a, "system"), 0u);
  EXPECT_EQ(HeapsView(*state).live_buffers(), 1u);

  // The importer's session ends: the buffer dies.
  state->CloseSession(b);
  v1::ListHeapsResponse heaps = HeapsView(*state);
  EXPECT_EQ(heaps.live_buffers(), 0u);
  EXPECT_EQ(heaps.live_handles(), 0u);
  EXPECT_EQ(heaps.fds().exports(), 0u);
  EXPECT_EQ(heaps.fds_in_use(), 2u) << "the two grants' fds, not yet delivered";
  EXPECT_EQ(heaps.heaps(0).used(), 0u);
  auto gone = Allocate(*state, b, Request("system", 1));
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kUnauthenticated);
  grant->fd = {};
  imported->fd = {};
  EXPECT_EQ(HeapsView(*state).fds_in_use(), 0u);
  EXPECT_EQ(CountOpenFds(), fds_before_);
}

// Tests each quota: its code, and a message naming which quota was hit.
// Tests that Release says when a session holds no handle on a buffer any
// more (its reservation status slot goes then), and not before.
TEST_F(StateTest, ReleaseSaysWhenTheSessionLetsGoOfABuffer) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1000);
  auto grant = Allocate(*state, a, Request("system", 4096));
  ASSERT_TRUE(grant.ok());
  v1::ExportRequest export_request;
  export_request.set_handle(grant->handle);
  auto token = Export(*state, a, export_request, grant->fd.fd.get());
  ASSERT_TRUE(token.ok());
  auto second = Import(*state, a, token->token());
  ASSERT_TRUE(second.ok());
  uint64_t let_go = 123;
  ASSERT_TRUE(state->Release(a, grant->handle, &let_go).ok());
  EXPECT_EQ(let_go, 0u) << "it still holds the buffer through its second handle";
  EXPECT_TRUE(state->Holds(a, grant->buffer->buffer_id()));
  ASSERT_TRUE(state->Release(a, second->handle, &let_go).ok());
  EXPECT_EQ(let_go, grant->buffer->buffer_id());
  EXPECT_FALSE(state->Holds(a, grant->buffer->buffer_id()));
  EXPECT_FALSE(state->Release(a, second->handle, &let_go).ok());
  EXPECT_EQ(let_go, 0u);
  grant->fd = {};
  second->fd = {};
}

TEST_F(StateTest, QuotasNameThemselves) {
  v1::QuotaConfig quotas;
  quotas.set_max_bytes_per_session(8 * kMiB);
  quotas.set_max_bytes_per_uid(12 * kMiB);
  quotas.set_max_buffers_per_session(3);
  quotas.set_max_allocation_bytes(6 * kMiB);
  auto state = NewState(quotas);
  const uint64_t a = Open(*state, 1000);
  const uint64_t b = Open(*state, 1000);

  auto too_big = Allocate(*state, a, Request("system", 7 * kMiB));
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(too_big.status().message().find("quota max_allocation_bytes"), absl::string_view::npos);

  auto a1 = Allocate(*state, a, Request("system", 6 * kMiB));
  ASSERT_TRUE(a1.ok());
  auto a2 = Allocate(*state, a, Request("system", 3 * kMiB));
  EXPECT_EQ(a2.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(a2.status().message().find("quota max_bytes_per_session on heap 'system'"),
            absl::string_view::npos)
      << a2.status();
  // Per heap: the carveout has its own budget.
  EXPECT_TRUE(Allocate(*state, a, Request("carveout", 3 * kMiB)).ok());

  auto b1 = Allocate(*state, b, Request("system", 6 * kMiB));
  auto b2 = Allocate(*state, b, Request("system", 1));
  ASSERT_TRUE(b1.ok());
  EXPECT_EQ(b2.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(b2.status().message().find("quota max_bytes_per_uid on heap 'system': uid 1000"),
            absl::string_view::npos)
      << b2.status();

  // Another uid is not affected.
  const uint64_t c = Open(*state, 2000);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Allocate(*state, c, Request("system", 4096)).ok());
  auto fourth = Allocate(*state, c, Request("system", 4096));
  EXPECT_EQ(fourth.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(fourth.status().message().find("quota max_buffers_per_session"),
            absl::string_view::npos);
  // Every refusal is counted on its heap by reason (bufctl heaps, metrics).
  using Counts = std::map<std::string, uint64_t>;
  EXPECT_EQ(state->Refusals(),
            (std::map<std::string, Counts>{{"system", Counts{{"quota", 3}, {"too_large", 1}}}}));
  EXPECT_EQ(HeapsView(*state).heaps(0).failures(), 4u);
}

// Tests per-heap quota overrides.
TEST_F(StateTest, PerHeapQuotaOverride) {
  v1::QuotaConfig quotas;
  quotas.set_max_bytes_per_session(64 * kMiB);
  auto state = NewState(quotas);
  state->SetHeapQuotas("carveout", 2 * kMiB, 0);
  const uint64_t a = Open(*state, 1);
  EXPECT_TRUE(Allocate(*state, a, Request("system", 10 * kMiB)).ok());
  EXPECT_TRUE(Allocate(*state, a, Request("carveout", 2 * kMiB)).ok());
  EXPECT_EQ(Allocate(*state, a, Request("carveout", 4096)).status().code(),
            absl::StatusCode::kResourceExhausted);
}

// Tests that a contiguous buffer that fell back to base pages is charged its
// real size, not the heap's huge page: the quota check is made against the
// huge page (the request might get one), then trimmed.
TEST_F(StateTest, FallbackChargesTheRealSize) {
  if (ReadHugepagePool(kHugePage1G).free > 0) GTEST_SKIP() << "a 1 GiB page is free";
  ContiguousHeap::Options options;
  options.name = "gig";
  options.hugepage_size = kHugePage1G;
  options.fallbacks = {Backing::kBasePages};
  ASSERT_TRUE(heaps_.Add(std::make_unique<ContiguousHeap>(options)).ok());
  v1::QuotaConfig quotas;
  quotas.set_max_bytes_per_session(uint64_t{3} << 30);
  auto state = NewState(quotas);
  const uint64_t a = Open(*state, 1);
  auto grant = Allocate(*state, a, Request("gig", 5000));
  ASSERT_TRUE(grant.ok()) << grant.status();
  EXPECT_EQ(grant->buffer->size(), 8192u);
  EXPECT_EQ(grant->buffer->backing(), v1::BACKING_BASE_PAGES);
  EXPECT_EQ(SessionBytes(*state, a, "gig"), 8192u);
  // Two more fit: each is checked against 1 GiB but charged 8 KiB.
  auto second = Allocate(*state, a, Request("gig", 5000));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(SessionBytes(*state, a, "gig"), 16384u);
  ASSERT_TRUE(state->Release(a, grant->handle).ok());
  ASSERT_TRUE(state->Release(a, second->handle).ok());
  EXPECT_EQ(SessionBytes(*state, a, "gig"), 0u);
  EXPECT_EQ(heaps_.Find("gig")->Stats().used, 0u);
}

// Tests that quotas hold exactly under 8 threads allocating and releasing at
// random, and that everything returns to zero afterwards.
TEST_F(StateTest, QuotasAreAtomicUnderConcurrency) {
  v1::QuotaConfig quotas;
  quotas.set_max_bytes_per_session(6 * kMiB);
  quotas.set_max_bytes_per_uid(10 * kMiB);
  auto state = NewState(quotas);
  std::vector<uint64_t> sessions;
  for (int i = 0; i < 4; ++i) sessions.push_back(Open(*state, 1000));
  std::atomic<bool> over{false};
  std::atomic<int> ok{0}, refused{0};
  std::vector<std::thread> threads;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      const uint64_t session = sessions[t % 4];
      std::vector<uint64_t> held;
      while (std::chrono::steady_clock::now() < deadline) {
        if (held.size() < 4 && rng() % 2) {
          auto grant = Allocate(*state, session,
                                Request(rng() % 2 ? "system" : "carveout", (rng() % 3 + 1) * kMiB));
          if (grant.ok()) {
            ++ok;
            held.push_back(grant->handle);
          } else {
            ++refused;
            if (grant.status().code() != absl::StatusCode::kResourceExhausted) over = true;
          }
        } else if (!held.empty()) {
          size_t i = rng() % held.size();
          if (!state->Release(session, held[i]).ok()) over = true;
          held.erase(held.begin() + static_cast<long>(i));
        }
        uint64_t uid_total = 0;
        for (const auto& holdings : state->ListHoldings()) {
          for (const auto& [heap, bytes] : holdings.bytes) {
            if (bytes > 6 * kMiB) over = true;
            if (heap == "system") uid_total += bytes;
          }
        }
        if (uid_total > 10 * kMiB) over = true;
      }
      for (uint64_t h : held) (void)state->Release(session, h);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_FALSE(over.load());
  EXPECT_GT(ok.load(), 0);
  EXPECT_GT(refused.load(), 0) << "the quotas were never reached; the test proves nothing";
  v1::ListHeapsResponse heaps = HeapsView(*state);
  EXPECT_EQ(heaps.live_buffers(), 0u);
  EXPECT_EQ(heaps.fds_in_use(), 0u);
  for (const auto& heap : heaps.heaps()) EXPECT_EQ(heap.used(), 0u) << heap.name();
  for (const auto& holdings : state->ListHoldings()) EXPECT_TRUE(holdings.bytes.empty());
  EXPECT_EQ(CountOpenFds(), fds_before_);
}

// Tests the cap on unredeemed share tokens per session: the 4097th is refused
// naming the cap, redeeming one makes room, releasing the buffer forgets its
// tokens, and another session is unaffected.
TEST_F(StateTest, UnredeemedTokensAreCapped) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1);
  const uint64_t b = Open(*state, 1);
  auto grant = Allocate(*state, a, Request("system", 4096));
  ASSERT_TRUE(grant.ok());
  v1::ExportRequest request;
  request.set_handle(grant->handle);
  std::string first;
  for (int i = 0; i < 4096; ++i) {
    auto token = Export(*state, a, request, grant->fd.fd.get());
    ASSERT_TRUE(token.ok()) << i << ": " << token.status();
    if (i == 0) first = token->token();
  }
  auto refused = Export(*state, a, request, grant->fd.fd.get());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("4096 share tokens out that nobody imported"),
            std::string::npos)
      << refused.status();
  auto other = Allocate(*state, b, Request("system", 4096));
  ASSERT_TRUE(other.ok());
  v1::ExportRequest other_request;
  other_request.set_handle(other->handle);
  EXPECT_TRUE(Export(*state, b, other_request, other->fd.fd.get()).ok());

  auto imported = Import(*state, b, first);
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_TRUE(Export(*state, a, request, grant->fd.fd.get()).ok()) << "a redeemed token makes room";
  EXPECT_FALSE(Export(*state, a, request, grant->fd.fd.get()).ok());
  // Releasing the buffer forgets its tokens (and their count).
  ASSERT_TRUE(state->Release(b, imported->handle).ok());
  ASSERT_TRUE(state->Release(a, grant->handle).ok());
  auto again = Allocate(*state, a, Request("system", 4096));
  ASSERT_TRUE(again.ok());
  request.set_handle(again->handle);
  EXPECT_TRUE(Export(*state, a, request, again->fd.fd.get()).ok());
}

// Tests that the fd budget refuses allocations with RESOURCE_EXHAUSTED: a
// buffer holds the fd granted to its creator until it is delivered, and no
// fd of the daemon's past that.
TEST_F(StateTest, FdBudget) {
  FdBudget budget({.total = 2});
  DaemonState::Options options;
  options.fd_budget = &budget;
  DaemonState state(&heaps_, options);
  const uint64_t a = Open(state, 1);
  auto first = Allocate(state, a, Request("system", 1));
  ASSERT_TRUE(first.ok());
  auto second = Allocate(state, a, Request("system", 1));
  ASSERT_TRUE(second.ok());
  auto third = Allocate(state, a, Request("system", 1));
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(third.status().message(),
            "daemon fd budget reached: 2 of 2 fds in use (2 fds in flight to clients); try again "
            "when some close");
  first->fd = {};  // delivered: the client holds it now, not the daemon
  second->fd = {};
  EXPECT_EQ(budget.usage().total, 0u) << "the daemon keeps no fd of a live buffer";
  std::vector<DaemonState::Grant> more;
  for (int i = 0; i < 10; ++i) {
    auto grant = Allocate(state, a, Request("system", 1));
    ASSERT_TRUE(grant.ok()) << i << ": " << grant.status();
    grant->fd = {};
    more.push_back(*std::move(grant));
  }
  EXPECT_EQ(HeapsView(state).live_buffers(), 12u) << "live buffers need no budget";
  EXPECT_EQ(state.Refusals()["system"], (std::map<std::string, uint64_t>{{"fd_budget", 1}}));
}

// Tests that one uid's share of the fd budget leaves the rest to other uids.
TEST_F(StateTest, FdBudgetPerUid) {
  FdBudget budget({.total = 8, .per_uid = 4});
  DaemonState::Options options;
  options.fd_budget = &budget;
  DaemonState state(&heaps_, options);
  const uint64_t a = Open(state, 1);
  std::vector<DaemonState::Grant> held;
  for (int i = 0; i < 4; ++i) {  // undelivered: one fd each
    auto grant = Allocate(state, a, Request("system", 1));
    ASSERT_TRUE(grant.ok()) << grant.status();
    held.push_back(*std::move(grant));
  }
  auto refused = Allocate(state, a, Request("system", 1));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(refused.status().message(),
            "fd budget of uid 1 reached: it holds 4 of 4 fds (limits.max_fds_per_uid): "
            "buffers it exported (share tokens not yet redeemed), sessions, control connections, "
            "fences and timelines (their pipes and pages) and fds not yet read; let tokens be "
            "redeemed or expire, drop fences and timelines or close sessions");
  const uint64_t b = Open(state, 2);
  EXPECT_TRUE(Allocate(state, b, Request("system", 1)).ok()) << "another uid still allocates";
}

// Tests that a heap name longer than any configured one is INVALID_ARGUMENT
// without echoing it, and that an unknown name is quoted escaped and short.
TEST_F(StateTest, HeapNamesAreNeverEchoedAtLength) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1);
  auto huge = Allocate(*state, a, Request(std::string(100000, 'x'), 1));
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(huge.status().message(), "heap name is 100000 bytes; heap names are at most 32");
  auto odd = Allocate(*state, a, Request("\x1b]0;PWN\x07", 1));
  EXPECT_EQ(odd.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(odd.status().message(), "unknown heap '\\x1b]0;PWN\\x07' (heaps: system, carveout)");
}

// Tests the two steps of freeing as DaemonState drives them: releasing a big
// buffer's last handle gives its bytes back to the heap at once; its memory
// (a carveout's refill) is the reaper's to free.
TEST_F(StateTest, FreedBytesAtOnce) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1);
  auto big = Allocate(*state, a, Request("carveout", 8 * kMiB));
  ASSERT_TRUE(big.ok());
  big->fd = {};  // delivered
  auto small = Allocate(*state, a, Request("system", 2 * kMiB));
  ASSERT_TRUE(small.ok());
  small->fd = {};
  std::vector<DeadBuffer> dead = state->CloseSession(a);
  ASSERT_EQ(dead.size(), 2u) << "what died is returned, not freed";
  for (const DeadBuffer& buffer : dead) EXPECT_FALSE(buffer.memory->cheap_to_free());
  v1::ListHeapsResponse heaps = HeapsView(*state);
  for (const auto& heap : heaps.heaps()) EXPECT_EQ(heap.used(), 0u) << heap.name();
  EXPECT_EQ(heaps.fds_in_use(), 0u);
  const uint64_t b = Open(*state, 1);
  EXPECT_TRUE(Allocate(*state, b, Request("carveout", 8 * kMiB)).ok())
      << "the bytes are back before the reaper runs";
  dead.clear();  // what the reaper does
}

// Tests that a share token keeps the exporter's uploaded fd, in the
// exporter's share of the budget, until it is redeemed (the fd goes with
// the import's commit), expires (closed at ExpireTokens), or its buffer
// dies; and that only the buffer's own memfd, read-write for a read-write
// export, is taken.
TEST_F(StateTest, TokensKeepTheExportersFdUntilRedeemedOrExpired) {
  FdBudget budget({.total = 100});
  DaemonState::Options options;
  options.fd_budget = &budget;
  DaemonState state(&heaps_, options);
  const uint64_t creator = Open(state, 1);
  const uint64_t importer = Open(state, 2);
  auto grant = Allocate(state, creator, Request("carveout", 4096));
  ASSERT_TRUE(grant.ok()) << grant.status();
  UniqueFd mine = std::move(grant->fd.fd);  // delivered: the client's now
  grant->fd = {};
  EXPECT_EQ(budget.usage().total, 0u);
  v1::ExportRequest request;
  request.set_handle(grant->handle);
  request.set_access(v1::ACCESS_READ_ONLY);
  auto token = Export(state, creator, request, mine.get());
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(budget.UsedBy(1), 1u) << "the token keeps the exporter's fd";
  EXPECT_EQ(budget.usage().of(FdUse::kExport), 1u);
  {
    auto pending = state.Import(importer, token->token());
    ASSERT_TRUE(pending.ok());
    EXPECT_EQ(::fcntl((*pending)->fd.fd.get(), F_GETFL) & O_ACCMODE, O_RDONLY);
    EXPECT_EQ(budget.UsedBy(1), 1u) << "kept until the import commits";
    DaemonState::Grant imported = std::move(*pending).Commit();
    imported.fd = {};
  }
  EXPECT_EQ(budget.UsedBy(1), 0u) << "a redeemed token's fd is closed";
  EXPECT_EQ(budget.usage().total, 0u);

  // Expiry closes the fd within a tick; the token then says it expired.
  request.set_ttl_ms(1000);
  token = Export(state, creator, request, mine.get());
  ASSERT_TRUE(token.ok());
  EXPECT_EQ(budget.UsedBy(1), 1u);
  state.ExpireTokens(absl::Now() + absl::Seconds(2));
  EXPECT_EQ(budget.UsedBy(1), 0u);

  // The buffer's death closes its tokens' fds with it.
  token = Export(state, creator, request, mine.get());
  ASSERT_TRUE(token.ok());
  auto dead = state.CloseSession(importer);
  dead = state.CloseSession(creator);
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].token_fds.size(), 1u);
  dead.clear();
  EXPECT_EQ(budget.usage().total, 0u);
}

// Tests what Export and Freeze take as the buffer's fd: its own memfd only
// (another file, even a memfd named alike, is INVALID_ARGUMENT), and a
// read-write fd for a read-write export or a freeze.
TEST_F(StateTest, UploadedFdsMustBeTheBuffersOwn) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1);
  v1::AllocateRequest allocate = Request("system", 4096);
  allocate.set_freezable(true);
  auto grant = Allocate(*state, a, allocate);
  ASSERT_TRUE(grant.ok());
  const uint64_t id = grant->buffer->buffer_id();
  v1::ExportRequest request;
  request.set_handle(grant->handle);
  request.set_access(v1::ACCESS_READ_WRITE);
  UniqueFd lookalike(::memfd_create("bufferd:system:", MFD_CLOEXEC));
  ASSERT_TRUE(lookalike.valid());
  auto wrong = Export(*state, a, request, lookalike.get());
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(wrong.status().message(),
            absl::StrCat("the fd uploaded for a read-write export is not buffer ", id,
                         "'s memfd (it is another file); upload this Buffer's own fd()"));
  UniqueFd pipe_ends[2];
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  pipe_ends[0].Reset(p[0]);
  pipe_ends[1].Reset(p[1]);
  EXPECT_THAT(std::string(Export(*state, a, request, p[0]).status().message()),
              ::testing::HasSubstr("(it is not a regular file)"));
  const std::string path = absl::StrCat("/proc/self/fd/", grant->fd.fd.get());
  UniqueFd read_only(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(read_only.valid());
  auto ro = Export(*state, a, request, read_only.get());
  EXPECT_EQ(ro.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ro.status().message(),
            absl::StrCat("the fd uploaded for a read-write export of buffer ", id,
                         " is not open read-write; upload the read-write holder's fd()"));
  request.set_access(v1::ACCESS_READ_ONLY);
  EXPECT_TRUE(Export(*state, a, request, read_only.get()).ok()) << "read-only is enough";
  ASSERT_TRUE(DuplicateFd(read_only.get()).ok());
  auto frozen = state->Freeze(a, grant->handle, *DuplicateFd(read_only.get()));
  EXPECT_EQ(frozen.status().code(), absl::StatusCode::kInvalidArgument);
  frozen = state->Freeze(a, grant->handle, *DuplicateFd(grant->fd.fd.get()));
  ASSERT_TRUE(frozen.ok()) << frozen.status();
  EXPECT_TRUE(frozen->frozen());
  EXPECT_EQ(::fcntl(grant->fd.fd.get(), F_GET_SEALS) & F_SEAL_WRITE, F_SEAL_WRITE);
}

// Tests that a frame's layout and metadata, kept by the buffer's record
// apart from its info, are in every answer about the buffer (the grants of
// a set, each record with its copy of the plan's layout; GetBuffer,
// SetMetadata, Freeze and the debug view).
TEST_F(StateTest, AFrameIsInEveryAnswerAboutItsBuffer) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1);
  v1::AllocateRequest request = Request("system", 0);
  request.set_freezable(true);
  v1::FrameRequest& frame = *request.mutable_frame();
  frame.set_width(64);
  frame.set_height(48);
  frame.set_fourcc(DRM_FORMAT_NV12);
  request.mutable_metadata()->set_tag("camera0");
  request.mutable_metadata()->mutable_crop()->set_width(32);
  request.mutable_metadata()->mutable_crop()->set_height(16);
  absl::StatusOr<DaemonState::Allocation> set = state->AllocateSet(a, request, 2);
  ASSERT_TRUE(set.ok()) << set.status();
  std::vector<DaemonState::Grant> grants;
  for (auto& pending : set->grants) grants.push_back(std::move(pending).Commit());
  ASSERT_EQ(grants.size(), 2u);
  const v1::FrameFormat& layout = grants[0].buffer->frame();
  EXPECT_EQ(layout.width(), 64u);
  EXPECT_EQ(layout.height(), 48u);
  EXPECT_EQ(layout.fourcc(), DRM_FORMAT_NV12);
  ASSERT_EQ(layout.planes_size(), 2);
  EXPECT_EQ(layout.planes(1).offset(), 64u * 48);
  auto same = [&](const v1::BufferInfo& info) {
    return info.has_frame() && info.frame().SerializeAsString() == layout.SerializeAsString();
  };
  for (const DaemonState::Grant& grant : grants) {
    EXPECT_TRUE(same(*grant.buffer)) << grant.buffer->DebugString();
    // Not sent back to the creator, which sent it.
    EXPECT_FALSE(grant.buffer->has_metadata());
    absl::StatusOr<v1::GetBufferResponse> got = state->GetBuffer(a, grant.handle);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(same(got->buffer())) << got->buffer().DebugString();
    EXPECT_EQ(got->buffer().metadata().tag(), "camera0");
    EXPECT_EQ(got->buffer().metadata().crop().width(), 32u);
  }
  v1::FrameMetadata metadata;
  metadata.set_tag("changed");
  absl::StatusOr<v1::BufferInfo> changed =
      state->SetMetadata(a, grants[0].handle, metadata, std::nullopt);
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_TRUE(same(*changed));
  EXPECT_EQ(changed->metadata().tag(), "changed");
  absl::StatusOr<UniqueFd> own = DuplicateFd(grants[1].fd.fd.get());
  ASSERT_TRUE(own.ok()) << own.status();
  absl::StatusOr<v1::BufferInfo> frozen = state->Freeze(a, grants[1].handle, *std::move(own));
  ASSERT_TRUE(frozen.ok()) << frozen.status();
  EXPECT_TRUE(same(*frozen));
  const DaemonState::BufferPage page = state->ListBuffers({});
  ASSERT_EQ(page.views.size(), 2u);
  for (const auto& view : page.views) {
    EXPECT_TRUE(same(view.info)) << view.info.DebugString();
  }
}

// An allocation given the call's arena makes each grant's info there (the
// answer takes it without a copy); the record keeps the metadata as sent.
TEST_F(StateTest, GrantsAreMadeOnTheAnswersArena) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1);
  v1::AllocateRequest request = Request("system", 0);
  request.mutable_frame()->set_width(32);
  request.mutable_frame()->set_height(32);
  request.mutable_frame()->set_fourcc(DRM_FORMAT_XRGB8888);
  v1::FrameMetadata& metadata = *request.mutable_metadata();
  metadata.mutable_crop()->set_x(1);
  metadata.mutable_crop()->set_y(2);
  metadata.mutable_crop()->set_width(30);
  metadata.mutable_crop()->set_height(29);
  metadata.set_color_space(v1::COLOR_SPACE_BT709);
  metadata.set_color_range(v1::COLOR_RANGE_LIMITED);
  metadata.set_tag(std::string(64, 't'));
  absl::StatusOr<AllocationPlan> plan = state->Plan(request, 2);
  ASSERT_TRUE(plan.ok()) << plan.status();
  google::protobuf::Arena arena;
  absl::StatusOr<DaemonState::Allocation> set = state->AllocatePlanned(a, *plan, request, &arena);
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ(set->grants.size(), 2u);
  for (auto& pending : set->grants) {
    DaemonState::Grant grant = std::move(pending).Commit();
    EXPECT_EQ(grant.buffer->GetArena(), &arena);
    EXPECT_EQ(grant.buffer->frame().planes_size(), 1);
    absl::StatusOr<v1::GetBufferResponse> got = state->GetBuffer(a, grant.handle);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->buffer().metadata().SerializeAsString(), metadata.SerializeAsString())
        << got->buffer().metadata().DebugString();
    EXPECT_EQ(got->buffer().frame().SerializeAsString(), grant.buffer->frame().SerializeAsString());
    EXPECT_TRUE(state->Release(a, grant.handle).ok());
  }
}

// A caller that lays the frame out itself (the C++ library) is answered
// without it; the record keeps it for every other answer. The flag without
// a frame is refused by name.
TEST_F(StateTest, ACallerThatLaysOutTheFrameIsNotSentIt) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1);
  v1::AllocateRequest request = Request("system", 0);
  request.mutable_frame()->set_width(64);
  request.mutable_frame()->set_height(48);
  request.mutable_frame()->set_fourcc(DRM_FORMAT_YUV420);
  request.set_caller_lays_out_frame(true);
  request.set_freezable(true);
  absl::StatusOr<DaemonState::PendingGrant> pending = state->Allocate(a, request);
  ASSERT_TRUE(pending.ok()) << pending.status();
  DaemonState::Grant grant = std::move(*pending).Commit();
  EXPECT_FALSE(grant.buffer->has_frame()) << grant.buffer->DebugString();
  absl::StatusOr<v1::GetBufferResponse> got = state->GetBuffer(a, grant.handle);
  ASSERT_TRUE(got.ok()) << got.status();
  absl::StatusOr<FrameFormat> layout = LayOutFrame(64, 48, DRM_FORMAT_YUV420, 0, 0);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(FromProto(got->buffer().frame()), *layout) << got->buffer().DebugString();
  EXPECT_EQ(got->buffer().frame().planes_size(), 3);
  // Every other answer about it keeps it: SetMetadata, Freeze, the debug
  // view.
  const std::string kept = got->buffer().frame().SerializeAsString();
  absl::StatusOr<v1::BufferInfo> changed =
      state->SetMetadata(a, grant.handle, v1::FrameMetadata(), std::nullopt);
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_EQ(changed->frame().SerializeAsString(), kept);
  absl::StatusOr<UniqueFd> own = DuplicateFd(grant.fd.fd.get());
  ASSERT_TRUE(own.ok()) << own.status();
  absl::StatusOr<v1::BufferInfo> frozen = state->Freeze(a, grant.handle, *std::move(own));
  ASSERT_TRUE(frozen.ok()) << frozen.status();
  EXPECT_EQ(frozen->frame().SerializeAsString(), kept);
  const DaemonState::BufferPage page = state->ListBuffers({});
  ASSERT_EQ(page.views.size(), 1u);
  EXPECT_EQ(page.views[0].info.frame().SerializeAsString(), kept);
  EXPECT_TRUE(state->Release(a, grant.handle).ok());

  // A set: none of its answers carries it; each record does.
  absl::StatusOr<DaemonState::Allocation> set = state->AllocateSet(a, request, 2);
  ASSERT_TRUE(set.ok()) << set.status();
  for (auto& pending_grant : set->grants) {
    DaemonState::Grant one = std::move(pending_grant).Commit();
    EXPECT_FALSE(one.buffer->has_frame()) << one.buffer->DebugString();
    absl::StatusOr<v1::GetBufferResponse> again = state->GetBuffer(a, one.handle);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->buffer().frame().SerializeAsString(), kept);
    EXPECT_TRUE(state->Release(a, one.handle).ok());
  }

  v1::AllocateRequest bytes = Request("system", 4096);
  bytes.set_caller_lays_out_frame(true);
  absl::StatusOr<DaemonState::PendingGrant> refused = state->Allocate(a, bytes);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(refused.status().message(),
            "caller_lays_out_frame is set without a frame: there is nothing to lay out");
}

// Tests that a grant dropped uncommitted undoes itself: a pending Allocate's
// buffer is gone with its charge, and a pending Import's handle goes while
// its token becomes redeemable again (and only a committed Import uses it).
TEST_F(StateTest, UncommittedGrantsUndoThemselves) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1);
  const uint64_t b = Open(*state, 1);
  {
    auto pending = state->Allocate(a, Request("system", 4096));
    ASSERT_TRUE(pending.ok());
    EXPECT_EQ(HeapsView(*state).live_buffers(), 1u);
    EXPECT_EQ(SessionBytes(*state, a, "system"), 4096u);
  }
  EXPECT_EQ(HeapsView(*state).live_buffers(), 0u);
  EXPECT_EQ(SessionBytes(*state, a, "system"), 0u);
  auto grant = Allocate(*state, a, Request("system", 4096));
  ASSERT_TRUE(grant.ok());
  v1::ExportRequest request;
  request.set_handle(grant->handle);
  auto token = Export(*state, a, request, grant->fd.fd.get());
  ASSERT_TRUE(token.ok());
  uint64_t undone_handle;
  {
    auto pending = state->Import(b, token->token());
    ASSERT_TRUE(pending.ok());
    undone_handle = (*pending)->handle;
    EXPECT_EQ(state->Import(b, token->token()).status().code(),
              absl::StatusCode::kFailedPrecondition)
        << "used while pending";
  }
  EXPECT_EQ(state->GetBuffer(b, undone_handle).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(SessionBytes(*state, b, "system"), 0u);
  auto second = Import(*state, b, token->token());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(state->Import(b, token->token()).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(HeapsView(*state).live_handles(), 2u);
}

// Tests that a detached session (its client left fds unread) answers no
// more calls but keeps its handles and charges until it is closed.
TEST_F(StateTest, DetachedSessionKeepsItsAccounting) {
  auto state = NewState();
  const uint64_t a = Open(*state, 1);
  auto grant = Allocate(*state, a, Request("system", 4096));
  ASSERT_TRUE(grant.ok());
  state->DetachSession(a);
  EXPECT_EQ(Allocate(*state, a, Request("system", 1)).status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(HeapsView(*state).live_buffers(), 1u);
  EXPECT_EQ(SessionBytes(*state, a, "system"), 4096u);
  state->CloseSession(a);
  EXPECT_EQ(HeapsView(*state).live_buffers(), 0u);
}

}  // namespace
// Tests that AllocateSet is all or nothing under the fd budget (room for
// two of the three fds to deliver: none is made), and that a set dropped
// uncommitted gives handles, heap bytes, quota charges and fds all back.
TEST_F(StateTest, AllocateSetIsAllOrNothing) {
  FdBudget budget({.total = 2});
  DaemonState::Options options;
  options.fd_budget = &budget;
  DaemonState state(&heaps_, options);
  const uint64_t a = Open(state, 1);
  absl::StatusOr<DaemonState::Allocation> set =
      state.AllocateSet(a, Request("carveout", 2 * kMiB), 3);
  ASSERT_EQ(set.status().code(), absl::StatusCode::kResourceExhausted) << set.status();
  EXPECT_THAT(std::string(set.status().message()),
              ::testing::HasSubstr("daemon fd budget reached"));
  EXPECT_EQ(budget.usage().total, 0u);
  EXPECT_EQ(HeapsView(state).live_buffers(), 0u);
  EXPECT_EQ(SessionBytes(state, a, "carveout"), 0u);
  EXPECT_EQ(heaps_.Find("carveout")->Stats().used, 0u);
  EXPECT_EQ(CountOpenFds(), fds_before_);

  // An uncommitted set undoes itself when dropped.
  set = state.AllocateSet(a, Request("carveout", 2 * kMiB), 2);
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(SessionBytes(state, a, "carveout"), 4 * kMiB);
  set = absl::CancelledError();
  EXPECT_EQ(SessionBytes(state, a, "carveout"), 0u);
  EXPECT_EQ(heaps_.Find("carveout")->Stats().used, 0u);
  EXPECT_EQ(budget.usage().total, 0u);
  EXPECT_EQ(CountOpenFds(), fds_before_);
}

// Tests that a list of heaps is tried in order, each skip said with its
// reason, and that the quota is charged on the heap that served.
TEST_F(StateTest, HeapListFallsBackWithReasons) {
  v1::QuotaConfig quotas;
  quotas.set_max_bytes_per_session(10 * kMiB);
  auto state = NewState(quotas);
  const uint64_t a = Open(*state, 1);
  v1::AllocateRequest request = Request("", 12 * kMiB);
  request.add_heaps("carveout");
  request.add_heaps("system");
  // carveout (16 MiB) could, but the quota (10 MiB) refuses both.
  absl::StatusOr<DaemonState::Allocation> refused = state->AllocateSet(a, request, 1);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()),
              ::testing::StartsWith("no heap could serve 12 MiB: quota max_bytes_per_session on "
                                    "heap 'carveout'"));
  request.set_size(6 * kMiB);
  auto first = state->AllocateSet(a, request, 1);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(first->skipped.empty());
  EXPECT_EQ((*first->grants[0]).buffer->heap(), "carveout");
  // 6 more MiB on carveout would pass its quota: system serves.
  auto second = state->AllocateSet(a, request, 1);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*second->grants[0]).buffer->heap(), "system");
  ASSERT_EQ(second->skipped.size(), 1u);
  EXPECT_EQ(second->skipped[0].reason(), v1::SKIP_REASON_QUOTA);
  EXPECT_EQ(SessionBytes(*state, a, "carveout"), 6 * kMiB);
  EXPECT_EQ(SessionBytes(*state, a, "system"), 6 * kMiB);
}

// Tests that a set whose heap runs out part-way (its pool empties at the
// third buffer) leaves nothing, and that the next heap of the list then gets
// the whole set, the skip saying why.
TEST_F(StateTest, AllocateSetUndoesAPartWhenThePoolRunsOut) {
  HeapRegistry heaps;
  ASSERT_TRUE(heaps
                  .Add(std::make_unique<testing::FakeHeap>(testing::FakeHeap::Options{
                      .name = "pooled", .kind = HeapKind::kContiguous, .pool_buffers = 2}))
                  .ok());
  ASSERT_TRUE(heaps
                  .Add(std::make_unique<testing::FakeHeap>(
                      testing::FakeHeap::Options{.name = "system"}))
                  .ok());
  DaemonState state(&heaps, {});
  const uint64_t a = Open(state, 1);
  absl::StatusOr<DaemonState::Allocation> set =
      state.AllocateSet(a, Request("pooled", kMiB), 3);
  ASSERT_EQ(set.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(set.status().message(), "heap 'pooled': its pool of 2 buffers is empty");
  EXPECT_EQ(SessionBytes(state, a, "pooled"), 0u);
  EXPECT_EQ(heaps.Find("pooled")->Stats().used, 0u);
  EXPECT_EQ(heaps.Find("pooled")->Stats().buffer_count, 0u);
  EXPECT_EQ(HeapsView(state).live_buffers(), 0u);

  v1::AllocateRequest request = Request("", kMiB);
  request.add_heaps("pooled");
  request.add_heaps("system");
  set = state.AllocateSet(a, request, 3);
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ(set->grants.size(), 3u);
  for (auto& grant : set->grants) EXPECT_EQ(grant->buffer->heap(), "system");
  ASSERT_EQ(set->skipped.size(), 1u);
  EXPECT_EQ(set->skipped[0].reason(), v1::SKIP_REASON_POOL_EMPTY);
  EXPECT_EQ(SessionBytes(state, a, "pooled"), 0u);
  EXPECT_EQ(SessionBytes(state, a, "system"), 3 * kMiB);
  // The pool got its two back: two fit again.
  set = absl::CancelledError();
  set = state.AllocateSet(a, Request("pooled", kMiB), 2);
  EXPECT_TRUE(set.ok()) << set.status();
}

}  // namespace bufferd
