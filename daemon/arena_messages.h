// ArenaMessages: a gRPC MessageAllocator for a callback unary method that
// puts each call's request and response on a protobuf Arena whose first
// block is part of the holder, so their nested messages (a frame, its
// metadata and layout) cost no malloc and free each. Holders are kept for
// the next calls.
//
// The arena is made afresh per call, on the thread that parses the request
// and runs the handler (an arena's first block belongs to the thread that
// made it; another thread allocating in it gets a block of its own). A
// handler builds what it answers on the response's arena (GetArena()):
// moving a heap message into an arena message copies it.
//
// Thread-safe.
#ifndef BUFFERD_DAEMON_ARENA_MESSAGES_H_
#define BUFFERD_DAEMON_ARENA_MESSAGES_H_

#include <cstddef>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "google/protobuf/arena.h"
#include "grpcpp/support/message_allocator.h"

namespace bufferd {

template <typename Request, typename Response>
class ArenaMessages final : public grpc::MessageAllocator<Request, Response> {
 public:
  ArenaMessages() = default;
  ArenaMessages(const ArenaMessages&) = delete;
  ArenaMessages& operator=(const ArenaMessages&) = delete;
  // After the server: no holder is out.
  ~ArenaMessages() override {
    for (Holder* holder : free_) delete holder;
  }

  grpc::MessageHolder<Request, Response>* AllocateMessages() override {
    Holder* holder = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (!free_.empty()) {
        holder = free_.back();
        free_.pop_back();
      }
    }
    if (holder == nullptr) holder = new Holder(this);
    holder->Start();
    return holder;
  }

 private:
  // Enough for an Allocate of a frame with metadata and its answer; a
  // larger call takes more blocks from the heap.
  static constexpr size_t kBlockBytes = 2048;
  // Holders kept: about the number of calls in flight at once.
  static constexpr size_t kMaxKept = 16;

  class Holder final : public grpc::MessageHolder<Request, Response> {
   public:
    explicit Holder(ArenaMessages* owner) : owner_(owner) {}

    void Start() {
      arena_.emplace(block_, sizeof(block_));
      this->set_request(google::protobuf::Arena::CreateMessage<Request>(&*arena_));
      this->set_response(google::protobuf::Arena::CreateMessage<Response>(&*arena_));
    }
    // gRPC is done with both messages.
    void Release() override {
      arena_.reset();
      owner_->Keep(this);
    }

   private:
    ArenaMessages* const owner_;
    alignas(std::max_align_t) char block_[kBlockBytes];
    std::optional<google::protobuf::Arena> arena_;
  };

  void Keep(Holder* holder) {
    {
      absl::MutexLock lock(&mu_);
      if (free_.size() < kMaxKept) {
        free_.push_back(holder);
        return;
      }
    }
    delete holder;
  }

  absl::Mutex mu_;
  std::vector<Holder*> free_ ABSL_GUARDED_BY(mu_);
};

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_ARENA_MESSAGES_H_
