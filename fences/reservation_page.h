// A session's reservation status page: what the daemon publishes of the
// reservation objects (fences/reservations.h) of the buffers a session
// accesses, so that Buffer::BeginCpuAccess costs no round trip and no
// syscall when nothing is pending.
//
// One page per session, made by the daemon at the session's first
// GetBufferFences with `subscribe`: a memfd of kPageSize bytes the daemon
// maps writable, then seals F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK |
// F_SEAL_GROW | F_SEAL_SEAL and hands out as an O_RDONLY fd, so only the
// daemon ever writes it. Slot 0 is the header; each other slot is one
// buffer the session subscribed to (the same slot for every handle the
// session holds on it), until the buffer is freed or the session ends.
//
// Every fence attached to a buffer gets the buffer's next attach sequence
// number. A slot says, for the writers' side (KERNEL, WRITE) and the
// readers' side (READ), the lowest sequence number of a fence still
// pending (0: none). A read access is clear when no writer is pending; a
// write access when nobody is. A waiter that was told "wait for the fences
// attached up to sequence S" is done when every pending fence left on the
// sides it waits for came after S: fences attached later never hold it.
// `failures` counts the buffer's waited-for fences (not BOOKKEEP) that ended
// other than OK, so a waiter learns without asking whether anything it
// waited for failed.
//
// Each slot is a seqlock: the daemon makes `seq` odd, writes, makes it even
// again, then FUTEX_WAKEs `seq`; a waiter sleeps on `seq`.
#ifndef BUFFERD_FENCES_RESERVATION_PAGE_H_
#define BUFFERD_FENCES_RESERVATION_PAGE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace bufferd::reservation {

inline constexpr size_t kPageSize = 16384;
inline constexpr uint32_t kMagic = 0x72657376;  // "resv"
inline constexpr uint32_t kVersion = 1;

struct Slot {
  // Even when stable; the futex word.
  uint32_t seq;
  // Waited-for fences of the buffer that ended other than OK, ever.
  uint32_t failures;
  // The buffer this slot is for (0: free).
  uint64_t buffer_id;
  // Lowest attach sequence number of a pending KERNEL/WRITE fence (0: none).
  uint64_t writers_low;
  // Lowest attach sequence number of a pending READ fence (0: none).
  uint64_t readers_low;
};
static_assert(sizeof(Slot) == 32);

inline constexpr uint32_t kSlots = kPageSize / sizeof(Slot);

// Slot 0.
struct Header {
  uint32_t magic;
  uint32_t version;
  uint32_t slots;
  uint32_t reserved[5];
};
static_assert(sizeof(Header) == sizeof(Slot));

// A slot as one consistent read.
struct SlotState {
  uint32_t seq = 0;
  uint32_t failures = 0;
  uint64_t buffer_id = 0;
  uint64_t writers_low = 0;
  uint64_t readers_low = 0;
};

template <typename T>
T LoadRelaxed(const T& word) {
  return std::atomic_ref<T>(const_cast<T&>(word)).load(std::memory_order_relaxed);
}
template <typename T>
void StoreRelaxed(T& word, T value) {
  std::atomic_ref<T>(word).store(value, std::memory_order_relaxed);
}

// Reads `slot` into `*state` (seqlock: retries while the daemon writes it).
// False if no consistent read came in a bounded number of tries (a daemon
// that died mid-write leaves `seq` odd forever): ask the daemon instead.
inline bool Read(const Slot& slot, SlotState* out) {
  SlotState state;
  for (int tries = 0; tries < 100000; ++tries) {
    const uint32_t before =
        std::atomic_ref<uint32_t>(const_cast<uint32_t&>(slot.seq)).load(std::memory_order_acquire);
    if ((before & 1) != 0) continue;
    state.failures = LoadRelaxed(slot.failures);
    state.buffer_id = LoadRelaxed(slot.buffer_id);
    state.writers_low = LoadRelaxed(slot.writers_low);
    state.readers_low = LoadRelaxed(slot.readers_low);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (LoadRelaxed(slot.seq) == before) {
      state.seq = before;
      *out = state;
      return true;
    }
  }
  return false;
}

// The daemon's side: writes `state` (all but seq) into `slot`.
inline void Write(Slot& slot, const SlotState& state) {
  std::atomic_ref<uint32_t> seq(slot.seq);
  seq.fetch_add(1, std::memory_order_relaxed);  // odd
  std::atomic_thread_fence(std::memory_order_release);
  StoreRelaxed(slot.failures, state.failures);
  StoreRelaxed(slot.buffer_id, state.buffer_id);
  StoreRelaxed(slot.writers_low, state.writers_low);
  StoreRelaxed(slot.readers_low, state.readers_low);
  seq.fetch_add(1, std::memory_order_release);  // even
}

// Whether an access waiting for the fences attached up to `upto` (all of
// them: UINT64_MAX) is clear: no such fence pending on the writers' side,
// nor (for a write) on the readers'.
inline bool Clear(const SlotState& state, bool write, uint64_t upto) {
  auto side_clear = [upto](uint64_t low) { return low == 0 || low > upto; };
  return side_clear(state.writers_low) && (!write || side_clear(state.readers_low));
}

}  // namespace bufferd::reservation

#endif  // BUFFERD_FENCES_RESERVATION_PAGE_H_
