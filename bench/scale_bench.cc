// scale_bench: how far one host goes. One daemon serves, at once,
//   - 1,000 sessions (each a Client::Connect: an fd.sock connection; the
//     sessions of one process share its control.sock connection),
//   - 100,000 live 4 KiB buffers (system heap, pages never touched),
//   - 10,000 pending fences, each with a waiter registered in the daemon,
// and this measures
//   1. the daemon's memory per session, per buffer and per pending fence
//      with its waiter: the growth of its VmRSS (also RssAnon and
//      smaps_rollup Pss) over the objects made, divided by their number.
//      Target <= 1 KiB each. A session is counted from each process's
//      second on: the first also opens the process's control.sock
//      connection (gRPC's state, ~22 KB), shown apart as the cost per
//      client process. What the kernel keeps for them (memfd inodes
//      and struct files, socket buffers, the clients' side) is the kernel's
//      own and in nobody's RSS: shown apart, from /proc/meminfo Slab
//      (system-wide, both sides), never in the verdict.
//   2. Allocate (4 KiB, then drop) / Release RPC / Export (read-only) /
//      Import / ListBuffers (one page of 100; and one page filtered on a
//      heap holding a single buffer) latency, p50 (p99), with the
//      daemon holding 1k, 10k and 100k live buffers, and the flatness ratio
//      p50 at 100k / p50 at 1k for each. Target <= 1.5: a hot path that
//      scans every buffer, handle or token shows here. An empty gRPC call
//      (the daemon's Health/Check) is timed beside them at every level, the
//      floor: a ratio the floor moved by too is the VM drifting, not the
//      daemon.
//
// Who holds what. Every client-side Buffer keeps its own fd, and no process
// may have more than RLIMIT_NOFILE (20,000 here) open, so the buffers are
// held by --children forked processes (8 x 12,500 by default), each with
// --sessions / --children sessions, its buffers allocated over those
// sessions round-robin (AllocateSet, 64 at a time). The children are forked
// before this process starts any thread, and each opens its own Clients.
// Latencies are measured from this process with two sessions of its own
// (one exports, the other imports), so the holders' sessions and handles
// are all "the others".
//
// Memory is measured first, with all of it made at once and nothing timed
// in between: a timed call's garbage (a big ListBuffers answer above all)
// would be reused by the next objects and hide their cost. Then latency,
// from the top level down (the children drop buffers between levels).
//
// The fence waiters: in each child, fences are created in groups of at most
// 1,000 on one session, and one thread per group blocks in Client::WaitAll
// on its group: one WaitFence RPC naming 1,000 fences, which the daemon
// registers as a wait on every one of them (FenceInfo.waiters = 1 each, as
// ListFences checks before the signal). So 10,000 fences are waited on by
// 10 pending RPCs from 10 client threads: no fd and no thread per fence on
// either side (a waiter per fence as an exported fd would cost the daemon a
// pipe, two fds a fence: 20,000 is over its fd budget). The owners then
// signal every fence one-way (Fence::Signal), and each WaitAll must return
// with all its fences SIGNALED OK; the time from the first signal to the
// last wait's return is printed.
//
// Placement (two vCPUs): the daemon (all its threads) on CPU 1; the
// children on CPU 0 (idle while latencies are timed); this process on
// CPU 0 ("split": every call crosses CPUs) and then on CPU 1 ("same": the
// daemon's CPU), every thread of it moved.
//
//   bazel run -c opt //bench:scale_bench [-- --quick]
#include <sched.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "bench/bench_util.h"
#include "bench/grpc_floor.h"
#include "bufferd/v1/debug.pb.h"
#include "bufferd/v1/fence.pb.h"
#include "client/client.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "testing/child_process.h"
#include "testing/daemon_process.h"

namespace bufferd::bench {
namespace {

constexpr uint64_t kBufferSize = 4096;
// Fences one WaitAll names (the daemon takes at most 1,024).
constexpr size_t kFencesPerWait = 1000;
// AllocateSet's default cap (limits.max_buffers_per_call), and what one
// fd.sock record carries.
constexpr uint32_t kPerSet = 64;

int64_t NowNs() {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  return int64_t{now.tv_sec} * 1000000000 + now.tv_nsec;
}

// ---------------------------------------------------------------------------
// Memory, as /proc shows it.

struct Memory {
  long rss_kb = 0;      // status VmRSS
  long anon_kb = 0;     // status RssAnon
  long pss_kb = 0;      // smaps_rollup Pss
  long slab_kb = 0;     // /proc/meminfo Slab (system-wide: the kernel's own)
  long threads = 0;
  int fds = 0;
};

Memory ReadMemory(const testing::DaemonProcess& daemon) {
  const std::string proc = absl::StrCat("/proc/", daemon.pid());
  Memory m;
  m.rss_kb = ProcField(proc + "/status", "VmRSS");
  m.anon_kb = ProcField(proc + "/status", "RssAnon");
  m.pss_kb = ProcField(proc + "/smaps_rollup", "Pss");
  m.slab_kb = ProcField("/proc/meminfo", "Slab");
  m.threads = ProcField(proc + "/status", "Threads");
  m.fds = daemon.OpenFds();
  return m;
}

// Lets the daemon finish what the last step started (frees, replies),
// then reads.
Memory SettledMemory(const testing::DaemonProcess& daemon) {
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  return ReadMemory(daemon);
}

// Growth from `a` to `b`, summed over steps.
struct Growth {
  long rss_kb = 0, anon_kb = 0, pss_kb = 0, slab_kb = 0;
  void Add(const Memory& a, const Memory& b) {
    rss_kb += b.rss_kb - a.rss_kb;
    anon_kb += b.anon_kb - a.anon_kb;
    pss_kb += b.pss_kb - a.pss_kb;
    slab_kb += b.slab_kb - a.slab_kb;
  }
  double PerObject(long kb, uint64_t n) const { return n == 0 ? 0 : kb * 1024.0 / n; }
};

// One verdict line per object kind (FLOORS.md: name, figures, target, met).
bool MemoryVerdict(const char* what, const Growth& g, uint64_t n, std::string* summary) {
  const double per = g.PerObject(g.rss_kb, n);
  const bool met = per <= 1024;
  std::printf(
      "%-34s daemon VmRSS +%ld KiB over %lu = %6.0f B each (RssAnon %6.0f B, Pss %6.0f B)  "
      "target <= 1024 B  %s\n",
      what, g.rss_kb, static_cast<unsigned long>(n), per, g.PerObject(g.anon_kb, n),
      g.PerObject(g.pss_kb, n), met ? "met" : "not met");
  std::printf(
      "%-34s (info, not in the target) kernel Slab, system-wide, both sides: %+.0f B each\n", "",
      g.PerObject(g.slab_kb, n));
  *summary = absl::StrFormat("%.0f B (RssAnon %.0f B)%s", per, g.PerObject(g.anon_kb, n),
                             met ? "" : " — not met");
  return met;
}

// ---------------------------------------------------------------------------
// The children: each holds sessions, buffers and fences, on command.

struct FenceGroup {
  size_t session = 0;
  std::vector<Fence> fences;
  std::thread waiter;
  // Set by the waiter thread, read after it is joined.
  absl::Status status;
  size_t signaled_ok = 0;
  int64_t woke_ns = 0;
};

void Reply(const UnixSocket& control, const std::string& text) { (void)control.Send(text); }

int ChildMain(const UnixSocket& control) {
  // Room for this child's buffers' fds.
  rlimit limit{};
  ::getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = limit.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &limit);
  std::string dir;
  std::vector<Client> clients;
  std::vector<Buffer> buffers;
  std::vector<std::unique_ptr<FenceGroup>> groups;
  size_t next_session = 0;
  while (true) {
    auto got = control.RecvWithFds(4096);
    if (!got.ok() || got->eof) return 0;
    const std::vector<std::string> words = absl::StrSplit(got->bytes, ' ');
    const std::string& command = words[0];
    uint64_t n = 0;
    if (words.size() == 2 && command != "dir" && !absl::SimpleAtoi(words[1], &n)) {
      Reply(control, "error bad command " + got->bytes);
      continue;
    }
    if (command == "dir" && words.size() == 2) {
      dir = words[1];
      Reply(control, "ok");
    } else if (command == "connect") {
      while (clients.size() < n) {
        auto client = Client::Connect(dir);
        if (!client.ok()) {
          Reply(control, absl::StrCat("error session ", clients.size() + 1, " of ", n, ": ",
                                      client.status().ToString()));
          break;
        }
        clients.push_back(*std::move(client));
      }
      if (clients.size() == n) Reply(control, "ok");
    } else if (command == "touch") {
      // One call on every session: what a session costs once it has been
      // used (gRPC sets up a stream's state at the first call).
      absl::Status status;
      for (Client& client : clients) {
        auto answer = client.CanAllocate({.heap = "system", .size = kBufferSize});
        if (!answer.ok()) {
          status = answer.status();
          break;
        }
      }
      Reply(control, status.ok() ? "ok" : "error " + status.ToString());
    } else if (command == "hold") {
      // Hold n buffers: allocate up to n over the sessions round-robin, or
      // drop the last ones (evenly over the sessions) and make one call on
      // every session, which carries its releases to the daemon.
      absl::Status status;
      while (buffers.size() < n && !clients.empty()) {
        const uint32_t count =
            static_cast<uint32_t>(std::min<uint64_t>(kPerSet, n - buffers.size()));
        const Client& client = clients[next_session++ % clients.size()];
        auto set = client.AllocateSet(count, {.heap = "system", .size = kBufferSize,
                                              .name = "scale"});
        if (!set.ok()) {
          status = set.status();
          break;
        }
        for (Buffer& buffer : *set) buffers.push_back(std::move(buffer));
      }
      if (buffers.size() > n) {
        buffers.erase(buffers.begin() + static_cast<std::ptrdiff_t>(n), buffers.end());
        for (Client& client : clients) {
          (void)client.CanAllocate({.heap = "system", .size = kBufferSize});
        }
      }
      Reply(control, status.ok() ? absl::StrCat("ok ", buffers.size())
                                 : absl::StrCat("error at buffer ", buffers.size() + 1,
                                                " of this child: ", status.ToString()));
    } else if (command == "fences") {
      // n pending fences, in groups of kFencesPerWait on one session each.
      absl::Status status;
      const absl::Duration deadline = absl::Seconds(300);
      for (uint64_t made = 0; made < n && status.ok() && !clients.empty();) {
        auto group = std::make_unique<FenceGroup>();
        group->session = groups.size() % clients.size();
        for (size_t i = 0; i < kFencesPerWait && made < n; ++i, ++made) {
          auto fence = clients[group->session].CreateFence(
              {.name = "scale", .timeline = "scale", .deadline = deadline});
          if (!fence.ok()) {
            status = absl::Status(fence.status().code(),
                                  absl::StrCat("fence ", made + 1, ": ", fence.status().message()));
            break;
          }
          group->fences.push_back(*std::move(fence));
        }
        groups.push_back(std::move(group));
      }
      Reply(control, status.ok() ? "ok" : "error " + status.ToString());
    } else if (command == "wait") {
      // One thread per group, blocked in one WaitAll on the whole group.
      for (auto& group : groups) {
        FenceGroup* g = group.get();
        const Client* client = &clients[g->session];
        g->waiter = std::thread([g, client] {
          std::vector<const Fence*> all;
          for (const Fence& fence : g->fences) all.push_back(&fence);
          auto result = client->WaitAll(all, absl::Seconds(280));
          g->woke_ns = NowNs();
          g->status = result.status();
          if (!result.ok()) return;
          for (const v1::FenceInfo& info : result->fences) {
            g->signaled_ok += info.state() == v1::FENCE_STATE_SIGNALED &&
                              info.status() == v1::FENCE_STATUS_OK;
          }
        });
      }
      // Registered once the daemon counts a waiter on the first and the
      // last fence of every group (one Wait registers on all at once).
      absl::Status status;
      for (auto& group : groups) {
        for (Fence* fence : {&group->fences.front(), &group->fences.back()}) {
          bool registered = false;
          for (int i = 0; i < 2000 && !registered; ++i) {
            auto info = fence->Info();
            if (!info.ok()) {
              status = info.status();
              break;
            }
            registered = info->waiters() >= 1;
            if (!registered) std::this_thread::sleep_for(std::chrono::milliseconds(5));
          }
          if (status.ok() && !registered) status = absl::DeadlineExceededError("wait not registered in 10 s");
        }
      }
      Reply(control, status.ok() ? "ok" : "error " + status.ToString());
    } else if (command == "signal") {
      const int64_t start = NowNs();
      for (auto& group : groups) {
        for (const Fence& fence : group->fences) (void)fence.Signal();
      }
      const int64_t signaled = NowNs();
      int64_t last = 0;
      size_t ok = 0, total = 0;
      std::string error;
      for (auto& group : groups) {
        if (group->waiter.joinable()) group->waiter.join();
        last = std::max(last, group->woke_ns);
        ok += group->signaled_ok;
        total += group->fences.size();
        if (!group->status.ok() && error.empty()) error = group->status.ToString();
      }
      Reply(control, absl::StrCat("t ", start, " ", signaled, " ", last, " ", ok, " ", total, " ",
                                  error.empty() ? "-" : error));
    } else if (command == "forget") {
      for (auto& group : groups) {
        if (group->waiter.joinable()) group->waiter.join();
      }
      groups.clear();
      Reply(control, "ok");
    } else if (command == "exit") {
      // The kernel closes every fd: the daemon ends these sessions and
      // releases their handles, as for any process that exits.
      ::_exit(0);
    } else {
      Reply(control, "error unknown command " + got->bytes);
    }
  }
}

struct Child {
  testing::ChildProcess process;
  UnixSocket socket;

  void Send(const std::string& command) const { (void)socket.Send(command); }
  std::string Read() const {
    auto got = socket.RecvWithFds(4096);
    return got.ok() && !got->eof ? got->bytes : "error child gone";
  }
};

// Sends one command to every child (with `arg(i)`), then reads every
// answer: the first error, or OK.
template <typename Arg>
absl::Status AskAll(const std::vector<Child>& children, const std::string& command, Arg arg,
                    std::vector<std::string>* answers = nullptr) {
  for (size_t i = 0; i < children.size(); ++i) children[i].Send(absl::StrCat(command, arg(i)));
  absl::Status status;
  for (size_t i = 0; i < children.size(); ++i) {
    const std::string answer = children[i].Read();
    if (answers != nullptr) answers->push_back(answer);
    if (answer.rfind("error", 0) == 0 && status.ok()) {
      status = absl::InternalError(absl::StrCat("child ", i, ": ", answer.substr(6)));
    }
  }
  return status;
}

// The i-th of `parts` shares of `total` (the remainder to the first ones).
uint64_t Share(uint64_t total, size_t parts, size_t i) {
  return total / parts + (i < total % parts ? 1 : 0);
}

// ---------------------------------------------------------------------------
// Latency at one level.

enum Op { kFloor, kAllocate, kRelease, kExport, kImport, kList, kListHeap, kOps };
const char* const kOpNames[kOps] = {
    "floor: empty gRPC call",  "Allocate 4 KiB + drop",   "Release RPC",
    "Export (read-only)",      "Import",                  "ListBuffers, page of 100",
    "ListBuffers --heap spare",
};
const char* const kOpShort[kOps] = {"floor",  "Allocate",    "Release",    "Export",
                                    "Import", "ListBuffers", "ListBuffersHeap"};
// A second heap holding one buffer (the measuring session's): a page of
// ListBuffers filtered on it must not walk the other heap's buffers.
constexpr char kSpareHeap[] = "spare";

struct OpResult {
  std::vector<double> samples;
  std::string error;
  // ListBuffers: buffers in the last answer, and whether it named a next page.
  int listed = -1;
  bool next_page = false;
};

struct LevelResult {
  uint64_t live = 0;
  OpResult ops[kOps];
  // When (ms from the first sample) an op of the interleaved loop took
  // over 1 ms: periodic work in the daemon shows as regular gaps.
  std::vector<double> slow_at_ms;
  // The daemon's CPU time per second of wall time, idle (before the
  // samples): periodic work that grows with what it holds shows here.
  double idle_cpu_ms_per_s = 0;
  // Allocate + drop while another session lists the spare heap back to
  // back: what a listing costs everyone else.
  std::vector<double> allocate_beside_list;
  int lists_beside = 0;
};

double IdleCpuMsPerSecond(pid_t pid, absl::Duration over) {
  const int64_t run0 = ProcessRunNs(pid), t0 = NowNs();
  std::this_thread::sleep_for(absl::ToChronoNanoseconds(over));
  return (ProcessRunNs(pid) - run0) / 1e6 / ((NowNs() - t0) / 1e9);
}

[[noreturn]] void Fail(const std::string& what, const absl::Status& status) {
  std::fprintf(stderr, "scale_bench: %s: %s\n", what.c_str(), status.ToString().c_str());
  std::exit(1);
}

// The samples of an op at a level come in kRounds rounds, kRoundGap apart.
constexpr int kRounds = 3;
constexpr auto kRoundGap = std::chrono::milliseconds(300);
int RoundLength(int iterations) { return std::max(1, (iterations + kRounds - 1) / kRounds); }

LevelResult MeasureLevel(uint64_t live, int iterations, const Client& client,
                         const Client& importer, const Buffer& shared, grpc::GenericStub& stub,
                         pid_t daemon_pid) {
  LevelResult r;
  r.live = live;
  r.idle_cpu_ms_per_s = IdleCpuMsPerSecond(daemon_pid, absl::Seconds(2));
  double first = 0;
  // The ops and the floor, interleaved round-robin so that drift on the
  // machine hits them alike.
  auto once = [&](bool record) {
    auto keep = [&](Op op, double us) {
      if (!record) return;
      r.ops[op].samples.push_back(us);
      if (first == 0) first = NowMicros() - us;
      if (us > 1000) r.slow_at_ms.push_back((NowMicros() - first) / 1000);
    };
    keep(kFloor, GrpcOnce(stub));
    double start = NowMicros();
    {
      auto buffer = client.Allocate({.heap = "system", .size = kBufferSize, .name = "probe"});
      if (!buffer.ok()) Fail("Allocate", buffer.status());
    }
    keep(kAllocate, NowMicros() - start);
    {
      auto buffer = client.Allocate({.heap = "system", .size = kBufferSize, .name = "probe"});
      if (!buffer.ok()) Fail("Allocate", buffer.status());
      start = NowMicros();
      absl::Status released = buffer->Release();
      keep(kRelease, NowMicros() - start);
      if (!released.ok()) Fail("Release", released);
    }
    start = NowMicros();
    auto token = shared.Export(Access::kReadOnly);
    keep(kExport, NowMicros() - start);
    if (!token.ok()) Fail("Export", token.status());
    start = NowMicros();
    {
      auto imported = importer.Import(*token);
      keep(kImport, NowMicros() - start);
      if (!imported.ok()) Fail("Import", imported.status());
    }
  };
  for (int i = 0; i < 10; ++i) once(false);  // warm up
  for (int i = 0; i < iterations; ++i) {
    // In kRounds rounds apart in time, so that a burst of noise on the
    // machine (a neighbour, on these VMs) lands in one round's samples,
    // not in all of them.
    if (i != 0 && i % RoundLength(iterations) == 0) std::this_thread::sleep_for(kRoundGap);
    // A pause now and then: the daemon finishes the frees the drops started.
    if (i % 20 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    once(true);
  }
  // ListBuffers alone: until it pages, an answer holds every buffer, and
  // the daemon's work after sending it (freeing it) would land on whatever
  // call came next. Each call is followed by a pause as long as it took.
  // At most 5 s of calls a level for each form, and 3 errors; the two
  // forms take turns in kRounds rounds apart in time, as above.
  v1::ListBuffersRequest all, spare;
  all.set_page_size(100);
  spare.set_page_size(100);
  spare.set_heap(kSpareHeap);
  struct Form {
    Op op;
    const v1::ListBuffersRequest* request;
    double spent = 0;
    int errors = 0;
    int done = -3;  // the first three calls warm up
  };
  Form forms[] = {{kList, &all}, {kListHeap, &spare}};
  for (int round = 0; round < kRounds; ++round) {
    if (round != 0) std::this_thread::sleep_for(kRoundGap);
    const int until = round == kRounds - 1
                          ? iterations
                          : std::min(iterations, (round + 1) * RoundLength(iterations));
    for (Form& form : forms) {
      OpResult& o = r.ops[form.op];
      for (; form.done < until && form.spent < 5e6 && form.errors < 3; ++form.done) {
        const double start = NowMicros();
        auto page = client.ListBuffers(*form.request);
        const double took = NowMicros() - start;
        if (form.done >= 0) form.spent += took;
        if (page.ok()) {
          if (form.done >= 0) o.samples.push_back(took);
          o.listed = page->buffers_size();
          o.next_page = !page->next_page_token().empty();
        } else {
          ++form.errors;
          o.error = page.status().ToString();
        }
        std::this_thread::sleep_for(
            std::chrono::microseconds(static_cast<int64_t>(std::max(2000.0, took))));
      }
    }
  }
  // Allocate + drop for 1 s while the importer's session lists the spare
  // heap back to back (info: whatever the listing holds, others wait for).
  std::atomic<bool> stop{false};
  std::thread lister([&] {
    while (!stop.load()) {
      (void)importer.ListBuffers(spare);
      ++r.lists_beside;
    }
  });
  const double until = NowMicros() + 1e6;
  while (NowMicros() < until) {
    const double start = NowMicros();
    {
      auto buffer = client.Allocate({.heap = "system", .size = kBufferSize, .name = "probe"});
      if (!buffer.ok()) Fail("Allocate", buffer.status());
    }
    r.allocate_beside_list.push_back(NowMicros() - start);
  }
  stop = true;
  lister.join();
  return r;
}

void PrintLevel(const char* placement, const LevelResult& r) {
  std::printf("  %-6s %-26s %10s %10s %6s\n", placement, "op", "p50 us", "p99 us", "n");
  for (int op = 0; op < kOps; ++op) {
    const OpResult& o = r.ops[op];
    if (o.samples.empty()) {
      std::printf("  %-6s %-26s %10s %10s %6d  error: %s\n", "", kOpNames[op], "-", "-", 0,
                  o.error.c_str());
      continue;
    }
    const Summary s = Summarize(o.samples, 0);
    std::printf("  %-6s %-26s %10.1f %10.1f %6zu", "", kOpNames[op], s.p50, s.p99,
                o.samples.size());
    if (op >= kList) {
      std::printf("  (%d buffers in an answer; next_page_token %s)", o.listed,
                  o.next_page ? "set" : "empty");
    }
    if (!o.error.empty()) std::printf("  also error: %s", o.error.c_str());
    std::printf("\n");
  }
  std::vector<double> gaps;
  for (size_t i = 1; i < r.slow_at_ms.size(); ++i) {
    gaps.push_back(r.slow_at_ms[i] - r.slow_at_ms[i - 1]);
  }
  std::sort(gaps.begin(), gaps.end());
  double sampled_ms = 0;
  for (int op = kFloor; op < kList; ++op) {
    for (double us : r.ops[op].samples) sampled_ms += us / 1000;
  }
  if (!r.allocate_beside_list.empty()) {
    const Summary beside = Summarize(r.allocate_beside_list, 0);
    std::printf(
        "  %-6s (info) Allocate 4 KiB + drop while another session lists --heap spare back to "
        "back (%d lists in 1 s): p50 %.1f  p99 %.1f  max %.1f\n",
        "", r.lists_beside, beside.p50, beside.p99,
        *std::max_element(r.allocate_beside_list.begin(), r.allocate_beside_list.end()));
  }
  std::printf(
      "  %-6s (info) daemon idle: %.2f ms CPU per s; calls over 1 ms (not ListBuffers): %zu in "
      "%.0f ms of calls%s\n",
      "", r.idle_cpu_ms_per_s, r.slow_at_ms.size(), sampled_ms,
      gaps.empty() ? ""
                   : absl::StrFormat(", median gap between them %.0f ms", gaps[gaps.size() / 2])
                         .c_str());
}

}  // namespace
}  // namespace bufferd::bench

int main(int argc, char** argv) {
  // As in the other benches: Debian's abseil checks every absl::Mutex for
  // deadlocks unless told not to; bufferd's release build turns it off.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  using namespace bufferd;
  using namespace bufferd::bench;
  CLI::App app{"scale_bench: bufferd with 1,000 sessions, 100,000 buffers, 10,000 fences"};
  uint64_t buffers = 100000, sessions = 1000, fences = 10000;
  size_t children_count = 8;
  int iterations = 300;
  bool quick = false;
  std::string daemon_binary = testing::BinaryPath("daemon/bufferd");
  app.add_option("--buffers", buffers, "live 4 KiB buffers at the top level")->capture_default_str();
  app.add_option("--sessions", sessions, "sessions held by the children")->capture_default_str();
  app.add_option("--fences", fences, "pending fences with waiters")->capture_default_str();
  app.add_option("--children", children_count, "holder processes")->capture_default_str();
  app.add_option("--iterations", iterations, "samples per op, level and placement")
      ->capture_default_str();
  app.add_flag("--quick", quick, "10x fewer of everything (and 100 samples): a fast check");
  app.add_option("--bufferd", daemon_binary, "bufferd binary")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (quick) {
    buffers /= 10;
    sessions /= 10;
    fences /= 10;
    iterations = std::min(iterations, 100);
  }
  if (children_count == 0 || sessions < children_count || buffers < 100 || iterations < 1) {
    std::fprintf(stderr, "need --children >= 1, --sessions >= --children, --buffers >= 100\n");
    return 2;
  }
  // Each child keeps an fd per buffer it holds, two per session, and a few
  // of its own, under one RLIMIT_NOFILE.
  rlimit nofile{};
  ::getrlimit(RLIMIT_NOFILE, &nofile);
  const uint64_t per_child_fds = buffers / children_count + 1 +
                                 2 * (sessions / children_count + 1) + 64;
  if (per_child_fds > nofile.rlim_max) {
    std::fprintf(stderr,
                 "each child would need %lu fds, over RLIMIT_NOFILE %lu: use more --children\n",
                 static_cast<unsigned long>(per_child_fds),
                 static_cast<unsigned long>(nofile.rlim_max));
    return 2;
  }
  if (std::thread::hardware_concurrency() < 2) {
    std::fprintf(stderr, "scale_bench pins the daemon to CPU 1: it needs 2 CPUs\n");
    return 1;
  }

  // Fork the children before anything starts a thread (gRPC included).
  std::vector<Child> children;
  for (size_t i = 0; i < children_count; ++i) {
    auto pair = UnixSocket::SeqPacketPair();
    if (!pair.ok()) Fail("socketpair", pair.status());
    testing::ChildOptions options;
    options.cpu = 0;
    auto child = testing::ChildProcess::Fork(
        [&] {
          pair->first = UnixSocket();
          return ChildMain(pair->second);
        },
        options);
    if (!child.ok()) Fail("fork", child.status());
    children.push_back(Child{*std::move(child), std::move(pair->first)});
  }
  PinTo(0);

  // Quotas off (0) and caps above what this run makes: the bench measures
  // scale, not the limits. Fence deadlines may reach 5 min.
  // Sessions, and the bare gRPC connections measured beside them.
  const uint64_t room = sessions + std::max<uint64_t>(50, sessions / 10) + 128;
  const std::string config = absl::StrCat(
      "heaps { name: \"system\" type: HEAP_TYPE_SYSTEM }\n"
      "heaps { name: \"", kSpareHeap, "\" type: HEAP_TYPE_SYSTEM }\n"
      "quotas { max_bytes_per_session: 0 max_bytes_per_uid: 0 max_buffers_per_session: 0\n"
      "         max_fences_per_session: 0 }\n"
      "max_fence_deadline_ms: 300000\n"
      "limits { max_sessions: ", std::max<uint64_t>(4096, room),
      " max_sessions_per_uid: ", std::max<uint64_t>(1024, room),
      "\n         max_control_connections: ", std::max<uint64_t>(4096, room),
      " max_control_connections_per_uid: ", std::max<uint64_t>(1024, room),
      "\n         max_fences: ", std::max<uint64_t>(65536, 2 * fences),
      " max_fences_per_uid: ", std::max<uint64_t>(16384, fences + 1024),
      " max_held_fences_per_session: 16384 }\n");
  const int kDaemonCpu = 1;
  auto daemon = testing::DaemonProcess::Start(
      {.config = config, .log_level = "info", .cpu = kDaemonCpu, .binary = daemon_binary});
  if (!daemon.ok()) Fail("could not start bufferd", daemon.status());
  testing::DaemonProcess& d = **daemon;
  // On any failure from here: the daemon's own words.
  auto fail = [&](const std::string& what, const absl::Status& status) {
    std::fprintf(stderr, "scale_bench: %s: %s\n", what.c_str(), status.ToString().c_str());
    std::ifstream log(d.log_path());
    std::vector<std::string> lines;
    for (std::string line; std::getline(log, line);) lines.push_back(line);
    std::fprintf(stderr, "--- last lines of the daemon's log (%s):\n", d.log_path().c_str());
    for (size_t i = lines.size() > 40 ? lines.size() - 40 : 0; i < lines.size(); ++i) {
      std::fprintf(stderr, "%s\n", lines[i].c_str());
    }
    for (const Child& child : children) child.Send("exit");
    std::exit(1);
  };

  const std::string dir = d.socket_dir();
  std::printf(
      "bufferd scale_bench: %lu sessions, %lu live 4 KiB buffers, %lu pending fences with "
      "waiters%s\n",
      static_cast<unsigned long>(sessions), static_cast<unsigned long>(buffers),
      static_cast<unsigned long>(fences), quick ? " (--quick: 10x smaller)" : "");
  std::printf(
      "placement: daemon (every thread) on CPU %d; %zu holder children on CPU 0 (%lu sessions "
      "and %lu buffers each), idle while latencies are timed; the measuring process on CPU 0 "
      "(\"split\") and on CPU 1 (\"same\", with the daemon)\n",
      kDaemonCpu, children_count, static_cast<unsigned long>(sessions / children_count),
      static_cast<unsigned long>(buffers / children_count));
  std::printf(
      "memory: daemon VmRSS growth over the objects made / their number (RssAnon and "
      "smaps_rollup Pss beside it); kernel objects (memfd inodes, struct file, socket buffers) "
      "are the kernel's own, in no RSS, shown apart from /proc/meminfo Slab (system-wide)\n\n");

  if (absl::Status s = AskAll(children, "dir ", [&](size_t) { return dir; }); !s.ok()) {
    fail("dir", s);
  }
  auto client = Client::Connect(dir);
  auto importer = Client::Connect(dir);
  if (!client.ok()) fail("connect", client.status());
  if (!importer.ok()) fail("connect", importer.status());
  grpc::GenericStub stub(
      grpc::CreateChannel("unix:" + ControlSocketPath(dir), grpc::InsecureChannelCredentials()));
  GrpcOnce(stub);
  // The buffer Export shares, all along.
  auto shared = client->Allocate({.heap = "system", .size = kBufferSize, .name = "shared"});
  if (!shared.ok()) fail("Allocate", shared.status());
  // The one buffer of the spare heap.
  auto spare = client->Allocate({.heap = kSpareHeap, .size = kBufferSize, .name = "spare"});
  if (!spare.ok()) fail("Allocate", spare.status());
  bool all_met = true;

  // The daemon's own count of live buffers on the system heap.
  auto live_buffers = [&]() -> uint64_t {
    auto heaps = client->ListHeaps();
    if (!heaps.ok()) fail("ListHeaps", heaps.status());
    for (const v1::HeapInfo& heap : heaps->heaps()) {
      if (heap.name() == "system") return heap.buffer_count();
    }
    return 0;
  };
  const uint64_t levels[] = {buffers / 100, buffers / 10, buffers};
  // Buffers held at each level: the children's, and `shared`.
  auto hold = [&](uint64_t level) {
    if (absl::Status s = AskAll(children, "hold ",
                                [&](size_t i) { return Share(level, children_count, i); });
        !s.ok()) {
      fail(absl::StrCat("holding ", level, " buffers"), s);
    }
    uint64_t live = 0;
    for (int i = 0; i < 500 && (live = live_buffers()) != level + 1; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (live != level + 1) {
      fail("hold", absl::InternalError(absl::StrCat("the daemon counts ", live,
                                                    " live buffers, not ", level + 1)));
    }
  };

  // ===== Part 1: memory, everything at once, nothing timed in between
  // (what a timed call allocates and frees, a big ListBuffers answer above
  // all, would be reused by the next objects and hide their cost).
  std::printf("===== memory (one daemon holding all of it at once)\n\n");
  // Each child's first session opens the process's control.sock
  // connection, which its later sessions share (Client::Options::
  // share_control_connection): that is a cost per client process, measured
  // apart below; the sessions are counted from the second on.
  if (absl::Status s = AskAll(children, "connect ", [](size_t) { return "1"; }); !s.ok()) {
    fail("first session of every child", s);
  }
  if (absl::Status s = AskAll(children, "touch", [](size_t) { return ""; }); !s.ok()) {
    fail("first call on every child's first session", s);
  }
  const uint64_t counted = sessions - children_count;
  const Memory m0 = SettledMemory(d);
  double start = NowMicros();
  if (absl::Status s = AskAll(children, "connect ",
                              [&](size_t i) { return Share(sessions, children_count, i); });
      !s.ok()) {
    fail("connect sessions", s);
  }
  const double connect_ms = (NowMicros() - start) / 1000;
  const Memory m1 = SettledMemory(d);
  if (absl::Status s = AskAll(children, "touch", [](size_t) { return ""; }); !s.ok()) {
    fail("first call on every session", s);
  }
  const Memory m2 = SettledMemory(d);
  std::printf(
      "== %lu sessions in %zu processes (the %lu after each one's first: connected in %.0f ms); "
      "daemon fds %d -> %d, threads %ld -> %ld\n",
      static_cast<unsigned long>(sessions), children_count, static_cast<unsigned long>(counted),
      connect_ms, m0.fds, m2.fds, m0.threads, m2.threads);
  Growth connected, session_growth;
  connected.Add(m0, m1);
  session_growth.Add(m0, m2);
  std::printf("%-34s daemon VmRSS +%ld KiB = %.0f B each (RssAnon %.0f B)\n",
              "(info) per session, connected", connected.rss_kb,
              connected.PerObject(connected.rss_kb, counted),
              connected.PerObject(connected.anon_kb, counted));
  std::string session_summary, buffer_summary, fence_summary;
  all_met &= MemoryVerdict("memory per session (+ a first call)", session_growth, counted,
                           &session_summary);
  // Per client process: its control.sock connection (gRPC's state for it),
  // measured as bare connections (a channel each, no session), one empty
  // call each.
  const size_t bare_count = std::max<size_t>(50, sessions / 10);
  std::vector<std::unique_ptr<grpc::GenericStub>> bare;
  {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection each
    for (size_t i = 0; i < bare_count; ++i) {
      bare.push_back(std::make_unique<grpc::GenericStub>(grpc::CreateCustomChannel(
          "unix:" + ControlSocketPath(dir), grpc::InsecureChannelCredentials(), args)));
      GrpcOnce(*bare.back());
    }
  }
  const Memory m3 = SettledMemory(d);
  Growth bare_growth;
  bare_growth.Add(m2, m3);
  std::printf(
      "%-34s its control.sock connection, shared by its sessions (measured as %zu bare gRPC "
      "connections, one empty call each): +%.0f B each (RssAnon %.0f B); not in the target\n",
      "(info) per client process", bare_count,
      bare_growth.PerObject(bare_growth.rss_kb, bare_count),
      bare_growth.PerObject(bare_growth.anon_kb, bare_count));
  const std::string process_summary =
      absl::StrFormat("%.0f B", bare_growth.PerObject(bare_growth.rss_kb, bare_count));

  Growth buffer_growth;
  uint64_t held = 0;
  for (uint64_t level : levels) {
    const Memory before = SettledMemory(d);
    start = NowMicros();
    hold(level);
    const double fill_ms = (NowMicros() - start) / 1000;
    const Memory after = SettledMemory(d);
    buffer_growth.Add(before, after);
    std::printf(
        "== %lu live buffers (the daemon's count, +1 of the measuring session; %lu added in "
        "%.0f ms): daemon fds %d -> %d, threads %ld, VmRSS %ld -> %ld KiB = %.0f B per buffer "
        "added\n",
        static_cast<unsigned long>(level), static_cast<unsigned long>(level - held), fill_ms,
        before.fds, after.fds, after.threads, before.rss_kb, after.rss_kb,
        (after.rss_kb - before.rss_kb) * 1024.0 / static_cast<double>(level - held));
    held = level;
  }
  all_met &= MemoryVerdict("memory per buffer", buffer_growth, buffers, &buffer_summary);

  // Fences, with their waiters, while the sessions and buffers live.
  const Memory f0 = SettledMemory(d);
  if (absl::Status s = AskAll(children, "fences ",
                              [&](size_t i) { return Share(fences, children_count, i); });
      !s.ok()) {
    fail("creating fences", s);
  }
  const Memory f1 = SettledMemory(d);
  if (absl::Status s = AskAll(children, "wait", [](size_t) { return ""; }); !s.ok()) {
    fail("registering waits", s);
  }
  const Memory f2 = SettledMemory(d);
  // Every fence pending, with a waiter: the daemon's own view.
  uint64_t pending = 0, waited = 0;
  v1::ListFencesRequest list;
  list.set_state(v1::FENCE_STATE_PENDING);
  list.set_limit(10000);
  for (int page = 0; page < 100; ++page) {
    auto listed = client->ListFences(list);
    if (!listed.ok()) fail("ListFences", listed.status());
    for (const v1::FenceInfo& info : listed->fences()) {
      ++pending;
      waited += info.waiters() >= 1;
    }
    if (listed->next_page_token().empty()) break;
    list.set_page_token(listed->next_page_token());
  }
  size_t wait_calls = 0;
  for (size_t i = 0; i < children_count; ++i) {
    wait_calls += (Share(fences, children_count, i) + kFencesPerWait - 1) / kFencesPerWait;
  }
  std::printf(
      "== %lu pending fences; their waiters: %zu WaitFence RPCs (Client::WaitAll, at most %zu "
      "fences each, one client thread each, in the children), the daemon registering one wait "
      "on every fence; daemon fds %d -> %d, threads %ld -> %ld\n",
      static_cast<unsigned long>(fences), wait_calls, kFencesPerWait, f0.fds, f2.fds, f0.threads,
      f2.threads);
  std::printf("%-34s ListFences: %lu pending, %lu of them with a waiter%s\n", "(check)",
              static_cast<unsigned long>(pending), static_cast<unsigned long>(waited),
              waited >= fences ? "" : "  (fewer than made!)");
  Growth fence_only, wait_only, fence_growth;
  fence_only.Add(f0, f1);
  wait_only.Add(f1, f2);
  fence_growth.Add(f0, f2);
  std::printf("%-34s the fence %.0f B + its wait %.0f B (VmRSS)\n", "(info) per pending fence",
              fence_only.PerObject(fence_only.rss_kb, fences),
              wait_only.PerObject(wait_only.rss_kb, fences));
  all_met &= MemoryVerdict("memory per fence (+ its waiter)", fence_growth, fences,
                           &fence_summary);
  std::vector<std::string> answers;
  if (absl::Status s = AskAll(children, "signal", [](size_t) { return ""; }, &answers); !s.ok()) {
    fail("signal", s);
  }
  int64_t first_signal = INT64_MAX, last_signal = 0, last_wake = 0;
  uint64_t woke_ok = 0, total = 0;
  std::string wait_error;
  for (const std::string& answer : answers) {
    const std::vector<std::string> w = absl::StrSplit(answer, absl::MaxSplits(' ', 6));
    int64_t a = 0, b = 0, c = 0;
    uint64_t ok = 0, n = 0;
    if (w.size() < 7 || !absl::SimpleAtoi(w[1], &a) || !absl::SimpleAtoi(w[2], &b) ||
        !absl::SimpleAtoi(w[3], &c) || !absl::SimpleAtoi(w[4], &ok) ||
        !absl::SimpleAtoi(w[5], &n)) {
      fail("signal", absl::InternalError("bad answer " + answer));
    }
    first_signal = std::min(first_signal, a);
    last_signal = std::max(last_signal, b);
    last_wake = std::max(last_wake, c);
    woke_ok += ok;
    total += n;
    if (w[6] != "-" && wait_error.empty()) wait_error = w[6];
  }
  const bool all_woke = woke_ok == fences && total == fences && wait_error.empty();
  all_met &= all_woke;
  const double wake_ms = (last_wake - first_signal) / 1e6;
  std::printf(
      "%-34s each fence signalled one-way by its owner (the children, CPU 0: %.1f ms to send "
      "all %lu); the last WaitAll returned %.1f ms after the first signal, %.1f ms after the "
      "last; %lu of %lu fences seen SIGNALED OK by their waiter%s  target: all  %s\n",
      "signal all -> every waiter woke", (last_signal - first_signal) / 1e6,
      static_cast<unsigned long>(fences), wake_ms, (last_wake - last_signal) / 1e6,
      static_cast<unsigned long>(woke_ok),
      static_cast<unsigned long>(fences),
      wait_error.empty() ? "" : ("; error: " + wait_error).c_str(), all_woke ? "met" : "not met");
  (void)AskAll(children, "forget", [](size_t) { return ""; });
  bare.clear();

  // ===== Part 2: latency at each level, from the top down (the children
  // drop buffers between levels).
  std::printf(
      "\n===== latency (us), %d samples per op, level and placement (in %d rounds %lld ms apart)\n",
      iterations, kRounds, static_cast<long long>(kRoundGap.count()));
  std::vector<LevelResult> split, same;  // in `levels` order
  for (int li = 2; li >= 0; --li) {
    hold(levels[li]);
    const Memory now = SettledMemory(d);
    std::printf("\n== %lu live buffers (the daemon's count, +1); %lu sessions; daemon fds %d\n",
                static_cast<unsigned long>(levels[li]), static_cast<unsigned long>(sessions),
                now.fds);
    PinProcess(0);
    split.insert(split.begin(),
                 MeasureLevel(levels[li], iterations, *client, *importer, *shared, stub, d.pid()));
    PrintLevel("split", split.front());
    PinProcess(kDaemonCpu);
    same.insert(same.begin(),
                MeasureLevel(levels[li], iterations, *client, *importer, *shared, stub, d.pid()));
    PrintLevel("same", same.front());
    PinProcess(0);
  }

  // Flatness: p50 at the top level / p50 at the bottom one.
  auto label = [](uint64_t n) {
    return n >= 1000 && n % 1000 == 0 ? absl::StrCat(n / 1000, "k") : absl::StrCat(n);
  };
  std::printf("\n== flatness: p50 with %s live buffers / p50 with %s (target <= 1.5)\n",
              label(levels[2]).c_str(), label(levels[0]).c_str());
  std::map<std::string, std::string> flat_cells;
  for (const auto& [placement, results] :
       {std::pair<const char*, std::vector<LevelResult>*>{"split", &split}, {"same", &same}}) {
    const LevelResult& lo = results->front();
    const LevelResult& hi = results->back();
    const double floor_lo = Summarize(lo.ops[kFloor].samples, 0).p50;
    const double floor_hi = Summarize(hi.ops[kFloor].samples, 0).p50;
    for (int op = kAllocate; op < kOps; ++op) {
      const OpResult& a = lo.ops[op];
      const OpResult& b = hi.ops[op];
      const std::string name = absl::StrFormat("%-28s %-6s", kOpNames[op], placement);
      if (a.samples.empty() || b.samples.empty()) {
        all_met = false;
        const std::string& error = b.samples.empty() ? b.error : a.error;
        std::printf("%s error at %s: %s  target <= 1.5  not met\n", name.c_str(),
                    label(b.samples.empty() ? hi.live : lo.live).c_str(), error.c_str());
        flat_cells[absl::StrCat(kOpShort[op], placement)] = "error (not met)";
        continue;
      }
      const Summary sa = Summarize(a.samples, 0), sb = Summarize(b.samples, 0);
      const double ratio = sb.p50 / sa.p50;
      const bool met = ratio <= 1.5;
      all_met &= met;
      std::printf(
          "%s %s: %8.1f (%8.1f)  %s: %8.1f (%8.1f)  ratio %5.2f  floor %.1f -> %.1f (%.2fx)  "
          "target <= 1.5  %s\n",
          name.c_str(), label(lo.live).c_str(), sa.p50, sa.p99, label(hi.live).c_str(), sb.p50,
          sb.p99, ratio, floor_lo, floor_hi, floor_hi / floor_lo, met ? "met" : "not met");
      flat_cells[absl::StrCat(kOpShort[op], placement)] =
          absl::StrFormat("%.2f×%s", ratio, met ? "" : " (not met)");
    }
  }

  // What to paste into the README.
  std::printf("\n== summary (README)\n\n");
  std::printf(
      "`scale_bench` (%lu sessions, %lu live 4 KiB buffers, %lu pending fences with waiters; "
      "daemon on CPU 1, %zu holder processes on CPU 0, the measuring process on CPU 0 (split) or "
      "CPU 1 (same); p50 (p99) in µs):\n\n",
      static_cast<unsigned long>(sessions), static_cast<unsigned long>(buffers),
      static_cast<unsigned long>(fences), children_count);
  std::printf("| daemon memory (VmRSS growth) | per object | target |\n|---|---|---|\n");
  std::printf(
      "| session (its fd.sock, one call made on its process's shared control "
      "connection) | %s | ≤ 1 KiB |\n",
      session_summary.c_str());
  std::printf("| client process (its control.sock connection: gRPC's state) | %s | — |\n",
              process_summary.c_str());
  std::printf("| live 4 KiB buffer | %s | ≤ 1 KiB |\n", buffer_summary.c_str());
  std::printf("| pending fence with its waiter (WaitAll of ≤ %zu) | %s | ≤ 1 KiB |\n\n",
              kFencesPerWait, fence_summary.c_str());
  std::printf(
      "Kernel objects (memfd inodes, struct file, sockets) are the kernel's own, not counted. "
      "%lu waiters all woke %.1f ms after the first signal%s.\n\n",
      static_cast<unsigned long>(fences), wake_ms, all_woke ? "" : " (NOT all: see above)");
  std::printf("| op | placement |");
  for (uint64_t level : levels) std::printf(" %s live |", label(level).c_str());
  std::printf(" %s / %s (≤ 1.5) |\n|---|---|---|---|---|---|\n", label(levels[2]).c_str(),
              label(levels[0]).c_str());
  for (int op = kFloor; op < kOps; ++op) {
    for (const auto& [placement, results] :
         {std::pair<const char*, std::vector<LevelResult>*>{"split", &split}, {"same", &same}}) {
      std::printf("| %s | %s |", kOpNames[op], placement);
      for (const LevelResult& r : *results) {
        const OpResult& o = r.ops[op];
        if (o.samples.empty()) {
          std::printf(" error |");
        } else {
          const Summary s = Summarize(o.samples, 0);
          std::printf(" %.0f (%.0f) |", s.p50, s.p99);
        }
      }
      if (op == kFloor) {
        std::printf(" — |\n");
      } else {
        std::printf(" %s |\n", flat_cells[absl::StrCat(kOpShort[op], placement)].c_str());
      }
    }
  }

  for (const Child& child : children) child.Send("exit");
  for (Child& child : children) child.process.Wait();
  shared = absl::UnavailableError("done");
  spare = absl::UnavailableError("done");
  client = absl::UnavailableError("done");
  importer = absl::UnavailableError("done");
  daemon->reset();
  std::printf("\n%s\n", all_met ? "all targets met" : "some targets not met");
  return 0;
}
