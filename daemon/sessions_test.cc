#include "daemon/sessions.h"

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "base/protocol.h"

namespace bufferd {
namespace {

PeerCredentials Peer(uid_t uid) { return {1234, uid, 100}; }

// Tests that a session's credential authenticates it, and that a missing,
// wrong or ended one is UNAUTHENTICATED saying why.
TEST(SessionTableTest, Authenticate) {
  SessionTable sessions({});
  auto session = sessions.Open(Peer(0), "x");
  ASSERT_TRUE(session.ok());
  EXPECT_EQ(session->secret.size(), kSessionSecretBytes);
  const std::string credential = FormatSessionCredential(session->id, session->secret);
  EXPECT_EQ(*sessions.Authenticate(credential), session->id);
  EXPECT_EQ(sessions.Authenticate("").status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(sessions.Authenticate(absl::StrCat(session->id, ":", std::string(32, 'f')))
                .status()
                .message(),
            absl::StrCat("wrong secret for session ", session->id));
  sessions.Detach(session->id);
  EXPECT_EQ(sessions.Authenticate(credential).status().code(), absl::StatusCode::kUnauthenticated)
      << "a detached session takes no calls";
  ASSERT_EQ(sessions.List().size(), 1u) << "but is still listed";
  EXPECT_EQ(sessions.List()[0].id, session->id);
  sessions.Close(session->id);
  EXPECT_NE(sessions.Authenticate(credential).status().message().find("is not live"),
            absl::string_view::npos);
  EXPECT_TRUE(sessions.List().empty());
}

// Tests the session caps, total and per uid, and that a closed session frees
// its place.
TEST(SessionTableTest, Caps) {
  SessionTable sessions({.max_sessions = 3, .max_sessions_per_uid = 2});
  auto a1 = sessions.Open(Peer(1), "a");
  ASSERT_TRUE(a1.ok());
  ASSERT_TRUE(sessions.Open(Peer(1), "a").ok());
  auto third = sessions.Open(Peer(1), "a");
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(third.status().message(), "uid 1 has 2 sessions open (limits.max_sessions_per_uid)");
  ASSERT_TRUE(sessions.Open(Peer(2), "b").ok());
  auto fourth = sessions.Open(Peer(3), "c");
  EXPECT_EQ(fourth.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(fourth.status().message(), "bufferd has 3 sessions open (limits.max_sessions)");
  sessions.Close(a1->id);
  auto again = sessions.Open(Peer(3), "c");
  ASSERT_TRUE(again.ok());
  EXPECT_GT(again->id, a1->id) << "ids are never reused";
  EXPECT_EQ(sessions.Open(Peer(1), "a").status().code(), absl::StatusCode::kResourceExhausted)
      << "3 open again";
  EXPECT_EQ(sessions.List().size(), 3u);
}

}  // namespace
}  // namespace bufferd
