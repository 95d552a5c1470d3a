// Graphics-style allocation against a real daemon: heap fallback by list and
// by usage (and why each heap was skipped), AllocateSet all or nothing,
// frames with a DRM fourcc and their plane layout seen by every holder,
// metadata a read-only holder cannot change, the CanAllocate dry run, and
// every bad input refused with nothing left behind.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <libdrm/drm_fourcc.h>
#include <sys/stat.h>

#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/unix_socket.h"
#include "bufferd/v1/buffer.grpc.pb.h"
#include "bufferd/v1/fd_channel.pb.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "google/protobuf/unknown_field_set.h"
#include "testing/daemon_test.h"

namespace bufferd {
namespace {

using ::bufferd::testing::Bufctl;
using ::bufferd::testing::DaemonTest;
using ::bufferd::testing::Eventually;
using ::bufferd::testing::OpenRawSession;
using ::bufferd::testing::ReadFile;
using ::bufferd::testing::SpawnPeer;
using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1 << 20;

// contiguous: 8 MiB of base pages (no hugepages needed); carveout: 4 MiB;
// system: 64 MiB. A session may hold 40 MiB per heap.
constexpr char kConfig[] = R"pb(
  heaps {
    name: "contiguous"
    type: HEAP_TYPE_CONTIGUOUS
    capacity_bytes: 8388608
    fallback: FALLBACK_BASE_PAGES
  }
  heaps { name: "carveout" type: HEAP_TYPE_CARVEOUT capacity_bytes: 4194304 }
  heaps { name: "system" type: HEAP_TYPE_SYSTEM capacity_bytes: 67108864 }
  quotas { max_bytes_per_session: 41943040 max_buffers_per_session: 64 }
  usages {
    name: "camera_frame"
    heaps: [ "contiguous", "carveout", "system" ]
  }
  usages { name: "cpu_scratch" heaps: "system" }
  limits { max_buffers_per_call: 8 max_frame_dimension: 4096 }
)pb";

class AllocationTest : public DaemonTest {
 protected:
  void SetUp() override { StartDaemon(kConfig); }

  // The heap as ListHeaps reports it (used ~0 if the call fails or there
  // is no such heap).
  v1::HeapInfo Heap(const std::string& name) {
    v1::HeapInfo missing;
    missing.set_used(~uint64_t{0});
    auto heaps = client_->ListHeaps();
    if (!heaps.ok()) return missing;
    for (const auto& heap : heaps->heaps()) {
      if (heap.name() == name) return heap;
    }
    return missing;
  }
  uint64_t HeapUsed(const std::string& name) { return Heap(name).used(); }

  // Bytes the test's session is charged on `heap`.
  uint64_t Charged(const std::string& heap) {
    auto clients = client_->ListClients();
    if (!clients.ok()) return ~uint64_t{0};
    for (const auto& c : clients->clients()) {
      if (c.session_id() != client_->session_id()) continue;
      for (const auto& b : c.bytes()) {
        if (b.heap() == heap) return b.bytes();
      }
    }
    return 0;
  }
};

TEST_F(AllocationTest, UsageFallsBackAndSaysWhyEachHeapWasSkipped) {
  absl::StatusOr<Buffer> filler =
      client_->Allocate({.heap = "contiguous", .size = 8 * kMiB, .name = "filler"});
  ASSERT_TRUE(filler.ok()) << filler.status();

  absl::StatusOr<Buffer> frame = client_->Allocate(
      {.usage = "camera_frame", .frame = FrameRequest{1920, 1080, DRM_FORMAT_NV12}});
  ASSERT_TRUE(frame.ok()) << frame.status();
  EXPECT_EQ(frame->heap(), "carveout");
  ASSERT_EQ(frame->skipped().size(), 1u);
  EXPECT_EQ(frame->skipped()[0].heap(), "contiguous");
  EXPECT_EQ(frame->skipped()[0].reason(), v1::SKIP_REASON_HEAP_FULL);
  EXPECT_THAT(frame->skipped()[0].message(), HasSubstr("heap 'contiguous' has 0 B free of 8 MiB"));

  // carveout is full now too: the next lands on system, past both.
  absl::StatusOr<Buffer> second = client_->Allocate(
      {.usage = "camera_frame", .frame = FrameRequest{1920, 1080, DRM_FORMAT_NV12}});
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->heap(), "system");
  ASSERT_EQ(second->skipped().size(), 2u);
  EXPECT_EQ(second->skipped()[1].heap(), "carveout");
  EXPECT_EQ(second->skipped()[1].reason(), v1::SKIP_REASON_HEAP_FULL);

  // An explicit list works the same, in its own order.
  absl::StatusOr<Buffer> listed =
      client_->Allocate({.heaps = {"carveout", "system"}, .size = 2 * kMiB});
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->heap(), "system");
  ASSERT_EQ(listed->skipped().size(), 1u);
  EXPECT_EQ(listed->skipped()[0].heap(), "carveout");
  // Quotas are charged per heap: on the heap that served.
  EXPECT_EQ(Charged("contiguous"), 8 * kMiB);
  EXPECT_EQ(Charged("carveout"), frame->size());
  EXPECT_EQ(Charged("system"), second->size() + listed->size());
}

// Tests that fallbacks and refusals are visible: a contiguous heap whose
// hugepage pool is empty logs its fallback once and shows its real backing
// mix and fallback count; quota, capacity and size refusals are counted per
// heap and reason in ListHeaps, the metrics and `bufctl heaps`, and logged.
TEST_F(AllocationTest, FallbacksAndRefusalsAreCountedLoggedAndShown) {
  if (Heap("contiguous").hugepages().free_pages() != 0) {
    GTEST_SKIP() << "the 2 MiB hugepage pool has free pages: the heap would not fall back";
  }
  std::vector<Buffer> buffers;
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<Buffer> buffer = client_->Allocate({.heap = "contiguous", .size = kMiB});
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    EXPECT_EQ(buffer->info().backing(), v1::BACKING_BASE_PAGES);
    buffers.push_back(*std::move(buffer));
  }
  v1::HeapInfo contiguous = Heap("contiguous");
  EXPECT_EQ(contiguous.backing(), v1::BACKING_HUGETLB_2M) << "what it tries first";
  EXPECT_EQ(contiguous.fallbacks().at("base_pages"), 3u);
  EXPECT_EQ(contiguous.buffers_by_backing().at("base_pages"), 3u);
  EXPECT_THAT(contiguous.last_fallback(), HasSubstr("hugetlb 2 MiB pool has 0 of"));
  EXPECT_EQ(contiguous.free(), 5 * kMiB) << "capacity - used: the fallback has room";

  absl::StatusOr<Buffer> full = client_->Allocate({.heap = "carveout", .size = 4 * kMiB});
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(client_->Allocate({.heap = "carveout", .size = kMiB}).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(client_->Allocate({.heap = "carveout", .size = 8 * kMiB}).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(client_->Allocate({.heap = "system", .size = 41 * kMiB}).status().code(),
            absl::StatusCode::kResourceExhausted);
  using Counts = std::map<std::string, uint64_t>;
  const v1::HeapInfo carveout = Heap("carveout");
  EXPECT_EQ(Counts(carveout.failures_by_reason().begin(), carveout.failures_by_reason().end()),
            (Counts{{"heap_full", 1}, {"too_large", 1}}));
  EXPECT_EQ(carveout.failures(), 2u);
  const v1::HeapInfo system = Heap("system");
  EXPECT_EQ(Counts(system.failures_by_reason().begin(), system.failures_by_reason().end()),
            (Counts{{"quota", 1}}));

  absl::StatusOr<std::string> metrics = client_->Metrics();
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_THAT(*metrics,
              HasSubstr("bufferd_alloc_failures_total{heap=\"system\",reason=\"quota\"} 1\n"));
  EXPECT_THAT(
      *metrics,
      HasSubstr("bufferd_alloc_failures_total{heap=\"carveout\",reason=\"heap_full\"} 1\n"));
  EXPECT_THAT(*metrics,
              HasSubstr("bufferd_alloc_failures_total{heap=\"system\",reason=\"fd_budget\"} 0\n"));
  EXPECT_THAT(
      *metrics,
      HasSubstr("bufferd_heap_fallbacks_total{heap=\"contiguous\",backing=\"base_pages\"} 3\n"));

  const std::string table = Bufctl(daemon_->socket_dir(), "heaps");
  EXPECT_THAT(table, HasSubstr("base_pages (wants hugetlb_2m)"));
  EXPECT_THAT(table, HasSubstr("carveout: refused heap_full 1, too_large 1"));
  EXPECT_THAT(table, HasSubstr("system: refused quota 1"));
  EXPECT_THAT(table, HasSubstr("contiguous: fell back base_pages 3 (last: hugetlb 2 MiB pool"));

  const std::string log = ReadFile(daemon_->log_path());
  const std::string fell_back = "heap 'contiguous' fell back to base_pages";
  int lines = 0;
  for (size_t at = log.find(fell_back); at != std::string::npos; at = log.find(fell_back, at + 1)) {
    ++lines;
  }
  EXPECT_EQ(lines, 1) << "logged once, not per buffer: " << log;
  EXPECT_THAT(
      log, HasSubstr("allocation on heap 'system' refused (quota): quota max_bytes_per_session"));
  EXPECT_THAT(log, HasSubstr("allocation on heap 'carveout' refused (heap_full)"));
  buffers.clear();
  full = absl::UnavailableError("released");
  ExpectBaseline();
}

TEST_F(AllocationTest, WhenNoHeapServesOneMessageGivesEveryReason) {
  // 48 MiB: more than contiguous and carveout hold at all, and over the
  // session's 40 MiB quota on system.
  const uint64_t buffers_before = LiveBuffers();
  absl::StatusOr<Buffer> refused = client_->Allocate({.usage = "camera_frame", .size = 48 * kMiB});
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_EQ(refused.status().message(),
            "no heap could serve 48 MiB: heap 'contiguous' holds 8 MiB in all, asked for 48 MiB; "
            "heap 'carveout' holds 4 MiB in all, asked for 48 MiB; quota max_bytes_per_session "
            "on heap 'system': session " +
                absl::StrCat(client_->session_id()) + " holds 0 B of 40 MiB, asked for 48 MiB");
  EXPECT_EQ(LiveBuffers(), buffers_before);

  // The dry run says the same, allocating nothing.
  absl::StatusOr<v1::CanAllocateResponse> dry =
      client_->CanAllocate({.usage = "camera_frame", .size = 48 * kMiB});
  ASSERT_TRUE(dry.ok()) << dry.status();
  EXPECT_FALSE(dry->ok());
  EXPECT_EQ(dry->message(), refused.status().message());
  ASSERT_EQ(dry->skipped_size(), 3);
  EXPECT_EQ(dry->skipped(0).reason(), v1::SKIP_REASON_TOO_LARGE);
  EXPECT_EQ(dry->skipped(1).reason(), v1::SKIP_REASON_TOO_LARGE);
  EXPECT_EQ(dry->skipped(2).reason(), v1::SKIP_REASON_QUOTA);
  ExpectBaseline();
}

TEST_F(AllocationTest, CanAllocateAnswersWithTheHeapAndTheLayout) {
  absl::StatusOr<v1::CanAllocateResponse> dry = client_->CanAllocate(
      {.usage = "camera_frame", .frame = FrameRequest{3840, 2160, DRM_FORMAT_NV12}});
  ASSERT_TRUE(dry.ok()) << dry.status();
  // 12,441,600 bytes: more than contiguous (8 MiB) and carveout hold.
  EXPECT_TRUE(dry->ok()) << dry->message();
  EXPECT_EQ(dry->heap(), "system");
  EXPECT_EQ(dry->size(), 12443648u) << "rounded to system's 4 KiB page";
  ASSERT_EQ(dry->frame().planes_size(), 2);
  EXPECT_EQ(dry->frame().planes(1).offset(), 3840u * 2160);
  EXPECT_EQ(dry->skipped_size(), 2);
  // Three of them would exceed the 40 MiB quota on system.
  dry = client_->CanAllocate(
      {.usage = "camera_frame", .frame = FrameRequest{3840, 2160, DRM_FORMAT_NV12}}, 4);
  ASSERT_TRUE(dry.ok()) << dry.status();
  EXPECT_FALSE(dry->ok());
  EXPECT_EQ(dry->skipped(2).reason(), v1::SKIP_REASON_QUOTA);
  EXPECT_EQ(LiveBuffers(), 0u);

  // bufctl prints the same.
  const std::string printed =
      Bufctl(daemon_->socket_dir(), "can-allocate --usage camera_frame --frame 3840x2160:NV12");
  EXPECT_THAT(printed, HasSubstr("yes: heap 'system', 11.9 MiB"));
  EXPECT_THAT(printed, HasSubstr("frame 3840x2160 NV12 LINEAR, 12441600 bytes"));
  EXPECT_THAT(printed, HasSubstr("plane 1: offset 8294400, stride 3840, 4147200 bytes"));
  EXPECT_THAT(printed, HasSubstr("skipped carveout (too_large)"));
  ExpectBaseline();
}

TEST_F(AllocationTest, AllocateSetIsAllOrNothing) {
  // Another session and this one leave system 20 MiB: two 8 MiB buffers
  // would fit, a third would not, so the set is refused whole. (A set whose
  // heap runs out part-way is undone too: //daemon:state_test.)
  absl::StatusOr<Client> other = Client::Connect(daemon_->socket_dir());
  ASSERT_TRUE(other.ok()) << other.status();
  absl::StatusOr<Buffer> hog = other->Allocate({.heap = "system", .size = 40 * kMiB});
  absl::StatusOr<Buffer> hog2 = client_->Allocate({.heap = "system", .size = 4 * kMiB});
  ASSERT_TRUE(hog.ok() && hog2.ok());
  const uint64_t used = HeapUsed("system");
  const int fds = daemon_->OpenFds();

  absl::StatusOr<std::vector<Buffer>> set =
      client_->AllocateSet(3, {.heap = "system", .size = 8 * kMiB, .name = "swapchain"});
  ASSERT_EQ(set.status().code(), absl::StatusCode::kResourceExhausted) << set.status();
  EXPECT_EQ(set.status().message(),
            "heap 'system' has 20 MiB free of 64 MiB, asked for 3 x 8 MiB");
  // Nothing was made: heap bytes, quota and fds exact.
  EXPECT_TRUE(Eventually([&] { return HeapUsed("system") == used; })) << HeapUsed("system");
  EXPECT_EQ(Charged("system"), 4 * kMiB);
  EXPECT_TRUE(Eventually([&] { return daemon_->OpenFds() == fds; }));

  // Two fit, and the quota is exact afterwards.
  set = client_->AllocateSet(2, {.heap = "system", .size = 8 * kMiB, .name = "swapchain"});
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ(set->size(), 2u);
  EXPECT_EQ(Charged("system"), 20 * kMiB);
  EXPECT_NE((*set)[0].id(), (*set)[1].id());
  EXPECT_NE((*set)[0].fd(), (*set)[1].fd());
  set->clear();
  hog = absl::CancelledError();
  hog2 = absl::CancelledError();
  other = absl::CancelledError();
  ExpectBaseline();
}

TEST_F(AllocationTest, AllocateSetFallsBackAsOneAndQuotaIsCheckedForAll) {
  const v1::HeapInfo before = Heap("carveout");
  // Three 2 MiB frames do not fit carveout (4 MiB): all three land on system,
  // and carveout is not made to punch and prefault the two that would fit.
  absl::StatusOr<std::vector<Buffer>> set =
      client_->AllocateSet(3, {.heaps = {"carveout", "system"}, .size = 2 * kMiB});
  ASSERT_TRUE(set.ok()) << set.status();
  for (const Buffer& buffer : *set) {
    EXPECT_EQ(buffer.heap(), "system");
    ASSERT_EQ(buffer.skipped().size(), 1u);
    EXPECT_EQ(buffer.skipped()[0].reason(), v1::SKIP_REASON_HEAP_FULL);
    EXPECT_EQ(buffer.skipped()[0].message(),
              "heap 'carveout' has 4 MiB free of 4 MiB, asked for 3 x 2 MiB");
  }
  EXPECT_EQ(Heap("carveout").allocations(), before.allocations()) << "none was made on carveout";
  EXPECT_EQ(Heap("carveout").failures(), before.failures() + 1) << "the refusal is counted";
  EXPECT_EQ(HeapUsed("carveout"), 0u);
  set->clear();
  // 6 x 8 MiB is over the 40 MiB session quota: refused before any is made.
  set = client_->AllocateSet(6, {.heap = "system", .size = 8 * kMiB});
  EXPECT_EQ(set.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(set.status().message(), HasSubstr("quota max_bytes_per_session on heap 'system'"));
  ExpectBaseline();
}

TEST_F(AllocationTest, AllocateSetFdsArriveInOneRecord) {
  absl::StatusOr<testing::RawSession> raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok()) << raw.status();
  v1::AllocateSetRequest request;
  request.set_count(8);
  request.mutable_request()->set_heap("system");
  request.mutable_request()->set_size(4096);
  v1::AllocateSetResponse response;
  grpc::Status status = raw->stub->AllocateSet(raw->Context().get(), request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.buffers_size(), 8);
  absl::StatusOr<UnixSocket::Received> record = raw->socket.RecvWithFds(4096, true);
  ASSERT_TRUE(record.ok()) << record.status();
  v1::FdChannelMessage message;
  ASSERT_TRUE(message.ParseFromString(record->bytes));
  ASSERT_TRUE(message.has_deliveries());
  ASSERT_EQ(message.deliveries().deliveries_size(), 8);
  ASSERT_EQ(record->fds.size(), 8u);
  std::set<uint64_t> inodes;
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(message.deliveries().deliveries(i).transfer_id(), response.buffers(i).transfer_id());
    EXPECT_EQ(message.deliveries().deliveries(i).object_id(),
              response.buffers(i).buffer().buffer_id());
    struct stat st {};
    ASSERT_EQ(::fstat(record->fds[i].get(), &st), 0);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), response.buffers(i).buffer().size());
    inodes.insert(st.st_ino);
  }
  EXPECT_EQ(inodes.size(), 8u);
  // Nothing more on the socket.
  EXPECT_FALSE(raw->socket.RecvWithFds(4096, true).ok());
  raw = absl::CancelledError();  // ends the session: its handles go
  ExpectBaseline();
}

TEST_F(AllocationTest, Nv12LayoutAndPixelsReachAnotherProcess) {
  absl::StatusOr<Buffer> frame =
      client_->Allocate({.heap = "system",
                         .frame = FrameRequest{1920, 1080, DRM_FORMAT_NV12},
                         .metadata = FrameMetadata{.crop = Rect{0, 0, 1920, 1080},
                                                   .color_space = v1::COLOR_SPACE_BT709,
                                                   .color_range = v1::COLOR_RANGE_LIMITED,
                                                   .tag = "cam0"},
                         .name = "nv12"});
  ASSERT_TRUE(frame.ok()) << frame.status();
  const std::optional<FrameFormat> layout = frame->frame();
  ASSERT_TRUE(layout.has_value());
  ASSERT_EQ(layout->planes.size(), 2u);
  EXPECT_EQ(layout->planes[0].offset, 0u);
  EXPECT_GE(layout->planes[0].stride, 1920u);
  // The documented offset: Y's stride x height, rounded to the alignment.
  EXPECT_EQ(layout->planes[1].offset, uint64_t{layout->planes[0].stride} * 1080);
  EXPECT_EQ(layout->size, uint64_t{1920} * 1080 * 3 / 2);
  EXPECT_GE(frame->size(), layout->size);
  // Row r of plane p starts with 10 * p + r.
  absl::StatusOr<Mapping> map = frame->Map();
  ASSERT_TRUE(map.ok()) << map.status();
  for (size_t p = 0; p < layout->planes.size(); ++p) {
    for (int row = 0; row < 4; ++row) {
      map->data()[layout->planes[p].offset + row * layout->planes[p].stride] =
          static_cast<uint8_t>(10 * p + row);
    }
  }
  absl::StatusOr<std::string> token = frame->Export(Access::kReadOnly);
  ASSERT_TRUE(token.ok()) << token.status();
  auto peer = SpawnPeer({"frame-read", daemon_->socket_dir(), *token});
  ASSERT_TRUE(peer.ok()) << peer.status();
  EXPECT_EQ(peer->ReadLine(),
            absl::StrCat("frame 1920x1080 fourcc=", DRM_FORMAT_NV12, " planes=2 size=3110400"));
  EXPECT_EQ(peer->ReadLine(), "plane=0 offset=0 stride=1920 size=2073600 rows=0,1,2,3");
  EXPECT_EQ(peer->ReadLine(), "plane=1 offset=2073600 stride=1920 size=1036800 rows=10,11,12,13");
  EXPECT_EQ(peer->ReadLine(), "tag=cam0 generation=0 crop=1920x1080");
  EXPECT_EQ(peer->ReadLine(), "set_metadata=PERMISSION_DENIED");
  EXPECT_EQ(peer->Wait(), 0);

  // bufctl buffers names the format.
  EXPECT_THAT(Bufctl(daemon_->socket_dir(), "buffers"), HasSubstr("1920x1080 NV12"));
  map = absl::CancelledError();
  frame = absl::CancelledError();
  ExpectBaseline();
}

// The library lays out the frames it allocates itself (the daemon leaves
// the layout out of its answer): for every format, odd sizes and every
// alignment, as one buffer and as a set, its layout is the daemon's own
// (GetBuffer's, after Refresh).
TEST_F(AllocationTest, TheLibraryLaysOutEveryFrameAsTheDaemonDoes) {
  const uint32_t fourccs[] = {DRM_FORMAT_XRGB8888, DRM_FORMAT_ARGB8888, DRM_FORMAT_XBGR8888,
                              DRM_FORMAT_ABGR8888, DRM_FORMAT_RGB565,   DRM_FORMAT_NV12,
                              DRM_FORMAT_NV21,     DRM_FORMAT_YUV420,   DRM_FORMAT_YVU420,
                              DRM_FORMAT_P010};
  for (const uint32_t fourcc : fourccs) {
    for (const uint32_t alignment : {0u, 1u, 256u, 4096u}) {
      const std::string what = absl::StrCat(FourccName(fourcc), " alignment ", alignment);
      const AllocateOptions options{
          .heap = "system",
          .frame = FrameRequest{
              .width = 37, .height = 19, .fourcc = fourcc, .stride_alignment = alignment}};
      absl::StatusOr<std::vector<Buffer>> set = client_->AllocateSet(2, options);
      ASSERT_TRUE(set.ok()) << what << ": " << set.status();
      absl::StatusOr<Buffer> one = client_->Allocate(options);
      ASSERT_TRUE(one.ok()) << what << ": " << one.status();
      set->push_back(*std::move(one));
      for (Buffer& buffer : *set) {
        const std::optional<FrameFormat> mine = buffer.frame();
        ASSERT_TRUE(mine.has_value()) << what;
        // The wire form the library builds, as the daemon's would be.
        const std::string mine_proto = buffer.info().frame().SerializeAsString();
        ASSERT_TRUE(buffer.Refresh().ok()) << what;
        EXPECT_EQ(buffer.frame(), mine) << what << ": " << buffer.info().DebugString();
        EXPECT_EQ(buffer.info().frame().SerializeAsString(), mine_proto) << what;
        EXPECT_EQ(buffer.frame()->fourcc, fourcc) << what;
      }
    }
  }
  ExpectBaseline();
}

TEST_F(AllocationTest, MetadataChangesReachEveryHolderAndGenerationsGuardThem) {
  absl::StatusOr<Buffer> frame =
      client_->Allocate({.heap = "system", .frame = FrameRequest{640, 480, DRM_FORMAT_XRGB8888}});
  ASSERT_TRUE(frame.ok()) << frame.status();
  absl::StatusOr<std::string> token = frame->Export(Access::kReadWrite);
  ASSERT_TRUE(token.ok());
  absl::StatusOr<Client> other = Client::Connect(daemon_->socket_dir());
  ASSERT_TRUE(other.ok());
  absl::StatusOr<Buffer> imported = other->Import(*token);
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ(imported->frame(), frame->frame());
  EXPECT_EQ(imported->metadata().generation, 0u);

  FrameMetadata metadata{.crop = Rect{8, 8, 624, 464}, .tag = "first"};
  ASSERT_TRUE(frame->SetMetadata(metadata).ok());
  EXPECT_EQ(frame->metadata().generation, 1u);
  ASSERT_TRUE(imported->Refresh().ok());
  EXPECT_EQ(imported->metadata().tag, "first");
  EXPECT_EQ(imported->metadata().crop, (Rect{8, 8, 624, 464}));

  // A change based on a stale generation is refused and changes nothing.
  FrameMetadata stale = frame->metadata();
  FrameMetadata newer = frame->metadata();
  newer.tag = "second";
  ASSERT_TRUE(imported->SetMetadata(newer).ok());
  stale.tag = "lost update";
  absl::Status conflict = frame->SetMetadata(stale);
  EXPECT_EQ(conflict.code(), absl::StatusCode::kFailedPrecondition) << conflict;
  EXPECT_THAT(std::string(conflict.message()),
              HasSubstr("expected_generation 1 is not current"));
  ASSERT_TRUE(frame->Refresh().ok());
  EXPECT_EQ(frame->metadata().tag, "second");
  EXPECT_EQ(frame->metadata().generation, 2u);
  // Overwriting is explicit.
  ASSERT_TRUE(frame->SetMetadata(stale, /*overwrite=*/true).ok());
  EXPECT_EQ(frame->metadata().tag, "lost update");
  EXPECT_EQ(frame->metadata().generation, 3u);
  imported = absl::CancelledError();
  other = absl::CancelledError();
  frame = absl::CancelledError();
  ExpectBaseline();
}

TEST_F(AllocationTest, TheFirstChangeIsGuardedToo) {
  absl::StatusOr<Buffer> frame = client_->Allocate(
      {.heap = "system",
       .frame = FrameRequest{64, 64, DRM_FORMAT_ABGR8888},
       .metadata = FrameMetadata{.tag = "orig"}});
  ASSERT_TRUE(frame.ok()) << frame.status();
  absl::StatusOr<std::string> token = frame->Export(Access::kReadWrite);
  ASSERT_TRUE(token.ok());
  absl::StatusOr<Buffer> imported = client_->Import(*token);
  ASSERT_TRUE(imported.ok());
  // Both read generation 0; the first change wins, the second is refused.
  FrameMetadata first = frame->metadata();
  FrameMetadata second = imported->metadata();
  EXPECT_EQ(first.generation, 0u);
  first.tag = "writer1";
  second.tag = "writer2";
  ASSERT_TRUE(frame->SetMetadata(first).ok());
  absl::Status refused = imported->SetMetadata(second);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition) << refused;
  ASSERT_TRUE(imported->Refresh().ok());
  EXPECT_EQ(imported->metadata().tag, "writer1");
  // The generation is the daemon's: a request setting it is refused.
  v1::SetMetadataRequest request;
  request.set_handle(frame->handle());
  request.mutable_metadata()->set_generation(7);
  absl::StatusOr<testing::RawSession> raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok());
  v1::SetMetadataResponse response;
  grpc::Status status = raw->stub->SetMetadata(raw->Context().get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(),
            "metadata.generation is the daemon's to set; guard a change with expected_generation");
  raw = absl::CancelledError();
  imported = absl::CancelledError();
  frame = absl::CancelledError();
  ExpectBaseline();
}

// One bad request through the raw stub: the code and message, and nothing
// allocated.
struct BadCase {
  std::string what;
  std::function<void(v1::AllocateSetRequest&)> edit;
  absl::StatusCode code;
  std::string message;
};

TEST_F(AllocationTest, BadRequestsAreRefusedByNameAndLeaveNothing) {
  absl::StatusOr<testing::RawSession> raw = OpenRawSession(daemon_->socket_dir());
  ASSERT_TRUE(raw.ok()) << raw.status();
  auto frame = [](v1::AllocateSetRequest& r) -> v1::FrameRequest& {
    r.mutable_request()->set_size(0);
    return *r.mutable_request()->mutable_frame();
  };
  const std::vector<BadCase> cases = {
      {"zero width", [&](auto& r) { frame(r).set_width(0); }, absl::StatusCode::kInvalidArgument,
       "frame.width must be at least 1"},
      {"width above the maximum", [&](auto& r) { frame(r).set_width(4097); },
       absl::StatusCode::kInvalidArgument,
       "frame.width 4097 is above the maximum of 4096 (limits.max_frame_dimension)"},
      {"overflowing size",
       [&](auto& r) {
         frame(r).set_width(UINT32_MAX);
         frame(r).set_height(UINT32_MAX);
       },
       absl::StatusCode::kInvalidArgument, "frame.width 4294967295 is above the maximum of 4096"},
      {"unknown fourcc", [&](auto& r) { frame(r).set_fourcc(0x31313131); },
       absl::StatusCode::kInvalidArgument,
       "frame.fourcc '1111' (0x31313131) is not a format bufferd lays out; it knows XRGB8888"},
      {"tiled modifier", [&](auto& r) { frame(r).set_modifier(I915_FORMAT_MOD_X_TILED); },
       absl::StatusCode::kInvalidArgument,
       "frame.modifier 0x100000000000001 is not DRM_FORMAT_MOD_LINEAR (0)"},
      {"stride alignment not a power of two", [&](auto& r) { frame(r).set_stride_alignment(96); },
       absl::StatusCode::kInvalidArgument,
       "frame.stride_alignment 96 must be a power of two up to 4096 (or 0 for 64)"},
      {"size and frame",
       [&](auto& r) {
         frame(r);
         r.mutable_request()->set_size(4096);
       },
       absl::StatusCode::kInvalidArgument, "size and frame are both set"},
      {"count 0", [](auto& r) { r.set_count(0); }, absl::StatusCode::kInvalidArgument,
       "count must be at least 1"},
      {"count above the per-call limit", [](auto& r) { r.set_count(9); },
       absl::StatusCode::kInvalidArgument,
       "count 9 is above the per-call limit of 8 (limits.max_buffers_per_call)"},
      {"unknown usage",
       [](auto& r) {
         r.mutable_request()->clear_heap();
         r.mutable_request()->set_usage("video_decode");
       },
       absl::StatusCode::kNotFound,
       "unknown usage 'video_decode' (usages: camera_frame, cpu_scratch)"},
      {"empty heap list", [](auto& r) { r.mutable_request()->clear_heap(); },
       absl::StatusCode::kInvalidArgument,
       "no heap given: set heap, heaps (a non-empty list) or usage"},
      {"heap and heaps", [](auto& r) { r.mutable_request()->add_heaps("system"); },
       absl::StatusCode::kInvalidArgument,
       "heap, heaps and usage are alternatives: set exactly one of them"},
      {"a heap listed twice",
       [](auto& r) {
         r.mutable_request()->clear_heap();
         r.mutable_request()->add_heaps("system");
         r.mutable_request()->add_heaps("system");
       },
       absl::StatusCode::kInvalidArgument, "heaps[1] 'system' is listed twice"},
      {"an empty heap in the list",
       [](auto& r) {
         r.mutable_request()->clear_heap();
         r.mutable_request()->add_heaps("");
       },
       absl::StatusCode::kInvalidArgument, "heaps[0] is empty"},
      {"tag over 64 bytes",
       [](auto& r) { r.mutable_request()->mutable_metadata()->set_tag(std::string(65, 't')); },
       absl::StatusCode::kInvalidArgument, "metadata.tag is 65 bytes; at most 64"},
      {"crop outside the frame",
       [&](auto& r) {
         frame(r);
         auto* crop = r.mutable_request()->mutable_metadata()->mutable_crop();
         crop->set_x(600);
         crop->set_width(100);
         crop->set_height(10);
       },
       absl::StatusCode::kInvalidArgument,
       "metadata.crop 100x10+600+0 reaches outside the 640x480 frame"},
      {"crop on a plain buffer",
       [](auto& r) { r.mutable_request()->mutable_metadata()->mutable_crop()->set_width(1); },
       absl::StatusCode::kInvalidArgument, "metadata.crop is set on a buffer that is not a frame"},
      {"unknown colour space",
       [](auto& r) {
         r.mutable_request()->mutable_metadata()->set_color_space(static_cast<v1::ColorSpace>(77));
       },
       absl::StatusCode::kInvalidArgument, "metadata.color_space 77 is not a known ColorSpace"},
      {"generation at Allocate",
       [](auto& r) { r.mutable_request()->mutable_metadata()->set_generation(3); },
       absl::StatusCode::kInvalidArgument, "metadata.generation is the daemon's to set"},
      {"an unknown field",
       [](auto& r) {
         r.mutable_request()
             ->GetReflection()
             ->MutableUnknownFields(r.mutable_request())
             ->AddVarint(99, 1);
       },
       absl::StatusCode::kInvalidArgument,
       "request.request has field number 99, which this daemon does not know (a newer client?)"},
      {"an unknown field in the frame",
       [&](auto& r) {
         frame(r).GetReflection()->MutableUnknownFields(&frame(r))->AddVarint(42, 1);
       },
       absl::StatusCode::kInvalidArgument, "request.request.frame has field number 42"},
      {"an unknown field in the crop, three messages down",
       [](auto& r) {
         v1::Rect* crop = r.mutable_request()->mutable_metadata()->mutable_crop();
         crop->GetReflection()->MutableUnknownFields(crop)->AddVarint(17, 1);
       },
       absl::StatusCode::kInvalidArgument, "request.request.metadata.crop has field number 17"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.what);
    v1::AllocateSetRequest request;
    request.set_count(2);
    request.mutable_request()->set_heap("system");
    request.mutable_request()->set_size(4096);
    if (c.what.find("frame") != std::string::npos || c.what.find("fourcc") != std::string::npos ||
        c.what.find("width") != std::string::npos || c.what.find("size") != std::string::npos ||
        c.what.find("modifier") != std::string::npos ||
        c.what.find("stride") != std::string::npos) {
      auto* f = request.mutable_request()->mutable_frame();
      f->set_width(640);
      f->set_height(480);
      f->set_fourcc(DRM_FORMAT_XRGB8888);
      request.mutable_request()->set_size(0);
    }
    c.edit(request);
    v1::AllocateSetResponse response;
    grpc::Status status = raw->stub->AllocateSet(raw->Context().get(), request, &response);
    EXPECT_EQ(static_cast<int>(status.error_code()), static_cast<int>(c.code))
        << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.message));
    EXPECT_EQ(response.buffers_size(), 0);
    // The dry run refuses it alike (but for the count, which it treats as
    // a number of buffers to check).
    if (request.count() != 0 && request.count() <= 8) {
      v1::CanAllocateRequest dry;
      *dry.mutable_request() = request.request();
      dry.set_count(request.count());
      v1::CanAllocateResponse answer;
      grpc::Status dry_status = raw->stub->CanAllocate(raw->Context().get(), dry, &answer);
      EXPECT_EQ(static_cast<int>(dry_status.error_code()), static_cast<int>(c.code));
      if (c.what.find("unknown field") == std::string::npos) {
        EXPECT_THAT(dry_status.error_message(), HasSubstr(c.message));
      }
    }
    EXPECT_EQ(LiveBuffers(), 0u);
    EXPECT_EQ(Charged("system"), 0u);
  }
  // A plain Allocate is checked for unknown fields too, in every message
  // it holds (its check takes another way than AllocateSet's).
  const std::pair<std::string, std::function<google::protobuf::Message*(v1::AllocateRequest&)>>
      levels[] = {
          {"request", [](v1::AllocateRequest& r) -> google::protobuf::Message* { return &r; }},
          {"request.frame", [](v1::AllocateRequest& r) { return r.mutable_frame(); }},
          {"request.metadata", [](v1::AllocateRequest& r) { return r.mutable_metadata(); }},
          {"request.metadata.crop",
           [](v1::AllocateRequest& r) { return r.mutable_metadata()->mutable_crop(); }},
      };
  for (const auto& [where, message_in] : levels) {
    SCOPED_TRACE(where);
    v1::AllocateRequest plain;
    plain.set_heap("system");
    plain.mutable_frame()->set_width(64);
    plain.mutable_frame()->set_height(64);
    plain.mutable_frame()->set_fourcc(DRM_FORMAT_XRGB8888);
    plain.mutable_metadata()->mutable_crop()->set_width(8);
    plain.mutable_metadata()->mutable_crop()->set_height(8);
    v1::AllocateResponse allocated;
    // Sound as it stands: allocated and released.
    grpc::Status status = raw->stub->Allocate(raw->Context().get(), plain, &allocated);
    ASSERT_TRUE(status.ok()) << status.error_message();
    v1::ReleaseRequest release;
    release.set_handle(allocated.handle());
    v1::ReleaseResponse released;
    ASSERT_TRUE(raw->stub->Release(raw->Context().get(), release, &released).ok());
    google::protobuf::Message* message = message_in(plain);
    message->GetReflection()->MutableUnknownFields(message)->AddVarint(99, 1);
    status = raw->stub->Allocate(raw->Context().get(), plain, &allocated);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(status.error_message(),
              where +
                  " has field number 99, which this daemon does not know (a newer client?); "
                  "nothing was done");
    EXPECT_TRUE(testing::Eventually([&] { return LiveBuffers() == 0; }));
  }
  raw = absl::CancelledError();
  ExpectBaseline();
}

// The daemon checks an Allocate request for unknown fields without
// reflection, looking into the messages listed here; a message field added
// to AllocateRequest (or to one in it) must be added there
// (CheckNoUnknownFields in daemon/requests.cc) and here.
TEST(AllocateRequestShape, HoldsTheMessagesTheUnknownFieldCheckLooksInto) {
  std::vector<std::string> paths;
  std::function<void(const google::protobuf::Descriptor&, const std::string&)> walk =
      [&](const google::protobuf::Descriptor& descriptor, const std::string& prefix) {
        for (int i = 0; i < descriptor.field_count(); ++i) {
          const google::protobuf::FieldDescriptor& field = *descriptor.field(i);
          if (field.cpp_type() != google::protobuf::FieldDescriptor::CPPTYPE_MESSAGE) continue;
          const std::string path = prefix + std::string(field.name());
          paths.push_back(field.is_repeated() ? path + "[]" : path);
          walk(*field.message_type(), path + ".");
        }
      };
  walk(*v1::AllocateRequest::descriptor(), "");
  EXPECT_THAT(paths, ::testing::ElementsAre("frame", "metadata", "metadata.crop"));
}

TEST_F(AllocationTest, BadMetadataChangesAreRefused) {
  absl::StatusOr<Buffer> frame =
      client_->Allocate({.heap = "system", .frame = FrameRequest{64, 64, DRM_FORMAT_RGB565}});
  ASSERT_TRUE(frame.ok()) << frame.status();
  EXPECT_EQ(frame->SetMetadata({.tag = std::string(65, 'x')}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(frame->SetMetadata({.crop = Rect{0, 0, 0, 0}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(frame->SetMetadata({.color_range = static_cast<v1::ColorRange>(9)}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(frame->SetMetadata({.generation = 5}).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(frame->Refresh().ok());
  EXPECT_EQ(frame->metadata(), FrameMetadata{}) << "nothing changed";
  // A read-only holder may read, not change.
  absl::StatusOr<std::string> token = frame->Export(Access::kReadOnly);
  ASSERT_TRUE(token.ok());
  absl::StatusOr<Buffer> reader = client_->Import(*token);
  ASSERT_TRUE(reader.ok());
  absl::Status denied = reader->SetMetadata({.tag = "mine"});
  EXPECT_EQ(denied.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(denied.message(),
            absl::StrCat("handle ", reader->handle(),
                         " is read-only; only a read-write holder may change metadata"));
  reader = absl::CancelledError();
  frame = absl::CancelledError();
  ExpectBaseline();
}

}  // namespace
}  // namespace bufferd
