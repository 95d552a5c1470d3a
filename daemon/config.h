// The daemon's configuration: the embedded default, loading a textproto file
// with errors that name the line and field, validation, and building heaps.
#ifndef BUFFERD_DAEMON_CONFIG_H_
#define BUFFERD_DAEMON_CONFIG_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "bufferd/v1/config.pb.h"
#include "heaps/heap_registry.h"

namespace bufferd {

// What the machine a config is loaded on has: the figures a config's
// reservations are checked against, and the groups and users its names must
// resolve to. ReadMachineFacts() reads this host; tests pass fake machines.
struct MachineFacts {
  // MemTotal of /proc/meminfo, in bytes; 0 = unknown (memory is not checked).
  uint64_t mem_total = 0;
  // Hugetlb pages the kernel's pool could hand out now (free_hugepages -
  // resv_hugepages), of 2 MiB and of 1 GiB.
  uint64_t available_hugepages_2m = 0;
  uint64_t available_hugepages_1g = 0;
  // RLIMIT_MEMLOCK's hard limit in bytes (the daemon raises the soft limit to
  // it at startup); max = unlimited.
  uint64_t memlock_limit = std::numeric_limits<uint64_t>::max();
  // CAP_IPC_LOCK in the effective set: mlock then ignores RLIMIT_MEMLOCK.
  bool cap_ipc_lock = true;
  // Whether a group / user of that name exists; null = not checked.
  std::function<bool(const std::string&)> group_exists;
  std::function<bool(const std::string&)> user_exists;
};

// This host's facts: /proc/meminfo, /sys/kernel/mm/hugepages,
// getrlimit(RLIMIT_MEMLOCK), CapEff of /proc/self/status, getgrnam/getpwnam.
MachineFacts ReadMachineFacts();

// The embedded default: a "system" heap, a "contiguous" heap (2 MiB hugetlb,
// falling back to THP then base pages) and a 64 MiB "carveout". Not checked
// against the machine (it reserves 64 MiB).
std::string DefaultConfigText();
v1::Config DefaultConfig();

// Parses and validates textproto, checking it against `machine` (default:
// this host). `source` names the text in errors ("bufferd.conf:7:3: ...");
// every error is INVALID_ARGUMENT "<source>:<line>:<col>: <what>" (or
// "<source>: <what>" when nothing in the text stands for it).
//
// A field or block the text does not write gets the embedded default's
// value: an omitted `quotas` block, or an omitted field in it, is the
// default quota, never "unlimited" (write `max_bytes_per_session: 0` for
// that); so are `limits`. `usages` omitted stay empty (the default's usages
// name heaps a custom config may not have).
absl::StatusOr<v1::Config> ParseConfig(absl::string_view text, absl::string_view source);
absl::StatusOr<v1::Config> ParseConfig(absl::string_view text, absl::string_view source,
                                       const MachineFacts& machine);
// Reads `path` (INVALID_ARGUMENT if it is a directory) and parses it.
absl::StatusOr<v1::Config> LoadConfigFile(const std::string& path);
absl::StatusOr<v1::Config> LoadConfigFile(const std::string& path, const MachineFacts& machine);

// The smallest fd budget the daemon runs with (a config's fd_budget, or what
// RLIMIT_NOFILE leaves).
inline constexpr uint64_t kMinFdBudget = 16;

// INVALID_ARGUMENT naming the heap and field for bad values (without a
// place in a file, and without machine checks).
absl::Status ValidateConfig(const v1::Config& config);

// The gid of the group `name` a config field (`what`: "group",
// "debug_groups: group") names; INVALID_ARGUMENT "config <what> '<name>'
// does not exist" if there is none.
absl::StatusOr<gid_t> ConfigGroup(absl::string_view what, const std::string& name);

// Creates every configured heap (carveouts reserve their memory now).
absl::StatusOr<std::unique_ptr<HeapRegistry>> BuildHeaps(const v1::Config& config);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_CONFIG_H_
