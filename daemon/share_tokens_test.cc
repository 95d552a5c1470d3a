#include "daemon/share_tokens.h"

#include <gtest/gtest.h>

namespace bufferd {
namespace {

const absl::Time kT0 = absl::FromUnixSeconds(1000000);

// Tests a token's life: found while live, used once, expired with how long
// ago, and forgotten only kTombstoneGrace after expiry.
TEST(ShareTokensTest, UseExpiryAndTombstones) {
  ShareTokens tokens;
  auto token = tokens.Create(1, 7, v1::ACCESS_READ_ONLY, kT0 + absl::Seconds(30));
  ASSERT_TRUE(token.ok());
  EXPECT_EQ(token->size(), 32u);
  auto found = tokens.Find(*token, kT0);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->buffer, 7u);
  EXPECT_EQ(found->access, v1::ACCESS_READ_ONLY);
  EXPECT_EQ(tokens.Pending(kT0), 1u);
  tokens.Redeem(*token, 2);
  EXPECT_EQ(tokens.Find(*token, kT0).status().message(),
            "share token was already used (by session 2)");
  tokens.Unredeem(*token);
  EXPECT_TRUE(tokens.Find(*token, kT0).ok());
  EXPECT_EQ(tokens.Find(*token, kT0 + absl::Seconds(31)).status().message(),
            "share token expired 1s ago");
  EXPECT_EQ(tokens.Find("nope", kT0).status().code(), absl::StatusCode::kNotFound);
  tokens.Expire(kT0 + absl::Seconds(30) + ShareTokens::kTombstoneGrace);
  EXPECT_EQ(tokens.size(), 1u) << "a tombstone until the grace is over";
  tokens.Expire(kT0 + absl::Seconds(31) + ShareTokens::kTombstoneGrace);
  EXPECT_EQ(tokens.size(), 0u);
  EXPECT_EQ(tokens.Find(*token, kT0).status().code(), absl::StatusCode::kNotFound);
}

// Tests that a destroyed buffer's tokens are forgotten, and give their
// exporter's room back, while other buffers' tokens stay.
TEST(ShareTokensTest, ForgetBufferFreesTheExportersRoom) {
  ShareTokens tokens;
  std::string other;
  for (uint32_t i = 0; i < ShareTokens::kMaxUnredeemed; ++i) {
    auto token = tokens.Create(1, i % 2 == 0 ? 7 : 8, v1::ACCESS_READ_WRITE, kT0 + absl::Hours(1));
    ASSERT_TRUE(token.ok()) << i;
    if (i == 1) other = *token;
  }
  EXPECT_EQ(tokens.Create(1, 7, v1::ACCESS_READ_WRITE, kT0).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(tokens.Create(2, 7, v1::ACCESS_READ_WRITE, kT0).ok()) << "another exporter";
  tokens.ForgetBuffer(7);
  EXPECT_EQ(tokens.size(), ShareTokens::kMaxUnredeemed / 2);
  EXPECT_TRUE(tokens.Find(other, kT0).ok());
  EXPECT_TRUE(tokens.Create(1, 8, v1::ACCESS_READ_WRITE, kT0 + absl::Hours(1)).ok());
}

}  // namespace
}  // namespace bufferd
