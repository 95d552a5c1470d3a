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
#include "base/unique_fd.h"

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

// A read-only fd for the file `fd` is open on (through /proc/self/fd): a new
// open file description, so nothing done to the original's flags reaches
// it. `what` names the file in the error.
absl::StatusOr<UniqueFd> ReopenReadOnly(int fd, absl::string_view what);

// Shared memory only this process ever writes: a memfd named `name` of
// `size` bytes, mapped writable here, then sealed (F_SEAL_FUTURE_WRITE, no
// shrink, no grow, no more seals; mode 0400), so that no other mapping,
// write() or re-opened fd can write it; and a read-only fd of it to hand
// out. The memfd's own fd is closed. `what` names it in errors.
struct SealedPage {
  Mapping writable;
  UniqueFd read_only;
};
absl::StatusOr<SealedPage> CreateSealedPage(const char* name, size_t size, absl::string_view what);

}  // namespace bufferd

#endif  // BUFFERD_BASE_MAPPING_H_
