#include "daemon/proto_convert.h"

#include "google/protobuf/util/time_util.h"

namespace bufferd {

google::protobuf::Timestamp ToProto(absl::Time time) {
  return google::protobuf::util::TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(time));
}

v1::HeapType ToProto(HeapKind kind) {
  switch (kind) {
    case HeapKind::kSystem:
      return v1::HEAP_TYPE_SYSTEM;
    case HeapKind::kContiguous:
      return v1::HEAP_TYPE_CONTIGUOUS;
    case HeapKind::kCarveout:
      return v1::HEAP_TYPE_CARVEOUT;
  }
  return v1::HEAP_TYPE_UNSPECIFIED;
}

v1::Backing ToProto(Backing backing) {
  switch (backing) {
    case Backing::kBasePages:
      return v1::BACKING_BASE_PAGES;
    case Backing::kThp:
      return v1::BACKING_THP;
    case Backing::kHugetlb2M:
      return v1::BACKING_HUGETLB_2M;
    case Backing::kHugetlb1G:
      return v1::BACKING_HUGETLB_1G;
  }
  return v1::BACKING_UNSPECIFIED;
}

v1::FrameFormat ToProto(const FrameFormat& frame) {
  v1::FrameFormat proto;
  FillProto(frame, proto);
  return proto;
}

}  // namespace bufferd
