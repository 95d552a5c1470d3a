#include "heaps/kernel_info.h"

#include <fstream>
#include <limits>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace bufferd {
namespace {
uint64_t ReadSysfsNumber(const std::string& path) {
  std::ifstream in(path);
  uint64_t value = 0;
  in >> value;
  return in ? value : 0;
}
}  // namespace

namespace {
// A /proc/meminfo figure ("MemTotal:") in bytes, or 0 if unreadable.
uint64_t MeminfoBytes(absl::string_view key) {
  std::ifstream meminfo("/proc/meminfo");
  std::string name;
  uint64_t kib = 0;
  while (meminfo >> name >> kib) {
    if (name == key) return kib * 1024;
    meminfo.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  return 0;
}
}  // namespace

uint64_t HostMemoryBytes() { return MeminfoBytes("MemTotal:"); }

uint64_t AvailableMemoryBytes() { return MeminfoBytes("MemAvailable:"); }

HugepagePoolState ReadHugepagePool(uint64_t page_size) {
  HugepagePoolState state;
  state.page_size = page_size;
  std::string dir = absl::StrCat("/sys/kernel/mm/hugepages/hugepages-", page_size / 1024, "kB/");
  state.total = ReadSysfsNumber(dir + "nr_hugepages");
  state.free = ReadSysfsNumber(dir + "free_hugepages");
  state.reserved = ReadSysfsNumber(dir + "resv_hugepages");
  return state;
}

absl::Mutex& HugetlbPoolMutex() {
  // Never destroyed: buffers may be freed during static destruction.
  static absl::Mutex* const mu = new absl::Mutex;
  return *mu;
}

int64_t SmapsKb(const void* vma_start, std::initializer_list<absl::string_view> fields) {
  const std::string prefix = absl::StrCat(absl::Hex(reinterpret_cast<uintptr_t>(vma_start)), "-");
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool in_vma = false;
  int64_t total = 0;
  while (std::getline(smaps, line)) {
    if (!in_vma) {
      in_vma = absl::StartsWith(line, prefix);
      continue;
    }
    if (absl::StartsWith(line, "VmFlags:")) return total;  // the mapping's last line
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    for (absl::string_view field : fields) {
      if (absl::string_view(line).substr(0, colon) != field) continue;
      int64_t kb = 0;
      if (absl::SimpleAtoi(
              absl::StripSuffix(absl::StripAsciiWhitespace(line.substr(colon + 1)), " kB"), &kb)) {
        total += kb;
      }
    }
  }
  return in_vma ? total : -1;
}

}  // namespace bufferd
