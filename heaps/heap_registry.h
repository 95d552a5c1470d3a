// HeapRegistry: the daemon's named heaps. Filled once at startup, then
// read-only (so lookups need no lock); heaps outlive every buffer because the
// registry is destroyed last.
#ifndef BUFFERD_HEAPS_HEAP_REGISTRY_H_
#define BUFFERD_HEAPS_HEAP_REGISTRY_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "heaps/heap.h"

namespace bufferd {

class HeapRegistry {
 public:
  // ALREADY_EXISTS if a heap of that name is registered.
  absl::Status Add(std::unique_ptr<Heap> heap);
  // nullptr if unknown.
  Heap* Find(absl::string_view name) const;
  // NOT_FOUND naming the known heaps.
  absl::StatusOr<Heap*> Get(absl::string_view name) const;
  const std::vector<std::unique_ptr<Heap>>& heaps() const { return heaps_; }

 private:
  std::vector<std::unique_ptr<Heap>> heaps_;
};

}  // namespace bufferd

#endif  // BUFFERD_HEAPS_HEAP_REGISTRY_H_
