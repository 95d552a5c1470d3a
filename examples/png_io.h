// PNG files of RGBA pictures (libpng): the compositor writes its output,
// tests read it back.
#ifndef BUFFERD_EXAMPLES_PNG_IO_H_
#define BUFFERD_EXAMPLES_PNG_IO_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "examples/frames.h"

namespace bufferd::frames {

// Writes `picture` (RGBA bytes) to `path` as an 8-bit RGBA PNG, fast
// (zlib level 1, no filter), through `path`.tmp renamed into place: a
// reader never sees half a file.
absl::Status WritePng(const std::string& path, const ConstRegion& picture);

struct Picture {
  uint32_t width = 0;
  uint32_t height = 0;
  // RGBA, rows width * 4 bytes apart.
  std::vector<uint8_t> pixels;
  ConstRegion region() const { return {pixels.data(), width * 4, width, height}; }
};
// Reads an 8-bit RGBA PNG (INVALID_ARGUMENT for any other kind).
absl::StatusOr<Picture> ReadPng(const std::string& path);

}  // namespace bufferd::frames

#endif  // BUFFERD_EXAMPLES_PNG_IO_H_
