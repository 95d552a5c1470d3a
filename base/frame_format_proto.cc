#include "base/frame_format_proto.h"

namespace bufferd {

void FillProto(const FrameFormat& frame, v1::FrameFormat& proto) {
  proto.set_width(frame.width);
  proto.set_height(frame.height);
  proto.set_fourcc(frame.fourcc);
  proto.set_modifier(frame.modifier);
  proto.mutable_planes()->Reserve(static_cast<int>(frame.planes.size()));
  for (const PlaneLayout& plane : frame.planes) {
    v1::PlaneLayout* p = proto.add_planes();
    p->set_offset(plane.offset);
    p->set_stride(plane.stride);
    p->set_size(plane.size);
  }
  proto.set_size(frame.size);
}

FrameFormat FromProto(const v1::FrameFormat& proto) {
  FrameFormat frame{.width = proto.width(),
                    .height = proto.height(),
                    .fourcc = proto.fourcc(),
                    .modifier = proto.modifier(),
                    .size = proto.size()};
  for (const v1::PlaneLayout& plane : proto.planes()) {
    frame.planes.push_back(PlaneLayout{plane.offset(), plane.stride(), plane.size()});
  }
  return frame;
}

}  // namespace bufferd
