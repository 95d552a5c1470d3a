#include "examples/frames.h"

#include <time.h>

#include <algorithm>
#include <cstring>
#include <cwchar>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace bufferd::frames {
namespace {

constexpr uint32_t Rgba(uint32_t r, uint32_t g, uint32_t b, uint32_t a = 0xff) {
  return (r & 0xff) | (g & 0xff) << 8 | (b & 0xff) << 16 | (a & 0xff) << 24;
}

constexpr uint32_t kBarColor = Rgba(0xff, 0xff, 0xff);

uint32_t Marker(uint32_t slot) { return Rgba(slot, 0xb0, 0xfd); }

uint32_t FramePixel(uint64_t frame) { return Frame24(frame) | 0xffu << 24; }

// Differs between any two frames less than 8,192 apart, in every row.
uint32_t Background(uint32_t frame24, uint32_t y, uint32_t slot) {
  return Rgba(frame24 * 5 + y / 4, 0x30 * (slot + 1) + (frame24 >> 8) * 8, frame24 * 3 + y);
}

uint32_t BarX(uint32_t frame24, uint32_t width) { return (frame24 * 7) % width; }

uint32_t* Row(const Region& region, uint32_t y) {
  return reinterpret_cast<uint32_t*>(region.data + static_cast<size_t>(y) * region.stride);
}
const uint32_t* Row(const ConstRegion& region, uint32_t y) {
  return reinterpret_cast<const uint32_t*>(region.data + static_cast<size_t>(y) * region.stride);
}

bool InBar(uint32_t x, uint32_t bar_x, uint32_t width) {
  return (x + width - bar_x) % width < kBarWidth;
}

// 1 to `max` letters, digits and `punctuation`.
bool Word(absl::string_view text, size_t max, absl::string_view punctuation) {
  if (text.empty() || text.size() > max) return false;
  return std::all_of(text.begin(), text.end(), [&](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
           punctuation.find(c) != absl::string_view::npos;
  });
}

bool ValidName(absl::string_view name) { return Word(name, 32, "_.-"); }
bool ValidToken(absl::string_view token) { return Word(token, 128, "_-"); }

// Sets `count` pixels to `rgba` at memset speed: glibc's wmemset (wchar_t
// is 32 bits on Linux) is the vectorised memset for 32-bit patterns, where
// std::fill_n of uint32_t is a plain loop at -O2.
void FillPixels(uint32_t* pixels, uint32_t rgba, size_t count) {
  static_assert(sizeof(wchar_t) == sizeof(uint32_t));
  std::wmemset(reinterpret_cast<wchar_t*>(pixels), static_cast<wchar_t>(rgba), count);
}

}  // namespace

void DrawFrame(const Region& region, uint32_t slot, uint64_t frame) {
  const uint32_t f = Frame24(frame);
  const uint32_t bar_x = BarX(f, region.width);
  for (uint32_t y = 0; y < region.height; ++y) {
    uint32_t* row = Row(region, y);
    FillPixels(row, Background(f, y, slot), region.width);
    // The bar, wrapping at the right edge.
    const uint32_t first = std::min(kBarWidth, region.width - bar_x);
    FillPixels(row + bar_x, kBarColor, first);
    FillPixels(row, kBarColor, kBarWidth - first);
    row[0] = FramePixel(frame);
    row[1] = Marker(slot);
  }
}

void DrawHeader(const Region& region, uint32_t slot, uint64_t frame) {
  uint32_t* row = Row(region, 0);
  row[0] = FramePixel(frame);
  row[1] = Marker(slot);
}

void StampReady(const Region& region, uint64_t ready_ns) {
  uint32_t* row = Row(region, 0);
  row[2] = static_cast<uint32_t>(ready_ns);
  row[3] = static_cast<uint32_t>(ready_ns >> 32);
}

std::optional<Header> ReadHeader(const ConstRegion& region) {
  const uint32_t* row = Row(region, 0);
  const uint32_t marker = row[1];
  const uint32_t slot = marker & 0xff;
  if (slot >= kMaxProducers || marker != Marker(slot)) return std::nullopt;
  return Header{.slot = slot,
                .frame24 = row[0] & 0xffffff,
                .ready_ns = static_cast<uint64_t>(row[3]) << 32 | row[2]};
}

std::string CheckFrame(const ConstRegion& region, uint32_t slot) {
  if (region.width < kMinWidth || region.height == 0) {
    return absl::StrCat("a ", region.width, "x", region.height, " region is too small to check");
  }
  const uint32_t* first = Row(region, 0);
  if (first[1] != Marker(slot)) {
    return absl::StrCat("row 0 has no marker of producer slot ", slot);
  }
  const uint32_t f = first[0] & 0xffffff;
  const uint32_t bar_x = BarX(f, region.width);
  for (uint32_t y = 0; y < region.height; ++y) {
    const uint32_t* row = Row(region, y);
    if (row[0] != FramePixel(f)) {
      return absl::StrCat("row ", y, " shows frame ", row[0] & 0xffffff, ", row 0 frame ", f);
    }
    if (row[1] != Marker(slot)) return absl::StrCat("row ", y, " has no marker");
    const uint32_t background = Background(f, y, slot);
    for (uint32_t x = (y == 0 ? 4 : 2); x < region.width; ++x) {
      const uint32_t want = InBar(x, bar_x, region.width) ? kBarColor : background;
      if (row[x] != want) {
        return absl::StrCat("row ", y, " pixel ", x, " is ", absl::Hex(row[x], absl::kZeroPad8),
                            " where frame ", f, " has ", absl::Hex(want, absl::kZeroPad8));
      }
    }
  }
  return "";
}

void CopyPixels(const ConstRegion& from, const Region& to) {
  const uint32_t width = std::min(from.width, to.width);
  const uint32_t height = std::min(from.height, to.height);
  for (uint32_t y = 0; y < height; ++y) {
    std::memcpy(to.data + static_cast<size_t>(y) * to.stride,
                from.data + static_cast<size_t>(y) * from.stride, size_t{width} * kBytesPerPixel);
  }
}

void Fill(const Region& to, uint32_t rgba) {
  for (uint32_t y = 0; y < to.height; ++y) FillPixels(Row(to, y), rgba, to.width);
}

std::string FormatHello(const Hello& hello) {
  return absl::StrCat("HELLO 1 ", hello.name, " ", hello.acquire_token, " ",
                      absl::StrJoin(hello.buffer_tokens, " "));
}

absl::StatusOr<Hello> ParseHello(absl::string_view record) {
  if (record.size() > kMaxRecord) {
    return absl::InvalidArgumentError(
        absl::StrCat("hello of ", record.size(), " bytes (at most ", kMaxRecord, ")"));
  }
  std::vector<absl::string_view> words = absl::StrSplit(record, ' ');
  if (words.size() < 5 || words[0] != "HELLO") {
    return absl::InvalidArgumentError(
        "not a hello: want 'HELLO 1 <name> <timeline token> <buffer token>...'");
  }
  if (words[1] != "1") {
    return absl::InvalidArgumentError(
        absl::StrCat("hello version '", words[1].substr(0, 8), "' is not 1"));
  }
  if (!ValidName(words[2])) {
    return absl::InvalidArgumentError("name must be 1 to 32 of [A-Za-z0-9_.-]");
  }
  Hello hello{.name = std::string(words[2])};
  for (size_t i = 3; i < words.size(); ++i) {
    if (!ValidToken(words[i])) {
      return absl::InvalidArgumentError(absl::StrCat("token ", i - 3, " is not a token"));
    }
  }
  hello.acquire_token = std::string(words[3]);
  if (words.size() - 4 > kMaxBuffers) {
    return absl::InvalidArgumentError(
        absl::StrCat(words.size() - 4, " buffers (at most ", kMaxBuffers, ")"));
  }
  for (size_t i = 4; i < words.size(); ++i) hello.buffer_tokens.emplace_back(words[i]);
  return hello;
}

std::string FormatWelcome(const Welcome& welcome) {
  return absl::StrCat("WELCOME ", welcome.slot, " ", welcome.release_token);
}

std::string FormatRefusal(absl::string_view why) { return absl::StrCat("REFUSED ", why); }

absl::StatusOr<Welcome> ParseWelcome(absl::string_view record) {
  if (absl::StartsWith(record, "REFUSED ")) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the compositor refused: ", record.substr(8, std::min<size_t>(record.size(), 512))));
  }
  std::vector<absl::string_view> words = absl::StrSplit(record, ' ');
  Welcome welcome;
  if (words.size() != 3 || words[0] != "WELCOME" || !absl::SimpleAtoi(words[1], &welcome.slot) ||
      welcome.slot >= kMaxProducers || !ValidToken(words[2])) {
    return absl::InvalidArgumentError("the compositor's answer is not a welcome");
  }
  welcome.release_token = std::string(words[2]);
  return welcome;
}

uint64_t NowNs() {
  timespec now;
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<uint64_t>(now.tv_sec) * 1000000000u + static_cast<uint64_t>(now.tv_nsec);
}

uint64_t Quantile(std::vector<uint64_t>& samples, double q) {
  if (samples.empty()) return 0;
  const size_t k = std::min(samples.size() - 1, static_cast<size_t>(q * samples.size()));
  std::nth_element(samples.begin(), samples.begin() + k, samples.end());
  return samples[k];
}

}  // namespace bufferd::frames
