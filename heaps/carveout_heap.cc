#include "heaps/carveout_heap.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <optional>

#include "absl/strings/str_cat.h"
#include "base/await.h"
#include "base/errno_status.h"

namespace bufferd {

absl::StatusOr<std::unique_ptr<CarveoutHeap>> CarveoutHeap::Create(Options options) {
  if (options.capacity == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("carveout heap '", options.name, "' needs a capacity > 0"));
  }
  // Not under memfd::BufferName's "bufferd:" prefix: that is for buffers only.
  const std::string balloon_name = absl::StrCat("bufferd-reservation:", options.name);
  std::string note;
  UniqueFd balloon;
  uint64_t page_size = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  Backing backing = Backing::kBasePages;
  if (options.hugepage_size != 0) {
    const uint64_t rounded = (options.capacity + options.hugepage_size - 1) /
                             options.hugepage_size * options.hugepage_size;
    absl::StatusOr<UniqueFd> fd =
        memfd::Create(balloon_name, rounded, memfd::HugetlbFlags(options.hugepage_size));
    absl::Status status = fd.status();
    if (status.ok()) status = memfd::Prefault(fd->get(), 0, rounded);
    if (status.ok()) {
      balloon = *std::move(fd);
      page_size = options.hugepage_size;
      options.capacity = rounded;
      backing = HugetlbBacking(options.hugepage_size);
    } else {
      HugepagePoolState pool = ReadHugepagePool(options.hugepage_size);
      note = absl::StrCat("hugetlb unavailable (", pool.free, " of ", pool.total, " ",
                          FormatBytes(options.hugepage_size), " pages free), using base pages");
    }
  }
  if (!balloon.valid()) {
    options.capacity = (options.capacity + page_size - 1) / page_size * page_size;
    ASSIGN_OR_RETURN(balloon, memfd::Create(balloon_name, options.capacity, 0));
    absl::Status status = memfd::Prefault(balloon.get(), 0, options.capacity);
    if (!status.ok()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("carveout heap '", options.name, "' cannot reserve ",
                       FormatBytes(options.capacity), ": ", status.message()));
    }
  }
  ASSIGN_OR_RETURN(Mapping map, Mapping::Create(balloon.get(), options.capacity,
                                                Mapping::Protection::kReadWrite));
  const bool mlock_ok = ::mlock(map.data(), map.size()) == 0;
  const int mlock_errno = errno;
  // Fault every page into the mapping, locked or not (mlock normally does this
  // already, but sanitizers stub mlock out): Stats measures residency there.
  (void)memfd::PopulateWrite(map.data(), map.size());
  // Locked is what smaps says, not what mlock returned (ASan's mlock is a
  // no-op that returns 0). Hugetlb pages are never swapped or reclaimed, and
  // the kernel does not mark hugetlb mappings locked: they count as locked.
  const bool hugetlb = backing != Backing::kBasePages;
  const int64_t locked_kb = hugetlb ? 0 : SmapsKb(map.data(), {"Locked"});
  const bool locked = hugetlb || (mlock_ok && locked_kb * 1024 >= static_cast<int64_t>(map.size()));
  if (!locked) {
    const std::string why =
        mlock_ok
            ? absl::StrCat(
                  "mlock returned success but the kernel shows ",
                  FormatBytes(static_cast<uint64_t>(std::max<int64_t>(locked_kb, 0)) * 1024),
                  " of ", FormatBytes(map.size()), " locked")
            : absl::StrCat(ErrnoError("mlock", mlock_errno).message(), "; raise RLIMIT_MEMLOCK");
    if (options.require_mlock) {
      return absl::ResourceExhaustedError(
          absl::StrCat("carveout heap '", options.name, "' could not lock its ",
                       FormatBytes(options.capacity), " (require_mlock set): ", why));
    }
    absl::StrAppend(&note, note.empty() ? "" : "; ", "not locked: ", why);
  }
  return std::unique_ptr<CarveoutHeap>(new CarveoutHeap(std::move(options), page_size, backing,
                                                        std::move(balloon), std::move(map), locked,
                                                        std::move(note)));
}

CarveoutHeap::CarveoutHeap(Options options, uint64_t page_size, Backing backing, UniqueFd balloon,
                           Mapping balloon_map, bool locked, std::string note)
    : AccountedHeap(options.name, page_size, options.capacity),
      options_(std::move(options)),
      backing_(backing),
      balloon_(std::move(balloon)),
      balloon_map_(std::move(balloon_map)),
      locked_(locked),
      note_(std::move(note)) {
  absl::MutexLock lock(&mu_);
  free_[0] = options_.capacity;
  free_bytes_ = options_.capacity;
}

CarveoutHeap::~CarveoutHeap() = default;

CarveoutHeap::Extents CarveoutHeap::TakeExtents(uint64_t size) {
  absl::MutexLock lock(&mu_);
  Extents taken;
  auto refilled = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return free_bytes_ >= size; };
  if (!AwaitWithTimeout(mu_, refilled, kRefillWait)) return taken;
  free_bytes_ -= size;
  while (size > 0 && !free_.empty()) {
    auto it = free_.begin();
    const uint64_t offset = it->first;
    const uint64_t length = it->second;
    free_.erase(it);
    const uint64_t take = std::min(length, size);
    taken.emplace_back(offset, take);
    if (take < length) free_[offset + take] = length - take;
    size -= take;
  }
  return taken;
}

void CarveoutHeap::ReturnExtents(const Extents& extents) {
  absl::MutexLock lock(&mu_);
  for (auto [offset, length] : extents) {
    free_bytes_ += length;
    auto next = free_.lower_bound(offset);
    if (next != free_.end() && offset + length == next->first) {
      length += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == offset) {
        prev->second += length;
        continue;
      }
    }
    free_[offset] = length;
  }
}

absl::Status CarveoutHeap::PunchHoles(const Extents& extents) {
  for (const auto& extent : extents) {
    // (Named, not a structured binding: clang 14, the fuzz build's
    // compiler, cannot capture those in a lambda.)
    const uint64_t offset = extent.first;
    const uint64_t length = extent.second;
    if (RetryOnEintr([&] {
          return ::fallocate(balloon_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                             static_cast<off_t>(offset), static_cast<off_t>(length));
        }) != 0) {
      return ErrnoError("fallocate(PUNCH_HOLE) in carveout reservation", errno);
    }
  }
  return absl::OkStatus();
}

void CarveoutHeap::Refill(const Extents& extents) {
  for (auto [offset, length] : extents) {
    // Best effort: if the pages can't be had back right now the capacity is
    // still accounted; the next refill or allocation retries.
    (void)memfd::Prefault(balloon_.get(), offset, length);
    (void)memfd::PopulateWrite(balloon_map_.data() + offset, length);
  }
}

absl::StatusOr<AccountedHeap::Backed> CarveoutHeap::AllocateBacking(uint64_t size,
                                                                    uint64_t /*requested*/,
                                                                    const std::string& memfd_name) {
  // AccountedHeap guarantees used + size <= capacity, so the free extents
  // cover `size` once the refills of retired buffers are done.
  Extents extents = TakeExtents(size);
  if (extents.empty()) {
    return HeapRefused(HeapRefusal::kFull,
                       absl::StrCat("heap '", name(), "': ", FormatBytes(size),
                                    " of its reservation were not refilled within ",
                                    absl::FormatDuration(kRefillWait), " of being freed"));
  }
  const bool hugetlb = backing_ != Backing::kBasePages;
  absl::Status status;
  absl::StatusOr<UniqueFd> fd = absl::UnknownError("not created");
  {
    // Punch + prefault as one step for the daemon's other hugetlb users.
    std::optional<absl::MutexLock> pool;
    if (hugetlb) pool.emplace(&HugetlbPoolMutex());
    status = PunchHoles(extents);
    const unsigned flags = hugetlb ? memfd::HugetlbFlags(options_.hugepage_size) : 0;
    if (status.ok()) {
      fd = memfd::Create(memfd_name, size, flags);
      status = fd.status();
    }
    if (status.ok()) status = memfd::Prefault(fd->get(), 0, size);
    if (status.ok()) status = memfd::Seal(fd->get());
    if (!status.ok()) {
      fd = status;      // closes the new memfd: its pages go back to the pool,
      Refill(extents);  // then into the reservation
    }
  }
  if (!status.ok()) {
    ReturnExtents(extents);
    return HeapRefused(HeapRefusal::kPoolEmpty,
                       absl::StrCat("heap '", name(), "' could not move ", FormatBytes(size),
                                    " from its reservation into a buffer: ", status.message()));
  }
  auto on_free = [this, hugetlb, extents = std::move(extents)](UniqueFd buffer_fd) {
    {
      // Close + refill as one step, like punch + prefault.
      std::optional<absl::MutexLock> pool;
      if (hugetlb) pool.emplace(&HugetlbPoolMutex());
      buffer_fd.Reset();
      Refill(extents);
    }
    ReturnExtents(extents);
  };
  return Backed{*std::move(fd), backing_, std::move(on_free)};
}

void CarveoutHeap::FillStats(HeapStats& stats) const {
  stats.backing = backing_;
  stats.locked = locked_;
  stats.note = note_;
  if (backing_ != Backing::kBasePages) stats.hugepages = ReadHugepagePool(options_.hugepage_size);
  // Residency of the unused reservation, measured, not assumed.
  const size_t base_page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> resident(balloon_map_.size() / base_page);
  if (::mincore(balloon_map_.data(), balloon_map_.size(), resident.data()) == 0) {
    uint64_t pages = 0;
    for (unsigned char r : resident) pages += r & 1;
    stats.reserved_resident = pages * base_page;
  }
}

}  // namespace bufferd
