/* c_share: bufferd from C. A writer allocates a buffer, shares it read-only
 * with a reader process (a token on its command line), writes a message and
 * signals a timeline point; the reader waits for that point, reads the
 * message, and finds it cannot map the buffer writable.
 *
 *   cc -o c_share c_share.c $(pkg-config --cflags --libs bufferd)
 *   ./c_share [--socket-dir DIR]
 */
#include <bufferd/bufferd.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

/* Prints what failed, with the daemon's code and message, and exits 1. */
static void check(int status, const char* what) {
  if (status == BUFFERD_OK) return;
  fprintf(stderr, "c_share: %s: %s: %s\n", what, bufferd_status_name(status),
          bufferd_last_error());
  exit(1);
}

static int reader(const char* dir, const char* buffer_token, const char* timeline_token) {
  bufferd_client* client = NULL;
  check(bufferd_connect(dir, &client), "connect");
  bufferd_buffer* buffer = NULL;
  check(bufferd_import(client, buffer_token, &buffer), "import the buffer");
  bufferd_timeline* frames = NULL;
  check(bufferd_timeline_import(client, timeline_token, &frames), "import the timeline");

  /* The writer signals point 1 once the message is in. */
  enum bufferd_fence_status how;
  check(bufferd_timeline_wait(frames, 1, 5000, &how), "wait for point 1");
  if (how != BUFFERD_FENCE_OK) {
    fprintf(stderr, "c_share: point 1 failed: %s\n", bufferd_last_error());
    return 1;
  }
  void* data = NULL;
  size_t size = 0;
  check(bufferd_buffer_map(buffer, 0, &data, &size), "map");
  printf("reader pid %d read: %s\n", (int)getpid(), (const char*)data);
  check(bufferd_unmap(data, size), "unmap");

  /* A read-only import is an O_RDONLY fd: no writable mapping. */
  void* writable = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, bufferd_buffer_fd(buffer), 0);
  if (writable != MAP_FAILED) {
    fprintf(stderr, "c_share: a read-only import mapped writable\n");
    return 1;
  }
  printf("reader: writable mapping refused: %s\n", strerror(errno));

  /* Errors carry the daemon's code and message. */
  bufferd_buffer* bogus = NULL;
  int status = bufferd_import(client, "1:00", &bogus);
  printf("reader: importing a made-up token: %s: %s\n", bufferd_status_name(status),
         bufferd_last_error());

  bufferd_timeline_destroy(frames);
  bufferd_buffer_destroy(buffer);
  bufferd_disconnect(client);
  return status == BUFFERD_OK ? 1 : 0;
}

int main(int argc, char** argv) {
  const char* dir = NULL; /* NULL: $BUFFERD_SOCKET_DIR, else the default */
  const char* buffer_token = NULL;
  const char* timeline_token = NULL;
  for (int i = 1; i < argc; ++i) {
    if (strcmp(argv[i], "--socket-dir") == 0 && i + 1 < argc) {
      dir = argv[++i];
    } else if (strcmp(argv[i], "--read") == 0 && i + 2 < argc) {
      buffer_token = argv[++i];
      timeline_token = argv[++i];
    } else {
      fprintf(stderr, "usage: c_share [--socket-dir DIR]\n");
      return 2;
    }
  }
  if (buffer_token != NULL) return reader(dir, buffer_token, timeline_token);

  bufferd_client* client = NULL;
  check(bufferd_connect(dir, &client), "connect");
  struct bufferd_allocation request = {
      .struct_size = sizeof(request), .heap = "system", .size = 1 << 20, .name = "c_share"};
  bufferd_buffer* buffer = NULL;
  check(bufferd_allocate(client, &request, &buffer), "allocate");
  bufferd_timeline* frames = NULL;
  check(bufferd_timeline_create(client, "c_share", 0, &frames), "create a timeline");
  char* buffer_token_out = NULL;
  char* timeline_token_out = NULL;
  check(bufferd_buffer_export(buffer, 0, 0, &buffer_token_out), "export the buffer");
  check(bufferd_timeline_export(frames, 0, &timeline_token_out), "export the timeline");

  pid_t child = fork();
  if (child == 0) {
    char* args[] = {argv[0], "--read", buffer_token_out, timeline_token_out, NULL, NULL, NULL};
    if (dir != NULL) {
      args[4] = "--socket-dir";
      args[5] = (char*)dir;
    }
    execv("/proc/self/exe", args);
    _exit(127);
  }
  bufferd_free(buffer_token_out);
  bufferd_free(timeline_token_out);

  void* data = NULL;
  size_t size = 0;
  check(bufferd_buffer_map(buffer, 1, &data, &size), "map");
  snprintf((char*)data, size, "hello from C, pid %d, buffer %llu", (int)getpid(),
           (unsigned long long)bufferd_buffer_id(buffer));
  check(bufferd_unmap(data, size), "unmap");
  check(bufferd_timeline_signal(frames, 1), "signal point 1");
  printf("writer pid %d wrote buffer %llu (%llu bytes) and signalled point 1\n", (int)getpid(),
         (unsigned long long)bufferd_buffer_id(buffer),
         (unsigned long long)bufferd_buffer_size(buffer));

  int wait_status = 0;
  waitpid(child, &wait_status, 0);
  check(bufferd_buffer_release(buffer), "release");
  bufferd_timeline_destroy(frames);
  bufferd_disconnect(client);
  return WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 1;
}
