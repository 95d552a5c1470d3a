#include "base/mapping.h"

#include <sys/mman.h>

#include <cerrno>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/errno_status.h"

namespace bufferd {

absl::StatusOr<Mapping> Mapping::Create(int fd, size_t length, Protection protection) {
  if (length == 0) return absl::InvalidArgumentError("cannot map 0 bytes");
  int prot = protection == Protection::kReadWrite ? PROT_READ | PROT_WRITE : PROT_READ;
  void* address = ::mmap(nullptr, length, prot, MAP_SHARED, fd, 0);
  if (address == MAP_FAILED) {
    return ErrnoError(
        absl::StrCat("mmap(", length, " bytes, ",
                     protection == Protection::kReadWrite ? "read-write" : "read-only", ")"),
        errno);
  }
  return Mapping(address, length, protection);
}

Mapping::~Mapping() { Reset(); }

Mapping::Mapping(Mapping&& other) noexcept
    : address_(std::exchange(other.address_, nullptr)),
      length_(std::exchange(other.length_, 0)),
      protection_(other.protection_) {}

Mapping& Mapping::operator=(Mapping&& other) noexcept {
  if (this != &other) {
    Reset();
    address_ = std::exchange(other.address_, nullptr);
    length_ = std::exchange(other.length_, 0);
    protection_ = other.protection_;
  }
  return *this;
}

void Mapping::Reset() {
  if (address_ != nullptr) ::munmap(address_, length_);
  address_ = nullptr;
  length_ = 0;
}

}  // namespace bufferd
