#include "daemon/arena_messages.h"

#include <string>
#include <thread>

#include "bufferd/v1/buffer.pb.h"
#include "gtest/gtest.h"

namespace bufferd {
namespace {

using Messages = ArenaMessages<v1::AllocateRequest, v1::AllocateResponse>;

TEST(ArenaMessagesTest, RequestAndResponseShareTheCallsArena) {
  Messages messages;
  grpc::MessageHolder<v1::AllocateRequest, v1::AllocateResponse>* call =
      messages.AllocateMessages();
  ASSERT_NE(call->request()->GetArena(), nullptr);
  EXPECT_EQ(call->response()->GetArena(), call->request()->GetArena());
  // What a handler builds for the answer goes on the same arena.
  EXPECT_EQ(call->response()->mutable_buffer()->GetArena(), call->request()->GetArena());
  call->Release();
}

TEST(ArenaMessagesTest, AKeptHolderStartsTheNextCallEmpty) {
  Messages messages;
  auto* first = messages.AllocateMessages();
  first->request()->set_name("first");
  first->request()->mutable_metadata()->set_tag(std::string(64, 't'));
  first->response()->mutable_buffer()->set_name("answer");
  first->Release();
  auto* second = messages.AllocateMessages();
  EXPECT_EQ(second, first);  // kept, not freed
  EXPECT_EQ(second->request()->ByteSizeLong(), 0u);
  EXPECT_FALSE(second->request()->has_metadata());
  EXPECT_EQ(second->response()->ByteSizeLong(), 0u);
  // Two calls at once never share a holder.
  auto* third = messages.AllocateMessages();
  EXPECT_NE(third, second);
  third->Release();
  second->Release();
}

TEST(ArenaMessagesTest, ACallLargerThanTheFirstBlockAndReleasedElsewhereIsWhole) {
  Messages messages;
  auto* call = messages.AllocateMessages();
  const std::string name(100000, 'n');
  call->request()->set_name(name);
  for (int i = 0; i < 200; ++i) call->response()->add_skipped()->set_message("skipped");
  EXPECT_EQ(call->request()->name(), name);
  EXPECT_EQ(call->response()->skipped_size(), 200);
  // gRPC may release a call on another thread than the one that made it.
  std::thread([call] { call->Release(); }).join();
  auto* next = messages.AllocateMessages();
  EXPECT_TRUE(next->request()->name().empty());
  EXPECT_EQ(next->response()->skipped_size(), 0);
  next->Release();
}

}  // namespace
}  // namespace bufferd
