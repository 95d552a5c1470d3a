// frame_bench: what bufferd costs per frame in the frame-sharing example
// (examples/frame_producer -> examples/compositor), against the floors
// measured in the same run.
//
//   bazel run -c opt //bench:frame_bench [-- --rounds 3 --width 1920 --height 1080]
//
// The producer is pinned to CPU 0; the compositor to CPU 0 ("same") or CPU 1
// ("apart"); the daemon to CPU 1 (it is not on the per-frame path). Both run
// in lockstep (--in-flight 1: frame N is drawn once frame N-1 was released),
// so every frame is drawn once and composed once and nothing queues.
//
// 1. Handoff with drawing off: the producer writes only the header, the
//    compositor reads only it. Handoff = producer ready -> compositor starts
//    reading. Floor: two forked processes, pinned the same way, doing the
//    same two things with nothing but the kernel: the producer stamps the
//    time and writes an eventfd the consumer polls (the ready notification);
//    the consumer stores a release word and FUTEX_WAKEs the producer
//    sleeping on it (the fence wake). Target: handoff p50 <= 1.5x the floor's.
// 2. Frames/s with drawing on (the producer draws every pixel, the
//    compositor copies every pixel into its output), against what memory
//    bandwidth allows: memset (drawing) and memcpy (composing) of a frame,
//    measured here on pinned memfd mappings, one after the other as the
//    lockstep does them. Target: >= 85%.
//
// Rounds alternate floor and bufferd runs so that machine drift hits both.
#include <linux/futex.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "bench/bench_util.h"
#include "examples/frames.h"
#include "testing/child_process.h"
#include "testing/daemon_process.h"

namespace bufferd {
namespace {

using frames::NowNs;

void Die(const std::string& what) {
  std::fprintf(stderr, "frame_bench: %s\n", what.c_str());
  std::exit(1);
}

struct Figures {
  double fps = 0;
  double handoff_p50_us = 0;
  double handoff_p99_us = 0;
};

// --- The floor: two processes, an eventfd and a futex word --------------

uint8_t* MapMemfd(size_t size) {
  const int fd = ::memfd_create("frame_bench", MFD_CLOEXEC);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) Die("memfd");
  void* map = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) Die("mmap");
  std::memset(map, 1, size);  // every page present, as the swapchain's are
  return static_cast<uint8_t*>(map);
}

// The example's working set: three swapchain buffers and one output, each a
// frame (32 MiB at 1080p: as big as this machine's L3).
struct Pixels {
  Pixels(uint32_t frame_width, uint32_t frame_height)
      : width(frame_width), height(frame_height), size(size_t{width} * height * 4) {
    for (uint8_t*& source : sources) source = MapMemfd(size);
    output = MapMemfd(size);
  }
  ~Pixels() {
    for (uint8_t* map : {sources[0], sources[1], sources[2], output}) ::munmap(map, size);
  }
  frames::Region Source(int i) const { return {sources[i % 3], width * 4, width, height}; }
  frames::ConstRegion ConstSource(int i) const {
    return {sources[i % 3], width * 4, width, height};
  }
  frames::Region Output() const { return {output, width * 4, width, height}; }
  uint32_t width;
  uint32_t height;
  size_t size;
  uint8_t* sources[3];
  uint8_t* output;
};

constexpr int kMaxFloorFrames = 100000;

struct FloorShared {
  std::atomic<uint64_t> ready_ns{0};
  std::atomic<uint32_t> released{0};
  uint64_t handoff_ns[kMaxFloorFrames];
  uint64_t start_ns = 0;
  uint64_t end_ns = 0;
};

long Futex(std::atomic<uint32_t>* word, int op, uint32_t value) {
  return ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, nullptr, nullptr, 0);
}

// The ready notification: an eventfd, or a record on a SOCK_SEQPACKET
// socket pair carrying the frame number (what a compositor's own protocol
// would send).
enum class Notify { kEventfd, kSocket };

// With `pixels`, the producer draws a frame before it is ready and the
// consumer copies it out before releasing it, with the example's own code
// (frames::DrawFrame, frames::CopyPixels): the same pixel work with no
// daemon and no library.
Figures Floor(int consumer_cpu, int frames, Notify notify, const Pixels* pixels = nullptr) {
  auto* shared = static_cast<FloorShared*>(::mmap(
      nullptr, sizeof(FloorShared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  if (shared == MAP_FAILED) Die("mmap");
  new (shared) FloorShared();
  int pair[2] = {-1, -1};
  if (notify == Notify::kEventfd) {
    pair[0] = pair[1] = ::eventfd(0, EFD_CLOEXEC);
  } else if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
    pair[0] = -1;
  }
  if (pair[0] < 0) Die("eventfd / socketpair");
  const int ready = pair[0];
  const int send_end = pair[1];
  auto consumer = testing::ChildProcess::Fork(
      [&] {
        for (int f = 1; f <= frames; ++f) {
          pollfd p{ready, POLLIN, 0};
          while (::poll(&p, 1, -1) != 1) {
          }
          const uint64_t start = NowNs();
          uint64_t count;
          if (::read(ready, &count, sizeof(count)) != sizeof(count)) return 1;
          shared->handoff_ns[f - 1] = start - shared->ready_ns.load(std::memory_order_acquire);
          if (pixels != nullptr) frames::CopyPixels(pixels->ConstSource(f), pixels->Output());
          shared->released.store(static_cast<uint32_t>(f), std::memory_order_release);
          Futex(&shared->released, FUTEX_WAKE, 1);
        }
        return 0;
      },
      {.cpu = consumer_cpu});
  auto producer = testing::ChildProcess::Fork(
      [&] {
        shared->start_ns = NowNs();
        for (int f = 1; f <= frames; ++f) {
          for (uint32_t r; (r = shared->released.load(std::memory_order_acquire)) <
                           static_cast<uint32_t>(f - 1);) {
            Futex(&shared->released, FUTEX_WAIT, r);
          }
          if (pixels != nullptr) frames::DrawFrame(pixels->Source(f), 0, static_cast<uint64_t>(f));
          shared->ready_ns.store(NowNs(), std::memory_order_release);
          const uint64_t one = 1;
          if (::write(send_end, &one, sizeof(one)) != sizeof(one)) return 1;
        }
        for (uint32_t r; (r = shared->released.load()) < static_cast<uint32_t>(frames);) {
          Futex(&shared->released, FUTEX_WAIT, r);
        }
        shared->end_ns = NowNs();
        return 0;
      },
      {.cpu = 0});
  if (!consumer.ok() || !producer.ok()) Die("fork");
  if (producer->Wait() != 0 || consumer->Wait() != 0) Die("the floor's processes failed");
  ::close(pair[0]);
  if (pair[1] != pair[0]) ::close(pair[1]);
  std::vector<uint64_t> samples(shared->handoff_ns, shared->handoff_ns + frames);
  Figures figures{.fps = frames * 1e9 / static_cast<double>(shared->end_ns - shared->start_ns),
                  .handoff_p50_us = static_cast<double>(frames::Quantile(samples, 0.5)) / 1e3,
                  .handoff_p99_us = static_cast<double>(frames::Quantile(samples, 0.99)) / 1e3};
  ::munmap(shared, sizeof(FloorShared));
  return figures;
}

// --- bufferd: the example's two processes --------------------------------

struct Paths {
  std::string compositor = testing::BinaryPath("examples/compositor");
  std::string producer = testing::BinaryPath("examples/frame_producer");
};

// "key=value" out of a RESULT line.
double Value(const std::string& line, const std::string& key) {
  for (absl::string_view word : absl::StrSplit(line, ' ')) {
    if (absl::ConsumePrefix(&word, key + "=")) {
      double value = 0;
      if (absl::SimpleAtod(word, &value)) return value;
    }
  }
  Die(absl::StrCat("no ", key, " in '", line, "'"));
  return 0;
}

Figures Example(const Paths& paths, const std::string& socket_dir, const std::string& root,
                int compositor_cpu, int frames, uint32_t width, uint32_t height, bool draw) {
  const std::string listen = absl::StrCat(root, "/compositor.sock");
  std::vector<std::string> args = {"--socket-dir",     socket_dir,
                                   "--listen",         listen,
                                   "--producers",      "1",
                                   "--width",          absl::StrCat(width),
                                   "--height",         absl::StrCat(height),
                                   "--exit-when-done", "--quiet",
                                   "--heap",           "system"};
  if (!draw) args.push_back("--no-compose");
  auto compositor = testing::ChildProcess::Spawn(paths.compositor, args,
                                                 {.cpu = compositor_cpu, .capture_stdout = true});
  if (!compositor.ok()) Die(compositor.status().ToString());
  for (int i = 0; i < 500 && ::access(listen.c_str(), F_OK) != 0; ++i) ::usleep(10000);
  std::vector<std::string> producer_args = {"--socket-dir", socket_dir,
                                            "--compositor", listen,
                                            "--name",       "bench",
                                            "--width",      absl::StrCat(width),
                                            "--height",     absl::StrCat(height),
                                            "--fps",        "0",
                                            "--in-flight",  "1",
                                            "--frames",     absl::StrCat(frames),
                                            "--heap",       "system"};
  if (!draw) producer_args.push_back("--no-draw");
  auto producer = testing::ChildProcess::Spawn(paths.producer, producer_args,
                                               {.cpu = 0, .output_path = root + "/producer.log"});
  if (!producer.ok()) Die(producer.status().ToString());
  if (producer->Wait() != 0) Die("the producer failed; see " + root + "/producer.log");
  std::string result;
  for (std::string line = compositor->ReadLine(60000); !line.empty();
       line = compositor->ReadLine(60000)) {
    if (line.rfind("RESULT ", 0) == 0) result = line;
  }
  if (compositor->Wait() != 0 || result.empty()) Die("the compositor failed");
  if (Value(result, "frames") != frames || Value(result, "torn") != 0) {
    Die("not every frame was composed whole: " + result);
  }
  return {.fps = Value(result, "fps"),
          .handoff_p50_us = Value(result, "handoff_p50_ns") / 1e3,
          .handoff_p99_us = Value(result, "handoff_p99_ns") / 1e3};
}

// --- Memory bandwidth ----------------------------------------------------

struct Bandwidth {
  double memset_gbps = 0;
  double memcpy_gbps = 0;
  double draw_gbps = 0;
  double copy_gbps = 0;
  // Frames/s of the pixel work alone (memset a swapchain buffer, memcpy it
  // into the output), in one process.
  double frames_per_second = 0;
};

// Nanoseconds `work(i)` takes, the median of 31 runs.
template <typename F>
double Median(F work) {
  std::vector<double> times;
  for (int i = 0; i < 31; ++i) {
    const uint64_t start = NowNs();
    work(i);
    times.push_back(static_cast<double>(NowNs() - start));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// On the example's working set, in rotation.
Bandwidth Measure(const Pixels& pixels) {
  const size_t size = pixels.size;
  uint8_t* const* sources = pixels.sources;
  uint8_t* output = pixels.output;
  Bandwidth bw;
  const double bytes = static_cast<double>(size);
  bw.memset_gbps = bytes / Median([&](int i) { std::memset(sources[i % 3], i, size); });
  bw.memcpy_gbps = bytes / Median([&](int i) { std::memcpy(output, sources[i % 3], size); });
  bw.draw_gbps = bytes / Median([&](int i) {
                   frames::DrawFrame(pixels.Source(i), 0, static_cast<uint64_t>(i));
                 });
  bw.frames_per_second = 1e9 / Median([&](int i) {
                           std::memset(sources[i % 3], i, size);
                           std::memcpy(output, sources[i % 3], size);
                         });
  return bw;
}

}  // namespace
}  // namespace bufferd

int main(int argc, char** argv) {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  using namespace bufferd;
  CLI::App app{"frame_bench: the frame-sharing example's cost per frame against its floors"};
  int rounds = 3;
  int handoff_frames = 2000;
  int draw_frames = 200;
  uint32_t width = 1920;
  uint32_t height = 1080;
  std::string daemon_binary = testing::BinaryPath("daemon/bufferd");
  Paths paths;
  app.add_option("--rounds", rounds, "floor/bufferd pairs per figure")->capture_default_str();
  app.add_option("--handoff-frames", handoff_frames, "frames per handoff run")
      ->check(CLI::Range(10, 100000))
      ->capture_default_str();
  app.add_option("--draw-frames", draw_frames, "frames per drawing run")->capture_default_str();
  app.add_option("--width", width, "frame width")->capture_default_str();
  app.add_option("--height", height, "frame height")->capture_default_str();
  app.add_option("--bufferd", daemon_binary, "bufferd binary")->capture_default_str();
  app.add_option("--compositor", paths.compositor, "compositor binary")->capture_default_str();
  app.add_option("--producer", paths.producer, "frame_producer binary")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  bench::PinTo(0);

  auto daemon =
      testing::DaemonProcess::Start({.log_level = "warn", .cpu = 1, .binary = daemon_binary});
  if (!daemon.ok()) Die(daemon.status().ToString());
  const std::string socket_dir = (*daemon)->socket_dir();
  const std::string root = (*daemon)->root();

  struct Placement {
    const char* name;
    int compositor_cpu;
  };
  const Placement placements[] = {{"same CPU", 0}, {"apart", 1}};
  std::printf(
      "bufferd frame_bench: producer on CPU 0, daemon on CPU 1, lockstep, %ux%u ABGR8888\n\n",
      width, height);
  bool all_met = true;

  std::printf("1. handoff, drawing off (%d frames per run; us p50 (p99); frames/s)\n",
              handoff_frames);
  for (const Placement& placement : placements) {
    std::vector<double> ratios;
    for (int round = 0; round < rounds; ++round) {
      const Figures efd = Floor(placement.compositor_cpu, handoff_frames, Notify::kEventfd);
      const Figures ours = Example(paths, socket_dir, root, placement.compositor_cpu,
                                   handoff_frames, width, height, false);
      const Figures sock = Floor(placement.compositor_cpu, handoff_frames, Notify::kSocket);
      const double ratio = ours.handoff_p50_us / efd.handoff_p50_us;
      ratios.push_back(ratio);
      std::printf(
          "   %-8s  bufferd %5.1f (%5.1f) %6.0f/s | eventfd floor %5.1f (%5.1f) %6.0f/s "
          "%.2fx | socket floor %5.1f (%5.1f) %6.0f/s %.2fx\n",
          placement.name, ours.handoff_p50_us, ours.handoff_p99_us, ours.fps, efd.handoff_p50_us,
          efd.handoff_p99_us, efd.fps, ratio, sock.handoff_p50_us, sock.handoff_p99_us, sock.fps,
          ours.handoff_p50_us / sock.handoff_p50_us);
    }
    std::sort(ratios.begin(), ratios.end());
    const bool met = ratios[ratios.size() / 2] <= 1.5;
    all_met &= met;
    std::printf("   %-8s  handoff %.2f-%.2fx the floor (median %.2fx; target <= 1.5: %s)\n\n",
                placement.name, ratios.front(), ratios.back(), ratios[ratios.size() / 2],
                met ? "met" : "NOT met");
  }

  const double megabytes = static_cast<double>(width) * height * 4 / 1e6;
  std::printf(
      "2. frames/s, drawing on (%d frames per run; %.1f MB drawn and %.1f MB copied per "
      "frame)\n",
      draw_frames, megabytes, megabytes);
  const Pixels pixels(width, height);
  for (const Placement& placement : placements) {
    std::vector<double> shares;
    for (int round = 0; round < rounds; ++round) {
      const Bandwidth bw = Measure(pixels);
      const Figures raw = Floor(placement.compositor_cpu, draw_frames, Notify::kEventfd, &pixels);
      const Figures ours = Example(paths, socket_dir, root, placement.compositor_cpu, draw_frames,
                                   width, height, true);
      const double share = ours.fps / bw.frames_per_second;
      shares.push_back(share);
      std::printf(
          "   %-8s  bufferd %6.1f/s | bandwidth allows %6.1f/s (memset %.1f GB/s, memcpy "
          "%.1f GB/s): %3.0f%% | raw pipeline %6.1f/s: %3.0f%%\n",
          placement.name, ours.fps, bw.frames_per_second, bw.memset_gbps, bw.memcpy_gbps,
          100 * share, raw.fps, 100 * ours.fps / raw.fps);
    }
    std::sort(shares.begin(), shares.end());
    const bool met = shares[shares.size() / 2] >= 0.85;
    all_met &= met;
    std::printf(
        "   %-8s  %.0f-%.0f%% of what bandwidth allows (median %.0f%%; target >= 85%%: "
        "%s)\n\n",
        placement.name, 100 * shares.front(), 100 * shares.back(), 100 * shares[shares.size() / 2],
        met ? "met" : "NOT met");
  }
  std::printf("%s\n", all_met ? "all targets met" : "some targets NOT met");
  return 0;
}
