#include "daemon/reaper.h"

#include <utility>

namespace bufferd {

void Reaper::Free(std::vector<DeadBuffer> dead, std::function<void()> done) {
  auto later = std::make_shared<std::vector<DeadBuffer>>();
  for (DeadBuffer& buffer : dead) {
    if (on_dead_ && buffer.buffer_id != 0) on_dead_(buffer.buffer_id);
    if (buffer.memory != nullptr && !buffer.memory->cheap_to_free()) {
      later->push_back(std::move(buffer));
    }
  }
  dead.clear();  // the cheap ones, here
  if (later->empty()) {
    if (done) done();
    return;
  }
  thread_.Post([later, done = std::move(done)] {
    later->clear();
    if (done) done();
  });
}

void Reaper::Close(std::vector<LeasedFd> fds) {
  if (fds.empty()) return;
  auto later = std::make_shared<std::vector<LeasedFd>>(std::move(fds));
  thread_.Post([later] { later->clear(); });
}

}  // namespace bufferd
