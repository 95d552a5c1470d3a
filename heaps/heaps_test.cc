#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "base/fd_count.h"
#include "base/mapping.h"
#include "heaps/carveout_heap.h"
#include "heaps/contiguous_heap.h"
#include "heaps/heap_registry.h"
#include "heaps/hugepage_testing.h"
#include "testing/child_process.h"
#include "heaps/system_heap.h"

namespace bufferd {
namespace {

constexpr uint64_t kMiB = 1 << 20;

bool AllZero(const Mapping& m) {
  for (size_t i = 0; i < m.size(); i += 512) {
    if (m.data()[i] != 0) return false;
  }
  return m.data()[m.size() - 1] == 0;
}

std::string FdTarget(int fd) {
  char buf[512];
  ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), buf, sizeof(buf));
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
}

std::unique_ptr<Heap> MakeHeap(HeapKind kind, uint64_t capacity = 0) {
  switch (kind) {
    case HeapKind::kSystem:
      return std::make_unique<SystemHeap>("system", capacity);
    case HeapKind::kContiguous: {
      ContiguousHeap::Options options;
      options.fallbacks = {Backing::kBasePages};
      options.capacity = capacity;
      return std::make_unique<ContiguousHeap>(options);
    }
    case HeapKind::kCarveout: {
      CarveoutHeap::Options options;
      options.capacity = capacity == 0 ? 64 * kMiB : capacity;
      auto heap = CarveoutHeap::Create(options);
      EXPECT_TRUE(heap.ok()) << heap.status();
      return heap.ok() ? *std::move(heap) : nullptr;
    }
  }
  return nullptr;
}

class EveryHeapTest : public ::testing::TestWithParam<HeapKind> {};

// Tests that only the system heap says its allocations never block: the
// daemon allocates from it on gRPC's callback threads, the others off them.
TEST_P(EveryHeapTest, SaysWhetherAllocationMayBlock) {
  std::unique_ptr<Heap> heap = MakeHeap(GetParam());
  ASSERT_NE(heap, nullptr);
  EXPECT_EQ(heap->allocation_may_block(), GetParam() != HeapKind::kSystem);
}

// Tests that a buffer is page-rounded, zero-filled, sealed against resize,
// read-only for other uids, and named after its heap.
TEST_P(EveryHeapTest, BufferPropertiesHold) {
  std::unique_ptr<Heap> heap = MakeHeap(GetParam());
  ASSERT_NE(heap, nullptr);
  auto buffer = heap->Allocate(1000, "frame");
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  // Rounded to the page of the backing it really got (a contiguous heap that
  // fell back to base pages rounds to 4 KiB, not to its huge page).
  const uint64_t page = (*buffer)->backing() == Backing::kBasePages
                            ? static_cast<uint64_t>(::sysconf(_SC_PAGESIZE))
                            : heap->page_size();
  EXPECT_EQ((*buffer)->size() % page, 0u);
  EXPECT_GE((*buffer)->size(), 1000u);
  EXPECT_LT((*buffer)->size(), 1000u + page);
  EXPECT_EQ(heap->Stats().used, (*buffer)->size()) << "the heap accounts the real size";
  const int fd = (*buffer)->fd();
  struct stat st {};
  ASSERT_EQ(::fstat(fd, &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), (*buffer)->size());
  EXPECT_EQ(st.st_mode & 0777, 0400u);
  // Never executable: sealed so (F_SEAL_EXEC) where the kernel can, and
  // nobody, root included, can chmod it +x to execve what another wrote.
  constexpr int kSealExec = 0x0020;  // F_SEAL_EXEC, Linux 6.3
  const int exec_seal = memfd::NoexecSealSupported() ? kSealExec : 0;
  EXPECT_EQ(::fcntl(fd, F_GET_SEALS), F_SEAL_SHRINK | F_SEAL_GROW | exec_seal)
      << "F_SEAL_SEAL is the daemon's to add";
  if (exec_seal != 0) {
    EXPECT_NE(::fchmod(fd, 0500), 0);
    EXPECT_EQ(errno, EPERM);
  }
  EXPECT_NE(::ftruncate(fd, 0), 0);
  EXPECT_EQ(errno, EPERM);
  EXPECT_NE(::ftruncate(fd, static_cast<off_t>((*buffer)->size() * 2)), 0);
  EXPECT_NE(FdTarget(fd).find("memfd:bufferd:" + heap->name() + ":frame"), std::string::npos)
      << FdTarget(fd);
  auto map = Mapping::Create(fd, (*buffer)->size(), Mapping::Protection::kReadWrite);
  ASSERT_TRUE(map.ok()) << map.status();
  EXPECT_TRUE(AllZero(*map));
}

// Tests that memory freed and allocated again, over and over, always comes
// back zero-filled, never with the previous buffer's pattern.
TEST_P(EveryHeapTest, ReusedMemoryIsZeroFilled) {
  std::unique_ptr<Heap> heap = MakeHeap(GetParam(), 8 * kMiB);
  ASSERT_NE(heap, nullptr);
  for (int round = 0; round < 20; ++round) {
    SCOPED_TRACE(round);
    auto buffer = heap->Allocate(4 * kMiB, "reuse");
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    auto map = Mapping::Create((*buffer)->fd(), (*buffer)->size(), Mapping::Protection::kReadWrite);
    ASSERT_TRUE(map.ok());
    ASSERT_TRUE(AllZero(*map));
    std::memset(map->data(), 0x5a + round, map->size());
  }
}

// Tests that size 0, absurd sizes and sizes above the capacity are refused
// with the right code and a message naming the heap, and count as failures.
TEST_P(EveryHeapTest, BadSizesAreRefused) {
  std::unique_ptr<Heap> heap = MakeHeap(GetParam(), 8 * kMiB);
  ASSERT_NE(heap, nullptr);
  EXPECT_EQ(heap->Allocate(0, "x").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(heap->Allocate(~uint64_t{0}, "x").status().code(), absl::StatusCode::kInvalidArgument);
  auto too_big = heap->Allocate(16 * kMiB, "x");
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(too_big.status().message().find("heap '" + heap->name() + "'"), std::string::npos)
      << too_big.status();
  EXPECT_NE(too_big.status().message().find("asked for 16 MiB"), std::string::npos)
      << too_big.status();
  EXPECT_EQ(heap->Stats().failures, 1u);
  EXPECT_EQ(heap->Stats().used, 0u);
}

// Tests exact accounting: used/peak/count follow allocations, capacity is never
// exceeded, and freeing returns it.
TEST_P(EveryHeapTest, AccountingAndCapacity) {
  std::unique_ptr<Heap> heap = MakeHeap(GetParam(), 8 * kMiB);
  ASSERT_NE(heap, nullptr);
  std::vector<std::unique_ptr<HeapBuffer>> buffers;
  for (int i = 0; i < 4; ++i) {
    auto buffer = heap->Allocate(2 * kMiB, "acct");
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    buffers.push_back(*std::move(buffer));
  }
  HeapStats stats = heap->Stats();
  EXPECT_EQ(stats.used, 8 * kMiB);
  EXPECT_EQ(stats.buffer_count, 4u);
  EXPECT_EQ(heap->Allocate(1, "full").status().code(), absl::StatusCode::kResourceExhausted);
  buffers.pop_back();
  EXPECT_EQ(heap->Stats().used, 6 * kMiB);
  auto again = heap->Allocate(2 * kMiB, "again");
  ASSERT_TRUE(again.ok()) << again.status();
  buffers.clear();
  again->reset();
  stats = heap->Stats();
  EXPECT_EQ(stats.used, 0u);
  EXPECT_EQ(stats.peak, 8 * kMiB);
  EXPECT_EQ(stats.buffer_count, 0u);
  EXPECT_EQ(stats.allocations, 5u);
  EXPECT_TRUE(stats.buffers_by_backing.empty());
}

// Tests that 8 threads allocating and freeing at random for a while leave the
// heap at zero and this process without leaked fds.
TEST_P(EveryHeapTest, ConcurrentChurnKeepsExactAccounting) {
  std::unique_ptr<Heap> heap = MakeHeap(GetParam(), 32 * kMiB);
  ASSERT_NE(heap, nullptr);
  const int fds_before = CountOpenFds();
  std::atomic<uint64_t> ok{0}, exhausted{0}, other{0};
  std::vector<std::thread> threads;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<std::unique_ptr<HeapBuffer>> held;
      while (std::chrono::steady_clock::now() < deadline) {
        if (held.size() < 4 && rng() % 3 != 0) {
          auto b = heap->Allocate((rng() % 4 + 1) * kMiB, "churn");
          if (b.ok()) {
            ++ok;
            held.push_back(*std::move(b));
          } else if (b.status().code() == absl::StatusCode::kResourceExhausted) {
            ++exhausted;
          } else {
            ++other;
          }
        } else if (!held.empty()) {
          held.erase(held.begin() + static_cast<long>(rng() % held.size()));
        }
        HeapStats s = heap->Stats();
        if (s.capacity != 0 && s.used > s.capacity) ++other;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_GT(ok.load(), 0u);
  EXPECT_EQ(other.load(), 0u);
  HeapStats stats = heap->Stats();
  EXPECT_EQ(stats.used, 0u);
  EXPECT_EQ(stats.buffer_count, 0u);
  EXPECT_LE(stats.peak, 32 * kMiB);
  EXPECT_EQ(stats.failures, exhausted.load());
  EXPECT_EQ(CountOpenFds(), fds_before);
}

INSTANTIATE_TEST_SUITE_P(Heaps, EveryHeapTest,
                         ::testing::Values(HeapKind::kSystem, HeapKind::kContiguous,
                                           HeapKind::kCarveout),
                         [](const auto& info) { return std::string(HeapKindName(info.param)); });

// Tests that with an empty hugetlb pool and no fallback the contiguous heap
// fails with RESOURCE_EXHAUSTED describing the pool.
TEST(ContiguousHeapTest, NoPoolNoFallbackFailsCleanly) {
  HugepagePoolState pool = ReadHugepagePool(kHugePage2M);
  if (pool.free > 0) GTEST_SKIP() << "hugetlb pool has free pages; this test needs an empty one";
  ContiguousHeap::Options options;
  options.fallbacks = {};
  ContiguousHeap heap(options);
  auto buffer = heap.Allocate(3 * kMiB, "x");
  ASSERT_EQ(buffer.status().code(), absl::StatusCode::kResourceExhausted) << buffer.status();
  EXPECT_NE(buffer.status().message().find("pages free"), std::string::npos) << buffer.status();
  EXPECT_EQ(heap.Stats().failures, 1u);
}

// Tests that the base-pages fallback rounds to base pages (not the huge page
// it could not get), prefaults, reports base_pages and accounts the real size.
TEST(ContiguousHeapTest, BasePagesFallbackIsReportedHonestly) {
  HugepagePoolState pool = ReadHugepagePool(kHugePage2M);
  if (pool.free > 0) GTEST_SKIP() << "hugetlb pool has free pages; this test needs an empty one";
  ContiguousHeap::Options options;
  options.fallbacks = {Backing::kBasePages};
  ContiguousHeap heap(options);
  auto buffer = heap.Allocate(3 * kMiB + 1, "x");
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  const uint64_t expected = 3 * kMiB + 4096;
  EXPECT_EQ((*buffer)->size(), expected);
  EXPECT_EQ((*buffer)->backing(), Backing::kBasePages);
  struct stat st {};
  ASSERT_EQ(::fstat((*buffer)->fd(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_blocks) * 512, expected) << "pages must be prefaulted";
  HeapStats stats = heap.Stats();
  EXPECT_EQ(stats.buffers_by_backing.at("base_pages"), 1u);
  EXPECT_EQ(stats.used, expected);
  buffer->reset();
  EXPECT_EQ(heap.Stats().used, 0u);
}

// Tests that a THP attempt that got base pages (shmem THP off here) keeps
// them at a base-page size, reported as base pages, prefaulted.
TEST(ContiguousHeapTest, ThpAttemptWithoutHugePagesShrinksToBasePages) {
  HugepagePoolState pool = ReadHugepagePool(kHugePage2M);
  if (pool.free > 0) GTEST_SKIP() << "hugetlb pool has free pages; this test needs an empty one";
  std::ifstream shmem("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
  std::string setting((std::istreambuf_iterator<char>(shmem)), std::istreambuf_iterator<char>());
  if (setting.find("[never]") == std::string::npos && setting.find("[deny]") == std::string::npos) {
    GTEST_SKIP() << "shmem THP is on here: " << setting;
  }
  ContiguousHeap::Options options;
  options.fallbacks = {Backing::kThp, Backing::kBasePages};
  ContiguousHeap heap(options);
  auto buffer = heap.Allocate(kMiB + 1, "x");
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  EXPECT_EQ((*buffer)->backing(), Backing::kBasePages);
  EXPECT_EQ((*buffer)->size(), kMiB + 4096);
  struct stat st {};
  ASSERT_EQ(::fstat((*buffer)->fd(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kMiB + 4096);
  EXPECT_EQ(static_cast<uint64_t>(st.st_blocks) * 512, kMiB + 4096) << "prefaulted, tail freed";
  EXPECT_EQ(heap.Stats().used, kMiB + 4096);
}

// Tests that a THP-only fallback is refused when shmem THP is off, rather than
// silently handing out base pages.
TEST(ContiguousHeapTest, ThpOnlyFallbackRefusesBasePages) {
  HugepagePoolState pool = ReadHugepagePool(kHugePage2M);
  if (pool.free > 0) GTEST_SKIP() << "hugetlb pool has free pages; this test needs an empty one";
  std::ifstream in(kShmemThp);
  std::string mode;
  std::getline(in, mode);
  if (mode.find("[never]") == std::string::npos && mode.find("[deny]") == std::string::npos) {
    GTEST_SKIP() << "shmem THP is enabled (" << mode << "); this test needs it off";
  }
  ContiguousHeap::Options options;
  options.fallbacks = {Backing::kThp};
  ContiguousHeap heap(options);
  auto buffer = heap.Allocate(2 * kMiB, "x");
  ASSERT_EQ(buffer.status().code(), absl::StatusCode::kResourceExhausted) << buffer.status();
  EXPECT_NE(buffer.status().message().find("thp"), std::string::npos) << buffer.status();
}

// Tests that a carveout really holds its memory: resident and (as root) locked,
// and that carving buffers out moves bytes from the reservation to buffers.
TEST(CarveoutHeapTest, ReservationIsResidentAndShrinksWhileCarved) {
  CarveoutHeap::Options options;
  options.capacity = 16 * kMiB;
  options.hugepage_size = 0;
  auto heap = CarveoutHeap::Create(options);
  ASSERT_TRUE(heap.ok()) << heap.status();
  HeapStats stats = (*heap)->Stats();
  EXPECT_EQ(stats.capacity, 16 * kMiB);
  EXPECT_EQ(stats.reserved_resident, 16 * kMiB);
#ifdef __SANITIZE_ADDRESS__
  // ASan's mlock locks nothing and returns 0: the heap must not believe it.
  EXPECT_FALSE(stats.locked);
  EXPECT_NE(stats.note.find("not locked: mlock returned success"), std::string::npos) << stats.note;
#else
  if (::geteuid() == 0) {
    EXPECT_TRUE(stats.locked) << stats.note;
  }
#endif
  auto buffer = (*heap)->Allocate(6 * kMiB, "cam");
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  struct stat st {};
  ASSERT_EQ(::fstat((*buffer)->fd(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_blocks) * 512, 6 * kMiB) << "buffer pages are prefaulted";
  stats = (*heap)->Stats();
  EXPECT_EQ(stats.reserved_resident, 10 * kMiB);
  EXPECT_EQ(stats.used, 6 * kMiB);
  buffer->reset();
  stats = (*heap)->Stats();
  EXPECT_EQ(stats.reserved_resident, 16 * kMiB);
  EXPECT_EQ(stats.used, 0u);
  EXPECT_EQ(stats.peak, 6 * kMiB);
}

// Tests that two buffers of one carveout are distinct files.
TEST(CarveoutHeapTest, EachBufferHasItsOwnFile) {
  CarveoutHeap::Options options;
  options.capacity = 8 * kMiB;
  options.hugepage_size = 0;
  auto heap = CarveoutHeap::Create(options);
  ASSERT_TRUE(heap.ok());
  auto a = (*heap)->Allocate(kMiB, "a");
  auto b = (*heap)->Allocate(kMiB, "b");
  ASSERT_TRUE(a.ok() && b.ok());
  struct stat sa {
  }, sb{};
  ::fstat((*a)->fd(), &sa);
  ::fstat((*b)->fd(), &sb);
  EXPECT_NE(sa.st_ino, sb.st_ino);
  auto ma = Mapping::Create((*a)->fd(), kMiB, Mapping::Protection::kReadWrite);
  auto mb = Mapping::Create((*b)->fd(), kMiB, Mapping::Protection::kReadWrite);
  ASSERT_TRUE(ma.ok() && mb.ok());
  std::memset(ma->data(), 1, kMiB);
  EXPECT_TRUE(AllZero(*mb));
}

// Tests the two steps of freeing: Retire() returns a buffer's bytes to the
// accounting at once, and an allocation that needs them waits until the
// buffer is destroyed and its part of the reservation refilled.
TEST(CarveoutHeapTest, RetiredBytesAreUsableOnceRefilled) {
  CarveoutHeap::Options options;
  options.capacity = 8 * kMiB;
  options.hugepage_size = 0;
  auto heap = CarveoutHeap::Create(options);
  ASSERT_TRUE(heap.ok());
  auto first = (*heap)->Allocate(6 * kMiB, "first");
  ASSERT_TRUE(first.ok());
  (*first)->Retire();
  (*first)->Retire();  // idempotent
  EXPECT_EQ((*heap)->Stats().used, 0u);
  EXPECT_EQ((*heap)->Stats().buffer_count, 0u);

  std::atomic<bool> first_destroyed{false};
  std::atomic<bool> second_allocated{false};
  absl::StatusOr<std::unique_ptr<HeapBuffer>> second;
  std::thread allocator([&] {
    second = (*heap)->Allocate(6 * kMiB, "second");
    EXPECT_TRUE(first_destroyed) << "allocated before the reservation was refilled";
    second_allocated = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(second_allocated);
  first_destroyed = true;
  first->reset();
  allocator.join();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*heap)->Stats().used, 6 * kMiB);
  second->reset();
  HeapStats stats = (*heap)->Stats();
  EXPECT_EQ(stats.used, 0u);
  EXPECT_EQ(stats.reserved_resident, 8 * kMiB);
}

// Runs `body` in a forked child that may not lock memory (RLIMIT_MEMLOCK 0,
// and uid nobody if we are root, dropping CAP_IPC_LOCK); returns its exit code.
int RunWithoutMemlock(const std::function<int()>& body) {
  testing::ChildOptions options;
  options.rlimits = {{RLIMIT_MEMLOCK, 0}};
  if (::geteuid() == 0) {
    options.uid = 65534;
    options.gid = 65534;
  }
  absl::StatusOr<testing::ChildProcess> child = testing::ChildProcess::Fork(body, options);
  return child.ok() ? child->Wait() : -1;
}

// Tests that a carveout that cannot be locked still starts and says so (and
// measures its residency anyway), unless require_mlock is set.
TEST(CarveoutHeapTest, RefusedMlockIsReportedOrFatal) {
  EXPECT_EQ(RunWithoutMemlock([] {
              CarveoutHeap::Options options;
              options.capacity = 4 * kMiB;
              options.hugepage_size = 0;
              auto heap = CarveoutHeap::Create(options);
              if (!heap.ok()) return 1;
              HeapStats stats = (*heap)->Stats();
              if (stats.locked) return 2;
              if (stats.note.find("not locked") == std::string::npos) return 3;
              if (stats.reserved_resident != 4 * kMiB) return 4;
              options.require_mlock = true;
              auto strict = CarveoutHeap::Create(options);
              if (strict.ok()) return 5;
              if (strict.status().code() != absl::StatusCode::kResourceExhausted) return 6;
              if (strict.status().message().find("require_mlock") == std::string::npos) return 7;
              return 0;
            }),
            0)
      << "1: Create failed, 2: claims locked, 3: no note, 4: not resident, "
         "5-7: require_mlock not enforced";
}

// Tests that a carveout without capacity is a configuration error.
TEST(CarveoutHeapTest, ZeroCapacityIsRefused) {
  CarveoutHeap::Options options;
  options.capacity = 0;
  EXPECT_EQ(CarveoutHeap::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

// Tests that the registry refuses duplicates and names known heaps on a miss.
TEST(HeapRegistryTest, FindAndErrors) {
  HeapRegistry registry;
  ASSERT_TRUE(registry.Add(std::make_unique<SystemHeap>("system")).ok());
  ASSERT_TRUE(registry.Add(std::make_unique<SystemHeap>("video")).ok());
  EXPECT_EQ(registry.Add(std::make_unique<SystemHeap>("video")).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.Find("video")->name(), "video");
  auto missing = registry.Get("nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(missing.status().message(), "unknown heap 'nope' (heaps: system, video)");
}

}  // namespace
}  // namespace bufferd
