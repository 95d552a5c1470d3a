#include "examples/png_io.h"

#include <png.h>

#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace bufferd::frames {
namespace {

struct FileCloser {
  void operator()(FILE* file) const { std::fclose(file); }
};
using File = std::unique_ptr<FILE, FileCloser>;

// libpng reports errors by longjmp; this keeps its message.
void OnError(png_structp png, png_const_charp message) {
  auto* error = static_cast<std::string*>(png_get_error_ptr(png));
  *error = message;
  png_longjmp(png, 1);
}
void OnWarning(png_structp, png_const_charp) {}

}  // namespace

absl::Status WritePng(const std::string& path, const ConstRegion& picture) {
  const std::string temp = path + ".tmp";
  File file(std::fopen(temp.c_str(), "wbx"));
  if (file == nullptr && errno == EEXIST) {
    // A previous run's leftover: ours to replace (fopen "wbx" never follows
    // a link someone left there).
    std::remove(temp.c_str());
    file.reset(std::fopen(temp.c_str(), "wbx"));
  }
  if (file == nullptr) {
    return absl::UnavailableError(absl::StrCat("open ", temp, ": ", std::strerror(errno)));
  }
  std::string error;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &error, OnError, OnWarning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (info == nullptr) {
    png_destroy_write_struct(&png, nullptr);
    return absl::ResourceExhaustedError("libpng: out of memory");
  }
  if (setjmp(png_jmpbuf(png)) != 0) {
    png_destroy_write_struct(&png, &info);
    file.reset();
    std::remove(temp.c_str());
    return absl::InternalError(absl::StrCat("writing ", path, ": ", error));
  }
  png_init_io(png, file.get());
  png_set_IHDR(png, info, picture.width, picture.height, 8, PNG_COLOR_TYPE_RGB_ALPHA,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_set_compression_level(png, 1);
  png_set_filter(png, 0, PNG_FILTER_NONE);
  png_write_info(png, info);
  for (uint32_t y = 0; y < picture.height; ++y) {
    png_write_row(png, picture.data + static_cast<size_t>(y) * picture.stride);
  }
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  if (std::fflush(file.get()) != 0) {
    return absl::UnavailableError(absl::StrCat("write ", temp, ": ", std::strerror(errno)));
  }
  file.reset();
  if (std::rename(temp.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError(absl::StrCat("rename ", temp, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<Picture> ReadPng(const std::string& path) {
  File file(std::fopen(path.c_str(), "rb"));
  if (file == nullptr) {
    return absl::NotFoundError(absl::StrCat("open ", path, ": ", std::strerror(errno)));
  }
  std::string error;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &error, OnError, OnWarning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (info == nullptr) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    return absl::ResourceExhaustedError("libpng: out of memory");
  }
  Picture picture;
  if (setjmp(png_jmpbuf(png)) != 0) {
    png_destroy_read_struct(&png, &info, nullptr);
    return absl::InvalidArgumentError(absl::StrCat("reading ", path, ": ", error));
  }
  png_init_io(png, file.get());
  png_read_info(png, info);
  if (png_get_bit_depth(png, info) != 8 ||
      png_get_color_type(png, info) != PNG_COLOR_TYPE_RGB_ALPHA ||
      png_get_interlace_type(png, info) != PNG_INTERLACE_NONE) {
    png_destroy_read_struct(&png, &info, nullptr);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not an 8-bit RGBA PNG"));
  }
  picture.width = png_get_image_width(png, info);
  picture.height = png_get_image_height(png, info);
  if (uint64_t{picture.width} * picture.height > (uint64_t{1} << 26)) {
    png_destroy_read_struct(&png, &info, nullptr);
    return absl::InvalidArgumentError(absl::StrCat(path, " is larger than 64 Mpixels"));
  }
  picture.pixels.resize(size_t{picture.width} * 4 * picture.height);
  for (uint32_t y = 0; y < picture.height; ++y) {
    png_read_row(png, picture.pixels.data() + size_t{y} * picture.width * 4, nullptr);
  }
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return picture;
}

}  // namespace bufferd::frames
