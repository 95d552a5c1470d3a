// Frames: the DRM fourcc formats bufferd lays out, and their plane layout.
//
// A frame is one buffer holding every plane of one picture. LayOutFrame
// computes, for a width, height and fourcc (drm_fourcc.h), each plane's
// offset, stride and size, LINEAR only (the one modifier a CPU heap can
// honour): each plane's rows are `stride` bytes apart, the stride is the
// plane's row of samples rounded up to the stride alignment, and each plane
// starts where the previous one ends, rounded up to the same alignment.
//
//   NV12 1920x1080, alignment 64: Y at 0, stride 1920, 2,073,600 bytes;
//   CbCr at 2,073,600, stride 1920, 540 rows; 3,110,400 bytes in all.
//
// Both sides run this code: the daemon to allocate, the client library to
// describe the frames it allocated (AllocateRequest.caller_lays_out_frame),
// so a layout is part of the protocol: changing any one changes
// kProtocolVersion (base/protocol.h).
//
// Pure functions; thread-safe.
#ifndef BUFFERD_BASE_FRAME_FORMAT_H_
#define BUFFERD_BASE_FRAME_FORMAT_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/container/inlined_vector.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace bufferd {

struct PlaneLayout {
  // Bytes from the start of the buffer.
  uint64_t offset = 0;
  // Bytes from one row to the next.
  uint32_t stride = 0;
  // stride x rows.
  uint64_t size = 0;
  bool operator==(const PlaneLayout&) const = default;
};

struct FrameFormat {
  uint32_t width = 0;
  uint32_t height = 0;
  // DRM fourcc (DRM_FORMAT_NV12, ...).
  uint32_t fourcc = 0;
  // DRM_FORMAT_MOD_LINEAR.
  uint64_t modifier = 0;
  // Three at most (YUV420): inline, so a layout costs no allocation.
  absl::InlinedVector<PlaneLayout, 3> planes;
  // Bytes from the buffer's start to the end of the last plane.
  uint64_t size = 0;
  bool operator==(const FrameFormat&) const = default;
};

// What a frame request may ask for.
struct FrameRequestLimits {
  // Largest width or height.
  uint32_t max_dimension = 16384;
};

inline constexpr uint32_t kDefaultStrideAlignment = 64;
inline constexpr uint32_t kMaxStrideAlignment = 4096;
inline constexpr uint32_t kMaxFrameDimension = 65536;

// Lays out a LINEAR frame. INVALID_ARGUMENT naming the field ("frame.width",
// "frame.fourcc", ...) for a zero or too large dimension, an unknown
// fourcc, a modifier other than DRM_FORMAT_MOD_LINEAR, or a stride
// alignment that is not a power of two up to kMaxStrideAlignment (0 means
// kDefaultStrideAlignment).
absl::StatusOr<FrameFormat> LayOutFrame(uint32_t width, uint32_t height, uint32_t fourcc,
                                        uint64_t modifier, uint32_t stride_alignment,
                                        const FrameRequestLimits& limits = {});

// "NV12" for a supported fourcc; the four characters (or hex) otherwise.
std::string FourccName(uint32_t fourcc);
// A supported fourcc by its name ("NV12", case-insensitive).
std::optional<uint32_t> FourccByName(absl::string_view name);
// "XRGB8888, ARGB8888, ..." for messages.
std::string SupportedFourccs();

}  // namespace bufferd

#endif  // BUFFERD_BASE_FRAME_FORMAT_H_
