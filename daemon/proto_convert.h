// Conversions from the heaps' and absl's types to the protocol's.
#ifndef BUFFERD_DAEMON_PROTO_CONVERT_H_
#define BUFFERD_DAEMON_PROTO_CONVERT_H_

#include "absl/time/time.h"
#include "base/frame_format.h"
#include "bufferd/v1/buffer.pb.h"
#include "bufferd/v1/debug.pb.h"
#include "google/protobuf/timestamp.pb.h"
#include "heaps/heap.h"

namespace bufferd {

google::protobuf::Timestamp ToProto(absl::Time time);
v1::HeapType ToProto(HeapKind kind);
v1::Backing ToProto(Backing backing);
v1::FrameFormat ToProto(const FrameFormat& frame);
// The same into `proto` (on its arena, if it has one).
void FillProto(const FrameFormat& frame, v1::FrameFormat& proto);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_PROTO_CONVERT_H_
