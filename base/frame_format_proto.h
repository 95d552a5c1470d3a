// A FrameFormat to and from its wire form (v1::FrameFormat), for both
// sides: the daemon answers with it, and the client library lays out the
// frames it allocates itself (AllocateRequest.caller_lays_out_frame) and
// reads the ones it imports.
//
// Pure functions; thread-safe.
#ifndef BUFFERD_BASE_FRAME_FORMAT_PROTO_H_
#define BUFFERD_BASE_FRAME_FORMAT_PROTO_H_

#include "base/frame_format.h"
#include "bufferd/v1/buffer.pb.h"

namespace bufferd {

// Fills `proto` (on its arena, if it has one).
void FillProto(const FrameFormat& frame, v1::FrameFormat& proto);
FrameFormat FromProto(const v1::FrameFormat& proto);

}  // namespace bufferd

#endif  // BUFFERD_BASE_FRAME_FORMAT_PROTO_H_
