// What frame_producer and compositor agree on: the picture a producer draws
// (a pattern that encodes the frame number in every row, so that a frame
// mixed from two frames is caught), the records they exchange on the
// compositor's socket, and small measuring helpers.
//
// Frames are DRM_FORMAT_ABGR8888 (bytes R, G, B, A in memory: what PNG
// calls RGBA). In every row of a producer's frame, pixel 0 holds the frame
// number (its low 24 bits, in R, G, B) and pixel 1 a marker with the
// producer's slot; row 0's pixels 2 and 3 hold the CLOCK_MONOTONIC time the
// producer called the frame ready (for handoff latency). The rest of each
// row is a background colour that depends on the frame and the row, with a
// 32-pixel white bar whose place moves with the frame.
//
// Pure functions; thread-safe.
#ifndef BUFFERD_EXAMPLES_FRAMES_H_
#define BUFFERD_EXAMPLES_FRAMES_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace bufferd::frames {

// DRM_FORMAT_ABGR8888.
inline constexpr uint32_t kFourcc = 0x34324241;
inline constexpr uint32_t kBytesPerPixel = 4;
// Narrower frames have no room for the header and the bar.
inline constexpr uint32_t kMinWidth = 64;
inline constexpr uint32_t kBarWidth = 32;
// Most buffers a producer may share; most producers a compositor shows.
inline constexpr uint32_t kMaxBuffers = 8;
inline constexpr uint32_t kMaxProducers = 4;

// Pixels of one picture in memory: `height` rows of `width` pixels,
// `stride` bytes apart.
struct Region {
  uint8_t* data = nullptr;
  uint32_t stride = 0;
  uint32_t width = 0;
  uint32_t height = 0;
};
struct ConstRegion {
  const uint8_t* data = nullptr;
  uint32_t stride = 0;
  uint32_t width = 0;
  uint32_t height = 0;
};

// The frame number as the picture holds it (24 bits).
inline uint32_t Frame24(uint64_t frame) { return static_cast<uint32_t>(frame & 0xffffff); }

// Draws frame `frame` of producer `slot` (0..kMaxProducers-1), header
// included but for the ready time (StampReady).
void DrawFrame(const Region& region, uint32_t slot, uint64_t frame);
// Writes only the header pixels of row 0 (frame number and marker): all a
// producer does with drawing off.
void DrawHeader(const Region& region, uint32_t slot, uint64_t frame);
// Row 0's ready time (CLOCK_MONOTONIC nanoseconds).
void StampReady(const Region& region, uint64_t ready_ns);

struct Header {
  uint32_t slot = 0;
  uint32_t frame24 = 0;
  uint64_t ready_ns = 0;
};
// Row 0's header; nullopt if its marker is not there.
std::optional<Header> ReadHeader(const ConstRegion& region);

// Empty if `region` is one whole frame of producer `slot` (every row shows
// the frame row 0 shows, and every pixel is what that frame has there),
// else what is wrong ("row 37 shows frame 41, row 0 frame 42"). Row 0's
// ready-time pixels are not checked.
std::string CheckFrame(const ConstRegion& region, uint32_t slot);

// Copies the pixels of `from` into `to` (the smaller of the two sizes).
void CopyPixels(const ConstRegion& from, const Region& to);
// Fills `to` with one colour (R, G, B, A bytes as a little-endian word).
void Fill(const Region& to, uint32_t rgba);

// The records on the compositor's socket (SOCK_SEQPACKET, one record each).
// A producer sends a Hello; the compositor answers Welcome or a refusal.
struct Hello {
  // [A-Za-z0-9_.-], 1 to 32 bytes.
  std::string name;
  // Share tokens: the producer's acquire timeline, and its buffers
  // (read-only), in swapchain order.
  std::string acquire_token;
  std::vector<std::string> buffer_tokens;
};
struct Welcome {
  uint32_t slot = 0;
  // The compositor's release timeline for this producer.
  std::string release_token;
};
// At most this many bytes in a record.
inline constexpr size_t kMaxRecord = 2048;

std::string FormatHello(const Hello& hello);
// INVALID_ARGUMENT naming what is wrong.
absl::StatusOr<Hello> ParseHello(absl::string_view record);
std::string FormatWelcome(const Welcome& welcome);
std::string FormatRefusal(absl::string_view why);
// A Welcome, or the compositor's refusal as FAILED_PRECONDITION with its
// words, or INVALID_ARGUMENT for anything else.
absl::StatusOr<Welcome> ParseWelcome(absl::string_view record);

// CLOCK_MONOTONIC in nanoseconds.
uint64_t NowNs();

// The `q` quantile (0..1) of `samples` (sorted in place); 0 when empty.
uint64_t Quantile(std::vector<uint64_t>& samples, double q);

}  // namespace bufferd::frames

#endif  // BUFFERD_EXAMPLES_FRAMES_H_
