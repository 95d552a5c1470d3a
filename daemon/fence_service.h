// FenceService: the Fence gRPC service, designed in fence.proto. Until
// fences land (fences/, beside heaps/), every call is UNIMPLEMENTED with a
// message naming the method.
#ifndef BUFFERD_DAEMON_FENCE_SERVICE_H_
#define BUFFERD_DAEMON_FENCE_SERVICE_H_

#include <string>

#include "bufferd/v1/fence.grpc.pb.h"

namespace bufferd {

class FenceService final : public v1::Fence::Service {
 public:
  grpc::Status CreateFence(grpc::ServerContext*, const v1::CreateFenceRequest*,
                           v1::CreateFenceResponse*) override {
    return Unimplemented("CreateFence");
  }
  grpc::Status SignalFence(grpc::ServerContext*, const v1::SignalFenceRequest*,
                           v1::SignalFenceResponse*) override {
    return Unimplemented("SignalFence");
  }
  grpc::Status WaitFence(grpc::ServerContext*, const v1::WaitFenceRequest*,
                         v1::WaitFenceResponse*) override {
    return Unimplemented("WaitFence");
  }
  grpc::Status GetFenceInfo(grpc::ServerContext*, const v1::GetFenceInfoRequest*,
                            v1::GetFenceInfoResponse*) override {
    return Unimplemented("GetFenceInfo");
  }
  grpc::Status MergeFences(grpc::ServerContext*, const v1::MergeFencesRequest*,
                           v1::MergeFencesResponse*) override {
    return Unimplemented("MergeFences");
  }
  grpc::Status ExportFence(grpc::ServerContext*, const v1::ExportFenceRequest*,
                           v1::ExportFenceResponse*) override {
    return Unimplemented("ExportFence");
  }
  grpc::Status ImportSyncFd(grpc::ServerContext*, const v1::ImportSyncFdRequest*,
                            v1::ImportSyncFdResponse*) override {
    return Unimplemented("ImportSyncFd");
  }
  grpc::Status AttachFence(grpc::ServerContext*, const v1::AttachFenceRequest*,
                           v1::AttachFenceResponse*) override {
    return Unimplemented("AttachFence");
  }
  grpc::Status GetBufferFences(grpc::ServerContext*, const v1::GetBufferFencesRequest*,
                               v1::GetBufferFencesResponse*) override {
    return Unimplemented("GetBufferFences");
  }

 private:
  static grpc::Status Unimplemented(const char* method) {
    return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                        std::string("Fence.") + method + ": fences are not implemented yet");
  }
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_FENCE_SERVICE_H_
