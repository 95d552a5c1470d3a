// Conversions from the heaps' and absl's types to the protocol's.
#ifndef BUFFERD_DAEMON_PROTO_CONVERT_H_
#define BUFFERD_DAEMON_PROTO_CONVERT_H_

#include "absl/time/time.h"
#include "base/frame_format.h"
#include "base/frame_format_proto.h"
#include "bufferd/v1/buffer.pb.h"
#include "bufferd/v1/debug.pb.h"
#include "google/protobuf/timestamp.pb.h"
#include "heaps/heap.h"

namespace bufferd {

google::protobuf::Timestamp ToProto(absl::Time time);
v1::HeapType ToProto(HeapKind kind);
v1::Backing ToProto(Backing backing);
// (FillProto, into a given message, is base/frame_format_proto.h's.)
v1::FrameFormat ToProto(const FrameFormat& frame);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_PROTO_CONVERT_H_
