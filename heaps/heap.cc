#include "heaps/heap.h"

#include <sys/stat.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
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

Backing HugetlbBacking(uint64_t hugepage_size) {
  return hugepage_size == kHugePage1G ? Backing::kHugetlb1G : Backing::kHugetlb2M;
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

void HeapBuffer::Retire() {
  if (on_retire_) std::exchange(on_retire_, nullptr)();
}

HeapBuffer::HeapBuffer(UniqueFd fd, uint64_t size, Backing backing, std::function<void()> on_retire,
                       std::function<void(UniqueFd)> on_free, bool cheap_to_free)
    : fd_(std::move(fd)),
      size_(size),
      backing_(backing),
      cheap_to_free_(cheap_to_free),
      on_retire_(std::move(on_retire)),
      on_free_(std::move(on_free)) {
  if (struct stat st{}; ::fstat(fd_.get(), &st) == 0) {
    dev_ = st.st_dev;
    ino_ = st.st_ino;
    uid_ = st.st_uid;
    file_size_ = static_cast<uint64_t>(st.st_size);
  }
}

HeapBuffer::~HeapBuffer() {
  Retire();
  if (on_free_) {
    on_free_(std::move(fd_));
  } else {
    fd_.Reset();
  }
}

namespace {
constexpr absl::string_view kRefusalPayload = "type.bufferd.dev/heap-refusal";
}  // namespace

absl::Status HeapRefused(HeapRefusal why, absl::string_view message) {
  absl::Status status = absl::ResourceExhaustedError(message);
  status.SetPayload(kRefusalPayload, absl::Cord(std::string(1, static_cast<char>(why))));
  return status;
}

HeapRefusal RefusalOf(const absl::Status& status) {
  const auto payload = status.GetPayload(kRefusalPayload);
  if (!payload.has_value() || payload->size() != 1) return HeapRefusal::kNone;
  const char value = std::string(*payload)[0];
  if (value < static_cast<char>(HeapRefusal::kNone) ||
      value > static_cast<char>(HeapRefusal::kTooLarge)) {
    return HeapRefusal::kNone;
  }
  return static_cast<HeapRefusal>(value);
}

AccountedHeap::AccountedHeap(std::string name, uint64_t page_size, uint64_t capacity)
    : name_(std::move(name)),
      page_size_(page_size),
      capacity_(capacity),
      host_memory_(std::max<uint64_t>(HostMemoryBytes(), 2 * page_size)),
      max_allocation_(host_memory_ / 2),
      accounting_(std::make_shared<Accounting>()) {}

absl::StatusOr<uint64_t> AccountedHeap::Round(uint64_t size) const {
  if (size == 0) return absl::InvalidArgumentError("size must be greater than 0");
  if (size > std::numeric_limits<uint64_t>::max() - page_size_ ||
      size > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat("size ", size, " is too large"));
  }
  return (size + page_size_ - 1) / page_size_ * page_size_;
}

absl::Status AccountedHeap::CheckSize(uint64_t rounded) const {
  if (capacity_ == 0 && rounded > max_allocation_) {
    return HeapRefused(
        HeapRefusal::kTooLarge,
        absl::StrCat("heap '", name_, "' allocates at most ", FormatBytes(max_allocation_),
                     " in one buffer (half of this host's RAM), asked for ", FormatBytes(rounded)));
  }
  if (capacity_ != 0 && rounded > capacity_) {
    return HeapRefused(HeapRefusal::kTooLarge,
                       absl::StrCat("heap '", name_, "' holds ", FormatBytes(capacity_),
                                    " in all, asked for ", FormatBytes(rounded)));
  }
  return absl::OkStatus();
}

absl::Status AccountedHeap::NoRoom(uint64_t free, uint64_t rounded, uint64_t count) const {
  return HeapRefused(
      HeapRefusal::kFull,
      absl::StrCat("heap '", name_, "' has ", FormatBytes(free), " free of ",
                   FormatBytes(capacity_), ", asked for ",
                   count == 1 ? "" : absl::StrCat(count, " x "), FormatBytes(rounded)));
}

absl::Status AccountedHeap::CheckAllocate(uint64_t size, uint64_t count) const {
  ASSIGN_OR_RETURN(const uint64_t rounded, Round(size));
  RETURN_IF_ERROR(CheckSize(rounded));
  // An unbounded heap's buffers are each at most half of this host's RAM;
  // a set of them together at most all of it (pages are lazy, so nothing
  // else would stop a set no touch of it could ever be served).
  if (capacity_ == 0 && count > 1 && count > host_memory_ / rounded) {
    return HeapRefused(
        HeapRefusal::kTooLarge,
        absl::StrCat("heap '", name_, "' allocates at most ", FormatBytes(host_memory_),
                     " in one set (this host's RAM), asked for ", count, " x ",
                     FormatBytes(rounded)));
  }
  if (capacity_ != 0) {
    absl::MutexLock lock(&accounting_->mu);
    const uint64_t free = capacity_ - accounting_->used;
    if (count > free / rounded) {
      return NoRoom(free, rounded, count);
    }
  }
  return CheckBacking(rounded, count);
}

absl::StatusOr<std::unique_ptr<HeapBuffer>> AccountedHeap::Allocate(uint64_t size,
                                                                    absl::string_view debug_name) {
  ASSIGN_OR_RETURN(uint64_t rounded, Round(size));
  if (absl::Status too_large = CheckSize(rounded); !too_large.ok()) {
    absl::MutexLock lock(&accounting_->mu);
    ++accounting_->failures;
    return too_large;
  }
  {
    absl::MutexLock lock(&accounting_->mu);
    if (capacity_ != 0 && rounded > capacity_ - accounting_->used) {
      ++accounting_->failures;
      return NoRoom(capacity_ - accounting_->used, rounded, 1);
    }
    if (rounded > std::numeric_limits<uint64_t>::max() - accounting_->used) {
      ++accounting_->failures;
      return HeapRefused(HeapRefusal::kFull, absl::StrCat("heap '", name_, "' cannot count ",
                                                          FormatBytes(rounded), " more bytes"));
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
  const bool cheap_to_free = rounded <= kCheapFreeBytes && !backed->on_free;
  ++accounting_->by_backing[std::string(BackingName(backing))];
  if (!backed->fell_back_because.empty()) {
    ++accounting_->fallbacks[std::string(BackingName(backing))];
    accounting_->last_fallback = backed->fell_back_because;
  }
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
  auto buffer =
      std::make_unique<HeapBuffer>(std::move(backed->fd), rounded, backing, std::move(on_retire),
                                   std::move(backed->on_free), cheap_to_free);
  buffer->set_fell_back_because(std::move(backed->fell_back_because));
  return buffer;
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
    stats.fallbacks = accounting_->fallbacks;
    stats.last_fallback = accounting_->last_fallback;
  }
  const uint64_t capacity_room = capacity_ == 0
                                     ? std::numeric_limits<uint64_t>::max()
                                     : (capacity_ > stats.used ? capacity_ - stats.used : 0);
  FillStats(stats);
  stats.free = std::min(capacity_room, MachineRoom(stats));
  return stats;
}

uint64_t AccountedHeap::MachineRoom(const HeapStats&) const { return AvailableMemoryBytes(); }

}  // namespace bufferd
