#include "client/buffer_store.h"

#include "base/frame_format_proto.h"

namespace bufferd::internal {

std::optional<FrameFormat> BufferStore::frame() const {
  if (pending_frame_ != nullptr) return LayOut();
  if (!info_->has_frame()) return std::nullopt;
  return FromProto(info_->frame());
}

std::optional<FrameFormat> BufferStore::LayOut() const {
  const v1::FrameRequest& frame = *pending_frame_;
  absl::StatusOr<FrameFormat> layout =
      LayOutFrame(frame.width(), frame.height(), frame.fourcc(), frame.modifier(),
                  frame.stride_alignment(), {.max_dimension = kMaxFrameDimension});
  // The daemon allocated the request's frame: the same size, or another
  // layout.
  if (!layout.ok() || layout->size != info_->requested_size()) return std::nullopt;
  return *std::move(layout);
}

void BufferStore::AddLayout() const {
  if (std::optional<FrameFormat> layout = LayOut()) FillProto(*layout, *info_->mutable_frame());
}

}  // namespace bufferd::internal
