#include "testing/sleep_probe.h"

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace bufferd::testing {

bool SleepsInFutexOn(pid_t pid, pid_t tid, std::string_view mapping) {
  std::ifstream syscall_file(absl::StrCat("/proc/", pid, "/task/", tid, "/syscall"));
  std::string number, first, second;
  if (!(syscall_file >> number >> first >> second)) return false;
  // The words it sleeps on: futex's first argument, or each futex_waitv
  // entry (read from the process's memory).
  std::vector<uint64_t> addresses;
  uint64_t arg0 = 0, arg1 = 0;
  if (!absl::SimpleHexAtoi(first, &arg0) || !absl::SimpleHexAtoi(second, &arg1)) return false;
  if (number == std::to_string(SYS_futex)) {
    addresses.push_back(arg0);
  } else if (number == std::to_string(SYS_futex_waitv) && arg1 > 0 && arg1 <= 128) {
    struct Entry {
      uint64_t val;
      uint64_t uaddr;
      uint32_t flags;
      uint32_t reserved;
    };
    std::vector<Entry> entries(arg1);
    const int mem = ::open(absl::StrCat("/proc/", pid, "/mem").c_str(), O_RDONLY | O_CLOEXEC);
    if (mem < 0) return false;
    const size_t bytes = entries.size() * sizeof(Entry);
    const bool read = ::pread(mem, entries.data(), bytes, static_cast<off_t>(arg0)) ==
                      static_cast<ssize_t>(bytes);
    ::close(mem);
    if (!read) return false;
    for (const Entry& entry : entries) addresses.push_back(entry.uaddr);
  } else {
    return false;
  }
  std::ifstream maps(absl::StrCat("/proc/", pid, "/maps"));
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find(mapping) == std::string::npos) continue;
    std::istringstream range(line.substr(0, line.find(' ')));
    std::string from, to;
    if (!std::getline(range, from, '-') || !std::getline(range, to)) continue;
    uint64_t start = 0, end = 0;
    if (!absl::SimpleHexAtoi(from, &start) || !absl::SimpleHexAtoi(to, &end)) continue;
    for (uint64_t address : addresses) {
      if (address >= start && address < end) return true;
    }
  }
  return false;
}

}  // namespace bufferd::testing
