#include "base/frame_format.h"

#include <libdrm/drm_fourcc.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace bufferd {
namespace {

using ::testing::HasSubstr;

TEST(LayOutFrame, Nv12HasYThenInterleavedChromaAtHalfHeight) {
  absl::StatusOr<FrameFormat> frame = LayOutFrame(1920, 1080, DRM_FORMAT_NV12, 0, 0);
  ASSERT_TRUE(frame.ok()) << frame.status();
  ASSERT_EQ(frame->planes.size(), 2u);
  EXPECT_EQ(frame->planes[0], (PlaneLayout{0, 1920, 1920u * 1080}));
  EXPECT_EQ(frame->planes[1], (PlaneLayout{1920u * 1080, 1920, 1920u * 540}));
  EXPECT_EQ(frame->size, 1920u * 1080 * 3 / 2);
}

TEST(LayOutFrame, StridesAndOffsetsFollowTheAlignment) {
  // 100 px of NV12 at 256-byte alignment: Y rows of 256, 51 chroma rows.
  absl::StatusOr<FrameFormat> frame = LayOutFrame(100, 101, DRM_FORMAT_NV12, 0, 256);
  ASSERT_TRUE(frame.ok()) << frame.status();
  EXPECT_EQ(frame->planes[0], (PlaneLayout{0, 256, 256u * 101}));
  // 256 * 101 = 25856 = 101 * 256: already aligned.
  EXPECT_EQ(frame->planes[1], (PlaneLayout{25856, 256, 256u * 51}));
  // Odd width: chroma covers ceil(99 / 2) = 50 pairs = 100 bytes.
  frame = LayOutFrame(99, 3, DRM_FORMAT_NV21, 0, 1);
  ASSERT_TRUE(frame.ok()) << frame.status();
  EXPECT_EQ(frame->planes[0], (PlaneLayout{0, 99, 297}));
  EXPECT_EQ(frame->planes[1], (PlaneLayout{297, 100, 200}));
  EXPECT_EQ(frame->size, 497u);
}

TEST(LayOutFrame, EveryFormat) {
  struct Case {
    uint32_t fourcc;
    absl::InlinedVector<PlaneLayout, 3> planes;
  };
  // 64x32 at the default alignment (64).
  const Case cases[] = {
      {DRM_FORMAT_XRGB8888, {{0, 256, 256 * 32}}},
      {DRM_FORMAT_ARGB8888, {{0, 256, 256 * 32}}},
      {DRM_FORMAT_XBGR8888, {{0, 256, 256 * 32}}},
      {DRM_FORMAT_ABGR8888, {{0, 256, 256 * 32}}},
      {DRM_FORMAT_RGB565, {{0, 128, 128 * 32}}},
      {DRM_FORMAT_NV12, {{0, 64, 64 * 32}, {2048, 64, 64 * 16}}},
      {DRM_FORMAT_NV21, {{0, 64, 64 * 32}, {2048, 64, 64 * 16}}},
      // Chroma rows of 32 bytes round up to 64.
      {DRM_FORMAT_YUV420, {{0, 64, 64 * 32}, {2048, 64, 64 * 16}, {3072, 64, 64 * 16}}},
      {DRM_FORMAT_YVU420, {{0, 64, 64 * 32}, {2048, 64, 64 * 16}, {3072, 64, 64 * 16}}},
      {DRM_FORMAT_P010, {{0, 128, 128 * 32}, {4096, 128, 128 * 16}}},
  };
  for (const Case& c : cases) {
    absl::StatusOr<FrameFormat> frame = LayOutFrame(64, 32, c.fourcc, DRM_FORMAT_MOD_LINEAR, 0);
    ASSERT_TRUE(frame.ok()) << FourccName(c.fourcc) << ": " << frame.status();
    EXPECT_EQ(frame->planes, c.planes) << FourccName(c.fourcc);
    EXPECT_EQ(frame->size, c.planes.back().offset + c.planes.back().size);
    EXPECT_EQ(FourccByName(FourccName(c.fourcc)), c.fourcc);
  }
}

TEST(LayOutFrame, BadRequestsNameTheField) {
  struct Case {
    uint32_t width, height, fourcc;
    uint64_t modifier;
    uint32_t alignment;
    const char* message;
  };
  const Case cases[] = {
      {0, 10, DRM_FORMAT_NV12, 0, 0, "frame.width must be at least 1"},
      {10, 0, DRM_FORMAT_NV12, 0, 0, "frame.height must be at least 1"},
      {16385, 10, DRM_FORMAT_NV12, 0, 0,
       "frame.width 16385 is above the maximum of 16384 (limits.max_frame_dimension)"},
      {10, 4000000000u, DRM_FORMAT_NV12, 0, 0, "frame.height 4000000000 is above the maximum"},
      {10, 10, 0x20202020, 0, 0,
       "frame.fourcc '    ' (0x20202020) is not a format bufferd lays out"},
      {10, 10, 7, 0, 0, "frame.fourcc 0x00000007 is not a format"},
      {10, 10, DRM_FORMAT_NV12, DRM_FORMAT_MOD_INVALID, 0,
       "frame.modifier 0xffffffffffffff is not DRM_FORMAT_MOD_LINEAR (0)"},
      {10, 10, DRM_FORMAT_NV12, 0, 48, "frame.stride_alignment 48 must be a power of two"},
      {10, 10, DRM_FORMAT_NV12, 0, 8192,
       "frame.stride_alignment 8192 must be a power of two up "
       "to 4096"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<FrameFormat> frame =
        LayOutFrame(c.width, c.height, c.fourcc, c.modifier, c.alignment);
    EXPECT_EQ(frame.status().code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(frame.status().message(), HasSubstr(c.message));
  }
  // The largest frame the hard cap allows lays out without overflow.
  absl::StatusOr<FrameFormat> largest =
      LayOutFrame(65536, 65536, DRM_FORMAT_P010, 0, 4096, {.max_dimension = 65536});
  ASSERT_TRUE(largest.ok()) << largest.status();
  EXPECT_EQ(largest->size, uint64_t{65536} * 2 * 65536 + uint64_t{65536} * 2 * 32768);
}

TEST(FourccNames, ParseAndPrint) {
  EXPECT_EQ(FourccByName("nv12"), DRM_FORMAT_NV12);
  EXPECT_EQ(FourccByName("NV13"), std::nullopt);
  EXPECT_EQ(FourccName(DRM_FORMAT_P010), "P010");
  EXPECT_THAT(SupportedFourccs(), HasSubstr("XRGB8888, ARGB8888"));
}

}  // namespace
}  // namespace bufferd
