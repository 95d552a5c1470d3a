#include "client/buffer_store.h"

#include <gtest/gtest.h>
#include <libdrm/drm_fourcc.h>

#include <string>

#include "base/frame_format.h"
#include "base/frame_format_proto.h"

namespace bufferd::internal {
namespace {

// An Allocate of a frame with metadata as the library makes it: request
// and answer on the store, the description taking the request's metadata
// and laying out the frame when first asked for. It fits the first block.
TEST(BufferStore, AnAllocateOfAFrameFitsAndLaysOutWhenAsked) {
  std::unique_ptr<BufferStore> store = BufferStore::Make();
  auto* request = store->New<v1::AllocateRequest>();
  request->set_heap("system");
  request->set_name("camera0-frame-buffer");
  v1::FrameRequest& frame = *request->mutable_frame();
  frame.set_width(640);
  frame.set_height(480);
  frame.set_fourcc(DRM_FORMAT_YUV420);
  request->set_caller_lays_out_frame(true);
  v1::FrameMetadata& metadata = *request->mutable_metadata();
  metadata.mutable_crop()->set_width(640);
  metadata.mutable_crop()->set_height(480);
  metadata.set_tag(std::string(64, 't'));
  const std::string sent_metadata = metadata.SerializeAsString();
  v1::AllocateResponse answer;
  answer.set_handle(7);
  answer.mutable_buffer()->set_buffer_id(3);
  answer.mutable_buffer()->set_heap("system");
  answer.mutable_buffer()->set_size(462848);
  answer.mutable_buffer()->set_requested_size(460800);
  answer.mutable_buffer()->set_name("camera0-frame-buffer");
  answer.mutable_buffer()->mutable_created_at()->set_seconds(1);
  auto* response = store->New<v1::AllocateResponse>();
  ASSERT_TRUE(response->ParseFromString(answer.SerializeAsString()));
  store->Adopt(response->mutable_buffer());
  store->mutable_info().unsafe_arena_set_allocated_metadata(
      request->unsafe_arena_release_metadata());
  store->LayOutLater(&request->frame());
  EXPECT_EQ(store->HeapBytes(), 0u);

  absl::StatusOr<FrameFormat> layout = LayOutFrame(640, 480, DRM_FORMAT_YUV420, 0, 0);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_FALSE(store->fields().has_frame());
  EXPECT_EQ(store->frame(), *layout);
  EXPECT_FALSE(store->fields().has_frame());
  EXPECT_EQ(FromProto(store->info().frame()), *layout);
  EXPECT_EQ(store->info().metadata().SerializeAsString(), sent_metadata);
  EXPECT_EQ(store->info().buffer_id(), 3u);
  EXPECT_EQ(store->HeapBytes(), 0u);

  // A layout of another size than the daemon's is no layout.
  std::unique_ptr<BufferStore> other = BufferStore::Make();
  other->mutable_info().set_size(462848);
  other->mutable_info().set_requested_size(460800 + 64);
  other->LayOutLater(&request->frame());
  EXPECT_EQ(other->frame(), std::nullopt);
  EXPECT_FALSE(other->info().has_frame());
}

// The largest description the library is answered with (a three-plane
// frame, a crop and a 64-byte tag, with the answer around it) fits the
// store's first block: parsing it takes nothing from the heap for the
// messages.
TEST(BufferStore, AFrameWithMetadataFitsTheFirstBlock) {
  v1::AllocateResponse sent;
  sent.set_handle(7);
  sent.set_transfer_id(9);
  v1::BufferInfo& info = *sent.mutable_buffer();
  info.set_buffer_id(3);
  info.set_heap("contiguous");
  info.set_size(1 << 20);
  info.set_name(std::string(200, 'n'));
  info.mutable_created_at()->set_seconds(1);
  absl::StatusOr<FrameFormat> layout = LayOutFrame(640, 480, DRM_FORMAT_YUV420, 0, 0);
  ASSERT_TRUE(layout.ok()) << layout.status();
  FillProto(*layout, *info.mutable_frame());
  v1::FrameMetadata& metadata = *info.mutable_metadata();
  metadata.mutable_crop()->set_width(640);
  metadata.mutable_crop()->set_height(480);
  metadata.set_tag(std::string(64, 't'));

  std::unique_ptr<BufferStore> store = BufferStore::Make();
  auto* response = store->New<v1::AllocateResponse>();
  ASSERT_TRUE(response->ParseFromString(sent.SerializeAsString()));
  store->Adopt(response->mutable_buffer());
  EXPECT_EQ(store->HeapBytes(), 0u);
  EXPECT_EQ(store->info().SerializeAsString(), info.SerializeAsString());
  EXPECT_EQ(store->info().GetArena(), response->GetArena());

  // A description parsed elsewhere is taken as it is.
  auto taken_info = std::make_unique<v1::BufferInfo>(info);
  const v1::BufferInfo* const address = taken_info.get();
  std::unique_ptr<BufferStore> taken = BufferStore::Taking(std::move(taken_info));
  EXPECT_EQ(&taken->info(), address);
  EXPECT_EQ(taken->info().SerializeAsString(), info.SerializeAsString());

  // What does not fit takes blocks from the heap (and the measure sees it).
  for (int i = 0; i < 64; ++i) sent.add_skipped()->set_heap("carveout");
  std::unique_ptr<BufferStore> large = BufferStore::Make();
  ASSERT_TRUE(large->New<v1::AllocateResponse>()->ParseFromString(sent.SerializeAsString()));
  EXPECT_GT(large->HeapBytes(), 0u);
}

}  // namespace
}  // namespace bufferd::internal
