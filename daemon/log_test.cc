#include "daemon/log.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace bufferd
