// BufferStore: one Buffer's description (v1::BufferInfo) on a protobuf
// arena of its own whose first block comes with the store. An answer that
// describes a buffer (Allocate, Import, GetBuffer, SetMetadata, Freeze) is
// parsed straight into a fresh store (an Allocate's request is built there
// too, so the description takes its metadata without a copy): the frame,
// its planes and its metadata cost no malloc and free each, and the store
// goes in one free. A new description takes a new store: an arena never
// grows with a Buffer's age, however often its metadata changes.
//
// A frame the library allocated is laid out when first asked for (frame()
// or info()), from its request: an Allocate builds no layout nobody reads.
//
// Not thread-safe while it is being filled; its const calls are
// thread-safe afterwards.
#ifndef BUFFERD_CLIENT_BUFFER_STORE_H_
#define BUFFERD_CLIENT_BUFFER_STORE_H_

#include <cstddef>
#include <memory>
#include <optional>

#include "absl/base/call_once.h"
#include "base/frame_format.h"
#include "bufferd/v1/buffer.pb.h"
#include "google/protobuf/arena.h"

namespace bufferd::internal {

class BufferStore {
 public:
  // Room for an Allocate of a frame with metadata, request and answer; a
  // larger description takes a block from the heap.
  static constexpr size_t kBlockBytes = 1536;

  // An empty description.
  static std::unique_ptr<BufferStore> Make() {
    return std::unique_ptr<BufferStore>(new BufferStore);
  }
  // `info`, taken as it is (a description parsed elsewhere: an
  // AllocateSet's answer holds several).
  static std::unique_ptr<BufferStore> Taking(std::unique_ptr<v1::BufferInfo> info) {
    std::unique_ptr<BufferStore> store = Make();
    store->owned_ = std::move(info);
    store->info_ = store->owned_.get();
    return store;
  }

  BufferStore(const BufferStore&) = delete;
  BufferStore& operator=(const BufferStore&) = delete;

  // A message on the store's arena (an answer to parse into).
  template <typename Message>
  Message* New() {
    return google::protobuf::Arena::CreateMessage<Message>(&arena_);
  }
  // `info` (on this store's arena: a field of a New() answer) is the
  // description from now on.
  void Adopt(v1::BufferInfo* info) { info_ = info; }
  // The description lacks its frame: it is `frame` (on this store's arena)
  // laid out, when first asked for.
  void LayOutLater(const v1::FrameRequest* frame) { pending_frame_ = frame; }

  const v1::BufferInfo& info() const {
    if (pending_frame_ != nullptr) absl::call_once(laid_out_, [this] { AddLayout(); });
    return *info_;
  }
  // The description but for a frame not laid out yet (every other field).
  const v1::BufferInfo& fields() const { return *info_; }
  // While the store is filled (before LayOutLater).
  v1::BufferInfo& mutable_info() { return *info_; }
  // The frame's layout, without building its wire form.
  std::optional<FrameFormat> frame() const;
  // Bytes the arena took from the heap beyond its first block (tests).
  size_t HeapBytes() const { return arena_.SpaceAllocated() - kBlockBytes; }

 private:
  BufferStore() : arena_(block_, sizeof(block_)), info_(New<v1::BufferInfo>()) {}

  // LayOutFrame of the pending frame; nullopt if this library cannot lay
  // out what the daemon allocated, or lays it out to another size than the
  // daemon's (requested_size): it never happens between a library and a
  // daemon of one protocol version.
  std::optional<FrameFormat> LayOut() const;
  void AddLayout() const;

  alignas(std::max_align_t) char block_[kBlockBytes];
  google::protobuf::Arena arena_;
  v1::BufferInfo* info_;
  // The description when it was taken rather than made here.
  std::unique_ptr<v1::BufferInfo> owned_;
  const v1::FrameRequest* pending_frame_ = nullptr;
  mutable absl::once_flag laid_out_;
};

}  // namespace bufferd::internal

#endif  // BUFFERD_CLIENT_BUFFER_STORE_H_
