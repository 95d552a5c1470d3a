// share_demo: allocate a buffer, write a message into it, and share it
// read-only with a second process, which reads it back and shows it cannot
// write. Run it against a live daemon:
//
//   bazel-bin/examples/share_demo [--socket-dir DIR]
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "CLI/CLI.hpp"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "client/client.h"

namespace {

int Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "share_demo: %s: %s\n", what, status.ToString().c_str());
  return 1;
}

// The second process: import the token, print what the buffer says.
int Reader(const std::string& socket_dir, const std::string& token) {
  auto client = bufferd::Client::Connect(socket_dir);
  if (!client.ok()) return Fail("connect", client.status());
  auto buffer = client->Import(token);
  if (!buffer.ok()) return Fail("import", buffer.status());
  auto map = buffer->Map();
  if (!map.ok()) return Fail("map", map.status());
  std::printf("[reader pid %d] session %lu imported buffer %lu (%s): \"%s\"\n", ::getpid(),
              static_cast<unsigned long>(client->session_id()),
              static_cast<unsigned long>(buffer->id()),
              buffer->access() == bufferd::Access::kReadOnly ? "read-only" : "read-write",
              reinterpret_cast<const char*>(map->data()));
  void* writable =
      ::mmap(nullptr, buffer->size(), PROT_READ | PROT_WRITE, MAP_SHARED, buffer->fd(), 0);
  std::printf("[reader pid %d] writable mapping: %s\n", ::getpid(),
              writable == MAP_FAILED ? std::strerror(errno) : "allowed (unexpected!)");
  return writable == MAP_FAILED ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"share_demo: share a buffer read-only with a second process"};
  std::string socket_dir = bufferd::DefaultSocketDir();
  std::string token;
  std::string heap = "system";
  app.add_option("--socket-dir", socket_dir, "bufferd's socket dir")
      ->envname("BUFFERD_SOCKET_DIR")
      ->capture_default_str();
  app.add_option("--heap", heap, "heap to allocate from")->capture_default_str();
  app.add_option("--import", token, "(internal) run as the reader with this token");
  CLI11_PARSE(app, argc, argv);
  if (!token.empty()) return Reader(socket_dir, token);

  auto client = bufferd::Client::Connect(socket_dir);
  if (!client.ok()) return Fail("connect", client.status());
  auto buffer = client->Allocate({.heap = heap, .size = 4096, .name = "share_demo"});
  if (!buffer.ok()) return Fail("allocate", buffer.status());
  {
    auto map = buffer->Map();
    if (!map.ok()) return Fail("map", map.status());
    std::snprintf(reinterpret_cast<char*>(map->data()), map->size(),
                  "hello from pid %d through bufferd", ::getpid());
  }
  std::printf("[writer pid %d] session %lu allocated buffer %lu: %lu bytes from heap '%s'\n",
              ::getpid(), static_cast<unsigned long>(client->session_id()),
              static_cast<unsigned long>(buffer->id()), static_cast<unsigned long>(buffer->size()),
              buffer->heap().c_str());
  auto shared = buffer->Export(bufferd::Access::kReadOnly);
  if (!shared.ok()) return Fail("export", shared.status());
  std::printf("[writer pid %d] exported read-only token %s\n", ::getpid(), shared->c_str());
  std::fflush(stdout);

  pid_t pid = ::fork();
  if (pid == 0) {
    // exec, not just fork: gRPC must not be used across fork.
    ::execl("/proc/self/exe", argv[0], "--socket-dir", socket_dir.c_str(), "--import",
            shared->c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  std::printf("[writer pid %d] reader %s\n", ::getpid(), ok ? "succeeded" : "FAILED");
  return ok ? 0 : 1;
}
