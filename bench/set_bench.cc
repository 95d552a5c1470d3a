// set_bench: what graphics-style allocation costs (issue "Graphics-style
// allocation").
//
//   1. AllocateSet(3) of 8 MiB system-heap buffers, until every fd is in
//      hand (pages untouched), against three Allocate calls of the same.
//      Target: <= 0.5x the three calls.
//   2. A frame's description and metadata on a 4 KiB Allocate: a 32x32
//      XRGB8888 frame (4096 bytes) with crop, colour and a 64-byte tag,
//      against a plain 4,096-byte Allocate, both named with 20 bytes.
//      Target: <= 1.02x.
//
// Both are measured in the same run, interleaved in short blocks so drift
// hits them alike, for two placements: "same" (client and daemon on CPU 0)
// and "apart" (client on CPU 0, daemon on CPU 1). Each line ends "met" or
// "not met".
//
//   bazel build -c opt //bench:set_bench //daemon:bufferd
//   bazel-out/k8-opt/bin/bench/set_bench --bufferd bazel-out/k8-opt/bin/daemon/bufferd
#include <libdrm/drm_fourcc.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/synchronization/mutex.h"
#include "bench/bench_util.h"
#include "client/client.h"
#include "testing/daemon_process.h"

namespace bufferd::bench {
namespace {

constexpr uint64_t kFrameBytes = 8 << 20;

struct Placement {
  const char* name;
  int daemon_cpu;
};

void Die(const absl::Status& status) {
  std::fprintf(stderr, "set_bench: %s\n", status.ToString().c_str());
  std::exit(1);
}

// µs until all three fds are in hand; the buffers are dropped after the
// clock stops.
double SetOnce(const Client& client) {
  const double start = NowMicros();
  absl::StatusOr<std::vector<Buffer>> set =
      client.AllocateSet(3, {.heap = "system", .size = kFrameBytes, .name = "swapchain"});
  const double end = NowMicros();
  if (!set.ok()) Die(set.status());
  return end - start;
}

double ThreeOnce(const Client& client) {
  std::vector<Buffer> buffers;
  const double start = NowMicros();
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<Buffer> buffer =
        client.Allocate({.heap = "system", .size = kFrameBytes, .name = "swapchain"});
    if (!buffer.ok()) Die(buffer.status());
    buffers.push_back(*std::move(buffer));
  }
  return NowMicros() - start;
}

double AllocateOnce(const Client& client, const AllocateOptions& options) {
  const double start = NowMicros();
  absl::StatusOr<Buffer> buffer = client.Allocate(options);
  const double end = NowMicros();
  if (!buffer.ok()) Die(buffer.status());
  return end - start;
}

}  // namespace
}  // namespace bufferd::bench

int main(int argc, char** argv) {
  // As alloc_bench: a release build runs without abseil's deadlock detection.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  using namespace bufferd;
  using namespace bufferd::bench;
  CLI::App app{"set_bench: AllocateSet and frame metadata against plain Allocate"};
  double scale = 1.0;
  std::string daemon_binary = testing::BinaryPath("daemon/bufferd");
  app.add_option("--iterations-scale", scale, "multiply every iteration count");
  app.add_option("--bufferd", daemon_binary, "bufferd binary")->capture_default_str();
  std::string profile;
  app.add_option(
      "--profile", profile,
      "plain or framed: only that Allocate, for 5 s, daemon on CPU 1 (for perf); both: the "
      "two interleaved for 10 s, CPU per call on each side");
  int profile_daemon_cpu = 1;
  app.add_option("--profile-daemon-cpu", profile_daemon_cpu,
                 "with --profile: the daemon's CPU (the client is on CPU 0)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  PinTo(0);
  const Placement placements[] = {{"same", 0}, {"apart", 1}};
  const AllocateOptions plain{.heap = "system", .size = 4096, .name = "camera0-frame-buffer"};
  const AllocateOptions framed{.heap = "system",
                               .frame = FrameRequest{32, 32, DRM_FORMAT_XRGB8888},
                               .metadata = FrameMetadata{.crop = Rect{0, 0, 32, 32},
                                                         .color_space = v1::COLOR_SPACE_SRGB,
                                                         .color_range = v1::COLOR_RANGE_FULL,
                                                         .tag = std::string(64, 't')},
                               .name = "camera0-frame-buffer"};
  if (!profile.empty()) {
    auto daemon = testing::DaemonProcess::Start(
        {.log_level = "warn", .cpu = profile_daemon_cpu, .binary = daemon_binary});
    if (!daemon.ok()) Die(daemon.status());
    absl::StatusOr<Client> client = Client::Connect((*daemon)->socket_dir());
    if (!client.ok()) Die(client.status());
    std::printf("daemon pid %d\n", (*daemon)->pid());
    std::fflush(stdout);
    if (profile == "both") {
      // Both, interleaved in blocks of 50 calls for 10 s: per block, the CPU
      // time each side spent per call (every thread of each process); the
      // medians over the blocks, so a burst of VM noise moves one block.
      const AllocateOptions* kinds[] = {&plain, &framed};
      std::vector<double> wall[2], client_cpu[2], daemon_cpu[2], client_switches[2],
          daemon_switches[2];
      for (int i = 0; i < 500; ++i) {
        for (const AllocateOptions* kind : kinds) AllocateOnce(*client, *kind);
      }
      const double end = NowMicros() + 10e6;
      for (int block = 0; NowMicros() < end; ++block) {
        const int k = block % 2;
        const int64_t c0 = ProcessRunNs(::getpid()), d0 = ProcessRunNs((*daemon)->pid());
        const Switches cs0 = ProcessSwitches(::getpid()), ds0 = ProcessSwitches((*daemon)->pid());
        std::vector<double> calls;
        for (int i = 0; i < 50; ++i) calls.push_back(AllocateOnce(*client, *kinds[k]));
        client_cpu[k].push_back((ProcessRunNs(::getpid()) - c0) / 1e3 / 50);
        daemon_cpu[k].push_back((ProcessRunNs((*daemon)->pid()) - d0) / 1e3 / 50);
        const Switches cs1 = ProcessSwitches(::getpid()), ds1 = ProcessSwitches((*daemon)->pid());
        client_switches[k].push_back(
            (cs1.voluntary + cs1.involuntary - cs0.voluntary - cs0.involuntary) / 50.0);
        daemon_switches[k].push_back(
            (ds1.voluntary + ds1.involuntary - ds0.voluntary - ds0.involuntary) / 50.0);
        wall[k].push_back(Summarize(calls, 0).p50);
      }
      for (int k = 0; k < 2; ++k) {
        std::printf(
            "%-7s %zu blocks: p50 %.1f us; CPU per call: client %.2f us, daemon %.2f us;"
            " context switches per call: client %.2f, daemon %.2f\n",
            k == 0 ? "plain" : "framed", wall[k].size(), Summarize(wall[k], 0).p50,
            Summarize(client_cpu[k], 0).p50, Summarize(daemon_cpu[k], 0).p50,
            Summarize(client_switches[k], 0).p50, Summarize(daemon_switches[k], 0).p50);
      }
      return 0;
    }
    std::vector<double> samples;
    const AllocateOptions& options = profile == "framed" ? framed : plain;
    for (int i = 0; i < 1000; ++i) AllocateOnce(*client, options);  // warm up
    const int64_t client0 = ProcessRunNs(::getpid()), daemon0 = ProcessRunNs((*daemon)->pid());
    const double end = NowMicros() + 5e6;
    while (NowMicros() < end) samples.push_back(AllocateOnce(*client, options));
    // CPU time per call on each side (every thread), to tell which side a
    // difference between the two profiles lies on.
    const double calls = samples.size();
    std::printf("%s: %zu calls, p50 %.1f us; CPU per call: client %.2f us, daemon %.2f us\n",
                profile.c_str(), samples.size(), Summarize(samples, 0).p50,
                (ProcessRunNs(::getpid()) - client0) / 1e3 / calls,
                (ProcessRunNs((*daemon)->pid()) - daemon0) / 1e3 / calls);
    return 0;
  }
  std::printf("bufferd set_bench (p50 / p99 in us; client pinned to CPU 0)\n");
  bool all_met = true;
  for (const Placement& placement : placements) {
    auto daemon = testing::DaemonProcess::Start(
        {.log_level = "warn", .cpu = placement.daemon_cpu, .binary = daemon_binary});
    if (!daemon.ok()) Die(daemon.status());
    absl::StatusOr<Client> client = Client::Connect((*daemon)->socket_dir());
    if (!client.ok()) Die(client.status());
    std::printf("\n== placement %s: daemon on CPU %d\n", placement.name, placement.daemon_cpu);

    // 1. Sets against three calls.
    std::vector<double> set_s, three_s;
    for (int i = 0; i < 20; ++i) {  // warm up
      SetOnce(*client);
      ThreeOnce(*client);
    }
    const int sets = std::max(50, static_cast<int>(1000 * scale));
    for (int done = 0; done < sets; done += 10) {
      // The drops of the last block are applied before the next starts.
      std::this_thread::sleep_for(std::chrono::milliseconds(3));
      for (int i = 0; i < 10; ++i) {
        set_s.push_back(SetOnce(*client));
        three_s.push_back(ThreeOnce(*client));
      }
    }
    const Summary set = Summarize(set_s, 0), three = Summarize(three_s, 0);
    const double set_ratio = set.p50 / three.p50;
    const bool set_met = set_ratio <= 0.5;
    all_met &= set_met;
    std::printf("3 x Allocate(8 MiB), fds in hand:    p50 %8.1f  p99 %8.1f\n", three.p50,
                three.p99);
    std::printf(
        "AllocateSet(3 x 8 MiB), fds in hand: p50 %8.1f  p99 %8.1f  ratio %.2f"
        "  target <= 0.50: %s\n",
        set.p50, set.p99, set_ratio, set_met ? "met" : "not met");

    // 2. A frame with metadata against plain bytes, and what each part
    // costs alone. Both carry a 20-byte name, as real buffers do; the same
    // pair with a 5-byte name is shown too: that plain request (18 bytes)
    // fits gRPC's 23-byte inline slice, which no request with a frame, or
    // with a real name, does.
    AllocateOptions frame_only = framed;
    frame_only.metadata.reset();
    AllocateOptions metadata_only = plain;
    metadata_only.metadata = framed.metadata;
    metadata_only.metadata->crop.reset();  // a crop needs a frame
    AllocateOptions plain_short = plain;
    plain_short.name = "plain";
    AllocateOptions framed_short = framed;
    framed_short.name = "plain";
    const AllocateOptions* variants[] = {&plain,         &framed,      &frame_only,
                                         &metadata_only, &plain_short, &framed_short};
    constexpr int kVariants = 6;
    std::vector<double> samples[kVariants];
    for (int i = 0; i < 200; ++i) {  // warm up
      for (const AllocateOptions* variant : variants) AllocateOnce(*client, *variant);
    }
    const int allocations = std::max(500, static_cast<int>(10000 * scale));
    for (int done = 0; done < allocations; done += 20) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      for (int i = 0; i < 20; ++i) {
        // Rotate which goes first, so none always follows another.
        for (int v = 0; v < kVariants; ++v) {
          const int which = (v + i) % kVariants;
          samples[which].push_back(AllocateOnce(*client, *variants[which]));
        }
      }
    }
    Summary summaries[kVariants];
    for (int v = 0; v < kVariants; ++v) summaries[v] = Summarize(samples[v], 0);
    const Summary& p = summaries[0];
    const double meta_ratio = summaries[1].p50 / p.p50;
    const bool meta_met = meta_ratio <= 1.02;
    all_met &= meta_met;
    std::printf("Allocate(4 KiB), plain:              p50 %8.1f  p99 %8.1f\n", p.p50, p.p99);
    std::printf("Allocate(32x32 XRGB8888 + metadata): p50 %8.1f  p99 %8.1f  ratio %.3f"
                "  target <= 1.02: %s\n",
                summaries[1].p50, summaries[1].p99, meta_ratio, meta_met ? "met" : "not met");
    std::printf("(info) frame only                    p50 %8.1f  ratio %.3f\n", summaries[2].p50,
                summaries[2].p50 / p.p50);
    std::printf("(info) metadata, no crop             p50 %8.1f  ratio %.3f\n", summaries[3].p50,
                summaries[3].p50 / p.p50);
    std::printf("(info) the same with 5-byte names:   plain p50 %.1f, frame + metadata p50 %.1f,"
                " ratio %.3f\n",
                summaries[4].p50, summaries[5].p50, summaries[5].p50 / summaries[4].p50);
    client = absl::UnavailableError("done");
    daemon->reset();
  }
  std::printf("\n%s\n", all_met ? "all targets met" : "some targets not met");
  return 0;
}
