#include "heaps/heap.h"

#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <limits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "base/errno_status.h"

namespace bufferd {

absl::string_view BackingName(Backing backing) {
  switch (backing) {
    case Backing::kBasePages:
      return "base_pages";
    case Backing::kThp:
      return "thp";
    case Backing::kHugetlb2M:
      return "hugetlb_2m";
    case Backing::kHugetlb1G:
      return "hugetlb_1g";
  }
  return "unknown";
}

absl::string_view HeapKindName(HeapKind kind) {
  switch (kind) {
    case HeapKind::kSystem:
      return "system";
    case HeapKind::kContiguous:
      return "contiguous";
    case HeapKind::kCarveout:
      return "carveout";
  }
  return "unknown";
}

namespace {
uint64_t ReadSysfsNumber(const std::string& path) {
  std::ifstream in(path);
  uint64_t value = 0;
  in >> value;
  return in ? value : 0;
}
}  // namespace

uint64_t HostMemoryBytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  while (meminfo >> key >> kib) {
    if (key == "MemTotal:") return kib * 1024;
    meminfo.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  return 0;
}

HugepagePoolState ReadHugepagePool(uint64_t page_size) {
  HugepagePoolState state;
  state.page_size = page_size;
  std::string dir = absl::StrCat("/sys/kernel/mm/hugepages/hugepages-", page_size / 1024, "kB/");
  state.total = ReadSysfsNumber(dir + "nr_hugepages");
  state.free = ReadSysfsNumber(dir + "free_hugepages");
  state.reserved = ReadSysfsNumber(dir + "resv_hugepages");
  return state;
}

void HeapBuffer::Retire() {
  if (on_retire_) std::exchange(on_retire_, nullptr)();
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

HeapBuffer::~HeapBuffer() {
  Retire();
  if (on_free_) {
    on_free_(std::move(fd_));
  } else {
    fd_.Reset();
  }
  if (after_free_) after_free_();
}

AccountedHeap::AccountedHeap(std::string name, uint64_t page_size, uint64_t capacity)
    : name_(std::move(name)),
      page_size_(page_size),
      capacity_(capacity),
      max_allocation_(std::max<uint64_t>(HostMemoryBytes() / 2, page_size)),
      accounting_(std::make_shared<Accounting>()) {}

absl::StatusOr<std::unique_ptr<HeapBuffer>> AccountedHeap::Allocate(uint64_t size,
                                                                    absl::string_view debug_name) {
  if (size == 0) return absl::InvalidArgumentError("size must be greater than 0");
  if (size > std::numeric_limits<uint64_t>::max() - page_size_ ||
      size > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat("size ", size, " is too large"));
  }
  uint64_t rounded = (size + page_size_ - 1) / page_size_ * page_size_;
  if (capacity_ == 0 && rounded > max_allocation_) {
    absl::MutexLock lock(&accounting_->mu);
    ++accounting_->failures;
    return absl::ResourceExhaustedError(
        absl::StrCat("heap '", name_, "' allocates at most ", FormatBytes(max_allocation_),
                     " in one buffer (half of this host's RAM), asked for ", FormatBytes(rounded)));
  }
  {
    absl::MutexLock lock(&accounting_->mu);
    if (capacity_ != 0 && rounded > capacity_ - accounting_->used) {
      ++accounting_->failures;
      return absl::ResourceExhaustedError(
          absl::StrCat("heap '", name_, "' has ", FormatBytes(capacity_ - accounting_->used),
                       " free of ", FormatBytes(capacity_), ", asked for ", FormatBytes(rounded)));
    }
    if (rounded > std::numeric_limits<uint64_t>::max() - accounting_->used) {
      ++accounting_->failures;
      return absl::ResourceExhaustedError(absl::StrCat(
          "heap '", name_, "' cannot count ", FormatBytes(rounded), " more bytes"));
    }
    accounting_->used += rounded;
  }
  absl::StatusOr<Backed> backed =
      AllocateBacking(rounded, size, memfd::BufferName(name_, debug_name));
  absl::MutexLock lock(&accounting_->mu);
  if (!backed.ok()) {
    accounting_->used -= rounded;
    ++accounting_->failures;
    return backed.status();
  }
  if (backed->size != 0 && backed->size < rounded) {
    // A fallback with a smaller page: give back what it did not need.
    accounting_->used -= rounded - backed->size;
    rounded = backed->size;
  }
  accounting_->peak = std::max(accounting_->peak, accounting_->used);
  ++accounting_->buffer_count;
  ++accounting_->allocations;
  const Backing backing = backed->backing;
  constexpr uint64_t kCheapFreeBytes = 1 << 20;
  const bool cheap_to_free = rounded <= kCheapFreeBytes && !backed->on_free;
  ++accounting_->by_backing[std::string(BackingName(backing))];
  std::function<void()> on_retire = [accounting = accounting_, rounded, backing,
                                     extra = std::move(backed->on_retire)] {
    {
      absl::MutexLock lock(&accounting->mu);
      accounting->used -= rounded;
      --accounting->buffer_count;
      auto it = accounting->by_backing.find(std::string(BackingName(backing)));
      if (--it->second == 0) accounting->by_backing.erase(it);
    }
    if (extra) extra();
  };
  return std::make_unique<HeapBuffer>(std::move(backed->fd), rounded, backing, std::move(on_retire),
                                      std::move(backed->on_free), cheap_to_free);
}

HeapStats AccountedHeap::Stats() const {
  HeapStats stats;
  stats.page_size = page_size_;
  stats.capacity = capacity_;
  {
    absl::MutexLock lock(&accounting_->mu);
    stats.used = accounting_->used;
    stats.peak = accounting_->peak;
    stats.buffer_count = accounting_->buffer_count;
    stats.allocations = accounting_->allocations;
    stats.failures = accounting_->failures;
    stats.buffers_by_backing = accounting_->by_backing;
  }
  FillStats(stats);
  return stats;
}

namespace memfd {
namespace {
#ifdef MFD_NOEXEC_SEAL
constexpr unsigned kNoexecSeal = MFD_NOEXEC_SEAL;
#else
constexpr unsigned kNoexecSeal = 0x0008U;
#endif
}  // namespace

std::string BufferName(absl::string_view heap, absl::string_view name) {
  // The kernel allows 249 bytes after its "memfd:" prefix.
  std::string full = absl::StrCat("bufferd:", heap, ":", name);
  if (full.size() > 240) full.resize(240);
  return full;
}

bool NoexecSealSupported() {
  // Debian bookworm's headers predate the flag (Linux 6.3).
  static const bool supported = [] {
    int fd = ::memfd_create("bufferd-probe", MFD_CLOEXEC | kNoexecSeal);
    if (fd < 0) return false;  // EINVAL: an older kernel
    ::close(fd);
    return true;
  }();
  return supported;
}

absl::StatusOr<UniqueFd> Create(const std::string& name, uint64_t size, unsigned extra_flags) {
  const unsigned noexec = NoexecSealSupported() ? kNoexecSeal : 0;
  UniqueFd fd(
      ::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING | noexec | extra_flags));
  if (!fd.valid()) return ErrnoError("memfd_create", errno);
  if (RetryOnEintr([&] { return ::ftruncate(fd.get(), static_cast<off_t>(size)); }) != 0) {
    return ErrnoError(absl::StrCat("ftruncate(memfd, ", FormatBytes(size), ")"), errno);
  }
  return fd;
}

unsigned HugetlbFlags(uint64_t hugepage_size) {
  return MFD_HUGETLB | (hugepage_size == kHugePage1G ? MFD_HUGE_1GB : MFD_HUGE_2MB);
}

absl::Status Prefault(int fd, uint64_t offset, uint64_t length) {
  if (RetryOnEintr([&] {
        return ::fallocate(fd, 0, static_cast<off_t>(offset), static_cast<off_t>(length));
      }) != 0) {
    return ErrnoError(absl::StrCat("fallocate(", FormatBytes(length), ")"), errno);
  }
  return absl::OkStatus();
}

absl::Status Seal(int fd) {
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) {
    return ErrnoError("fcntl(F_ADD_SEALS)", errno);
  }
  if (::fchmod(fd, 0400) != 0) return ErrnoError("fchmod(memfd, 0400)", errno);
  return absl::OkStatus();
}

}  // namespace memfd
}  // namespace bufferd
