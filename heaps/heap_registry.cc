#include "heaps/heap_registry.h"

#include "absl/strings/str_cat.h"
#include "base/client_text.h"

namespace bufferd {

absl::Status HeapRegistry::Add(std::unique_ptr<Heap> heap) {
  if (Find(heap->name()) != nullptr) {
    return absl::AlreadyExistsError(absl::StrCat("heap '", heap->name(), "' is configured twice"));
  }
  heaps_.push_back(std::move(heap));
  return absl::OkStatus();
}

Heap* HeapRegistry::Find(absl::string_view name) const {
  for (const auto& heap : heaps_) {
    if (heap->name() == name) return heap.get();
  }
  return nullptr;
}

absl::StatusOr<Heap*> HeapRegistry::Get(absl::string_view name) const {
  if (Heap* heap = Find(name)) return heap;
  std::string known;
  for (const auto& heap : heaps_) absl::StrAppend(&known, known.empty() ? "" : ", ", heap->name());
  return absl::NotFoundError(
      absl::StrCat("unknown heap ", QuoteClientText(name), " (heaps: ", known, ")"));
}

}  // namespace bufferd
