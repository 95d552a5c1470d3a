// Heap tests that need the kernel's hugetlb pool or shmem THP. They change
// /sys settings (as root), restore them, and skip with the reason otherwise.
// The target is `exclusive`: the settings are machine-wide.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>

#include "absl/time/clock.h"
#include "base/mapping.h"
#include "heaps/carveout_heap.h"
#include "heaps/contiguous_heap.h"
#include "heaps/hugepage_testing.h"

namespace bufferd {
namespace {

constexpr uint64_t kMiB = 1 << 20;

// Reserves `extra` more 2 MiB pages for the test's lifetime.
class HugepagePoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HugepagePoolState pool = ReadHugepagePool(kHugePage2M);
    setting_ =
        std::make_unique<ScopedKernelSetting>(kNrHugepages2M, std::to_string(pool.total + kExtra));
    if (!setting_->ok()) GTEST_SKIP() << setting_->why();
    if (ReadHugepagePool(kHugePage2M).free < kExtra) {
      GTEST_SKIP() << "kernel could not reserve " << kExtra << " huge pages";
    }
  }
  static constexpr uint64_t kExtra = 8;
  std::unique_ptr<ScopedKernelSetting> setting_;
};

// Tests that the contiguous heap takes pages from the hugetlb pool, rounds to
// 2 MiB, reports hugetlb_2m, and gives the pages back on free.
TEST_F(HugepagePoolTest, ContiguousHeapUsesHugetlb) {
  ContiguousHeap heap(ContiguousHeap::Options{});
  const uint64_t free_before = ReadHugepagePool(kHugePage2M).free;
  {
    auto buffer = heap.Allocate(3 * kMiB, "hp");
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    EXPECT_EQ((*buffer)->size(), 4 * kMiB);
    EXPECT_EQ((*buffer)->backing(), Backing::kHugetlb2M);
    EXPECT_EQ(ReadHugepagePool(kHugePage2M).free, free_before - 2) << "pages are taken now";
    auto map = Mapping::Create((*buffer)->fd(), (*buffer)->size(), Mapping::Protection::kReadWrite);
    ASSERT_TRUE(map.ok()) << map.status();
    EXPECT_EQ(map->data()[0], 0);
    EXPECT_EQ(map->data()[4 * kMiB - 1], 0);
    std::memset(map->data(), 7, map->size());
  }
  EXPECT_EQ(ReadHugepagePool(kHugePage2M).free, free_before);
}

// Tests that when the pool runs dry the heap falls back (here to base pages)
// and says so per buffer.
TEST_F(HugepagePoolTest, FallsBackWhenPoolRunsDry) {
  ContiguousHeap::Options options;
  options.fallbacks = {Backing::kBasePages};
  ContiguousHeap heap(options);
  const uint64_t free_pages = ReadHugepagePool(kHugePage2M).free;
  auto all = heap.Allocate(free_pages * kHugePage2M, "all");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ((*all)->backing(), Backing::kHugetlb2M);
  auto more = heap.Allocate(2 * kMiB, "more");
  ASSERT_TRUE(more.ok()) << more.status();
  EXPECT_EQ((*more)->backing(), Backing::kBasePages);
  HeapStats stats = heap.Stats();
  EXPECT_EQ(stats.buffers_by_backing["hugetlb_2m"], 1u);
  EXPECT_EQ(stats.buffers_by_backing["base_pages"], 1u);
}

// Tests that an allocation the pool can't serve only because a retired buffer
// of the same heap still holds the pages waits for that buffer's free and
// gets huge pages, instead of falling back.
TEST_F(HugepagePoolTest, RetiredBuffersPagesServeTheNextAllocation) {
  ContiguousHeap::Options options;
  options.fallbacks = {Backing::kBasePages};
  ContiguousHeap heap(options);
  const uint64_t all = ReadHugepagePool(kHugePage2M).free * kHugePage2M;
  auto first = heap.Allocate(all, "first");
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ((*first)->backing(), Backing::kHugetlb2M);
  (*first)->Retire();
  std::atomic<bool> first_destroyed{false};
  absl::StatusOr<std::unique_ptr<HeapBuffer>> second;
  std::thread allocator([&] {
    second = heap.Allocate(all, "second");
    EXPECT_TRUE(first_destroyed) << "allocated (or fell back) before the pages came back";
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  first_destroyed = true;
  first->reset();
  allocator.join();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*second)->backing(), Backing::kHugetlb2M);
}

// Tests that the daemon's heaps never take each other's huge pages: a hugetlb
// carveout moving pages out of and back into the pool (punch + prefault,
// close + refill) while a contiguous heap with no fallback keeps asking for
// one more huge page than the pool has free outside the carveout: it must
// always fail (it could succeed only with the carveout's pages in flight), the
// carveout must never fail, and its reservation must be whole at the end.
TEST_F(HugepagePoolTest, HeapsNeverTakeEachOthersPages) {
  CarveoutHeap::Options carveout_options;
  carveout_options.capacity = 4 * kHugePage2M;
  auto carveout = CarveoutHeap::Create(carveout_options);
  ASSERT_TRUE(carveout.ok()) << carveout.status();
  ASSERT_EQ((*carveout)->Stats().backing, Backing::kHugetlb2M);
  ContiguousHeap::Options contiguous_options;
  contiguous_options.fallbacks = {};
  ContiguousHeap contiguous(contiguous_options);
  const uint64_t rest = ReadHugepagePool(kHugePage2M).free * kHugePage2M;
  ASSERT_GT(rest, 0u);

  std::atomic<bool> stop{false};
  std::atomic<int> carveout_failures{0}, rounds{0};
  int stolen = 0;
  std::thread mover([&] {
    while (!stop) {
      auto buffer = (*carveout)->Allocate(2 * kHugePage2M, "mover");
      if (!buffer.ok()) ++carveout_failures;
      ++rounds;
    }
  });
  const absl::Time end = absl::Now() + absl::Seconds(1);
  while (absl::Now() < end) {
    auto buffer = contiguous.Allocate(rest + kHugePage2M, "greedy");
    if (buffer.ok()) ++stolen;
  }
  stop = true;
  mover.join();
  EXPECT_EQ(carveout_failures, 0);
  EXPECT_EQ(stolen, 0) << "the contiguous heap got the carveout's pages";
  EXPECT_GT(rounds, 10);
  EXPECT_EQ((*carveout)->Stats().reserved_resident, 4 * kHugePage2M);
}

// Tests a hugetlb-backed carveout: the reservation comes from the pool at
// creation and buffers are carved out of it without exceeding capacity.
TEST_F(HugepagePoolTest, CarveoutReservesHugetlb) {
  const uint64_t free_before = ReadHugepagePool(kHugePage2M).free;
  CarveoutHeap::Options options;
  options.capacity = 8 * kMiB;
  auto heap = CarveoutHeap::Create(options);
  ASSERT_TRUE(heap.ok()) << heap.status();
  EXPECT_EQ((*heap)->Stats().backing, Backing::kHugetlb2M);
  EXPECT_TRUE((*heap)->Stats().locked)
      << "hugetlb pages are never swapped: " << (*heap)->Stats().note;
  EXPECT_EQ((*heap)->Stats().note.find("not locked"), std::string::npos) << (*heap)->Stats().note;
  EXPECT_EQ(ReadHugepagePool(kHugePage2M).free, free_before - 4) << "reserved at creation";
  auto a = (*heap)->Allocate(5 * kMiB, "a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->backing(), Backing::kHugetlb2M);
  EXPECT_EQ((*a)->size(), 6 * kMiB);
  EXPECT_EQ(ReadHugepagePool(kHugePage2M).free, free_before - 4) << "moved, not added";
  EXPECT_EQ((*heap)->Allocate(4 * kMiB, "b").status().code(), absl::StatusCode::kResourceExhausted);
  a->reset();
  EXPECT_EQ((*heap)->Stats().used, 0u);
  EXPECT_EQ(ReadHugepagePool(kHugePage2M).free, free_before - 4) << "refilled";
  heap->reset();
  EXPECT_EQ(ReadHugepagePool(kHugePage2M).free, free_before);
}

// Reserves one 1 GiB page for the test's lifetime (the kernel often can't find
// a free gigabyte on a long-running machine: the test then skips).
class GigantPagePoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HugepagePoolState pool = ReadHugepagePool(kHugePage1G);
    setting_ =
        std::make_unique<ScopedKernelSetting>(kNrHugepages1G, std::to_string(pool.total + 1));
    if (!setting_->ok()) GTEST_SKIP() << setting_->why();
    if (ReadHugepagePool(kHugePage1G).free < 1) {
      GTEST_SKIP() << "kernel could not reserve a 1 GiB page";
    }
  }
  std::unique_ptr<ScopedKernelSetting> setting_;
};

// Tests 1 GiB pages: sizes round up to the gigabyte, the page is taken from the
// 1G pool at allocation (prefaulted), and a second buffer falls back when the
// pool is empty.
TEST_F(GigantPagePoolTest, ContiguousHeapUses1GPages) {
  ContiguousHeap::Options options;
  options.hugepage_size = kHugePage1G;
  options.fallbacks = {Backing::kBasePages};
  ContiguousHeap heap(options);
  const uint64_t free_before = ReadHugepagePool(kHugePage1G).free;
  {
    auto buffer = heap.Allocate(5 * kMiB, "gig");
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    EXPECT_EQ((*buffer)->size(), kHugePage1G);
    EXPECT_EQ((*buffer)->backing(), Backing::kHugetlb1G);
    EXPECT_EQ(ReadHugepagePool(kHugePage1G).free, free_before - 1) << "the page is taken now";
    auto map = Mapping::Create((*buffer)->fd(), (*buffer)->size(), Mapping::Protection::kReadWrite);
    ASSERT_TRUE(map.ok()) << map.status();
    EXPECT_EQ(map->data()[0], 0);
    EXPECT_EQ(map->data()[kHugePage1G - 1], 0);
    map->data()[kHugePage1G / 2] = 1;
    if (free_before == 1) {
      auto more = heap.Allocate(2 * kMiB, "more");
      ASSERT_TRUE(more.ok()) << more.status();
      EXPECT_EQ((*more)->backing(), Backing::kBasePages);
      EXPECT_EQ((*more)->size(), 2 * kMiB) << "base pages round to 4 KiB, not 1 GiB";
    }
  }
  EXPECT_EQ(ReadHugepagePool(kHugePage1G).free, free_before) << "given back on free";
}

// Tests that with shmem THP in "advise" mode the THP fallback really yields
// huge PMD mappings and is reported as thp.
TEST(ThpTest, ThpFallbackVerifiedInSmaps) {
  ScopedKernelSetting thp(kShmemThp, "advise");
  if (!thp.ok()) GTEST_SKIP() << thp.why();
  if (ReadHugepagePool(kHugePage2M).free > 0) GTEST_SKIP() << "hugetlb pool not empty";
  ContiguousHeap::Options options;
  options.fallbacks = {Backing::kThp};
  ContiguousHeap heap(options);
  auto buffer = heap.Allocate(8 * kMiB, "thp");
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  EXPECT_EQ((*buffer)->backing(), Backing::kThp);
}

}  // namespace
}  // namespace bufferd
