#include "heaps/contiguous_heap.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/await.h"
#include "base/errno_status.h"

namespace bufferd {

absl::StatusOr<std::pair<UniqueFd, Backing>> AllocateThpMemfd(const std::string& name,
                                                              uint64_t size) {
  ASSIGN_OR_RETURN(UniqueFd fd, memfd::Create(name, size, 0));
  void* address = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (address == MAP_FAILED) return ErrnoError("mmap(thp memfd)", errno);
  // MAP_POPULATE would fault before MADV_HUGEPAGE applies: advise, then populate.
  Backing backing = Backing::kBasePages;
  absl::Status status = ::madvise(address, size, MADV_HUGEPAGE) == 0
                            ? memfd::PopulateWrite(address, size)
                            : ErrnoError("madvise(MADV_HUGEPAGE)", errno);
  // Every byte huge-mapped, or it is reported as base pages: never as more
  // than it is.
  if (status.ok() && SmapsKb(address, {"ShmemPmdMapped", "FilePmdMapped"}) * 1024 >=
                         static_cast<int64_t>(size)) {
    backing = Backing::kThp;
  }
  ::munmap(address, size);
  RETURN_IF_ERROR(status);
  return std::make_pair(std::move(fd), backing);
}

ContiguousHeap::ContiguousHeap(Options options)
    : AccountedHeap(options.name, options.hugepage_size, options.capacity),
      options_(std::move(options)) {}

absl::StatusOr<AccountedHeap::Backed> ContiguousHeap::AllocateBacking(
    uint64_t size, uint64_t requested, const std::string& memfd_name) {
  std::vector<std::string> attempts;
  // 1. hugetlb: fallocate takes the pages from the pool now, or fails cleanly.
  absl::Status hugetlb_status;
  while (true) {
    absl::StatusOr<UniqueFd> fd = AllocateHugetlb(size, memfd_name);
    if (fd.ok()) {
      return Backed{*std::move(fd), HugetlbBacking(options_.hugepage_size),
                    [this](UniqueFd fd) {
                      fd.Reset();  // its pages go back to the pool (unless a client holds them)
                      absl::MutexLock lock(&mu_);
                      --retired_hugetlb_;
                      ++freed_hugetlb_;
                    },
                    0,
                    [this] {
                      absl::MutexLock lock(&mu_);
                      ++retired_hugetlb_;
                    }};
    }
    hugetlb_status = fd.status();
    // Our own retired buffers may be about to give pages back: wait for one
    // to be freed and try again, before falling back.
    absl::MutexLock lock(&mu_);
    if (retired_hugetlb_ == 0) break;
    const uint64_t freed = freed_hugetlb_;
    auto one_more_freed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return freed_hugetlb_ != freed;
    };
    if (!AwaitWithTimeout(mu_, one_more_freed, kFreeWait)) break;
  }
  {
    HugepagePoolState pool = ReadHugepagePool(options_.hugepage_size);
    attempts.push_back(absl::StrCat("hugetlb ", FormatBytes(options_.hugepage_size), " pool has ",
                                    pool.free, " of ", pool.total, " pages free (", pool.reserved,
                                    " reserved), need ", size / options_.hugepage_size, ": ",
                                    hugetlb_status.message()));
  }
  // 2. Fallbacks, in the configured order, each rounding the request to its
  // own page: THP to 2 MiB (a partial PMD can't be huge), base pages to 4 KiB.
  auto round_up = [requested](uint64_t page) { return (requested + page - 1) / page * page; };
  for (Backing fallback : options_.fallbacks) {
    if (fallback == Backing::kThp) {
      const uint64_t thp_size = round_up(kHugePage2M);
      absl::StatusOr<std::pair<UniqueFd, Backing>> thp = AllocateThpMemfd(memfd_name, thp_size);
      if (!thp.ok()) {
        attempts.push_back(absl::StrCat("thp: ", thp.status().message()));
        continue;
      }
      bool base_allowed = false;
      for (Backing b : options_.fallbacks) base_allowed |= b == Backing::kBasePages;
      if (thp->second == Backing::kThp) {
        RETURN_IF_ERROR(memfd::Seal(thp->first.get()));
        return Backed{std::move(thp->first),        Backing::kThp, nullptr, thp_size, nullptr,
                      absl::StrJoin(attempts, "; ")};
      }
      if (base_allowed) {
        // It got base pages after all (shmem THP off, or no huge page free):
        // keep them, but at a base-page size, not a 2 MiB one.
        const uint64_t base_size = round_up(static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)));
        if (RetryOnEintr([&] {
              return ::ftruncate(thp->first.get(), static_cast<off_t>(base_size));
            }) != 0) {
          attempts.push_back(
              absl::StrCat("thp: got base pages, and ",
                           ErrnoError("ftruncate to the base-page size", errno).message()));
          continue;
        }
        RETURN_IF_ERROR(memfd::Seal(thp->first.get()));
        attempts.push_back("thp: no huge pages mapped");
        return Backed{
            std::move(thp->first),        Backing::kBasePages, nullptr, base_size, nullptr,
            absl::StrJoin(attempts, "; ")};
      }
      attempts.push_back(
          "thp: no huge pages mapped (is /sys/kernel/mm/transparent_hugepage/shmem_enabled "
          "'advise'?)");
    } else if (fallback == Backing::kBasePages) {
      const uint64_t base_size = round_up(static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)));
      ASSIGN_OR_RETURN(UniqueFd fd, memfd::Create(memfd_name, base_size, 0));
      RETURN_IF_ERROR(memfd::Prefault(fd.get(), 0, base_size));
      RETURN_IF_ERROR(memfd::Seal(fd.get()));
      return Backed{std::move(fd), Backing::kBasePages,          nullptr, base_size,
                    nullptr,       absl::StrJoin(attempts, "; ")};
    }
  }
  return HeapRefused(HeapRefusal::kPoolEmpty,
                     absl::StrCat("heap '", name(), "' cannot allocate ", FormatBytes(size), ": ",
                                  absl::StrJoin(attempts, "; ")));
}

absl::StatusOr<UniqueFd> ContiguousHeap::AllocateHugetlb(uint64_t size,
                                                         const std::string& memfd_name) {
  // Not while a carveout of ours moves pages through the pool.
  absl::MutexLock pool(&HugetlbPoolMutex());
  ASSIGN_OR_RETURN(UniqueFd fd,
                   memfd::Create(memfd_name, size, memfd::HugetlbFlags(options_.hugepage_size)));
  RETURN_IF_ERROR(memfd::Prefault(fd.get(), 0, size));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 ||
      static_cast<uint64_t>(st.st_blksize) != options_.hugepage_size) {
    return absl::InternalError("hugetlb memfd does not report the huge page size");
  }
  RETURN_IF_ERROR(memfd::Seal(fd.get()));
  return fd;
}

absl::Status ContiguousHeap::CheckBacking(uint64_t rounded, uint64_t count) const {
  // A fallback (THP, base pages) serves whatever the pool cannot.
  if (!options_.fallbacks.empty()) return absl::OkStatus();
  const HugepagePoolState pool = ReadHugepagePool(options_.hugepage_size);
  const uint64_t need = rounded / options_.hugepage_size * count;
  const uint64_t available = pool.available();
  if (available >= need) return absl::OkStatus();
  return HeapRefused(HeapRefusal::kPoolEmpty,
                     absl::StrCat("heap '", name(), "' has no fallback and its hugetlb ",
                                  FormatBytes(options_.hugepage_size), " pool has ", available,
                                  " of ", pool.total, " pages free, need ", need));
}

uint64_t ContiguousHeap::MachineRoom(const HeapStats& stats) const {
  // The pool as FillStats read it: sysfs once a Stats call.
  return stats.hugepages.available() * options_.hugepage_size +
         (options_.fallbacks.empty() ? 0 : AvailableMemoryBytes());
}

void ContiguousHeap::FillStats(HeapStats& stats) const {
  stats.backing = HugetlbBacking(options_.hugepage_size);
  stats.hugepages = ReadHugepagePool(options_.hugepage_size);
  std::vector<std::string> names;
  for (Backing b : options_.fallbacks) names.emplace_back(BackingName(b));
  stats.note =
      names.empty() ? "no fallback" : absl::StrCat("fallback: ", absl::StrJoin(names, ", "));
}

}  // namespace bufferd
