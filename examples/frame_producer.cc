// frame_producer: renders frames into a swapchain of bufferd buffers and
// hands them to a compositor (examples/compositor.cc) with no copy: the
// buffers are shared once, read-only, by token; per frame the producer waits
// until the compositor released the buffer (a point of the compositor's
// release timeline), draws, and reaches a point of its own acquire timeline
// (a store and a wake: no daemon round trip, no socket message).
//
//   bazel-bin/examples/frame_producer --compositor /path/compositor.sock
//       [--name cam] [--width 1920 --height 1080] [--buffers 3] [--fps 60]
//
// Frame N goes into buffer N % buffers and is the acquire timeline's point N.
// Exit codes: 0 done (--frames, --seconds, SIGINT/SIGTERM), 1 error, 2 bad
// command line, 3 the compositor went away.
#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/errno_status.h"
#include "base/frame_format.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "client/client.h"
#include "examples/cli.h"
#include "examples/frames.h"

namespace {

using bufferd::examples::StopRequested;
using bufferd::frames::NowNs;


struct Options {
  std::string socket_dir = bufferd::DefaultSocketDir();
  std::string compositor;
  std::string name;
  uint32_t width = 1920;
  uint32_t height = 1080;
  uint32_t buffers = 3;
  uint32_t in_flight = 0;
  std::string heap;
  std::string usage = "display_frame";
  double fps = 60;
  double seconds = 0;
  uint64_t frames = 0;
  bool no_draw = false;
  uint32_t deadline_ms = 2000;
};

int Fail(const std::string& name, const std::string& what, const absl::Status& status) {
  std::fprintf(stderr, "frame_producer %s: %s: %s\n", name.c_str(), what.c_str(),
               status.ToString().c_str());
  return 1;
}

// The compositor's answer to our hello, within `timeout`.
absl::StatusOr<bufferd::frames::Welcome> Handshake(const bufferd::UnixSocket& socket,
                                                   const bufferd::frames::Hello& hello) {
  RETURN_IF_ERROR(socket.Send(bufferd::frames::FormatHello(hello)));
  pollfd pfd{.fd = socket.fd(), .events = POLLIN, .revents = 0};
  if (::poll(&pfd, 1, 10000) != 1) {
    return absl::DeadlineExceededError("the compositor did not answer within 10 s");
  }
  ASSIGN_OR_RETURN(bufferd::UnixSocket::Received answer,
                   socket.RecvWithFds(bufferd::frames::kMaxRecord, true, 0));
  if (answer.eof) return absl::UnavailableError("the compositor hung up");
  return bufferd::frames::ParseWelcome(answer.bytes);
}

int Run(const Options& options) {
  const std::string& name = options.name;
  auto client = bufferd::Client::Connect(options.socket_dir);
  if (!client.ok()) return Fail(name, "connect to bufferd", client.status());

  // The swapchain: every buffer from one heap, or none.
  bufferd::AllocateOptions allocate{
      .frame =
          bufferd::FrameRequest{
              .width = options.width, .height = options.height, .fourcc = bufferd::frames::kFourcc},
      .name = absl::StrCat(name, "-swapchain")};
  if (!options.heap.empty()) {
    allocate.heap = options.heap;
  } else {
    allocate.usage = options.usage;
  }
  auto buffers = client->AllocateSet(options.buffers, allocate);
  if (!buffers.ok()) return Fail(name, "allocate the swapchain", buffers.status());
  std::vector<bufferd::Mapping> maps;
  std::vector<bufferd::frames::Region> regions;
  bufferd::frames::Hello hello{.name = name};
  for (const bufferd::Buffer& buffer : *buffers) {
    auto map = buffer.Map();
    if (!map.ok()) return Fail(name, "map", map.status());
    const bufferd::PlaneLayout plane = buffer.frame()->planes.at(0);
    regions.push_back({map->data() + plane.offset, plane.stride, options.width, options.height});
    maps.push_back(*std::move(map));
    auto token = buffer.Export(bufferd::Access::kReadOnly);
    if (!token.ok()) return Fail(name, "export a buffer", token.status());
    hello.buffer_tokens.push_back(*std::move(token));
  }
  auto acquire = client->CreateTimeline({.name = absl::StrCat(name, "-acquire"),
                                         .deadline = absl::Milliseconds(options.deadline_ms)});
  if (!acquire.ok()) return Fail(name, "create the acquire timeline", acquire.status());
  auto acquire_token = acquire->Export();
  if (!acquire_token.ok()) return Fail(name, "export the acquire timeline", acquire_token.status());
  hello.acquire_token = *std::move(acquire_token);

  auto socket = bufferd::UnixSocket::ConnectSeqPacket(options.compositor);
  if (!socket.ok()) return Fail(name, "connect to the compositor", socket.status());
  auto welcome = Handshake(*socket, hello);
  if (!welcome.ok()) return Fail(name, "join the compositor", welcome.status());
  auto release = client->ImportTimeline(welcome->release_token);
  if (!release.ok()) return Fail(name, "import the release timeline", release.status());
  const uint32_t slot = welcome->slot;
  std::printf("producer %s: slot %u, %u buffers of %ux%u %s from heap '%s', %s\n", name.c_str(),
              slot, options.buffers, options.width, options.height,
              bufferd::FourccName(bufferd::frames::kFourcc).c_str(),
              buffers->front().heap().c_str(), options.no_draw ? "drawing off" : "drawing");
  std::fflush(stdout);

  const uint32_t in_flight = options.in_flight == 0 ? options.buffers : options.in_flight;
  const uint64_t start = NowNs();
  const uint64_t period_ns = options.fps > 0 ? static_cast<uint64_t>(1e9 / options.fps) : 0;
  const uint64_t end_ns =
      options.seconds > 0 ? start + static_cast<uint64_t>(options.seconds * 1e9) : UINT64_MAX;
  uint64_t waited_ns = 0;
  uint64_t due = start;
  uint64_t frame = 1;
  int code = 0;
  for (; !StopRequested() && (options.frames == 0 || frame <= options.frames); ++frame) {
    if (period_ns != 0) {
      const uint64_t now = NowNs();
      if (due > now) {
        std::this_thread::sleep_for(std::chrono::nanoseconds(due - now));
      } else if (now - due > period_ns) {
        due = now;  // late by more than a frame (stopped, starved): go on from now, no burst
      }
      due += period_ns;
    }
    if (NowNs() >= end_ns) break;
    // The buffer is ours again once the compositor released the frame that
    // used it last (or any later one: it releases in order).
    if (frame > in_flight) {
      const uint64_t before = NowNs();
      absl::StatusOr<bufferd::PointResult> released;
      do {
        released = release->Wait(frame - in_flight, absl::Milliseconds(250));
      } while (!released.ok() && absl::IsDeadlineExceeded(released.status()) && !StopRequested());
      waited_ns += NowNs() - before;
      if (StopRequested()) break;
      if (!released.ok()) {
        code = Fail(name, "wait for the release", released.status());
        break;
      }
      if (released->status == bufferd::v1::FENCE_STATUS_OWNER_DIED ||
          released->status == bufferd::v1::FENCE_STATUS_CANCELLED) {
        std::fprintf(stderr,
                     "frame_producer %s: the compositor went away (its release timeline ended: "
                     "%s); exiting after %lu frames\n",
                     name.c_str(), bufferd::v1::FenceStatus_Name(released->status).c_str(),
                     static_cast<unsigned long>(frame - 1));
        code = 3;
        break;
      }
      if (released->status != bufferd::v1::FENCE_STATUS_OK) {
        std::fprintf(stderr, "frame_producer %s: the release of frame %lu failed: %s %s\n",
                     name.c_str(), static_cast<unsigned long>(frame - in_flight),
                     bufferd::v1::FenceStatus_Name(released->status).c_str(),
                     released->message.c_str());
        code = 1;
        break;
      }
    }
    const bufferd::frames::Region& region = regions[frame % options.buffers];
    if (options.no_draw) {
      bufferd::frames::DrawHeader(region, slot, frame);
    } else {
      bufferd::frames::DrawFrame(region, slot, frame);
    }
    bufferd::frames::StampReady(region, NowNs());
    if (absl::Status signalled = acquire->Signal(frame); !signalled.ok()) {
      code = Fail(name, absl::StrCat("signal frame ", frame), signalled);
      break;
    }
  }
  const double seconds = static_cast<double>(NowNs() - start) / 1e9;
  const uint64_t made = frame - 1;
  std::printf(
      "producer %s: %lu frames in %.1f s (%.1f fps), %.0f%% of the time waiting for "
      "release\n",
      name.c_str(), static_cast<unsigned long>(made), seconds,
      seconds > 0 ? static_cast<double>(made) / seconds : 0.0,
      seconds > 0 ? 100.0 * static_cast<double>(waited_ns) / 1e9 / seconds : 0.0);
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"frame_producer: draw frames into bufferd buffers for examples/compositor"};
  Options options;
  options.name = absl::StrCat("producer-", ::getpid());
  app.add_option("--socket-dir", options.socket_dir, "bufferd's socket dir")
      ->envname("BUFFERD_SOCKET_DIR")
      ->capture_default_str();
  app.add_option("--compositor", options.compositor, "the compositor's socket")->required();
  app.add_option("--name", options.name, "name (1-32 of A-Za-z0-9_.-)")->capture_default_str();
  app.add_option("--width", options.width, "frame width")
      ->check(CLI::Range(bufferd::frames::kMinWidth, 16384u))
      ->capture_default_str();
  app.add_option("--height", options.height, "frame height")
      ->check(CLI::Range(1u, 16384u))
      ->capture_default_str();
  app.add_option("--buffers", options.buffers, "swapchain length")
      ->check(CLI::Range(1u, bufferd::frames::kMaxBuffers))
      ->capture_default_str();
  app.add_option("--in-flight", options.in_flight,
                 "frames ahead of the compositor's release (default: --buffers; 1 = lockstep)")
      ->check(CLI::Range(1u, bufferd::frames::kMaxBuffers));
  auto* heap = app.add_option("--heap", options.heap, "heap to allocate from");
  app.add_option("--usage", options.usage, "usage to allocate for (when no --heap)")
      ->capture_default_str()
      ->excludes(heap);
  app.add_option("--fps", options.fps, "frames per second (0: as fast as released)")
      ->check(bufferd::examples::FiniteRange(0, 10000))
      ->capture_default_str();
  app.add_option("--seconds", options.seconds, "stop after this long (0: never)")
      ->check(bufferd::examples::FiniteRange(0, 1e6));
  app.add_option("--frames", options.frames, "stop after this many frames (0: never)")
      ->check(bufferd::examples::FiniteRange(0, 1e12));
  app.add_flag("--no-draw", options.no_draw, "write only the header (the cost of the handoff)");
  app.add_option("--deadline-ms", options.deadline_ms,
                 "a frame the compositor waits for longer fails DEADLINE_EXCEEDED")
      ->check(CLI::Range(10u, 300000u))
      ->capture_default_str();
  if (int code = bufferd::examples::ParseCommandLine(app, argc, argv, "frame_producer");
      code >= 0) {
    return code;
  }
  if (options.in_flight > options.buffers) {
    std::fprintf(stderr, "frame_producer: --in-flight %u is more than --buffers %u\n",
                 options.in_flight, options.buffers);
    return 2;
  }
  if (!bufferd::frames::ParseHello(absl::StrCat("HELLO 1 ", options.name, " t t")).ok()) {
    std::fprintf(stderr, "frame_producer: --name must be 1 to 32 of [A-Za-z0-9_.-]\n");
    return 2;
  }
  bufferd::examples::StopOnSignals();
  return Run(options);
}
