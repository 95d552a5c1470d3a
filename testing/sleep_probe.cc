#include "testing/sleep_probe.h"

#include <sys/syscall.h>

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace bufferd::testing {

bool SleepsInFutexOn(pid_t pid, pid_t tid, std::string_view mapping) {
  std::ifstream syscall_file(absl::StrCat("/proc/", pid, "/task/", tid, "/syscall"));
  std::string number, first;
  if (!(syscall_file >> number >> first) || number != std::to_string(SYS_futex)) return false;
  uint64_t address = 0;
  if (!absl::SimpleHexAtoi(first, &address)) return false;
  std::ifstream maps(absl::StrCat("/proc/", pid, "/maps"));
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find(mapping) == std::string::npos) continue;
    std::istringstream range(line.substr(0, line.find(' ')));
    std::string from, to;
    if (!std::getline(range, from, '-') || !std::getline(range, to)) continue;
    uint64_t start = 0, end = 0;
    if (absl::SimpleHexAtoi(from, &start) && absl::SimpleHexAtoi(to, &end) && address >= start &&
        address < end) {
      return true;
    }
  }
  return false;
}

}  // namespace bufferd::testing
