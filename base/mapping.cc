#include "base/mapping.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

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

absl::StatusOr<UniqueFd> ReopenReadOnly(int fd, absl::string_view what) {
  const std::string path = absl::StrCat("/proc/self/fd/", fd);
  UniqueFd copy(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!copy.valid()) return ErrnoError(absl::StrCat("re-opening ", what, " read-only"), errno);
  return copy;
}

absl::StatusOr<SealedPage> CreateSealedPage(const char* name, size_t size,
                                            absl::string_view what) {
  UniqueFd page(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!page.valid()) return ErrnoError(absl::StrCat("memfd_create for ", what), errno);
  if (::ftruncate(page.get(), static_cast<off_t>(size)) != 0) {
    return ErrnoError(absl::StrCat("ftruncate ", what), errno);
  }
  SealedPage sealed;
  ASSIGN_OR_RETURN(sealed.writable, Mapping::Create(page.get(), size, Mapping::Protection::kReadWrite));
  (void)::fchmod(page.get(), 0400);
  if (::fcntl(page.get(), F_ADD_SEALS,
              F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return ErrnoError(absl::StrCat("sealing ", what), errno);
  }
  ASSIGN_OR_RETURN(sealed.read_only, ReopenReadOnly(page.get(), what));
  return sealed;
}

}  // namespace bufferd
