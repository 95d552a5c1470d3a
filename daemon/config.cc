#include "daemon/config.h"

#include <grp.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "base/errno_status.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "heaps/carveout_heap.h"
#include "heaps/contiguous_heap.h"
#include "heaps/system_heap.h"

namespace bufferd {
namespace {

constexpr char kDefaultConfig[] = R"pb(# bufferd embedded default configuration.
                                       heaps { name: "system" type: HEAP_TYPE_SYSTEM }
                                       heaps {
                                         name: "contiguous"
                                         type: HEAP_TYPE_CONTIGUOUS
                                         hugepage_size: HUGEPAGE_SIZE_2M
                                         fallback: FALLBACK_THP
                                         fallback: FALLBACK_BASE_PAGES
                                       }
                                       heaps {
                                         name: "carveout"
                                         type: HEAP_TYPE_CARVEOUT
                                         capacity_bytes: 67108864  # 64 MiB
                                         hugepage_size: HUGEPAGE_SIZE_2M
                                       }
                                       quotas {
                                         max_bytes_per_session: 4294967296  # 4 GiB per heap
                                         max_bytes_per_uid: 8589934592      # 8 GiB per heap
                                         max_buffers_per_session: 4096
                                         max_fences_per_session: 4096
                                         max_allocation_bytes: 1073741824  # 1 GiB
                                       }
                                       log_level: "info"
                                       debug_access: DEBUG_ACCESS_OPERATORS
                                       default_token_ttl_ms: 30000
                                       max_queued_deliveries: 1024
                                       stalled_session_timeout_ms: 10000
                                       default_fence_deadline_ms: 10000
                                       max_fence_deadline_ms: 300000
                                       timeline_scan_ms: 100
                                       limits {
                                         max_sessions: 4096
                                         max_sessions_per_uid: 1024
                                         max_control_connections: 4096
                                         max_control_connections_per_uid: 1024
                                         # max_fds_per_uid: half the fd budget
                                         max_fences: 65536
                                         max_fences_per_uid: 16384
                                         max_held_fences_per_session: 16384
                                         max_fence_waits_per_session: 16384
                                         max_fence_waits_per_uid: 65536
                                         max_fence_waits: 262144
                                         max_timelines_per_session: 256
                                         max_timelines_per_uid: 1024
                                         max_timelines: 4096
                                         max_points_behind_fences: 1024
                                         max_fences_per_buffer: 64
                                         max_buffers_per_call: 64
                                         max_frame_dimension: 16384
                                       }
                                       usages {
                                         name: "camera_frame"
                                         heaps: [ "contiguous", "carveout", "system" ]
                                       }
                                       usages {
                                         name: "display_frame"
                                         heaps: [ "contiguous", "system" ]
                                       }
                                       usages { name: "cpu_scratch" heaps: "system" }
)pb";

// Collects parser errors as "source:line:column: message".
class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  explicit ErrorCollector(std::string source) : source_(std::move(source)) {}
  void AddError(int line, int column, const std::string& message) override {
    errors_.push_back(absl::StrCat(source_, ":", line + 1, ":", column + 1, ": ", message));
  }
  void AddWarning(int line, int column, const std::string& message) override {}
  std::string Joined() const { return absl::StrJoin(errors_, "; "); }

 private:
  std::string source_;
  std::vector<std::string> errors_;
};

bool ValidHeapName(const std::string& name) {
  if (name.empty() || name.size() > 32) return false;
  for (char c : name) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-')) return false;
  }
  return true;
}

// The prefix an error about a field starts with: "source:line:column: "
// (1-based) where the field, or for one not written its heap, stands in the
// text; "source: " where nothing does (heap -1 and an unknown field name:
// the config as a whole).
using Locator = std::function<std::string(int heap, absl::string_view field, int element)>;

absl::Status Validate(const v1::Config& config, const Locator& locate) {
  // heap = -1 for top-level fields.
  // `element`: which value of a repeated field.
  auto bad = [&](int heap, absl::string_view field, absl::string_view problem, int element = 0) {
    std::string where = locate ? locate(heap, field, element) : "";
    if (heap >= 0) {
      absl::StrAppend(&where, "heaps[", heap, "] ('", config.heaps(heap).name(), "'): ");
    }
    return absl::InvalidArgumentError(absl::StrCat(where, "field '", field, "' ", problem));
  };
  if (config.heaps_size() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(locate ? locate(-1, "", 0) : "", "config defines no heaps"));
  }
  std::set<std::string> names;
  for (int i = 0; i < config.heaps_size(); ++i) {
    const v1::HeapConfig& heap = config.heaps(i);
    if (!ValidHeapName(heap.name())) return bad(i, "name", "must match [a-z0-9_-]{1,32}");
    if (!names.insert(heap.name()).second) return bad(i, "name", "is used twice");
    if (heap.type() == v1::HEAP_TYPE_UNSPECIFIED) return bad(i, "type", "is required");
    if (heap.type() == v1::HEAP_TYPE_CARVEOUT && heap.capacity_bytes() == 0) {
      return bad(i, "capacity_bytes", "is required for a carveout heap");
    }
    if (heap.type() != v1::HEAP_TYPE_CONTIGUOUS && heap.fallback_size() > 0) {
      return bad(i, "fallback", "applies to contiguous heaps only");
    }
    for (int f = 0; f < heap.fallback_size(); ++f) {
      if (heap.fallback(f) == v1::FALLBACK_UNSPECIFIED) {
        return bad(i, "fallback", "must be FALLBACK_THP or FALLBACK_BASE_PAGES", f);
      }
    }
  }
  std::set<std::string> usages;
  for (int u = 0; u < config.usages_size(); ++u) {
    const v1::UsageConfig& usage = config.usages(u);
    auto bad_usage = [&](absl::string_view field, absl::string_view problem, int element = -1) {
      std::string where =
          locate ? locate(-1, absl::StrCat("usages#", u, ".", field), std::max(element, 0)) : "";
      return absl::InvalidArgumentError(absl::StrCat(where, "usages[", u, "] ('", usage.name(),
                                                     "'): field '", field, "' ", problem));
    };
    if (!ValidHeapName(usage.name())) return bad_usage("name", "must match [a-z0-9_-]{1,32}");
    if (!usages.insert(usage.name()).second) return bad_usage("name", "is used twice");
    if (usage.heaps_size() == 0) return bad_usage("heaps", "must name at least one heap");
    if (usage.heaps_size() > 8) return bad_usage("heaps", "names more than 8 heaps");
    std::set<std::string> listed;
    for (int h = 0; h < usage.heaps_size(); ++h) {
      if (!names.count(usage.heaps(h))) {
        return bad_usage(
            "heaps",
            absl::StrCat("names heap '", usage.heaps(h), "', which the config does not define"), h);
      }
      if (!listed.insert(usage.heaps(h)).second) {
        return bad_usage("heaps", absl::StrCat("lists heap '", usage.heaps(h), "' twice"), h);
      }
    }
  }
  if (const uint32_t per_call = config.limits().max_buffers_per_call(); per_call > 1024) {
    return bad(-1, "limits.max_buffers_per_call",
               absl::StrCat("is ", per_call, "; must be at most 1024"));
  }
  if (const uint32_t dimension = config.limits().max_frame_dimension(); dimension > 65536) {
    return bad(-1, "limits.max_frame_dimension",
               absl::StrCat("is ", dimension, "; must be at most 65536"));
  }
  static const std::set<std::string> kLevels = {"",     "trace", "debug",    "info",
                                                "warn", "error", "critical", "off"};
  if (!kLevels.count(config.log_level())) {
    return bad(-1, "log_level",
               absl::StrCat("is '", config.log_level(),
                            "'; must be trace, debug, info, warn, error, critical or off"));
  }
  if (config.default_token_ttl_ms() > 3600 * 1000) {
    return bad(-1, "default_token_ttl_ms", "must be at most 3600000");
  }
  const uint32_t max_deadline =
      config.max_fence_deadline_ms() != 0 ? config.max_fence_deadline_ms() : 300000;
  if (config.max_fence_deadline_ms() > 24 * 3600 * 1000) {
    return bad(-1, "max_fence_deadline_ms", "must be at most 86400000 (a day)");
  }
  if (config.timeline_scan_ms() > 10000) {
    return bad(-1, "timeline_scan_ms", "must be at most 10000 (10 s)");
  }
  if (config.default_fence_deadline_ms() > max_deadline) {
    return bad(-1, "default_fence_deadline_ms",
               absl::StrCat("is ", config.default_fence_deadline_ms(),
                            "; must be at most max_fence_deadline_ms (", max_deadline, ")"));
  }
  // Every client needs a session, a control connection and, per buffer, its
  // fd and the one granted to it: less than that serves nobody.
  if (config.fd_budget() != 0 && config.fd_budget() < kMinFdBudget) {
    return bad(-1, "fd_budget", absl::StrCat("is ", config.fd_budget(), "; must be at least ",
                                             kMinFdBudget, " (or 0 for the default)"));
  }
  if (const uint32_t per_uid = config.limits().max_fds_per_uid(); per_uid != 0 && per_uid < 4) {
    return bad(-1, "limits.max_fds_per_uid",
               absl::StrCat("is ", per_uid,
                            "; must be at least 4 (a session, a control connection, a buffer "
                            "and the fd granted for it), or 0 for the default"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view DefaultConfigText() { return kDefaultConfig; }

v1::Config DefaultConfig() {
  absl::StatusOr<v1::Config> config = ParseConfig(kDefaultConfig, "<embedded default>");
  return *config;  // The embedded default is tested to parse.
}

absl::StatusOr<v1::Config> ParseConfig(absl::string_view text, absl::string_view source) {
  v1::Config config;
  google::protobuf::TextFormat::Parser parser;
  ErrorCollector errors{std::string(source)};
  parser.RecordErrorsTo(&errors);
  google::protobuf::TextFormat::ParseInfoTree locations;
  parser.WriteLocationsTo(&locations);
  if (!parser.ParseFromString(std::string(text), &config)) {
    return absl::InvalidArgumentError(absl::StrCat("bad config: ", errors.Joined()));
  }
  const google::protobuf::Descriptor* root = v1::Config::descriptor();
  const google::protobuf::FieldDescriptor* heaps_field = root->FindFieldByName("heaps");
  Locator locate = [&](int heap, absl::string_view field, int element) -> std::string {
    google::protobuf::TextFormat::ParseLocation at;
    if (heap < 0 && absl::StartsWith(field, "usages#")) {
      // "usages#<index>.<field>": a field of one usage, or the usage itself.
      const std::pair<std::string, std::string> path =
          absl::StrSplit(field.substr(7), absl::MaxSplits('.', 1));
      int index = 0;
      const auto* usages_field = root->FindFieldByName("usages");
      if (absl::SimpleAtoi(path.first, &index)) {
        const auto* f = v1::UsageConfig::descriptor()->FindFieldByName(path.second);
        const auto* nested = locations.GetTreeForNested(usages_field, index);
        if (nested != nullptr && f != nullptr) {
          at = nested->GetLocation(f, f->is_repeated() ? element : -1);
        }
        if (at.line < 0) at = locations.GetLocation(usages_field, index);
      }
    } else if (heap < 0 && absl::StrContains(field, '.')) {
      // A field of a top-level block ("limits.max_fds_per_uid"), or the
      // block itself if the field is not written.
      const std::pair<std::string, std::string> path = absl::StrSplit(field, '.');
      if (const auto* block = root->FindFieldByName(path.first); block != nullptr) {
        const auto* f = block->message_type()->FindFieldByName(path.second);
        const auto* nested = locations.GetTreeForNested(block, -1);
        if (nested != nullptr && f != nullptr) at = nested->GetLocation(f, -1);
        if (at.line < 0) at = locations.GetLocation(block, -1);
      }
    } else if (heap < 0) {
      if (const auto* f = root->FindFieldByName(std::string(field)); f != nullptr) {
        at = locations.GetLocation(f, -1);
      }
    } else {
      const google::protobuf::FieldDescriptor* f =
          v1::HeapConfig::descriptor()->FindFieldByName(std::string(field));
      const auto* nested = locations.GetTreeForNested(heaps_field, heap);
      if (nested != nullptr && f != nullptr) {
        at = nested->GetLocation(f, f->is_repeated() ? element : -1);
      }
      if (at.line < 0) at = locations.GetLocation(heaps_field, heap);  // the heap itself
    }
    // "bufferd.conf:4:3: ", or "bufferd.conf: " without a place.
    return at.line < 0 ? absl::StrCat(source, ": ")
                       : absl::StrCat(source, ":", at.line + 1, ":", at.column + 1, ": ");
  };
  RETURN_IF_ERROR(Validate(config, locate));
  return config;
}

absl::StatusOr<v1::Config> LoadConfigFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return ErrnoError(absl::StrCat("cannot open config file ", path), errno);
  std::stringstream text;
  text << in.rdbuf();
  return ParseConfig(text.str(), path);
}

absl::Status ValidateConfig(const v1::Config& config) { return Validate(config, nullptr); }

absl::StatusOr<gid_t> ConfigGroup(absl::string_view what, const std::string& name) {
  struct group* entry = ::getgrnam(name.c_str());
  if (entry == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("config ", what, " '", name, "' does not exist"));
  }
  return entry->gr_gid;
}

absl::StatusOr<std::unique_ptr<HeapRegistry>> BuildHeaps(const v1::Config& config) {
  auto registry = std::make_unique<HeapRegistry>();
  for (const v1::HeapConfig& heap : config.heaps()) {
    const uint64_t hugepage =
        heap.hugepage_size() == v1::HUGEPAGE_SIZE_1G ? kHugePage1G : kHugePage2M;
    std::unique_ptr<Heap> built;
    switch (heap.type()) {
      case v1::HEAP_TYPE_SYSTEM:
        built = std::make_unique<SystemHeap>(heap.name(), heap.capacity_bytes());
        break;
      case v1::HEAP_TYPE_CONTIGUOUS: {
        ContiguousHeap::Options options;
        options.name = heap.name();
        options.hugepage_size = hugepage;
        options.capacity = heap.capacity_bytes();
        options.fallbacks.clear();
        for (int f : heap.fallback()) {
          options.fallbacks.push_back(f == v1::FALLBACK_THP ? Backing::kThp : Backing::kBasePages);
        }
        built = std::make_unique<ContiguousHeap>(options);
        break;
      }
      case v1::HEAP_TYPE_CARVEOUT: {
        CarveoutHeap::Options options;
        options.name = heap.name();
        options.capacity = heap.capacity_bytes();
        options.hugepage_size = hugepage;
        options.require_mlock = heap.require_mlock();
        ASSIGN_OR_RETURN(built, CarveoutHeap::Create(options));
        break;
      }
      default:
        return absl::InvalidArgumentError(absl::StrCat("heap '", heap.name(), "' has no type"));
    }
    RETURN_IF_ERROR(registry->Add(std::move(built)));
  }
  return registry;
}

}  // namespace bufferd
