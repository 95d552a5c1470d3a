#include "daemon/config.h"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <limits>
#include <set>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/errno_status.h"
#include "base/unique_fd.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "heaps/carveout_heap.h"
#include "heaps/contiguous_heap.h"
#include "heaps/kernel_info.h"
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

// Levenshtein distance between `a` and `b`, ignoring case.
size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      const bool same = absl::ascii_tolower(a[i - 1]) == absl::ascii_tolower(b[j - 1]);
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (same ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// The candidate closest to `written` (edit distance), if close enough to be
// what was meant: at most a third of its letters off; else the closest one
// that starts with it or that it starts with ("capacity" -> capacity_bytes);
// else "".
std::string Closest(absl::string_view written, const std::vector<std::string>& candidates) {
  std::string best;
  std::string best_prefix;
  size_t best_distance = std::numeric_limits<size_t>::max();
  size_t best_prefix_distance = std::numeric_limits<size_t>::max();
  for (const std::string& candidate : candidates) {
    const size_t distance = EditDistance(written, candidate);
    if (distance < best_distance) {
      best = candidate;
      best_distance = distance;
    }
    const bool prefix = absl::StartsWithIgnoreCase(candidate, written) ||
                        absl::StartsWithIgnoreCase(written, candidate);
    if (prefix && written.size() >= 3 && distance < best_prefix_distance) {
      best_prefix = candidate;
      best_prefix_distance = distance;
    }
  }
  if (!best.empty() && best_distance <= std::max<size_t>(1, written.size() / 3)) return best;
  return best_prefix;
}

// The text between the first `open` after `after` and the next quote, in a
// parser message ("...has no field named \"capcity\"." -> capcity); "".
std::string Quoted(absl::string_view message, absl::string_view after) {
  const size_t at = message.find(after);
  if (at == absl::string_view::npos) return "";
  const size_t start = at + after.size();
  const size_t end = message.find('"', start);
  return end == absl::string_view::npos ? "" : std::string(message.substr(start, end - start));
}

// The enum type of the first field named `name` in Config or a message in
// it; nullptr if there is none.
const google::protobuf::EnumDescriptor* EnumOfField(const google::protobuf::Descriptor* message,
                                                    const std::string& name, int depth = 0) {
  if (depth > 3) return nullptr;
  for (int i = 0; i < message->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* field = message->field(i);
    if (field->name() == name && field->enum_type() != nullptr) return field->enum_type();
  }
  for (int i = 0; i < message->field_count(); ++i) {
    if (const auto* nested = message->field(i)->message_type(); nested != nullptr) {
      if (const auto* found = EnumOfField(nested, name, depth + 1)) return found;
    }
  }
  return nullptr;
}

// A parser message with "; did you mean "<name>"?" appended when it names an
// unknown field or enum value close to a real one of that message or enum.
std::string WithSuggestion(const std::string& message) {
  std::vector<std::string> candidates;
  std::string written;
  if (absl::StartsWith(message, "Message type \"")) {
    const auto* type = google::protobuf::DescriptorPool::generated_pool()->FindMessageTypeByName(
        Quoted(message, "Message type \""));
    written = Quoted(message, "has no field named \"");
    if (type != nullptr) {
      for (int i = 0; i < type->field_count(); ++i) candidates.push_back(type->field(i)->name());
    }
  } else if (absl::StartsWith(message, "Unknown enumeration value of \"")) {
    written = Quoted(message, "Unknown enumeration value of \"");
    if (const auto* type = EnumOfField(v1::Config::descriptor(), Quoted(message, "for field \""))) {
      for (int i = 0; i < type->value_count(); ++i) candidates.push_back(type->value(i)->name());
    }
  }
  const std::string suggestion = written.empty() ? "" : Closest(written, candidates);
  if (suggestion.empty()) return message;
  return absl::StrCat(absl::StripSuffix(message, "."), "; did you mean \"", suggestion, "\"?");
}

// Collects parser errors as "source:line:column: message".
class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  explicit ErrorCollector(std::string source) : source_(std::move(source)) {}
  void AddError(int line, int column, const std::string& message) override {
    errors_.push_back(
        absl::StrCat(source_, ":", line + 1, ":", column + 1, ": ", WithSuggestion(message)));
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

// "1 TiB (1099511627776 bytes)": a figure from the config, readable and exact.
std::string Figure(uint64_t bytes) {
  if (bytes < 1024) return absl::StrCat(bytes, " bytes");
  std::string text = FormatBytes(bytes);
  if (absl::StrContains(text, " bytes)")) return text;
  return absl::StrCat(text, " (", bytes, " bytes)");
}

uint64_t SaturatingAdd(uint64_t a, uint64_t b) {
  return a > std::numeric_limits<uint64_t>::max() - b ? std::numeric_limits<uint64_t>::max()
                                                      : a + b;
}

// `bytes` rounded up to a multiple of `page`, saturating.
uint64_t RoundUp(uint64_t bytes, uint64_t page) {
  const uint64_t pages = bytes / page + (bytes % page != 0 ? 1 : 0);
  return pages > std::numeric_limits<uint64_t>::max() / page ? std::numeric_limits<uint64_t>::max()
                                                             : pages * page;
}

// The page size BuildHeaps gives a heap (2 MiB unless 1 GiB is asked for).
uint64_t HugepageOf(const v1::HeapConfig& heap) {
  return heap.hugepage_size() == v1::HUGEPAGE_SIZE_1G ? kHugePage1G : kHugePage2M;
}

// "must be A, B or C": the named values of `type` but its UNSPECIFIED.
std::string OneOf(const google::protobuf::EnumDescriptor* type) {
  std::vector<std::string> names;
  for (int i = 0; i < type->value_count(); ++i) {
    if (type->value(i)->number() != 0) names.push_back(type->value(i)->name());
  }
  std::string last = names.back();
  names.pop_back();
  return absl::StrCat("must be ", absl::StrJoin(names, ", "), " or ", last);
}

template <typename Enum>
bool Named(const google::protobuf::EnumDescriptor* type, Enum value) {
  return type->FindValueByNumber(static_cast<int>(value)) != nullptr;
}

// Checks what the heaps reserve and may hold against `machine` (nothing if
// its MemTotal is unknown). `bad(heap, field, problem)` makes the error.
//
// A carveout reserves its capacity at startup, prefaulted: from the hugetlb
// pool if the pool can hold all of it (rounded up to its huge page), else in
// base pages (CarveoutHeap::Create's own fallback). Pool pages are set aside
// already, so only base-page carveouts count against the share: together at
// most half of MemTotal. Base pages are mlocked; with require_mlock and no
// CAP_IPC_LOCK they must fit RLIMIT_MEMLOCK. A contiguous or system heap's cap
// above MemTotal caps nothing (a typo); and all caps and reservations together
// may be at most MemTotal.
template <typename Bad>
absl::Status CheckMemory(const v1::Config& config, const MachineFacts& machine, const Bad& bad) {
  const uint64_t memory = machine.mem_total;
  if (memory == 0) return absl::OkStatus();
  const uint64_t share = memory / 2;
  const std::string share_text =
      absl::StrCat("carveouts may reserve at most half of this machine's memory (MemTotal ",
                   FormatBytes(memory), "): ", FormatBytes(share));
  const uint64_t base_page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint64_t base_carveouts = 0;  // carveout bytes in base pages
  uint64_t locked = 0;          // what their mlocks take of RLIMIT_MEMLOCK
  uint64_t all = 0;             // every reservation and cap
  uint64_t pool_taken_2m = 0;   // hugetlb pages the carveouts before take
  uint64_t pool_taken_1g = 0;
  for (int i = 0; i < config.heaps_size(); ++i) {
    const v1::HeapConfig& heap = config.heaps(i);
    const uint64_t capacity = heap.capacity_bytes();
    uint64_t holds = capacity;
    if (heap.type() == v1::HEAP_TYPE_CARVEOUT) {
      const uint64_t page = HugepageOf(heap);
      const bool gigantic = page == kHugePage1G;
      uint64_t& taken = gigantic ? pool_taken_1g : pool_taken_2m;
      const uint64_t available =
          gigantic ? machine.available_hugepages_1g : machine.available_hugepages_2m;
      const uint64_t pages = capacity / page + (capacity % page != 0 ? 1 : 0);
      if (available >= taken && pages <= available - taken) {
        taken += pages;
        holds = pages * page;  // from the pool
      } else {
        holds = RoundUp(capacity, base_page);
        const std::string pool =
            available == 0
                ? ""
                : absl::StrCat(" (the ", FormatBytes(page), " hugetlb pool has ",
                               available - std::min(available, taken), " pages available, not the ",
                               pages, " it needs, so it reserves base pages)");
        if (holds > share) {
          return bad(i, "capacity_bytes",
                     absl::StrCat("is ", Figure(capacity), pool, "; ", share_text));
        }
        if (base_carveouts + holds > share) {
          return bad(
              i, "capacity_bytes",
              absl::StrCat("is ", Figure(capacity), pool, ", which with the carveouts before it (",
                           FormatBytes(base_carveouts), ") makes ",
                           FormatBytes(base_carveouts + holds), "; ", share_text));
        }
        base_carveouts += holds;
        if (!machine.cap_ipc_lock) {
          if (holds <= machine.memlock_limit && locked <= machine.memlock_limit - holds) {
            locked += holds;
          } else if (heap.require_mlock()) {
            return bad(
                i, "require_mlock",
                absl::StrCat("is set, but the carveout's ", FormatBytes(holds),
                             " of base pages, with ", FormatBytes(locked),
                             " locked by the carveouts before it, exceed RLIMIT_MEMLOCK (",
                             FormatBytes(machine.memlock_limit),
                             ") and the daemon lacks CAP_IPC_LOCK; raise the limit "
                             "(LimitMEMLOCK= in its unit, ulimit -l) or drop require_mlock"));
          }
        }
      }
    } else if (capacity > memory) {
      return bad(i, "capacity_bytes",
                 absl::StrCat("is ", Figure(capacity),
                              "; a heap's cap may be at most this machine's memory (MemTotal ",
                              FormatBytes(memory), ")"));
    }
    const uint64_t with_this = SaturatingAdd(all, holds);
    if (with_this > memory) {
      return bad(i, "capacity_bytes",
                 absl::StrCat("is ", Figure(capacity), ", which with the heaps before it (",
                              FormatBytes(all), ") makes ", FormatBytes(with_this),
                              "; the heaps' capacities together may be at most this machine's "
                              "memory (MemTotal ",
                              FormatBytes(memory), ")"));
    }
    all = with_this;
  }
  return absl::OkStatus();
}

absl::Status Validate(const v1::Config& config, const Locator& locate,
                      const MachineFacts* machine) {
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
    if (!Named(v1::HeapType_descriptor(), heap.type())) {
      return bad(i, "type",
                 absl::StrCat("is ", heap.type(), "; ", OneOf(v1::HeapType_descriptor())));
    }
    if (heap.type() == v1::HEAP_TYPE_CARVEOUT && heap.capacity_bytes() == 0) {
      return bad(i, "capacity_bytes", "is required for a carveout heap");
    }
    if (!Named(v1::HugepageSize_descriptor(), heap.hugepage_size())) {
      return bad(
          i, "hugepage_size",
          absl::StrCat("is ", heap.hugepage_size(), "; ", OneOf(v1::HugepageSize_descriptor())));
    }
    if (heap.type() == v1::HEAP_TYPE_SYSTEM &&
        heap.hugepage_size() != v1::HUGEPAGE_SIZE_UNSPECIFIED) {
      return bad(i, "hugepage_size",
                 "applies to contiguous and carveout heaps only (a system heap has 4 KiB pages)");
    }
    if (heap.type() != v1::HEAP_TYPE_CARVEOUT && heap.require_mlock()) {
      return bad(i, "require_mlock", "applies to carveout heaps only (nothing else is locked)");
    }
    if (heap.type() != v1::HEAP_TYPE_CONTIGUOUS && heap.fallback_size() > 0) {
      return bad(i, "fallback", "applies to contiguous heaps only");
    }
    for (int f = 0; f < heap.fallback_size(); ++f) {
      if (heap.fallback(f) == v1::FALLBACK_UNSPECIFIED ||
          !Named(v1::Fallback_descriptor(), heap.fallback(f))) {
        return bad(i, "fallback", "must be FALLBACK_THP or FALLBACK_BASE_PAGES", f);
      }
      for (int g = 0; g < f; ++g) {
        if (heap.fallback(g) == heap.fallback(f)) {
          return bad(i, "fallback",
                     absl::StrCat("lists ", v1::Fallback_Name(heap.fallback(f)), " twice"), f);
        }
      }
    }
  }
  if (machine != nullptr) RETURN_IF_ERROR(CheckMemory(config, *machine, bad));
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
  // GetBufferFences merges both sides' fences (FenceTable's max_merge_ids,
  // 256) into one fence.
  if (const uint32_t per_buffer = config.limits().max_fences_per_buffer(); per_buffer > 128) {
    return bad(-1, "limits.max_fences_per_buffer",
               absl::StrCat("is ", per_buffer,
                            "; must be at most 128 (both sides of a buffer merge into one fence "
                            "of at most 256)"));
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
  if (!Named(v1::DebugAccess_descriptor(), config.debug_access())) {
    return bad(
        -1, "debug_access",
        absl::StrCat("is ", config.debug_access(), "; ", OneOf(v1::DebugAccess_descriptor())));
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
  if (machine != nullptr && machine->group_exists) {
    if (!config.group().empty() && !machine->group_exists(config.group())) {
      return bad(
          -1, "group",
          absl::StrCat("names group '", config.group(), "', which does not exist on this machine"));
    }
    for (int g = 0; g < config.debug_groups_size(); ++g) {
      if (!machine->group_exists(config.debug_groups(g))) {
        return bad(-1, "debug_groups",
                   absl::StrCat("names group '", config.debug_groups(g),
                                "', which does not exist on this machine"),
                   g);
      }
    }
  }
  if (machine != nullptr && machine->user_exists && !config.user().empty() &&
      !machine->user_exists(config.user())) {
    return bad(
        -1, "user",
        absl::StrCat("names user '", config.user(), "', which does not exist on this machine"));
  }
  return absl::OkStatus();
}

// Copies singular field `field` of `from` into `to` (same message type).
void CopyField(const google::protobuf::Message& from, google::protobuf::Message* to,
               const google::protobuf::FieldDescriptor* field) {
  std::unique_ptr<google::protobuf::Message> source(from.New());
  source->CopyFrom(from);
  to->GetReflection()->SwapFields(to, source.get(), {field});
}

// Gives every field of block `block_name` (quotas, limits) that the text did
// not write the value `defaults` has: omitted means the default, and only a
// written 0 means 0.
void FillUnwritten(const google::protobuf::TextFormat::ParseInfoTree& locations,
                   const v1::Config& defaults, absl::string_view block_name, v1::Config* config) {
  const google::protobuf::FieldDescriptor* block =
      v1::Config::descriptor()->FindFieldByName(std::string(block_name));
  const auto* written = locations.GetTreeForNested(block, -1);
  const google::protobuf::Message& from = defaults.GetReflection()->GetMessage(defaults, block);
  google::protobuf::Message* to = config->GetReflection()->MutableMessage(config, block);
  const google::protobuf::Descriptor* type = block->message_type();
  for (int i = 0; i < type->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* field = type->field(i);
    if (field->is_repeated()) continue;
    if (written != nullptr && written->GetLocation(field, -1).line >= 0) continue;
    CopyField(from, to, field);
  }
}

absl::StatusOr<v1::Config> Parse(absl::string_view text, absl::string_view source,
                                 const MachineFacts* machine) {
  v1::Config config;
  google::protobuf::TextFormat::Parser parser;
  ErrorCollector errors{std::string(source)};
  parser.RecordErrorsTo(&errors);
  google::protobuf::TextFormat::ParseInfoTree locations;
  parser.WriteLocationsTo(&locations);
  if (!parser.ParseFromString(std::string(text), &config)) {
    return absl::InvalidArgumentError(errors.Joined());
  }
  if (machine != nullptr) {
    // Not for the embedded default itself (machine == nullptr): it is what
    // the others are filled from.
    const v1::Config defaults = DefaultConfig();
    FillUnwritten(locations, defaults, "quotas", &config);
    FillUnwritten(locations, defaults, "limits", &config);
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
        at = locations.GetLocation(f, f->is_repeated() ? element : -1);
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
  RETURN_IF_ERROR(Validate(config, locate, machine));
  return config;
}

// CAP_IPC_LOCK (capability 14) in CapEff of /proc/self/status.
bool HasCapIpcLock() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (!absl::StartsWith(line, "CapEff:")) continue;
    uint64_t caps = 0;
    if (!absl::SimpleHexAtoi(absl::StripAsciiWhitespace(line.substr(7)), &caps)) return false;
    return (caps >> 14) & 1;
  }
  return false;
}

}  // namespace

MachineFacts ReadMachineFacts() {
  MachineFacts machine;
  machine.mem_total = HostMemoryBytes();
  for (const uint64_t page : {kHugePage2M, kHugePage1G}) {
    (page == kHugePage2M ? machine.available_hugepages_2m : machine.available_hugepages_1g) =
        ReadHugepagePool(page).available();
  }
  struct rlimit limit {};
  if (::getrlimit(RLIMIT_MEMLOCK, &limit) == 0 && limit.rlim_max != RLIM_INFINITY) {
    machine.memlock_limit = limit.rlim_max;
  }
  machine.cap_ipc_lock = HasCapIpcLock();
  machine.group_exists = [](const std::string& name) {
    return ::getgrnam(name.c_str()) != nullptr;
  };
  machine.user_exists = [](const std::string& name) { return ::getpwnam(name.c_str()) != nullptr; };
  return machine;
}

std::string DefaultConfigText() {
  // As a file would hold it: clang-format lines the raw string's lines up
  // under its first, so every line after it carries that indent.
  const std::vector<absl::string_view> lines = absl::StrSplit(kDefaultConfig, '\n');
  size_t indent = absl::string_view::npos;
  for (size_t i = 1; i < lines.size(); ++i) {
    const size_t first = lines[i].find_first_not_of(' ');
    if (first != absl::string_view::npos) indent = std::min(indent, first);
  }
  std::string text;
  for (size_t i = 0; i < lines.size(); ++i) {
    absl::string_view line = lines[i];
    if (i > 0) {
      const size_t spaces = std::min(line.find_first_not_of(' '), line.size());
      line.remove_prefix(std::min(indent, spaces));
      text += '\n';
    }
    absl::StrAppend(&text, line);
  }
  return text;
}

v1::Config DefaultConfig() {
  absl::StatusOr<v1::Config> config = Parse(kDefaultConfig, "<embedded default>", nullptr);
  return *config;  // The embedded default is tested to parse.
}

absl::StatusOr<v1::Config> ParseConfig(absl::string_view text, absl::string_view source) {
  return ParseConfig(text, source, ReadMachineFacts());
}

absl::StatusOr<v1::Config> ParseConfig(absl::string_view text, absl::string_view source,
                                       const MachineFacts& machine) {
  return Parse(text, source, &machine);
}

absl::StatusOr<v1::Config> LoadConfigFile(const std::string& path) {
  return LoadConfigFile(path, ReadMachineFacts());
}

absl::StatusOr<v1::Config> LoadConfigFile(const std::string& path, const MachineFacts& machine) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoError(absl::StrCat("cannot open config file ", path), errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0)
    return ErrnoError(absl::StrCat("stat config file ", path), errno);
  if (S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config file ", path, " is a directory; --config takes a textproto file"));
  }
  std::string text;
  char chunk[65536];
  while (true) {
    const ssize_t n = RetryOnEintr([&] { return ::read(fd.get(), chunk, sizeof(chunk)); });
    if (n < 0) return ErrnoError(absl::StrCat("read config file ", path), errno);
    if (n == 0) break;
    text.append(chunk, static_cast<size_t>(n));
  }
  return ParseConfig(text, path, machine);
}

absl::Status ValidateConfig(const v1::Config& config) { return Validate(config, nullptr, nullptr); }

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
    const uint64_t hugepage = HugepageOf(heap);
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
