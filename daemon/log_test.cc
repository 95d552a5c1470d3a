#include "daemon/log.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>

#include "google/protobuf/stubs/logging.h"
#include "spdlog/sinks/ostream_sink.h"

namespace bufferd {
namespace {

// Tests that a limiter lets `burst` lines through per period, drops the rest,
// and that the first line after the pause says how many were dropped.
TEST(LogLimiterTest, BurstThenDropsThenCounts) {
  LogLimiter limiter(3, absl::Seconds(10));
  const absl::Time start = absl::FromUnixSeconds(1000);
  uint64_t dropped = 99;
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(limiter.Allow(start + absl::Seconds(i), &dropped)) << i;
    EXPECT_EQ(dropped, 0u);
  }
  for (int i = 0; i < 1000; ++i) EXPECT_FALSE(limiter.Allow(start + absl::Seconds(9), &dropped));
  EXPECT_TRUE(limiter.Allow(start + absl::Seconds(10), &dropped));
  EXPECT_EQ(dropped, 1000u);
  EXPECT_TRUE(limiter.Allow(start + absl::Seconds(11), &dropped));
  EXPECT_EQ(dropped, 0u) << "counted once";
}

// Tests that libprotobuf's log lines go through spdlog, limited: 1,000 errors
// (one per bad request, say) make 10 lines, formatted as the daemon's own.
TEST(LibraryLogTest, ProtobufLinesGoThroughSpdlogLimited) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>("test", sink));
  InstallLibraryLogHandlers();
  for (int i = 0; i < 1000; ++i) GOOGLE_LOG(ERROR) << "bad request " << i;
  spdlog::set_default_logger(previous);
  google::protobuf::SetLogHandler(nullptr);
  const std::string text = out.str();
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 10) << text;
  EXPECT_NE(text.find("libprotobuf daemon/log_test.cc:"), std::string::npos) << text;
  EXPECT_NE(text.find(": bad request 0"), std::string::npos) << text;
  EXPECT_EQ(text.find("bad request 10\n"), std::string::npos) << "dropped";
}

}  // namespace
}  // namespace bufferd
