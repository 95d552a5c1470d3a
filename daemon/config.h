// The daemon's configuration: the embedded default, loading a textproto file
// with errors that name the line and field, validation, and building heaps.
#ifndef BUFFERD_DAEMON_CONFIG_H_
#define BUFFERD_DAEMON_CONFIG_H_

#include <sys/types.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "bufferd/v1/config.pb.h"
#include "heaps/heap_registry.h"

namespace bufferd {

// The embedded default: a "system" heap, a "contiguous" heap (2 MiB hugetlb,
// falling back to THP then base pages) and a 64 MiB "carveout".
absl::string_view DefaultConfigText();
v1::Config DefaultConfig();

// Parses and validates textproto. `source` names the text in errors
// ("bufferd.conf:7:3: ...").
absl::StatusOr<v1::Config> ParseConfig(absl::string_view text, absl::string_view source);
absl::StatusOr<v1::Config> LoadConfigFile(const std::string& path);

// The smallest fd budget the daemon runs with (a config's fd_budget, or what
// RLIMIT_NOFILE leaves).
inline constexpr uint64_t kMinFdBudget = 16;

// INVALID_ARGUMENT naming the heap and field for bad values.
absl::Status ValidateConfig(const v1::Config& config);

// The gid of the group `name` a config field (`what`: "group",
// "debug_groups: group") names; INVALID_ARGUMENT "config <what> '<name>'
// does not exist" if there is none.
absl::StatusOr<gid_t> ConfigGroup(absl::string_view what, const std::string& name);

// Creates every configured heap (carveouts reserve their memory now).
absl::StatusOr<std::unique_ptr<HeapRegistry>> BuildHeaps(const v1::Config& config);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_CONFIG_H_
