#include "examples/frames.h"

#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "examples/png_io.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace bufferd::frames {
namespace {

using ::testing::HasSubstr;

struct Image {
  Image(uint32_t width, uint32_t height, uint32_t stride)
      : pixels(size_t{stride} * height), region{pixels.data(), stride, width, height} {}
  ConstRegion view() const { return {region.data, region.stride, region.width, region.height}; }
  std::vector<uint8_t> pixels;
  Region region;
};

TEST(FramesTest, DrawnFrameChecksAndCarriesItsHeader) {
  Image image(200, 50, 832);  // a stride wider than the row
  for (uint64_t frame : {1u, 27u, 199u, 200u, 1000u}) {
    DrawFrame(image.region, 2, frame);
    StampReady(image.region, 0x123456789abcdefull);
    EXPECT_EQ(CheckFrame(image.view(), 2), "") << "frame " << frame;
    std::optional<Header> header = ReadHeader(image.view());
    ASSERT_TRUE(header.has_value());
    EXPECT_EQ(header->slot, 2u);
    EXPECT_EQ(header->frame24, frame);
    EXPECT_EQ(header->ready_ns, 0x123456789abcdefull);
  }
}

TEST(FramesTest, AFrameMixedFromTwoIsCaught) {
  Image older(128, 40, 512), newer(128, 40, 512);
  for (uint64_t gap : {1u, 2u, 255u, 256u, 4096u}) {
    DrawFrame(older.region, 0, 100);
    DrawFrame(newer.region, 0, 100 + gap);
    // The producer got as far as row 17 of the newer frame.
    CopyPixels({newer.region.data, newer.region.stride, 128, 17}, older.region);
    EXPECT_THAT(CheckFrame(older.view(), 0), HasSubstr("row 17 shows frame 100"));
    // ... or half-way along a row: its first pixels new, the rest old.
    DrawFrame(older.region, 0, 100);
    CopyPixels({newer.region.data, newer.region.stride, 40, 1}, older.region);
    EXPECT_THAT(CheckFrame(older.view(), 0), HasSubstr("row 0 pixel")) << "gap " << gap;
  }
}

TEST(FramesTest, AnotherProducersFrameOrGarbageIsCaught) {
  Image image(64, 4, 256);
  DrawFrame(image.region, 1, 5);
  EXPECT_THAT(CheckFrame(image.view(), 0), HasSubstr("no marker of producer slot 0"));
  Fill(image.region, 0xff00ff00);
  EXPECT_FALSE(ReadHeader(image.view()).has_value());
  EXPECT_NE(CheckFrame(image.view(), 1), "");
  Image narrow(8, 4, 32);
  EXPECT_THAT(CheckFrame(narrow.view(), 0), HasSubstr("too small"));
}

TEST(FramesTest, HeaderOnlyFramesCarryTheFrameNumber) {
  Image image(64, 4, 256);
  DrawHeader(image.region, 3, 0x1234567);
  std::optional<Header> header = ReadHeader(image.view());
  ASSERT_TRUE(header.has_value());
  EXPECT_EQ(header->frame24, 0x234567u);
  EXPECT_EQ(header->slot, 3u);
}

TEST(FramesTest, HelloRoundTripsAndBadOnesAreNamed) {
  Hello hello{.name = "cam-1", .acquire_token = "abc", .buffer_tokens = {"t1", "t2", "t3"}};
  absl::StatusOr<Hello> parsed = ParseHello(FormatHello(hello));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->name, "cam-1");
  EXPECT_EQ(parsed->acquire_token, "abc");
  EXPECT_EQ(parsed->buffer_tokens, hello.buffer_tokens);

  struct Bad {
    std::string record;
    std::string says;
  };
  const std::vector<Bad> bad = {
      {"", "not a hello"},
      {"HELLO 1 cam abc", "not a hello"},
      {"GOODBYE 1 cam abc t1", "not a hello"},
      {"HELLO 2 cam abc t1", "version '2' is not 1"},
      {"HELLO 1 c/m abc t1", "name must be"},
      {"HELLO 1 " + std::string(33, 'n') + " abc t1", "name must be"},
      {"HELLO 1 cam abc t\x01", "token 1 is not a token"},
      {"HELLO 1 cam abc  t1", "token 1 is not a token"},
      {"HELLO 1 cam a t1 t2 t3 t4 t5 t6 t7 t8 t9", "9 buffers (at most 8)"},
      {"HELLO 1 cam " + std::string(3000, 'a') + " t1", "bytes (at most 2048)"},
  };
  for (const Bad& b : bad) {
    absl::Status status = ParseHello(b.record).status();
    EXPECT_TRUE(absl::IsInvalidArgument(status)) << b.record.substr(0, 40) << ": " << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(b.says)) << b.record.substr(0, 40);
  }
}

TEST(FramesTest, WelcomeAndRefusal) {
  absl::StatusOr<Welcome> welcome = ParseWelcome(FormatWelcome({3, "rt"}));
  ASSERT_TRUE(welcome.ok()) << welcome.status();
  EXPECT_EQ(welcome->slot, 3u);
  EXPECT_EQ(welcome->release_token, "rt");
  absl::Status refused = ParseWelcome(FormatRefusal("every place is taken")).status();
  EXPECT_TRUE(absl::IsFailedPrecondition(refused));
  EXPECT_THAT(std::string(refused.message()), HasSubstr("every place is taken"));
  EXPECT_TRUE(absl::IsInvalidArgument(ParseWelcome("WELCOME 9 rt").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(ParseWelcome("WELCOME x rt").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(ParseWelcome("hello").status()));
}

TEST(FramesTest, PngRoundTrip) {
  Image image(96, 30, 96 * 4);
  DrawFrame(image.region, 1, 77);
  const std::string dir = ::testing::TempDir();
  const std::string path = dir + "/frames_test.png";
  ASSERT_TRUE(WritePng(path, image.view()).ok());
  EXPECT_NE(::access((path + ".tmp").c_str(), F_OK), 0);
  absl::StatusOr<Picture> picture = ReadPng(path);
  ASSERT_TRUE(picture.ok()) << picture.status();
  EXPECT_EQ(picture->width, 96u);
  EXPECT_EQ(picture->height, 30u);
  EXPECT_EQ(picture->pixels, image.pixels);
  EXPECT_EQ(CheckFrame(picture->region(), 1), "");
  EXPECT_TRUE(absl::IsNotFound(ReadPng(dir + "/no-such.png").status()));
}

TEST(FramesTest, QuantileOfSamples) {
  std::vector<uint64_t> none;
  EXPECT_EQ(Quantile(none, 0.5), 0u);
  std::vector<uint64_t> samples;
  for (uint64_t i = 100; i >= 1; --i) samples.push_back(i);
  EXPECT_EQ(Quantile(samples, 0.5), 51u);
  EXPECT_EQ(Quantile(samples, 0.99), 100u);
}

}  // namespace
}  // namespace bufferd::frames
