// No holder can crash another: a read-write holder of a hugetlb buffer that
// punches a hole, with the freed page then taken by another process, makes
// every mapping of the buffer SIGBUS on its next touch. Such exports need
// explicit consent, bufctl shows the risk and the hole, and Buffer::Read
// reads safely. Reserves 2 MiB hugetlb pages (root; restored after).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <linux/memfd.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "heaps/heap.h"
#include "heaps/hugepage_testing.h"
#include "testing/daemon_test.h"

namespace bufferd {
namespace {

constexpr uint64_t kMiB = 1 << 20;

// Tests the whole hazard and its guards on a contiguous hugetlb buffer.
TEST(SigbusTest, PunchedHugetlbBufferIsGuardedAndReadSafely) {
  const HugepagePoolState pool = ReadHugepagePool(kHugePage2M);
  ScopedKernelSetting setting(kNrHugepages2M, std::to_string(pool.total + 2));
  if (!setting.ok()) GTEST_SKIP() << setting.why();
  if (ReadHugepagePool(kHugePage2M).free < 2) GTEST_SKIP() << "could not reserve 2 huge pages";
  auto daemon = testing::TestDaemon::Start(R"pb(
    heaps { name: "contiguous" type: HEAP_TYPE_CONTIGUOUS hugepage_size: HUGEPAGE_SIZE_2M }
  )pb");
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  auto creator = (*daemon)->Connect();
  auto importer = (*daemon)->Connect();
  ASSERT_TRUE(creator.ok() && importer.ok());
  auto buffer = creator->Allocate({.heap = "contiguous", .size = 2 * kMiB, .name = "frame"});
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  ASSERT_EQ(buffer->info().backing(), v1::BACKING_HUGETLB_2M);
  auto map = buffer->Map();
  ASSERT_TRUE(map.ok());
  std::memset(map->data(), 0x5a, map->size());

  // Read-write sharing needs consent; read-only never does.
  auto refused = buffer->Export(Access::kReadWrite);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(refused.status().message(),
            absl::StrCat("buffer ", buffer->id(),
                         " is hugetlb_2m-backed: a read-write importer could punch holes in it and "
                         "make its other holders SIGBUS (or hand its pages back behind the heap's "
                         "accounting); export it READ_ONLY, or set accept_sigbus_risk for an "
                         "importer you trust"));
  EXPECT_TRUE(buffer->Export(Access::kReadOnly).ok());
  auto token = buffer->Export(Access::kReadWrite, ExportOptions{.accept_sigbus_risk = true});
  ASSERT_TRUE(token.ok()) << token.status();
  auto shared = importer->Import(*token);
  ASSERT_TRUE(shared.ok()) << shared.status();
  auto listed = creator->ListBuffers();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->buffers_size(), 1);
  EXPECT_TRUE(listed->buffers(0).sigbus_risk());

  // The importer punches the page out; another process takes it.
  ASSERT_EQ(::fallocate(shared->fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                        static_cast<off_t>(2 * kMiB)),
            0);
  const uint64_t free_pages = ReadHugepagePool(kHugePage2M).free;
  int thief = ::memfd_create("thief", MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB);
  ASSERT_GE(thief, 0);
  ASSERT_EQ(::fallocate(thief, 0, 0, static_cast<off_t>(free_pages * 2 * kMiB)), 0);
  ASSERT_EQ(ReadHugepagePool(kHugePage2M).free, 0u) << "the pool is dry";

  // Touching the mapping now kills the toucher...
  auto child = testing::ChildProcess::Fork([&] {
    ::signal(SIGBUS, SIG_DFL);  // not a sanitizer's report: the plain death
    volatile uint8_t byte = map->bytes()[0];
    (void)byte;
    return 0;
  });
  ASSERT_TRUE(child.ok()) << child.status();
  EXPECT_EQ(child->Wait(), 128 + SIGBUS);
  // ...while Buffer::Read reads the hole as zeros.
  std::vector<uint8_t> out(4096, 0xff);
  ASSERT_TRUE(buffer->Read(0, out).ok());
  EXPECT_EQ(std::count(out.begin(), out.end(), 0), 4096);
  EXPECT_EQ(buffer->Read(2 * kMiB - 10, out).code(), absl::StatusCode::kOutOfRange);
  ::close(thief);
}

}  // namespace
}  // namespace bufferd
