// Lazy<T>: a T allocated at its first use, for the parts of a per-session
// record that most sessions never touch (their fences, timelines, handles):
// a session that uses none of them costs one pointer.
//
// Use() makes it (for any change); Read() never does, and gives a shared
// empty T when there is none yet, so read paths cost no allocation. Not
// thread-safe: guard it as the record holding it is guarded.
#ifndef BUFFERD_BASE_LAZY_H_
#define BUFFERD_BASE_LAZY_H_

#include <memory>

namespace bufferd {

template <typename T>
class Lazy {
 public:
  T& Use() {
    if (value_ == nullptr) value_ = std::make_unique<T>();
    return *value_;
  }
  const T& Read() const {
    static const T* const kNone = new T();
    return value_ != nullptr ? *value_ : *kNone;
  }
  // Null until the first Use().
  T* get() const { return value_.get(); }

 private:
  std::unique_ptr<T> value_;
};

}  // namespace bufferd

#endif  // BUFFERD_BASE_LAZY_H_
