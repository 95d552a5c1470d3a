#include "daemon/process_ref.h"

#include <fstream>
#include <iterator>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace bufferd {

uint64_t ProcessStartTicks(pid_t pid) {
  if (pid <= 0) return 0;
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  const std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so
  // count fields after its last ')'. starttime is field 22, the 20th after.
  const size_t end = stat.rfind(')');
  if (end == std::string::npos) return 0;
  const std::vector<absl::string_view> fields =
      absl::StrSplit(absl::string_view(stat).substr(end + 1), ' ', absl::SkipEmpty());
  uint64_t ticks = 0;
  if (fields.size() < 20 || !absl::SimpleAtoi(fields[19], &ticks)) return 0;
  return ticks;
}

bool ProcessExited(const ProcessRef& process) {
  if (process.pid <= 0) return false;
  const uint64_t now = ProcessStartTicks(process.pid);
  return now == 0 || (process.start_ticks != 0 && now != process.start_ticks);
}

}  // namespace bufferd
