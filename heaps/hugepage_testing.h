// Test helpers that change kernel memory settings and restore them.
#ifndef BUFFERD_HEAPS_HUGEPAGE_TESTING_H_
#define BUFFERD_HEAPS_HUGEPAGE_TESTING_H_

#include <cstdio>
#include <fstream>
#include <string>

namespace bufferd {

// Writes `value` to a sysfs/procfs file and restores the old value when
// destroyed. ok() is false (and nothing changes) if the file can't be written,
// e.g. without root; callers GTEST_SKIP with why().
class ScopedKernelSetting {
 public:
  ScopedKernelSetting(std::string path, const std::string& value) : path_(std::move(path)) {
    std::ifstream in(path_);
    if (!std::getline(in, old_)) {
      why_ = "cannot read " + path_;
      return;
    }
    // "always within_size advise [never] deny force" -> "never"
    if (auto open = old_.find('['); open != std::string::npos) {
      old_ = old_.substr(open + 1, old_.find(']') - open - 1);
    }
    std::ofstream out(path_);
    out << value << std::flush;
    if (!out) {
      why_ = "cannot write " + path_ + " (needs root)";
      return;
    }
    ok_ = true;
  }
  ~ScopedKernelSetting() {
    if (!ok_) return;
    std::ofstream out(path_);
    out << old_ << std::flush;
    if (!out)
      std::fprintf(stderr, "WARNING: could not restore %s to '%s'\n", path_.c_str(), old_.c_str());
  }
  ScopedKernelSetting(const ScopedKernelSetting&) = delete;
  ScopedKernelSetting& operator=(const ScopedKernelSetting&) = delete;

  bool ok() const { return ok_; }
  const std::string& why() const { return why_; }
  const std::string& old_value() const { return old_; }

 private:
  std::string path_;
  std::string old_;
  std::string why_;
  bool ok_ = false;
};

inline constexpr char kNrHugepages2M[] = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
inline constexpr char kNrHugepages1G[] =
    "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages";
inline constexpr char kShmemThp[] = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

}  // namespace bufferd

#endif  // BUFFERD_HEAPS_HUGEPAGE_TESTING_H_
