// tests/peer: the second process of integration tests. Talks to bufferd only
// through the client library and reports on stdout, one fact per line.
//
//   peer read  <dir> <token> <byte>   import, check every byte, try a writable map
//   peer write <dir> <token> <byte>   import, fill with <byte>
//   peer hold  <dir> <heap> <size> <count>  allocate, print "ready", wait to be killed
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "client/client.h"

namespace {

int Fail(const std::string& what, const absl::Status& status) {
  std::printf("error %s: %s\n", what.c_str(), status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc < 3) return 2;
  const std::string mode = argv[1];
  absl::StatusOr<bufferd::Client> client = bufferd::Client::Connect(argv[2]);
  if (!client.ok()) return Fail("connect", client.status());

  if ((mode == "read" || mode == "write") && argc == 5) {
    const int byte = std::atoi(argv[4]);
    absl::StatusOr<bufferd::Buffer> buffer = client->Import(argv[3]);
    if (!buffer.ok()) return Fail("import", buffer.status());
    std::printf("imported size=%lu access=%s\n", static_cast<unsigned long>(buffer->size()),
                buffer->access() == bufferd::Access::kReadOnly ? "ro" : "rw");
    if (mode == "read") {
      absl::StatusOr<bufferd::Mapping> map = buffer->MapReadOnly();
      if (!map.ok()) return Fail("map", map.status());
      size_t bad = 0;
      for (uint8_t b : map->bytes()) bad += b != byte;
      std::printf("mismatched=%zu\n", bad);
      void* writable =
          ::mmap(nullptr, buffer->size(), PROT_READ | PROT_WRITE, MAP_SHARED, buffer->fd(), 0);
      std::printf("writable_map=%s\n", writable == MAP_FAILED
                                           ? (errno == EACCES ? "EACCES" : std::strerror(errno))
                                           : "ok");
      if (writable != MAP_FAILED) ::munmap(writable, buffer->size());
    } else {
      absl::StatusOr<bufferd::Mapping> map = buffer->Map();
      if (!map.ok()) return Fail("map", map.status());
      std::memset(map->data(), byte, map->size());
      std::printf("written\n");
    }
    return 0;
  }
  if (mode == "hold" && argc == 6) {
    std::vector<bufferd::Buffer> held;
    for (int i = 0; i < std::atoi(argv[5]); ++i) {
      absl::StatusOr<bufferd::Buffer> buffer = client->Allocate(
          {.heap = argv[3], .size = std::strtoull(argv[4], nullptr, 10), .name = "held"});
      if (!buffer.ok()) return Fail("allocate", buffer.status());
      held.push_back(*std::move(buffer));
    }
    std::printf("ready session=%lu\n", static_cast<unsigned long>(client->session_id()));
    while (true) ::pause();
  }
  std::printf("usage error\n");
  return 2;
}
