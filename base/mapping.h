// Mapping: bytes of a file mapped into this process, unmapped on destruction.
//
// A Mapping is a different thing from the fd it came from: closing the fd
// does not unmap, and destroying the Mapping does not close the fd. Move-only;
// not thread-safe (the bytes themselves may be shared with other processes).
#ifndef BUFFERD_BASE_MAPPING_H_
#define BUFFERD_BASE_MAPPING_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "absl/status/statusor.h"

namespace bufferd {

class Mapping {
 public:
  enum class Protection { kReadOnly, kReadWrite };

  // Maps `length` bytes of `fd` from offset 0, MAP_SHARED. A writable
  // mapping of an O_RDONLY fd fails with PERMISSION_DENIED (EACCES).
  static absl::StatusOr<Mapping> Create(int fd, size_t length, Protection protection);

  Mapping() = default;
  ~Mapping();
  Mapping(Mapping&& other) noexcept;
  Mapping& operator=(Mapping&& other) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(address_); }
  size_t size() const { return length_; }
  std::span<uint8_t> bytes() const { return {data(), length_}; }
  bool writable() const { return protection_ == Protection::kReadWrite; }
  bool valid() const { return address_ != nullptr; }

  // Unmaps now; the Mapping becomes empty.
  void Reset();

 private:
  Mapping(void* address, size_t length, Protection protection)
      : address_(address), length_(length), protection_(protection) {}

  void* address_ = nullptr;
  size_t length_ = 0;
  Protection protection_ = Protection::kReadOnly;
};

}  // namespace bufferd

#endif  // BUFFERD_BASE_MAPPING_H_
