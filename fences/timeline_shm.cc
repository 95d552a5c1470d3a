#include "fences/timeline_shm.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/client_text.h"
#include "base/errno_status.h"

namespace bufferd::timeline {
namespace {

void RaiseTo(std::atomic<uint64_t>& seen, uint64_t value) {
  uint64_t current = seen.load(std::memory_order_relaxed);
  while (value > current && !seen.compare_exchange_weak(current, value)) {
  }
}

// A copy of one entry of a seqlocked ring (gen odd while it is written),
// read again a few times while it moves; false if it never held still.
template <typename Entry>
bool ReadStable(const Entry& entry, Entry& copy) {
  for (int attempt = 0; attempt < 4; ++attempt) {
    const uint32_t gen = Load(entry.gen);
    std::memcpy(&copy, &entry, sizeof(copy));
    std::atomic_thread_fence(std::memory_order_acquire);
    if (gen % 2 == 0 && Load(entry.gen) == gen) return true;
  }
  return false;
}

// The owner's failure covering `point`, if its page says so. An owner that
// keeps an entry moving gets its point failed with "(message unreadable)".
bool FindFailure(const CounterPage& counters, uint64_t point, std::string* message) {
  const uint64_t count = Load(counters.failure_count);
  const uint64_t kept = std::min<uint64_t>(count, CounterPage::kFailures);
  for (uint64_t k = 0; k < kept; ++k) {
    Failure copy;
    const bool stable =
        ReadStable(counters.failures[(count - 1 - k) % CounterPage::kFailures], copy);
    if (copy.from < point && point <= copy.to) {
      const size_t length = std::min<size_t>(copy.length, sizeof(copy.message));
      *message = stable ? EscapeClientText(absl::string_view(copy.message, length))
                        : std::string("(message unreadable: the owner kept rewriting it)");
      return true;
    }
  }
  return false;
}

// The daemon's failure covering `point`, if any (the daemon writes each
// once: an entry only moves when the ring wraps under the reader).
bool FindDaemonFailure(const StatePage& state, uint64_t point, PointState* result) {
  const uint64_t count = Load(state.failure_count);
  const uint64_t kept = std::min<uint64_t>(count, StatePage::kFailures);
  for (uint64_t k = 0; k < kept; ++k) {
    DaemonFailure copy;
    if (!ReadStable(state.failures[(count - 1 - k) % StatePage::kFailures], copy)) continue;
    if (copy.from < point && point <= copy.to) {
      result->status = v1::FenceStatus_IsValid(static_cast<int>(copy.status))
                           ? static_cast<v1::FenceStatus>(copy.status)
                           : v1::FENCE_STATUS_ERROR;
      result->message =
          std::string(copy.message, std::min<size_t>(copy.length, sizeof(copy.message)));
      return true;
    }
  }
  return false;
}

}  // namespace

int WakeAll(const uint32_t& seq) {
  const long woke = syscall(SYS_futex, &seq, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
  return woke > 0 ? static_cast<int>(woke) : 0;
}

void WakeWaker(WakePage& page) {
  Bump(page.seq);
  // seq_cst, after the bump: a sleeper counted after this load sees the
  // new seq in its futex wait, one counted before is woken.
  if (std::atomic_ref<uint32_t>(page.sleepers).load(std::memory_order_seq_cst) != 0) {
    WakeAll(page.seq);
  }
}

void NotifyArmed(WakePage& page, int notify_fd, uint64_t upto) {
  const uint64_t armed = std::atomic_ref<uint64_t>(page.armed).load(std::memory_order_seq_cst);
  if (armed == 0 || armed > upto || Load(page.notified) == armed) return;
  Store(page.notified, armed);
  const char byte = 1;
  (void)::send(notify_fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
}

namespace {

constexpr int64_t kMaxSpinNs = 1'000'000;
// -1: not read from the environment yet.
std::atomic<int64_t> spin_ns{-1};

}  // namespace

int64_t SpinNs() {
  const int64_t ns = spin_ns.load(std::memory_order_relaxed);
  if (ns >= 0) return ns;
  int64_t from_env = 20'000;
  if (const char* text = std::getenv("BUFFERD_SPIN_US"); text != nullptr && *text != '\0') {
    char* end = nullptr;
    const long long us = std::strtoll(text, &end, 10);
    if (*end == '\0' && us >= 0) from_env = std::min<long long>(us, kMaxSpinNs / 1000) * 1000;
  }
  int64_t unset = -1;
  spin_ns.compare_exchange_strong(unset, from_env, std::memory_order_relaxed);
  return spin_ns.load(std::memory_order_relaxed);
}

void SetSpinNs(int64_t ns) {
  spin_ns.store(std::clamp<int64_t>(ns, 0, kMaxSpinNs), std::memory_order_relaxed);
}

bool SpinUntilMoved(const uint32_t* const* words, const uint32_t* expected, size_t count,
                    int64_t until_ns) {
  while (true) {
    // A clock read costs tens of ns; the loads a few: look often, time rarely.
    for (int round = 0; round < 32; ++round) {
      for (size_t i = 0; i < count; ++i) {
        if (std::atomic_ref<uint32_t>(const_cast<uint32_t&>(*words[i]))
                .load(std::memory_order_acquire) != expected[i]) {
          return true;
        }
      }
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    if (MonotonicNs() >= until_ns) return false;
  }
}

uint32_t CurrentCpu() {
  const int cpu = ::sched_getcpu();
  return cpu < 0 ? 0 : static_cast<uint32_t>(cpu) + 1;
}

int64_t MonotonicNs() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
}

uint64_t Reached(const CounterPage& counters, const StatePage& state,
                 std::atomic<uint64_t>& seen) {
  // After the end the owner's page is not read any more: its session is
  // gone, whoever still maps the page.
  uint64_t reached =
      Load(state.ended) != 0 ? Load(state.ended_after) : Load(counters.reached);
  reached = std::max(reached, Load(state.observed));
  RaiseTo(seen, reached);
  return seen.load(std::memory_order_acquire);
}

PointState Evaluate(const CounterPage& counters, const StatePage& state, uint64_t point,
                    std::atomic<uint64_t>& seen, const WakePage* wake) {
  PointState result;
  if (point == 0) {
    result.done = true;
    result.status = v1::FENCE_STATUS_OK;
    return result;
  }
  const uint32_t ended = Load(state.ended);
  const uint64_t reached = Reached(counters, state, seen);
  // A deadline mark stands whether or not the point was reached since.
  const uint64_t marks = Load(state.mark_count);
  for (uint64_t i = marks > StatePage::kMarks ? marks - StatePage::kMarks : 0; i < marks; ++i) {
    if (Load(state.marks[i % StatePage::kMarks]) == point) {
      result.done = true;
      result.status = v1::FENCE_STATUS_DEADLINE_EXCEEDED;
      result.message =
          absl::StrCat("point ", point, " was not reached within the timeline's deadline (",
                       Load(state.deadline_ms), " ms of being waited on)");
      return result;
    }
  }
  if (point > reached && wake != nullptr) {
    const uint64_t count = Load(wake->expired_count);
    for (uint64_t i = count > WakePage::kExpired ? count - WakePage::kExpired : 0; i < count; ++i) {
      if (Load(wake->expired[i % WakePage::kExpired]) == point) {
        result.done = true;
        result.status = v1::FENCE_STATUS_DEADLINE_EXCEEDED;
        result.message = absl::StrCat(
            "point ", point, " (the timeline is at ", reached,
            ") was not reached within the timeline's deadline (", Load(state.deadline_ms),
            " ms of being waited on); it is not the next point, so it failed for this session "
            "only");
        return result;
      }
    }
  }
  if (point > reached) {
    if (ended == 0) return result;
    result.done = true;
    if (ended == v1::FENCE_STATUS_CANCELLED) {
      result.status = v1::FENCE_STATUS_CANCELLED;
      result.message = absl::StrCat("the owner dropped the timeline at point ",
                                    Load(state.ended_after), ", before point ", point);
    } else {
      result.status = v1::FENCE_STATUS_OWNER_DIED;
      result.message = absl::StrCat("the owner's session ended at point ",
                                    Load(state.ended_after), ", before point ", point);
    }
    return result;
  }
  result.done = true;
  if (FindDaemonFailure(state, point, &result)) return result;
  if (FindFailure(counters, point, &result.message)) {
    result.status = v1::FENCE_STATUS_ERROR;
    return result;
  }
  result.status = v1::FENCE_STATUS_OK;
  return result;
}

bool Available(const CounterPage& counters, const StatePage& state, uint64_t point,
               std::atomic<uint64_t>& seen) {
  return point <= Load(state.available) || point <= Reached(counters, state, seen);
}

absl::Status CheckPageFd(int fd, bool read_only_for_others, const char* what) {
  struct stat st;
  if (fstat(fd, &st) != 0) return ErrnoError(absl::StrCat(what, ": fstat"), errno);
  const int seals = fcntl(fd, F_GET_SEALS);
  if (!S_ISREG(st.st_mode) || seals < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " is not a memfd (memfd_create with MFD_ALLOW_SEALING)"));
  }
  if (st.st_size != static_cast<off_t>(kPageSize)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " is ", st.st_size, " bytes; it must be ", kPageSize));
  }
  int need = F_SEAL_SHRINK | F_SEAL_GROW;
  std::string names = "F_SEAL_SHRINK and F_SEAL_GROW";
  if (read_only_for_others) {
    // F_SEAL_SEAL too: nobody who gets a copy may seal it against its owner.
    need |= F_SEAL_SEAL;
    if ((seals & (F_SEAL_FUTURE_WRITE | F_SEAL_WRITE)) == 0) need |= F_SEAL_FUTURE_WRITE;
    names = "F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_FUTURE_WRITE and F_SEAL_SEAL";
  }
  if ((seals & need) != need) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be sealed with ", names, " (its seals: 0x",
                     absl::Hex(seals), ")"));
  }
  return absl::OkStatus();
}

absl::Status WaitAny(const uint32_t* const* words, const uint32_t* expected, size_t count,
                     int64_t until_ns, bool* capped_out, int64_t now_ns) {
  if (capped_out != nullptr) *capped_out = false;
  if (count == 0 || count > FUTEX_WAITV_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("futex_waitv takes 1 to ", FUTEX_WAITV_MAX,
                                                   " words, not ", count));
  }
  // Never long: a requeued waiter (see kMaxSleepNs) looks again soon.
  const int64_t now = now_ns != 0 ? now_ns : MonotonicNs();
  const bool capped = until_ns - now > kMaxSleepNs;
  const int64_t wake_at = capped ? now + kMaxSleepNs : until_ns;
  timespec until;
  until.tv_sec = wake_at / 1'000'000'000;
  until.tv_nsec = wake_at % 1'000'000'000;
  long rc;
  if (count == 1) {
    // One word: FUTEX_WAIT_BITSET (an absolute CLOCK_MONOTONIC timeout), a
    // little cheaper than futex_waitv.
    rc = syscall(SYS_futex, words[0], FUTEX_WAIT_BITSET, expected[0], &until, nullptr,
                 FUTEX_BITSET_MATCH_ANY);
  } else {
    // Only the entries used are written (the whole array is 3 KiB of stack).
    futex_waitv waiters[FUTEX_WAITV_MAX];
    for (size_t i = 0; i < count; ++i) {
      waiters[i] = {.val = expected[i],
                    .uaddr = reinterpret_cast<uintptr_t>(words[i]),
                    .flags = FUTEX_32,
                    .__reserved = 0};
    }
    rc = syscall(SYS_futex_waitv, waiters, count, 0, &until, CLOCK_MONOTONIC);
  }
  if (rc >= 0) return absl::OkStatus();
  switch (errno) {
    case EAGAIN:
    case EINTR:
      return absl::OkStatus();
    case ETIMEDOUT:
      if (capped) {
        if (capped_out != nullptr) *capped_out = true;
        return absl::OkStatus();
      }
      return absl::DeadlineExceededError("timed out");
    default:
      return ErrnoError("futex_waitv", errno);
  }
}

}  // namespace bufferd::timeline
