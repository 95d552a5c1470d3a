// The fence page: one 4096-byte page per session that creates fences, made
// and sealed by that session's client library (F_SEAL_FUTURE_WRITE: nobody
// maps it writable after its owner) and uploaded with its first
// CreateFence. The daemon gives each pending fence the session creates a
// word of the page (a slot, and a generation so that a slot used again is
// never taken for the fence before). The owner writes a fence's status into
// its word when it signals, before whatever tells the daemon (its doorbell
// for OK, else a one-way record), and wakes whoever sleeps on the word if
// it attached the fence to a buffer itself (below).
//
// A holder of a buffer the fence is attached to maps the page read-only
// (OpenFencePage) and sleeps on the word beside its reservation status slot
// (fences/reservation_page.h): the owner's signal wakes it directly, with no
// daemon in between, as a timeline's does. Everything else (a deadline, the
// owner's death, a signal that did not go through the page) comes through
// the status slot, which the daemon writes, as before; so does a signal
// whose owner did not wake the word (a fence another session attached: the
// owner cannot know someone sleeps on it, and only wakes the words of
// fences it attached itself).
//
// The page is its owner's word only, and the owner may write anything in
// it, as it may signal its fences whenever it likes: a reader takes a word
// only as "this generation signalled OK" and leaves everything else (an
// error, a word it does not understand) to the status slot. The daemon reads
// the page once, when a fence would otherwise fail without its owner (the
// session's end, the deadline): what the owner wrote there is what it
// signalled. It reads a word too when the fence's doorbell rings, and before
// a call that carries the fence as rung (kRungMetadataKey) runs.
#ifndef BUFFERD_FENCES_FENCE_PAGE_H_
#define BUFFERD_FENCES_FENCE_PAGE_H_

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>

namespace bufferd::fence_page {

inline constexpr size_t kPageSize = 4096;
// Words of the page; slot 0 is none.
inline constexpr uint32_t kSlots = kPageSize / sizeof(uint32_t);
// A word: generation << 8 | status (0 while pending, else the
// v1::FenceStatus it was signalled with). Generations are 24 bits, never 0.
inline constexpr uint32_t kGenerationMask = 0xffffff;

inline constexpr uint32_t Word(uint32_t generation, uint32_t status) {
  return ((generation & kGenerationMask) << 8) | (status & 0xff);
}
inline constexpr uint32_t Generation(uint32_t word) { return word >> 8; }
inline constexpr uint32_t Status(uint32_t word) { return word & 0xff; }
// The generation after `generation` (never 0).
inline constexpr uint32_t NextGeneration(uint32_t generation) {
  const uint32_t next = (generation + 1) & kGenerationMask;
  return next == 0 ? 1 : next;
}

inline uint32_t Load(const uint32_t& word) {
  return std::atomic_ref<uint32_t>(const_cast<uint32_t&>(word)).load(std::memory_order_acquire);
}

// The owner's store, then, if `wake`, a wake of every sleeper on the word
// (the page is shared: FUTEX_WAKE, not the private form, and it costs a
// page lookup: 1-2 us here, which a signal nobody sleeps on should not pay).
inline void Publish(uint32_t& word, uint32_t value, bool wake) {
  std::atomic_ref<uint32_t>(word).store(value, std::memory_order_seq_cst);
  if (wake) (void)::syscall(SYS_futex, &word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

}  // namespace bufferd::fence_page

#endif  // BUFFERD_FENCES_FENCE_PAGE_H_
