// heap_bench: what each heap's memory costs to use (issue: contiguous and
// carveout heaps). For a 256 MiB buffer from each heap: allocation time,
// first touch (one write per 4 KiB) with minor page faults counted, then
// memset and read bandwidth. Then allocation latency of the carveout against
// the system heap. Heaps are used in-process: the daemon adds only its RPC
// (see alloc_bench), and the pages are the same pages a client maps.
//
// As root it reserves hugetlb pages for the run (and turns shmem THP to
// "advise" for the THP row), restoring both at the end.
//
//   bazel run -c opt //bench:heap_bench
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "base/errno_status.h"
#include "base/mapping.h"
#include "bench/bench_util.h"
#include "heaps/carveout_heap.h"
#include "heaps/contiguous_heap.h"
#include "heaps/hugepage_testing.h"
#include "heaps/system_heap.h"

namespace bufferd::bench {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kSize = 256 * kMiB;

long MinorFaults() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

struct Row {
  std::string heap;
  std::string backing;
  double alloc_ms = 0;
  double touch_ms = 0;
  long faults = 0;
  double memset_gbs = 0;
  double read_gbs = 0;
};

std::optional<Row> Measure(Heap& heap, const std::string& label) {
  Row row;
  row.heap = label;
  double start = NowMicros();
  auto buffer = heap.Allocate(kSize, "bench");
  if (!buffer.ok()) {
    std::printf("%-22s cannot allocate: %s\n", label.c_str(), buffer.status().ToString().c_str());
    return std::nullopt;
  }
  row.alloc_ms = (NowMicros() - start) / 1000;
  row.backing = std::string(BackingName((*buffer)->backing()));
  auto map = Mapping::Create((*buffer)->fd(), (*buffer)->size(), Mapping::Protection::kReadWrite);
  if (!map.ok()) return std::nullopt;
  long faults = MinorFaults();
  start = NowMicros();
  for (size_t i = 0; i < map->size(); i += 4096) map->data()[i] = 1;
  row.touch_ms = (NowMicros() - start) / 1000;
  row.faults = MinorFaults() - faults;
  start = NowMicros();
  for (int r = 0; r < 4; ++r) std::memset(map->data(), r, map->size());
  row.memset_gbs = 4.0 * map->size() / ((NowMicros() - start) * 1e3);
  start = NowMicros();
  volatile uint64_t sink = 0;
  uint64_t total = 0;
  const uint64_t* words = reinterpret_cast<const uint64_t*>(map->data());
  for (int r = 0; r < 4; ++r) {
    for (size_t i = 0; i < map->size() / 8; ++i) total += words[i];
  }
  sink = total;
  (void)sink;
  row.read_gbs = 4.0 * map->size() / ((NowMicros() - start) * 1e3);
  return row;
}

void Print(const Row& row) {
  std::printf("%-22s %-11s %9.1f %9.1f %9ld %9.2f %9.2f\n", row.heap.c_str(), row.backing.c_str(),
              row.alloc_ms, row.touch_ms, row.faults, row.memset_gbs, row.read_gbs);
}

// p50 of allocate (+ map and write every 4 KiB page when `touch`) + free.
double AllocLatencyP50(Heap& heap, uint64_t size, int n, bool touch) {
  std::vector<double> samples;
  for (int i = 0; i < n + 5; ++i) {
    double start = NowMicros();
    auto buffer = heap.Allocate(size, "lat");
    if (!buffer.ok()) return -1;
    if (touch) {
      auto map =
          Mapping::Create((*buffer)->fd(), (*buffer)->size(), Mapping::Protection::kReadWrite);
      for (size_t j = 0; j < map->size(); j += 4096) map->data()[j] = 1;
    }
    buffer->reset();
    double took = NowMicros() - start;
    if (i >= 5) samples.push_back(took);
  }
  return Summarize(samples, 0).p50;
}

}  // namespace
}  // namespace bufferd::bench

int main() {
  using namespace bufferd;
  using namespace bufferd::bench;
  PinTo(0);
  std::printf("bufferd heap_bench: one 256 MiB buffer per heap\n\n");
  std::printf("%-22s %-11s %9s %9s %9s %9s %9s\n", "heap", "backing", "alloc ms", "touch ms",
              "faults", "memset", "read");
  std::printf("%-22s %-11s %9s %9s %9s %9s %9s\n", "", "", "", "", "(minor)", "GB/s", "GB/s");

  std::vector<Row> rows;
  SystemHeap system("system");
  if (auto row = Measure(system, "system")) rows.push_back(*row), Print(*row);

  // THP: an empty hugetlb pool makes the contiguous heap fall back to THP.
  {
    ScopedKernelSetting thp(kShmemThp, "advise");
    ContiguousHeap::Options options;
    options.name = "contiguous (thp)";
    options.fallbacks = {Backing::kThp, Backing::kBasePages};
    ContiguousHeap heap(options);
    if (ReadHugepagePool(kHugePage2M).free == 0) {
      if (auto row = Measure(heap, "contiguous (thp)")) rows.push_back(*row), Print(*row);
    }
  }

  // Reserve enough 2 MiB pages for a contiguous buffer and a carveout.
  const uint64_t need = 2 * kSize / kHugePage2M + 8;
  HugepagePoolState pool = ReadHugepagePool(kHugePage2M);
  ScopedKernelSetting reserve(kNrHugepages2M, std::to_string(pool.total + need));
  if (!reserve.ok())
    std::printf("(hugetlb rows use whatever the pool has: %s)\n", reserve.why().c_str());
  {
    ContiguousHeap::Options options;
    options.fallbacks = {Backing::kBasePages};
    ContiguousHeap contiguous(options);
    if (auto row = Measure(contiguous, "contiguous (hugetlb)")) rows.push_back(*row), Print(*row);
  }
  std::unique_ptr<CarveoutHeap> carveout;
  {
    CarveoutHeap::Options options;
    options.capacity = kSize;
    double start = NowMicros();
    auto heap = CarveoutHeap::Create(options);
    if (heap.ok()) {
      carveout = *std::move(heap);
      std::printf("(carveout reserved %lu MiB as %s in %.1f ms at startup%s)\n",
                  static_cast<unsigned long>(kSize / kMiB),
                  std::string(BackingName(carveout->Stats().backing)).c_str(),
                  (NowMicros() - start) / 1000, carveout->Stats().locked ? ", locked" : "");
      if (auto row = Measure(*carveout, "carveout")) rows.push_back(*row), Print(*row);
    }
  }

  const Row* base = nullptr;
  for (const Row& row : rows) {
    if (row.heap == "system") base = &row;
  }
  if (base != nullptr) {
    std::printf("\npage faults for the same 256 MiB, relative to the system heap:\n");
    for (const Row& row : rows) {
      if (&row == base || row.faults == 0) continue;
      std::printf("  %-22s %7.0fx fewer faults, first touch %5.1fx faster\n", row.heap.c_str(),
                  static_cast<double>(base->faults) / row.faults, base->touch_ms / row.touch_ms);
    }
  }

  if (carveout != nullptr) {
    std::printf("\nallocation latency p50 (us), in-process, allocate + free\n");
    std::printf("(carveout buffers arrive prefaulted; system pages come at first touch):\n");
    std::printf("  %-8s %10s %14s %10s %14s %14s\n", "size", "system", "system+touch", "carveout",
                "carveout+touch", "vs sys+touch");
    for (uint64_t size : {uint64_t{2} * kMiB, 8 * kMiB, 32 * kMiB}) {
      double sys = AllocLatencyP50(system, size, 50, false);
      double sys_touch = AllocLatencyP50(system, size, 50, true);
      double carve = AllocLatencyP50(*carveout, size, 50, false);
      double carve_touch = AllocLatencyP50(*carveout, size, 50, true);
      std::printf("  %-8s %10.1f %14.1f %10.1f %14.1f %13.2fx\n", FormatBytes(size).c_str(), sys,
                  sys_touch, carve, carve_touch, carve_touch > 0 ? sys_touch / carve_touch : 0);
    }
    std::printf("  (last column: how many times faster a ready-to-use carveout buffer is)\n");
  }
  carveout.reset();
  return 0;
}
