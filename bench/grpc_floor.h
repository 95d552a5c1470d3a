// The gRPC floor of the IPC benchmarks: one empty unary call (the daemon's
// own Health/Check) through a generic stub on the control socket.
#ifndef BUFFERD_BENCH_GRPC_FLOOR_H_
#define BUFFERD_BENCH_GRPC_FLOOR_H_

#include <atomic>

#include "absl/synchronization/mutex.h"
#include "bench/bench_util.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/byte_buffer.h"

namespace bufferd::bench {

// Microseconds one empty unary call takes, request to response.
inline double GrpcOnce(grpc::GenericStub& stub) {
  grpc::ClientContext context;
  grpc::Slice empty;
  grpc::ByteBuffer request(&empty, 1);  // a valid, empty message
  grpc::ByteBuffer response;
  std::atomic<bool> done{false};
  grpc::Status status;
  absl::Mutex mu;
  double start = NowMicros();
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   absl::MutexLock lock(&mu);
                   status = s;
                   done = true;
                 });
  mu.LockWhen(absl::Condition(
      +[](std::atomic<bool>* d) { return d->load(); }, &done));
  mu.Unlock();
  return NowMicros() - start;
}

}  // namespace bufferd::bench

#endif  // BUFFERD_BENCH_GRPC_FLOOR_H_
