// Heap: where buffers come from. One small interface, three implementations
// (SystemHeap, ContiguousHeap, CarveoutHeap), any number of named instances.
//
// Every buffer a heap hands out is a memfd that is: rounded up to the heap's
// page size, zero-filled (fresh pages, never another client's old data),
// sealed against shrink/grow (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) so no
// holder can SIGBUS the others, chmod 0400 so a same-host process of another
// uid cannot reopen it writable through /proc, and named
// "bufferd:<heap>:<name>" (visible in /proc/<pid>/maps, like DMA_BUF_SET_NAME).
//
// Thread-safety: Allocate and Stats may be called from any thread at once.
// A Heap must outlive every HeapBuffer it handed out.
#ifndef BUFFERD_HEAPS_HEAP_H_
#define BUFFERD_HEAPS_HEAP_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/unique_fd.h"
#include "heaps/kernel_info.h"
#include "heaps/memfd.h"

namespace bufferd {

enum class HeapKind { kSystem, kContiguous, kCarveout };

// What really backs a buffer's pages.
enum class Backing { kBasePages, kThp, kHugetlb2M, kHugetlb1G };

// "base_pages", "thp", "hugetlb_2m", "hugetlb_1g".
absl::string_view BackingName(Backing backing);
absl::string_view HeapKindName(HeapKind kind);

// The backing of a hugetlb memfd of `hugepage_size` (kHugePage2M or 1G).
Backing HugetlbBacking(uint64_t hugepage_size);

struct HeapStats {
  uint64_t page_size = 0;
  // 0 = unbounded.
  uint64_t capacity = 0;
  uint64_t used = 0;
  // What the next allocations may take now: capacity - used for a bounded
  // heap, and never more than the machine has for it (MemAvailable, the
  // hugepage pool), so an unbounded heap's free is a real figure too.
  uint64_t free = 0;
  uint64_t peak = 0;
  uint64_t buffer_count = 0;
  uint64_t allocations = 0;
  // Allocate calls this heap refused itself (the daemon counts every
  // refusal, its quotas' too, by reason: DaemonState::Refusals).
  uint64_t failures = 0;
  // The backing the heap tries first.
  Backing backing = Backing::kBasePages;
  // Live buffers by BackingName().
  std::map<std::string, uint64_t> buffers_by_backing;
  // Hugetlb pool behind the heap (page_size 0 if none).
  HugepagePoolState hugepages;
  // Carveout only: bytes of the unused reservation really resident, and
  // whether the reservation is mlocked.
  uint64_t reserved_resident = 0;
  bool locked = false;
  // Fallbacks taken, mlock refused, ...
  std::string note;
  // Allocations since start that a fallback served, by BackingName(), and
  // why the heap's first backing could not serve the last of them.
  std::map<std::string, uint64_t> fallbacks;
  std::string last_fallback;
};

// Why a heap refused an allocation it could not serve. Carried as a payload
// of the RESOURCE_EXHAUSTED status, so that a caller trying heaps in turn
// can say why each was skipped.
enum class HeapRefusal {
  kNone,
  // No room left in the heap's capacity (or its reservation).
  kFull,
  // The kernel's hugepage pool, and the heap's fallbacks, could not serve.
  kPoolEmpty,
  // Larger than the heap's largest single allocation.
  kTooLarge,
};
absl::Status HeapRefused(HeapRefusal why, absl::string_view message);
// kNone for any status HeapRefused did not make.
HeapRefusal RefusalOf(const absl::Status& status);

// Buffers up to this size with no page work at free (no refill) are cheap to
// free on any thread: closing the fd frees at most 256 base pages.
inline constexpr uint64_t kCheapFreeBytes = uint64_t{1} << 20;

// One allocation. Made with the buffer's fd, which the daemon hands to the
// buffer's creator (TakeFd): past that the daemon keeps no fd of the buffer,
// only its identity (dev, ino, uid). Freeing has two steps: Retire() gives
// the bytes back to the heap's accounting at once (cheap: the daemon calls it
// under its lock the moment the last handle goes, so the very next Allocate
// sees the capacity); destroying the HeapBuffer closes the fd if it was never
// taken and does the page work (for a carveout, refilling its reservation; an
// Allocate that needs those bytes waits for the refill). The destructor
// retires first if nobody did. Pages live on while any process holds an fd or
// mapping.
//
// Thread-compatible: Retire() and the destructor may run on different
// threads if the handoff between them is synchronized (a queue, a mutex).
class HeapBuffer {
 public:
  // `on_retire` returns the bytes to the heap's accounting; `on_free` gets
  // the fd at destruction and closes it along with its page work (without
  // one, the fd is just closed). `cheap_to_free`: destroying it touches few
  // pages (no refill, small).
  HeapBuffer(UniqueFd fd, uint64_t size, Backing backing, std::function<void()> on_retire,
             std::function<void(UniqueFd)> on_free, bool cheap_to_free = true);
  ~HeapBuffer();
  HeapBuffer(const HeapBuffer&) = delete;
  HeapBuffer& operator=(const HeapBuffer&) = delete;

  // Returns the bytes to the heap's accounting now; the fd stays open until
  // destruction. Idempotent.
  void Retire();

  // Borrowed: O_RDWR, sealed, close-on-exec; -1 once taken.
  int fd() const { return fd_.get(); }
  // The fd itself, for the buffer's creator; fd() is -1 from then on.
  UniqueFd TakeFd() { return std::move(fd_); }
  uint64_t size() const { return size_; }
  Backing backing() const { return backing_; }
  // False when destruction does page work worth keeping off latency-sensitive
  // threads (a big buffer whose pages may be freed now, a carveout refill).
  bool cheap_to_free() const { return cheap_to_free_; }
  // Empty, or why the heap's first backing could not serve this buffer and a
  // fallback (backing()) did.
  const std::string& fell_back_because() const { return fell_back_because_; }
  // The memfd's st_dev and st_ino (read once, as it is made): how the
  // holders view finds it in other processes' fds and mappings.
  uint64_t dev() const { return dev_; }
  uint64_t ino() const { return ino_; }
  // The memfd's owner (the daemon's euid as it made it): a client cannot
  // make a look-alike with this owner unless it runs as the daemon's uid.
  uid_t uid() const { return uid_; }
  // The memfd's st_size as it was made (sealed: it never changes).
  uint64_t file_size() const { return file_size_; }
  void set_fell_back_because(std::string why) { fell_back_because_ = std::move(why); }

 private:
  UniqueFd fd_;
  uint64_t size_;
  Backing backing_;
  bool cheap_to_free_;
  uint64_t dev_ = 0;
  uint64_t ino_ = 0;
  uid_t uid_ = static_cast<uid_t>(-1);
  uint64_t file_size_ = 0;
  std::string fell_back_because_;
  std::function<void()> on_retire_;
  std::function<void(UniqueFd)> on_free_;
};

class Heap {
 public:
  virtual ~Heap() = default;

  virtual const std::string& name() const = 0;
  virtual HeapKind kind() const = 0;
  // Sizes are rounded up to this.
  virtual uint64_t page_size() const = 0;
  // Whether Allocate may take long or wait (prefaulting and zeroing huge
  // pages, waiting for a refill): callers keep it off threads that must not
  // block. False: it touches no page (memfd_create, ftruncate, seals).
  virtual bool allocation_may_block() const = 0;

  // Allocates at least `size` bytes. INVALID_ARGUMENT for size 0 or a size
  // that cannot be rounded; RESOURCE_EXHAUSTED when the heap's capacity or the
  // kernel's pool can't serve it (the message names the heap and its state).
  virtual absl::StatusOr<std::unique_ptr<HeapBuffer>> Allocate(uint64_t size,
                                                               absl::string_view debug_name) = 0;
  // Whether `count` buffers of `size` would fit now, without allocating:
  // the same refusals as Allocate (capacity, largest allocation, the pool
  // when there is no fallback). A dry run: another allocation may take the
  // room before a real one comes.
  virtual absl::Status CheckAllocate(uint64_t size, uint64_t count) const = 0;

  virtual HeapStats Stats() const = 0;
};

// Shared bookkeeping for the heaps here: capacity check, used/peak/count,
// failures. Subclasses implement AllocateBacking for a size rounded to
// page_size() and reserved against capacity; `requested` is the caller's size,
// for fallbacks with a smaller page.
class AccountedHeap : public Heap {
 public:
  const std::string& name() const override { return name_; }
  uint64_t page_size() const override { return page_size_; }
  absl::StatusOr<std::unique_ptr<HeapBuffer>> Allocate(uint64_t size,
                                                       absl::string_view debug_name) final;
  absl::Status CheckAllocate(uint64_t size, uint64_t count) const final;
  HeapStats Stats() const override;

 protected:
  struct Backed {
    UniqueFd fd;
    Backing backing;
    // Runs when the buffer is destroyed, with the buffer's fd to close (its
    // bytes may already be back in the accounting: see HeapBuffer::Retire).
    std::function<void(UniqueFd)> on_free;
    // The memfd's real size when a fallback backing needed less than the
    // reserved size (a base-page fallback of a 1 GiB-page heap rounds to
    // 4 KiB, not 1 GiB); 0 = the size AllocateBacking was given.
    uint64_t size = 0;
    // Runs when the buffer is retired (HeapBuffer::Retire), after its bytes
    // are back in the accounting; on_free follows later.
    std::function<void()> on_retire;
    // Set when a fallback served: why the heap's first backing could not.
    std::string fell_back_because;
  };

  // `capacity` 0 = unbounded.
  AccountedHeap(std::string name, uint64_t page_size, uint64_t capacity);

  virtual absl::StatusOr<Backed> AllocateBacking(uint64_t size, uint64_t requested,
                                                 const std::string& memfd_name) = 0;
  // Adds heap-specific fields to `stats`.
  virtual void FillStats(HeapStats& stats) const {}
  // Bytes the machine could give this heap now, whatever its capacity
  // (default: MemAvailable); `stats` as FillStats left them.
  virtual uint64_t MachineRoom(const HeapStats& stats) const;
  // CheckAllocate's heap-specific part, for `count` buffers of `rounded`
  // bytes that fit the capacity.
  virtual absl::Status CheckBacking(uint64_t rounded, uint64_t count) const {
    return absl::OkStatus();
  }

 private:
  struct Accounting {
    absl::Mutex mu;
    uint64_t used ABSL_GUARDED_BY(mu) = 0;
    uint64_t peak ABSL_GUARDED_BY(mu) = 0;
    uint64_t buffer_count ABSL_GUARDED_BY(mu) = 0;
    uint64_t allocations ABSL_GUARDED_BY(mu) = 0;
    uint64_t failures ABSL_GUARDED_BY(mu) = 0;
    std::map<std::string, uint64_t> by_backing ABSL_GUARDED_BY(mu);
    std::map<std::string, uint64_t> fallbacks ABSL_GUARDED_BY(mu);
    std::string last_fallback ABSL_GUARDED_BY(mu);
  };

  const std::string name_;
  const uint64_t page_size_;
  const uint64_t capacity_;
  // MemTotal (at least two pages): the most one set from an unbounded heap
  // may take.
  const uint64_t host_memory_;
  // Largest single buffer of an unbounded heap: half of the host's RAM (as
  // ION and DMA-BUF heaps cap one allocation), whatever the quotas. A bounded
  // heap's capacity check covers it.
  const uint64_t max_allocation_;
  // `size` rounded to the page, or INVALID_ARGUMENT.
  absl::StatusOr<uint64_t> Round(uint64_t size) const;
  // The largest-allocation refusal for `rounded`, if any.
  absl::Status CheckSize(uint64_t rounded) const;
  // The refusal of `count` buffers of `rounded` bytes with `free` left.
  absl::Status NoRoom(uint64_t free, uint64_t rounded, uint64_t count) const;

  // Shared with every HeapBuffer's on_free.
  std::shared_ptr<Accounting> accounting_;
};

}  // namespace bufferd

#endif  // BUFFERD_HEAPS_HEAP_H_
