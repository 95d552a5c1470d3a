#include "base/frame_format.h"

#include <libdrm/drm_fourcc.h>

#include <algorithm>
#include <array>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace bufferd {
namespace {

// One plane of a format: bytes per sample block of `hsub` x `vsub`
// pixels (a Y byte; a CbCr pair covering 2x2 pixels).
struct PlaneShape {
  uint32_t bytes = 0;
  uint32_t hsub = 1;
  uint32_t vsub = 1;
};

struct FormatInfo {
  uint32_t fourcc;
  const char* name;
  std::array<PlaneShape, 3> planes;
  int plane_count;
};

constexpr FormatInfo kFormats[] = {
    {DRM_FORMAT_XRGB8888, "XRGB8888", {{{4, 1, 1}}}, 1},
    {DRM_FORMAT_ARGB8888, "ARGB8888", {{{4, 1, 1}}}, 1},
    {DRM_FORMAT_XBGR8888, "XBGR8888", {{{4, 1, 1}}}, 1},
    {DRM_FORMAT_ABGR8888, "ABGR8888", {{{4, 1, 1}}}, 1},
    {DRM_FORMAT_RGB565, "RGB565", {{{2, 1, 1}}}, 1},
    // Y, then Cb and Cr interleaved at half resolution both ways.
    {DRM_FORMAT_NV12, "NV12", {{{1, 1, 1}, {2, 2, 2}}}, 2},
    {DRM_FORMAT_NV21, "NV21", {{{1, 1, 1}, {2, 2, 2}}}, 2},
    // Y, Cb, Cr planes (YVU420: Y, Cr, Cb).
    {DRM_FORMAT_YUV420, "YUV420", {{{1, 1, 1}, {1, 2, 2}, {1, 2, 2}}}, 3},
    {DRM_FORMAT_YVU420, "YVU420", {{{1, 1, 1}, {1, 2, 2}, {1, 2, 2}}}, 3},
    // 10 bits in 16 per sample: Y, then CbCr interleaved.
    {DRM_FORMAT_P010, "P010", {{{2, 1, 1}, {4, 2, 2}}}, 2},
};

const FormatInfo* Find(uint32_t fourcc) {
  for (const FormatInfo& format : kFormats) {
    if (format.fourcc == fourcc) return &format;
  }
  return nullptr;
}

uint64_t RoundUp(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

uint64_t DivideUp(uint64_t value, uint64_t by) { return (value + by - 1) / by; }

}  // namespace

absl::StatusOr<FrameFormat> LayOutFrame(uint32_t width, uint32_t height, uint32_t fourcc,
                                        uint64_t modifier, uint32_t stride_alignment,
                                        const FrameRequestLimits& limits) {
  const uint32_t max = std::min(limits.max_dimension, kMaxFrameDimension);
  for (auto [field, value] : {std::pair{"frame.width", width}, std::pair{"frame.height", height}}) {
    if (value == 0) return absl::InvalidArgumentError(absl::StrCat(field, " must be at least 1"));
    if (value > max) {
      return absl::InvalidArgumentError(absl::StrCat(field, " ", value, " is above the maximum of ",
                                                     max, " (limits.max_frame_dimension)"));
    }
  }
  const FormatInfo* format = Find(fourcc);
  if (format == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("frame.fourcc ", FourccName(fourcc),
                                                   " is not a format bufferd lays out; it knows ",
                                                   SupportedFourccs()));
  }
  if (modifier != DRM_FORMAT_MOD_LINEAR) {
    return absl::InvalidArgumentError(
        absl::StrFormat("frame.modifier 0x%x is not DRM_FORMAT_MOD_LINEAR (0): a CPU heap lays "
                        "frames out linearly only",
                        modifier));
  }
  const uint32_t alignment = stride_alignment == 0 ? kDefaultStrideAlignment : stride_alignment;
  if ((alignment & (alignment - 1)) != 0 || alignment > kMaxStrideAlignment) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame.stride_alignment ", stride_alignment, " must be a power of two up to ",
                     kMaxStrideAlignment, " (or 0 for ", kDefaultStrideAlignment, ")"));
  }
  // Dimensions are at most 65536 and a sample block at most 4 bytes: no
  // product below overflows 64 bits.
  FrameFormat frame{.width = width, .height = height, .fourcc = fourcc, .modifier = modifier};
  uint64_t end = 0;
  for (int p = 0; p < format->plane_count; ++p) {
    const PlaneShape& shape = format->planes[p];
    const uint64_t row = DivideUp(width, shape.hsub) * shape.bytes;
    const uint64_t stride = RoundUp(row, alignment);
    const uint64_t rows = DivideUp(height, shape.vsub);
    PlaneLayout& plane = frame.planes.emplace_back();
    plane.offset = RoundUp(end, alignment);
    plane.stride = static_cast<uint32_t>(stride);
    plane.size = stride * rows;
    end = plane.offset + plane.size;
  }
  frame.size = end;
  return frame;
}

std::string FourccName(uint32_t fourcc) {
  if (const FormatInfo* format = Find(fourcc); format != nullptr) return format->name;
  std::string chars;
  for (int i = 0; i < 4; ++i) {
    const char c = static_cast<char>((fourcc >> (8 * i)) & 0xff);
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != ' ') {
      return absl::StrFormat("0x%08x", fourcc);
    }
    chars.push_back(c);
  }
  return absl::StrFormat("'%s' (0x%08x)", chars, fourcc);
}

std::optional<uint32_t> FourccByName(absl::string_view name) {
  for (const FormatInfo& format : kFormats) {
    if (absl::EqualsIgnoreCase(name, format.name)) return format.fourcc;
  }
  return std::nullopt;
}

std::string SupportedFourccs() {
  return absl::StrJoin(kFormats, ", ",
                       [](std::string* out, const FormatInfo& f) { out->append(f.name); });
}

}  // namespace bufferd
