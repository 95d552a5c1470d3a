// Small helpers shared by the benchmarks: timing, percentiles, pinning. A
// pinned bufferd comes from testing/daemon_process.h.
#ifndef BUFFERD_BENCH_BENCH_UTIL_H_
#define BUFFERD_BENCH_BENCH_UTIL_H_

#include <sched.h>
#include <sys/types.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace bufferd::bench {

inline double NowMicros() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Summary {
  double p50 = 0;
  double p99 = 0;
  double per_second = 0;
};

// p50/p99 of `samples` (µs) and throughput given the wall time they took.
inline Summary Summarize(std::vector<double> samples, double wall_micros) {
  Summary s;
  if (samples.empty()) return s;
  std::sort(samples.begin(), samples.end());
  s.p50 = samples[samples.size() / 2];
  s.p99 = samples[std::min(samples.size() - 1, samples.size() * 99 / 100)];
  s.per_second = wall_micros > 0 ? samples.size() * 1e6 / wall_micros : 0;
  return s;
}

// Pins the calling thread (pid 0) or a process to one CPU.
inline bool PinTo(int cpu, pid_t pid = 0) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return ::sched_setaffinity(pid, sizeof(set), &set) == 0;
}

// Moves every thread of this process (gRPC's included) to `cpu`: what a
// placement means for a process whose library runs threads of its own.
inline void PinProcess(int cpu) {
  std::error_code error;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task", error)) {
    const std::string name = task.path().filename().string();
    if (!name.empty() && std::all_of(name.begin(), name.end(), ::isdigit)) {
      PinTo(cpu, static_cast<pid_t>(std::stol(name)));
    }
  }
}

// The number after "<field>:" in a /proc file of "name: value kB" lines
// (/proc/<pid>/status, smaps_rollup, /proc/meminfo); -1 if missing.
inline long ProcField(const std::string& path, const std::string& field) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      std::istringstream rest(line.substr(field.size() + 1));
      long value = -1;
      rest >> value;
      return value;
    }
  }
  return -1;
}

// Run time of every thread of `pid` (schedstat, ns).
inline int64_t ProcessRunNs(pid_t pid) {
  int64_t total = 0;
  std::error_code error;
  for (const auto& task :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", error)) {
    std::ifstream in(task.path() / "schedstat");
    int64_t ns = 0;
    if (in >> ns) total += ns;
  }
  return total;
}

// Context switches of every thread of `pid`, voluntary and not (status).
struct Switches {
  long voluntary = 0;
  long involuntary = 0;
};
inline Switches ProcessSwitches(pid_t pid) {
  Switches total;
  std::error_code error;
  for (const auto& task :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", error)) {
    const std::string status = (task.path() / "status").string();
    total.voluntary += std::max(0L, ProcField(status, "voluntary_ctxt_switches"));
    total.involuntary += std::max(0L, ProcField(status, "nonvoluntary_ctxt_switches"));
  }
  return total;
}

}  // namespace bufferd::bench

#endif  // BUFFERD_BENCH_BENCH_UTIL_H_
