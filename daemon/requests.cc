#include "daemon/requests.h"

#include <algorithm>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/client_text.h"
#include "base/errno_status.h"
#include "base/frame_format.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/unknown_field_set.h"

namespace bufferd {
namespace {

// Configured heap and usage names are [a-z0-9_-]{1,32}: a longer request
// names none.
constexpr size_t kMaxNameBytes = 32;
// Most heaps one request may list.
constexpr int kMaxHeapsPerRequest = 8;

absl::Status CheckName(absl::string_view field, absl::string_view noun, absl::string_view name) {
  if (name.size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, " name is ", name.size(), " bytes; ",
                                                   noun, " names are at most ", kMaxNameBytes));
  }
  return absl::OkStatus();
}

// The heaps a request names, in order.
absl::StatusOr<std::vector<Heap*>> ResolveHeaps(const HeapRegistry& heaps,
                                                const AllocationRules& rules,
                                                const v1::AllocateRequest& request) {
  const int named = !request.heap().empty() + (request.heaps_size() > 0) + !request.usage().empty();
  if (named == 0) {
    return absl::InvalidArgumentError("no heap given: set heap, heaps (a non-empty list) or usage");
  }
  if (named > 1) {
    return absl::InvalidArgumentError(
        "heap, heaps and usage are alternatives: set exactly one of them");
  }
  std::vector<Heap*> list;
  if (!request.heap().empty()) {
    RETURN_IF_ERROR(CheckName("heap", "heap", request.heap()));
    ASSIGN_OR_RETURN(Heap * heap, heaps.Get(request.heap()));
    list.push_back(heap);
    return list;
  }
  std::vector<std::string> names(request.heaps().begin(), request.heaps().end());
  if (!request.usage().empty()) {
    RETURN_IF_ERROR(CheckName("usage", "usage", request.usage()));
    auto it = rules.usages.find(request.usage());
    if (it == rules.usages.end()) {
      std::vector<std::string> known;
      for (const auto& [name, unused] : rules.usages) known.push_back(name);
      return absl::NotFoundError(absl::StrCat(
          "unknown usage ", QuoteClientText(request.usage()),
          " (usages: ", known.empty() ? "none configured" : absl::StrJoin(known, ", "), ")"));
    }
    names = it->second;
  } else if (request.heaps_size() > kMaxHeapsPerRequest) {
    return absl::InvalidArgumentError(absl::StrCat("heaps lists ", request.heaps_size(),
                                                   " heaps; at most ", kMaxHeapsPerRequest));
  }
  std::set<std::string> seen;
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string field = absl::StrCat("heaps[", i, "]");
    if (names[i].empty()) return absl::InvalidArgumentError(absl::StrCat(field, " is empty"));
    RETURN_IF_ERROR(CheckName(field, "heap", names[i]));
    if (!seen.insert(names[i]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " ", QuoteClientText(names[i]), " is listed twice"));
    }
    ASSIGN_OR_RETURN(Heap * heap, heaps.Get(names[i]));
    list.push_back(heap);
  }
  return list;
}

}  // namespace

AllocationRules RulesFromConfig(const v1::Config& config) {
  AllocationRules rules;
  rules.quotas = config.quotas();
  for (const v1::UsageConfig& usage : config.usages()) {
    rules.usages[usage.name()] = {usage.heaps().begin(), usage.heaps().end()};
  }
  if (config.limits().max_buffers_per_call() != 0) {
    rules.max_buffers_per_call = config.limits().max_buffers_per_call();
  }
  if (config.limits().max_frame_dimension() != 0) {
    rules.max_frame_dimension = config.limits().max_frame_dimension();
  }
  return rules;
}

absl::StatusOr<AllocationPlan> CheckAllocateRequest(const HeapRegistry& heaps,
                                                    const AllocationRules& rules,
                                                    const v1::AllocateRequest& request,
                                                    uint32_t count) {
  if (count == 0) return absl::InvalidArgumentError("count must be at least 1");
  if (count > rules.max_buffers_per_call) {
    return absl::InvalidArgumentError(
        absl::StrCat("count ", count, " is above the per-call limit of ",
                     rules.max_buffers_per_call, " (limits.max_buffers_per_call)"));
  }
  AllocationPlan plan;
  plan.count = count;
  ASSIGN_OR_RETURN(plan.heaps, ResolveHeaps(heaps, rules, request));
  RETURN_IF_ERROR(CheckClientText("name", request.name()));
  if (request.has_frame()) {
    if (request.size() != 0) {
      return absl::InvalidArgumentError(
          "size and frame are both set: a frame's size is computed from it; leave size 0");
    }
    const v1::FrameRequest& frame = request.frame();
    ASSIGN_OR_RETURN(FrameFormat layout, LayOutFrame(frame.width(), frame.height(), frame.fourcc(),
                                                     frame.modifier(), frame.stride_alignment(),
                                                     {.max_dimension = rules.max_frame_dimension}));
    plan.size = layout.size;
    plan.frame = std::move(layout);
  } else {
    if (request.caller_lays_out_frame()) {
      return absl::InvalidArgumentError(
          "caller_lays_out_frame is set without a frame: there is nothing to lay out");
    }
    if (request.size() == 0) return absl::InvalidArgumentError("size must be greater than 0");
    if (request.size() > (uint64_t{1} << 62)) {
      return absl::InvalidArgumentError(absl::StrCat("size ", request.size(), " is too large"));
    }
    plan.size = request.size();
  }
  if (request.has_metadata()) {
    RETURN_IF_ERROR(
        CheckMetadata(request.metadata(), plan.frame ? &*plan.frame : nullptr, "metadata"));
    if (request.metadata().generation() != 0) {
      return absl::InvalidArgumentError(
          "metadata.generation is the daemon's to set; leave it 0 at Allocate");
    }
    plan.metadata = KeptMetadata::Of(request.metadata());
  }
  return plan;
}

absl::StatusOr<uint64_t> RoundForHeap(const Heap& heap, uint64_t max_allocation, uint64_t size,
                                      uint32_t count) {
  const uint64_t page = heap.page_size();
  const uint64_t rounded = (size + page - 1) / page * page;
  if (rounded > std::numeric_limits<uint64_t>::max() / std::max<uint32_t>(count, 1)) {
    return HeapRefused(HeapRefusal::kTooLarge,
                       absl::StrCat(count, " buffers of ", FormatBytes(rounded), " on heap '",
                                    heap.name(), "' cannot be counted"));
  }
  if (max_allocation != 0 && rounded > max_allocation) {
    return HeapRefused(
        HeapRefusal::kTooLarge,
        absl::StrCat("quota max_allocation_bytes: asked for ", FormatBytes(rounded), " on heap '",
                     heap.name(), "', the largest allowed allocation is ",
                     FormatBytes(max_allocation)));
  }
  return rounded;
}

KeptMetadata KeptMetadata::Of(const v1::FrameMetadata& metadata) {
  KeptMetadata kept;
  if (metadata.has_crop()) {
    const v1::Rect& crop = metadata.crop();
    kept.crop = {crop.x(), crop.y(), crop.width(), crop.height()};
  }
  kept.color_space = metadata.color_space();
  kept.color_range = metadata.color_range();
  const std::string& tag = metadata.tag();
  kept.tag_size = static_cast<uint8_t>(std::min(tag.size(), kMaxTagBytes));
  std::copy_n(tag.data(), kept.tag_size, kept.tag.data());
  kept.generation = metadata.generation();
  return kept;
}

void KeptMetadata::FillProto(v1::FrameMetadata& out) const {
  if (crop.has_value()) {
    v1::Rect& rect = *out.mutable_crop();
    rect.set_x((*crop)[0]);
    rect.set_y((*crop)[1]);
    rect.set_width((*crop)[2]);
    rect.set_height((*crop)[3]);
  }
  out.set_color_space(color_space);
  out.set_color_range(color_range);
  if (tag_size != 0) out.set_tag(tag.data(), tag_size);
  out.set_generation(generation);
}

absl::Status CheckMetadata(const v1::FrameMetadata& metadata, const FrameFormat* frame,
                           absl::string_view field) {
  if (metadata.has_crop()) {
    const v1::Rect& crop = metadata.crop();
    if (frame == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".crop is set on a buffer that is not a frame"));
    }
    if (crop.width() == 0 || crop.height() == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".crop is empty (", crop.width(), "x", crop.height(), ")"));
    }
    if (uint64_t{crop.x()} + crop.width() > frame->width ||
        uint64_t{crop.y()} + crop.height() > frame->height) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".crop ", crop.width(), "x", crop.height(), "+", crop.x(), "+", crop.y(),
          " reaches outside the ", frame->width, "x", frame->height, " frame"));
    }
  }
  if (!v1::ColorSpace_IsValid(metadata.color_space())) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".color_space ", metadata.color_space(), " is not a known ColorSpace"));
  }
  if (!v1::ColorRange_IsValid(metadata.color_range())) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".color_range ", metadata.color_range(), " is not a known ColorRange"));
  }
  if (metadata.tag().size() > kMaxTagBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".tag is ", metadata.tag().size(), " bytes; at most ", kMaxTagBytes));
  }
  return absl::OkStatus();
}

namespace {

// The way from the request down to a nested message, named only when an
// error needs it: this runs on every Allocate.
struct FieldPath {
  const FieldPath* parent;
  absl::string_view name;
};

std::string Spell(const FieldPath& path) {
  return path.parent == nullptr ? std::string(path.name)
                                : absl::StrCat(Spell(*path.parent), ".", path.name);
}

absl::Status CheckNoUnknownFieldsAt(const google::protobuf::Message& message,
                                    const FieldPath& path) {
  const google::protobuf::Reflection* reflection = message.GetReflection();
  const google::protobuf::UnknownFieldSet& unknown = reflection->GetUnknownFields(message);
  if (!unknown.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Spell(path), " has field number ", unknown.field(0).number(),
                     ", which this daemon does not know (a newer client?); nothing was done"));
  }
  // The message fields set (no ListFields: it builds a vector).
  const google::protobuf::Descriptor* descriptor = message.GetDescriptor();
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* field = descriptor->field(i);
    if (field->cpp_type() != google::protobuf::FieldDescriptor::CPPTYPE_MESSAGE ||
        field->is_repeated() || !reflection->HasField(message, field)) {
      continue;
    }
    RETURN_IF_ERROR(
        CheckNoUnknownFieldsAt(reflection->GetMessage(message, field), {&path, field->name()}));
  }
  return absl::OkStatus();
}

// Whether `message` itself has a field it does not know (its reflection
// looked up once: the lookup is the costly part).
template <typename M>
bool HasUnknownFields(const M& message) {
  static const google::protobuf::Reflection* const reflection = M::GetReflection();
  return !reflection->GetUnknownFields(message).empty();
}

}  // namespace

absl::Status CheckNoUnknownFields(const google::protobuf::Message& message,
                                  absl::string_view name) {
  return CheckNoUnknownFieldsAt(message, {nullptr, name});
}

absl::Status CheckNoUnknownFields(const v1::AllocateRequest& request) {
  const bool none =
      !HasUnknownFields(request) && (!request.has_frame() || !HasUnknownFields(request.frame())) &&
      (!request.has_metadata() ||
       (!HasUnknownFields(request.metadata()) &&
        (!request.metadata().has_crop() || !HasUnknownFields(request.metadata().crop()))));
  if (none) return absl::OkStatus();
  return CheckNoUnknownFields(request, "request");  // names it
}

absl::StatusOr<absl::Duration> CheckExportTtl(const v1::ExportRequest& request,
                                              absl::Duration default_ttl, absl::Duration max_ttl) {
  const absl::Duration ttl =
      request.ttl_ms() == 0 ? default_ttl : absl::Milliseconds(request.ttl_ms());
  if (ttl > max_ttl) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ttl_ms ", request.ttl_ms(), " is above the maximum of ",
        absl::ToInt64Milliseconds(max_ttl), " (", absl::ToInt64Minutes(max_ttl), " minutes)"));
  }
  return ttl;
}

}  // namespace bufferd
