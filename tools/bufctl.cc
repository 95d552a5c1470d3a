// bufctl: inspect a running bufferd. Built on the client library only.
//
//   bufctl heaps | clients | buffers [--heap H] | fences [--pending] [--owner S] | metrics
//   bufctl watch
//   bufctl can-allocate --usage camera_frame --frame 3840x2160:NV12 [--count 3]
//   bufctl heaps --json     (protobuf JSON instead of a table; options go anywhere)
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/errno_status.h"
#include "base/frame_format.h"
#include "base/protocol.h"
#include "base/unix_socket.h"
#include "client/client.h"
#include "fences/reservations.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"

namespace {

using Row = std::vector<std::string>;

// Prints rows as a table with columns padded to their widest cell.
void PrintTable(const Row& header, const std::vector<Row>& rows) {
  std::vector<size_t> widths(header.size());
  for (size_t i = 0; i < header.size(); ++i) widths[i] = header[i].size();
  for (const Row& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  // Nothing a client named reaches the terminal raw (the daemon escapes
  // process names already; this holds for any other cell too).
  auto cell = [](std::string text) {
    for (char& c : text) {
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) c = '?';
    }
    return text;
  };
  auto print = [&](const Row& row) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      absl::StrAppend(&line, cell(row[i]), std::string(widths[i] - row[i].size() + 2, ' '));
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::cout << line << "\n";
  };
  print(header);
  for (const Row& row : rows) print(row);
}

std::string Bytes(uint64_t bytes) { return bufferd::FormatBytes(bytes); }

std::string Age(const google::protobuf::Timestamp& since) {
  int64_t nanos = google::protobuf::util::TimeUtil::TimestampToNanoseconds(since);
  absl::Duration age = absl::Now() - absl::FromUnixNanos(nanos);
  return absl::FormatDuration(absl::Trunc(age, absl::Seconds(1)));
}

std::string BackingName(int backing) {
  std::string name = bufferd::v1::Backing_Name(backing);
  std::transform(name.begin(), name.end(), name.begin(), ::tolower);
  return name.rfind("backing_", 0) == 0 ? name.substr(8) : name;
}

template <typename Message>
int PrintJson(const Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(message, &json, options).ok()) return 1;
  std::cout << json;
  return 0;
}

int Fail(const absl::Status& status) {
  std::cerr << "bufctl: " << status << "\n";
  return 1;
}

int Heaps(const bufferd::Client& client, bool json) {
  auto heaps = client.ListHeaps();
  if (!heaps.ok()) return Fail(heaps.status());
  if (json) return PrintJson(*heaps);
  std::vector<Row> rows;
  for (const auto& h : heaps->heaps()) {
    std::string type = bufferd::v1::HeapType_Name(h.type()).substr(10);
    std::transform(type.begin(), type.end(), type.begin(), ::tolower);
    std::string pool = "-";
    if (h.hugepages().page_size() != 0) {
      pool = absl::StrCat(h.hugepages().free_pages(), "/", h.hugepages().total_pages(), " free");
    }
    std::string by_backing;
    for (const auto& [name, count] : h.buffers_by_backing()) {
      absl::StrAppend(&by_backing, by_backing.empty() ? "" : " ", name, "=", count);
    }
    // What the heap tries first, and what its live buffers really are when
    // a fallback served some of them.
    std::string backing = BackingName(h.backing());
    for (const auto& [name, count] : h.buffers_by_backing()) {
      if (name != backing) absl::StrAppend(&backing, "+", name);
    }
    rows.push_back({h.name(), type, backing, Bytes(h.page_size()),
                    h.capacity() ? Bytes(h.capacity()) : "-", Bytes(h.used()), Bytes(h.free()),
                    Bytes(h.peak()), absl::StrCat(h.buffer_count()), absl::StrCat(h.failures()),
                    pool,
                    h.type() == bufferd::v1::HEAP_TYPE_CARVEOUT
                        ? absl::StrCat(Bytes(h.reserved_resident()), h.locked() ? " locked" : "")
                        : "-",
                    by_backing.empty() ? h.note() : absl::StrCat(by_backing, "; ", h.note())});
  }
  PrintTable({"HEAP", "TYPE", "BACKING", "PAGE", "CAPACITY", "USED", "FREE", "PEAK", "BUFFERS",
              "FAILS", "HUGEPAGES", "RESERVED", "NOTES"},
             rows);
  // Refusals by reason and fallbacks taken, for the heaps that had any.
  for (const auto& h : heaps->heaps()) {
    if (h.failures_by_reason().empty() && h.fallbacks().empty()) continue;
    std::cout << "\n" << h.name() << ":";
    if (!h.failures_by_reason().empty()) {
      std::map<std::string, uint64_t> sorted(h.failures_by_reason().begin(),
                                             h.failures_by_reason().end());
      std::cout << " refused " << absl::StrJoin(sorted, ", ", absl::PairFormatter(" "));
      if (!h.fallbacks().empty()) std::cout << ";";
    }
    if (!h.fallbacks().empty()) {
      std::map<std::string, uint64_t> sorted(h.fallbacks().begin(), h.fallbacks().end());
      std::cout << " fell back " << absl::StrJoin(sorted, ", ", absl::PairFormatter(" "))
                << " (last: " << h.last_fallback() << ")";
    }
  }
  if (std::any_of(heaps->heaps().begin(), heaps->heaps().end(), [](const auto& h) {
        return !h.failures_by_reason().empty() || !h.fallbacks().empty();
      })) {
    std::cout << "\n";
  }
  const bufferd::v1::FdUsage& fds = heaps->fds();
  std::cout << absl::StrFormat(
      "\n%d buffers, %d handles, %d pending tokens\n"
      "fds %d/%d (buffers %d, sessions %d, control connections %d, in flight %d, being freed "
      "%d, fences %d); %d per uid, %d of RLIMIT_NOFILE %d kept for the daemon\n",
      heaps->live_buffers(), heaps->live_handles(), heaps->pending_tokens(), fds.in_use(),
      fds.budget(), fds.buffers(), fds.sessions(), fds.control_connections(), fds.deliveries(),
      fds.freeing(), fds.fences(), fds.per_uid(), fds.reserve(), fds.rlimit_nofile());
  return 0;
}

int Clients(const bufferd::Client& client, bool json) {
  auto clients = client.ListClients();
  if (!clients.ok()) return Fail(clients.status());
  if (json) return PrintJson(*clients);
  std::vector<Row> rows;
  for (const auto& c : clients->clients()) {
    std::string bytes;
    for (const auto& b : c.bytes()) {
      absl::StrAppend(&bytes, bytes.empty() ? "" : " ", b.heap(), "=", Bytes(b.bytes()));
    }
    rows.push_back({absl::StrCat(c.session_id()), absl::StrCat(c.pid()), absl::StrCat(c.uid()),
                    c.comm(), absl::StrCat(c.handles()), absl::StrCat(c.fences()),
                    absl::StrCat(c.fences_held()), absl::StrCat(c.queued_deliveries()),
                    Age(c.connected_since()),
                    bytes.empty() ? "-" : bytes});
  }
  PrintTable({"SESSION", "PID", "UID", "COMM", "HANDLES", "FENCES", "HELD", "QUEUED", "CONNECTED",
              "BYTES"},
             rows);
  return 0;
}

std::string FenceAge(const google::protobuf::Timestamp& since);
std::string Lower(std::string name, absl::string_view prefix);

// "1920x1080 NV12" for a frame, "-" otherwise.
std::string FrameText(const bufferd::v1::BufferInfo& b) {
  if (!b.has_frame()) return "-";
  return absl::StrCat(b.frame().width(), "x", b.frame().height(), " ",
                      bufferd::FourccName(b.frame().fourcc()));
}

int Buffers(const bufferd::Client& client, bool json, const std::string& heap) {
  bufferd::v1::ListBuffersRequest request;
  request.set_heap(heap);
  auto buffers = client.ListBuffers(request);
  if (!buffers.ok()) return Fail(buffers.status());
  if (!heap.empty() && buffers->buffers_size() == 0) {
    // An empty table would not say whether the heap exists.
    auto heaps = client.ListHeaps();
    if (!heaps.ok()) return Fail(heaps.status());
    std::vector<std::string> names;
    for (const auto& h : heaps->heaps()) names.push_back(h.name());
    if (std::find(names.begin(), names.end(), heap) == names.end()) {
      return Fail(absl::NotFoundError(
          absl::StrCat("no heap '", heap, "' (heaps: ", absl::StrJoin(names, ", "), ")")));
    }
  }
  if (json) return PrintJson(*buffers);
  std::vector<Row> rows;
  for (const auto& entry : buffers->buffers()) {
    const auto& b = entry.buffer();
    std::string holders;
    for (const auto& h : entry.holders()) {
      // ro: the kernel enforces it for this holder; ro?: it does not (the
      // holder is root or the daemon's uid and could reopen it writable).
      absl::StrAppend(&holders, holders.empty() ? "" : " ", h.comm(), "[", h.pid(), "]",
                      h.access() == bufferd::v1::ACCESS_READ_WRITE ? ":rw"
                      : h.read_only_enforced()                     ? ":ro"
                                                                   : ":ro?");
    }
    std::vector<std::string> notes;
    if (b.frozen()) notes.push_back("frozen");
    if (entry.sigbus_risk()) notes.push_back("sigbus-risk");
    if (entry.punched_bytes() != 0) {
      notes.push_back(absl::StrCat("punched ", Bytes(entry.punched_bytes())));
    }
    // Unsignalled fences: what an access waits for, and who must signal.
    std::string fences = entry.fences_size() == 0 ? "-" : "";
    for (int i = 0; i < entry.fences_size() && i < 2; ++i) {
      const auto& f = entry.fences(i);
      absl::StrAppend(&fences, i == 0 ? "" : " ",
                      Lower(bufferd::v1::FenceUsage_Name(f.usage()), "fence_usage_"), ":",
                      f.fence_id(), "@",
                      f.owner_pid() != 0 ? absl::StrCat(f.owner_comm(), "[", f.owner_pid(), "]")
                                         : absl::StrCat("session ", f.owner_session()),
                      ":", FenceAge(f.created_at()));
    }
    if (entry.fences_size() > 2) absl::StrAppend(&fences, " +", entry.fences_size() - 2);
    rows.push_back({absl::StrCat(b.buffer_id()), b.heap(), Bytes(b.size()), FrameText(b),
                    BackingName(b.backing()), b.name().empty() ? "-" : b.name(),
                    absl::StrCat(b.creator_session()), Age(b.created_at()), fences, holders,
                    notes.empty() ? "-" : absl::StrJoin(notes, ", ")});
  }
  PrintTable({"ID", "HEAP", "SIZE", "FORMAT", "BACKING", "NAME", "CREATOR", "AGE", "FENCES",
              "HOLDERS", "NOTES"},
             rows);
  return 0;
}

absl::Time ToTime(const google::protobuf::Timestamp& t) {
  return absl::FromUnixNanos(google::protobuf::util::TimeUtil::TimestampToNanoseconds(t));
}

// "3.2s" from now, "-1.5s" (past), to 100 ms.
std::string FromNow(const google::protobuf::Timestamp& t) {
  return absl::FormatDuration(absl::Trunc(ToTime(t) - absl::Now(), absl::Milliseconds(100)));
}

// Fences live for frames: their age to the millisecond under 10 s.
std::string FenceAge(const google::protobuf::Timestamp& since) {
  const absl::Duration age = absl::Now() - ToTime(since);
  return absl::FormatDuration(
      absl::Trunc(age, age < absl::Seconds(10) ? absl::Milliseconds(1) : absl::Seconds(1)));
}

std::string Lower(std::string name, absl::string_view prefix) {
  std::transform(name.begin(), name.end(), name.begin(), ::tolower);
  return absl::StartsWith(name, prefix) ? name.substr(prefix.size()) : name;
}

int Fences(const bufferd::Client& client, bool json, bool pending_only, uint64_t owner,
           uint32_t limit) {
  bufferd::v1::ListFencesRequest request;
  if (pending_only) request.set_state(bufferd::v1::FENCE_STATE_PENDING);
  request.set_owner_session(owner);
  request.set_limit(limit);
  auto fences = client.ListFences(request);
  if (!fences.ok()) return Fail(fences.status());
  if (json) return PrintJson(*fences);
  std::vector<Row> rows;
  for (const auto& f : fences->fences()) {
    const bool pending = f.state() == bufferd::v1::FENCE_STATE_PENDING;
    const std::string owner_name =
        f.owner_pid() != 0 ? absl::StrCat(f.owner_comm(), "[", f.owner_pid(), "]")
                           : absl::StrCat("session ", f.owner_session(), " (gone)");
    rows.push_back(
        {absl::StrCat(f.fence_id()), f.name().empty() ? "-" : f.name(),
         f.timeline().empty() ? "-" : f.timeline(),
         Lower(bufferd::v1::FenceKind_Name(f.kind()), "fence_kind_"), owner_name,
         pending ? "pending" : Lower(bufferd::v1::FenceStatus_Name(f.status()), "fence_status_"),
         FenceAge(f.created_at()), absl::StrCat(f.waiters()), absl::StrCat(f.exported_fds()),
         pending ? FromNow(f.deadline()) : "-",
         pending && f.has_need_by() ? FromNow(f.need_by()) : "-",
         f.message().empty() ? "-" : f.message()});
  }
  // Pending first, oldest first: what holds a frame up is at the top.
  const bool cut = static_cast<uint32_t>(fences->fences_size()) == (limit != 0 ? limit : 10000u);
  PrintTable({"ID", "NAME", "TIMELINE", "KIND", "OWNER", "STATUS", "AGE", "WAITERS", "EXPORTED",
              "DEADLINE IN", "NEEDED IN", "MESSAGE"},
             rows);
  if (cut) std::cout << "(the first " << rows.size() << " fences; --limit N for another cut)\n";
  if (fences->timelines_size() == 0) return 0;
  // Timelines: where each stands and who waits on what, for how long.
  std::vector<Row> timelines;
  for (const auto& t : fences->timelines()) {
    const std::string owner_name =
        t.owner_pid() != 0 ? absl::StrCat(t.owner_comm(), "[", t.owner_pid(), "]")
        : t.owner_session() != 0 ? absl::StrCat("session ", t.owner_session())
                                 : "-";
    std::string waits;
    for (int i = 0; i < t.waits_size() && i < 4; ++i) {
      absl::StrAppend(&waits, i == 0 ? "" : " ", t.waits(i).point(), "@",
                      FenceAge(t.waits(i).since()));
    }
    if (t.waits_size() > 4) absl::StrAppend(&waits, " +", t.waits_size() - 4);
    // Points that wait on a fence (ImportFenceAsPoint): a frame stuck there
    // is stuck on that fence (bufctl fences lists it above).
    std::string behind;
    for (int i = 0; i < t.promised_points_size() && i < 4; ++i) {
      absl::StrAppend(&behind, i == 0 ? "" : " ", t.promised_points(i));
    }
    if (t.promised_points_size() > 4) absl::StrAppend(&behind, " +", t.promised_points_size() - 4);
    timelines.push_back(
        {absl::StrCat(t.timeline_id()), t.name().empty() ? "-" : t.name(), owner_name,
         t.ended() == 0 ? "live" : Lower(bufferd::v1::FenceStatus_Name(t.ended()), "fence_status_"),
         absl::StrCat(t.reached()), waits.empty() ? "-" : waits,
         t.waits_size() > 0 ? FromNow(t.waits(0).fails_at()) : "-",
         t.has_need_by() ? FromNow(t.need_by()) : "-",
         absl::StrCat(t.wakers(), t.notify_fds() > 0 ? absl::StrCat(" (", t.notify_fds(), " fd)")
                                                     : ""),
         behind.empty() ? "-" : behind, absl::StrCat(t.exported_points()),
         absl::StrCat(t.deadline_failures()), absl::StrCat(t.holders()), FenceAge(t.created_at())});
  }
  std::cout << "\n";
  PrintTable({"TIMELINE", "NAME", "OWNER", "STATE", "POINT", "WAITED (POINT@AGE)", "FAILS IN",
              "NEEDED IN", "WAKERS", "BEHIND FENCES", "EXPORTED", "DEADLINE FAILS", "HOLDERS",
              "AGE"},
             timelines);
  return 0;
}

// bufctl why BUFFER: what a read and a write of it would wait for right
// now, and who must signal each.
int Why(const bufferd::Client& client, bool json, uint64_t buffer_id) {
  auto buffers = client.ListBuffers({});
  if (!buffers.ok()) return Fail(buffers.status());
  const bufferd::v1::BufferDebugInfo* entry = nullptr;
  for (const auto& candidate : buffers->buffers()) {
    if (candidate.buffer().buffer_id() == buffer_id) entry = &candidate;
  }
  if (entry == nullptr) {
    std::cerr << "bufctl: no buffer " << buffer_id << " (bufctl buffers lists them)\n";
    return 1;
  }
  if (json) return PrintJson(*entry);
  const auto& b = entry->buffer();
  std::cout << "buffer " << b.buffer_id() << " (" << (b.name().empty() ? "unnamed" : b.name())
            << ", " << b.heap() << ", " << Bytes(b.size()) << ")\n";
  for (const auto usage :
       {bufferd::v1::FENCE_USAGE_READ, bufferd::v1::FENCE_USAGE_WRITE}) {
    std::vector<const bufferd::v1::FenceInfo*> waits;
    for (const auto& f : entry->fences()) {
      if (bufferd::AccessWaitsFor(usage, f.usage())) waits.push_back(&f);
    }
    std::cout << (usage == bufferd::v1::FENCE_USAGE_READ ? "a read" : "a write");
    if (waits.empty()) {
      std::cout << " would start now: no fence holds it\n";
      continue;
    }
    std::cout << " waits for " << waits.size() << (waits.size() == 1 ? " fence" : " fences")
              << ":\n";
    for (const auto* f : waits) {
      const std::string owner =
          f->owner_pid() != 0 ? absl::StrCat(f->owner_comm(), "[", f->owner_pid(), "]")
                              : absl::StrCat("session ", f->owner_session());
      std::string who;
      switch (f->kind()) {
        case bufferd::v1::FENCE_KIND_CREATED:
          who = absl::StrCat("signalled by ", owner);
          break;
        case bufferd::v1::FENCE_KIND_TIMELINE_POINT:
          who = absl::StrCat("reached when timeline '", f->timeline(), "' reaches ", f->name(),
                             " (its owner signals it; attached by ", owner, ")");
          break;
        case bufferd::v1::FENCE_KIND_MERGED:
          who = absl::StrCat("signalled when its inputs are (merged by ", owner, ")");
          break;
        default:
          who = absl::StrCat("signalled when its fd polls readable (imported by ", owner, ")");
      }
      std::cout << "  " << Lower(bufferd::v1::FenceUsage_Name(f->usage()), "fence_usage_")
                << " fence " << f->fence_id()
                << (f->name().empty() ? "" : absl::StrCat(" '", f->name(), "'")) << ": " << who
                << "; pending " << FenceAge(f->created_at()) << ", fails in "
                << FromNow(f->deadline()) << "\n";
    }
  }
  return 0;
}

// "12M" -> 12 MiB; digits with an optional K, M or G (binary).
absl::StatusOr<uint64_t> ParseSize(absl::string_view text) {
  uint64_t unit = 1;
  if (!text.empty()) {
    switch (absl::ascii_toupper(static_cast<unsigned char>(text.back()))) {
      case 'K':
        unit = uint64_t{1} << 10;
        break;
      case 'M':
        unit = uint64_t{1} << 20;
        break;
      case 'G':
        unit = uint64_t{1} << 30;
        break;
      default:
        break;
    }
    if (unit != 1) text.remove_suffix(1);
  }
  uint64_t value = 0;
  if (!absl::SimpleAtoi(text, &value) || value > UINT64_MAX / unit) {
    return absl::InvalidArgumentError(
        "--size must be a number of bytes, optionally with K, M or G (binary)");
  }
  return value * unit;
}

// "3840x2160:NV12[:ALIGNMENT]".
absl::StatusOr<bufferd::FrameRequest> ParseFrame(absl::string_view text) {
  const std::vector<std::string> parts = absl::StrSplit(text, absl::ByAnyChar("x:"));
  bufferd::FrameRequest frame;
  std::optional<uint32_t> fourcc =
      parts.size() >= 3 ? bufferd::FourccByName(parts[2]) : std::nullopt;
  if (parts.size() < 3 || parts.size() > 4 || !absl::SimpleAtoi(parts[0], &frame.width) ||
      !absl::SimpleAtoi(parts[1], &frame.height) || !fourcc.has_value() ||
      (parts.size() == 4 && !absl::SimpleAtoi(parts[3], &frame.stride_alignment))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--frame must be WIDTHxHEIGHT:FOURCC[:STRIDE_ALIGNMENT], e.g. 1920x1080:NV12; FOURCC is "
        "one of ",
        bufferd::SupportedFourccs()));
  }
  frame.fourcc = *fourcc;
  return frame;
}

// Exit status: 0 if the allocation would succeed now, 4 if not, 1 for an
// error (a bad request, no daemon); 2 for a bad command line, as for every
// bufctl command.
int CanAllocate(const bufferd::Client& client, bool json, const std::vector<std::string>& heaps,
                const std::string& usage, const std::string& size, const std::string& frame,
                uint32_t count) {
  bufferd::AllocateOptions options;
  if (heaps.size() == 1) {
    options.heap = heaps[0];
  } else {
    options.heaps = heaps;
  }
  options.usage = usage;
  if (!frame.empty()) {
    absl::StatusOr<bufferd::FrameRequest> parsed = ParseFrame(frame);
    if (!parsed.ok()) return Fail(parsed.status());
    options.frame = *parsed;
  }
  if (!size.empty()) {
    absl::StatusOr<uint64_t> parsed = ParseSize(size);
    if (!parsed.ok()) return Fail(parsed.status());
    options.size = *parsed;
  }
  if (options.frame.has_value() == !size.empty()) {
    return Fail(absl::InvalidArgumentError("give one of --frame and --size"));
  }
  auto answer = client.CanAllocate(options, count);
  if (!answer.ok()) return Fail(answer.status());
  const int status = answer->ok() ? 0 : 4;
  if (json) return PrintJson(*answer) == 0 ? status : 1;
  if (answer->ok()) {
    std::cout << "yes: heap '" << answer->heap() << "', "
              << (count > 1 ? absl::StrCat(count, " x ") : "") << Bytes(answer->size()) << "\n";
  } else {
    std::cout << "no: " << answer->message() << "\n";
  }
  if (answer->has_frame()) {
    const auto& f = answer->frame();
    std::cout << "frame " << f.width() << "x" << f.height() << " "
              << bufferd::FourccName(f.fourcc()) << " LINEAR, " << f.size() << " bytes\n";
    for (int p = 0; p < f.planes_size(); ++p) {
      std::cout << "  plane " << p << ": offset " << f.planes(p).offset() << ", stride "
                << f.planes(p).stride() << ", " << f.planes(p).size() << " bytes\n";
    }
  }
  if (answer->ok()) {
    for (const auto& skip : answer->skipped()) {
      std::cout << "skipped " << skip.heap() << " ("
                << Lower(bufferd::v1::SkipReason_Name(skip.reason()), "skip_reason_")
                << "): " << skip.message() << "\n";
    }
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bufctl: inspect a running bufferd"};
  std::string socket_dir = bufferd::DefaultSocketDir();
  bool json = false;
  std::string heap;
  double interval = 1.0;
  app.add_option("--socket-dir", socket_dir, "bufferd's socket dir")
      ->envname("BUFFERD_SOCKET_DIR")
      ->capture_default_str();
  app.add_flag("--json", json, "print protobuf JSON instead of a table");
  app.require_subcommand(1);
  app.footer(R"(Examples:
  bufctl heaps                       heaps: capacity, used, free, peak (human units)
  bufctl heaps --json                the same as protobuf JSON (exact bytes)
  bufctl clients                     who is connected and what each holds
  bufctl buffers --heap carveout     buffers of one heap, with their holders
  bufctl fences --pending            what is pending, oldest first, and who must signal
  bufctl why 42                      what a read or a write of buffer 42 waits for
  bufctl can-allocate --usage camera_frame --frame 3840x2160:NV12 --count 3
  BUFFERD_SOCKET_DIR=/run/bufferd bufctl metrics

Options go before or after the command. The socket dir is --socket-dir, else
$BUFFERD_SOCKET_DIR, else $XDG_RUNTIME_DIR/bufferd (/run/bufferd as root).
Debug calls are for operators: the daemon's uid, root, and the config's
debug_uids and debug_groups.
Exit status: 0 ok; 1 an error (the daemon's code and message on stderr);
2 a bad command line; can-allocate: 4 when the allocation would fail.)");
  // --socket-dir and --json before or after the subcommand alike.
  app.fallthrough();
  auto* heaps = app.add_subcommand("heaps", "heaps: capacity, used, peak, failures, backing");
  auto* clients = app.add_subcommand("clients", "sessions: pid, uid, comm, bytes per heap");
  auto* buffers = app.add_subcommand("buffers", "buffers: size, backing, name, holders");
  buffers->add_option("--heap", heap, "only this heap");
  auto* fences = app.add_subcommand(
      "fences", "fences: pending first (oldest first), owner, waiters, time to deadline; then "
                "timelines: point reached, points waited on and for how long");
  bool pending_only = false;
  uint64_t owner = 0;
  uint32_t limit = 0;
  fences->add_flag("--pending", pending_only, "only pending fences");
  fences->add_option("--owner", owner, "only fences this session owns");
  fences->add_option("--limit", limit, "at most this many rows");
  auto* why = app.add_subcommand(
      "why", "what a read and a write of BUFFER would wait for now, and who must signal");
  uint64_t why_buffer = 0;
  why->add_option("BUFFER", why_buffer, "buffer id (bufctl buffers)")->required();
  auto* can = app.add_subcommand(
      "can-allocate",
      "would an allocation succeed now, on which heap, with which plane layout; or every reason "
      "why not (exit 0: yes, 4: no, 1: error)");
  std::vector<std::string> can_heaps;
  std::string can_usage, can_size, can_frame;
  uint32_t can_count = 1;
  can->add_option("--heap", can_heaps, "heap to try (repeat for a list, tried in order)");
  can->add_option("--usage", can_usage, "a usage from the daemon's config (camera_frame, ...)");
  can->add_option("--size", can_size, "bytes (K, M, G: binary units)");
  can->add_option("--frame", can_frame,
                  "WIDTHxHEIGHT:FOURCC[:STRIDE_ALIGNMENT], e.g. 3840x2160:NV12");
  can->add_option("--count", can_count, "that many buffers (AllocateSet)")
      ->check(CLI::Range(1u, 0xffffffffu))
      ->capture_default_str();
  auto* metrics = app.add_subcommand("metrics", "Prometheus text metrics");
  auto* watch = app.add_subcommand("watch", "live view of heaps and clients (Ctrl-C stops)");
  watch->add_option("--interval", interval, "seconds between refreshes")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; a bad command line exits 2, never one of
    // CLI11's own codes.
    return app.exit(e) == 0 ? 0 : 2;
  }

  absl::StatusOr<bufferd::Client> client = bufferd::Client::Connect(socket_dir);
  if (!client.ok()) return Fail(client.status());
  if (*heaps) return Heaps(*client, json);
  if (*clients) return Clients(*client, json);
  if (*buffers) return Buffers(*client, json, heap);
  if (*fences) return Fences(*client, json, pending_only, owner, limit);
  if (*why) return Why(*client, json, why_buffer);
  if (*can) {
    return CanAllocate(*client, json, can_heaps, can_usage, can_size, can_frame, can_count);
  }
  if (*metrics) {
    auto text = client->Metrics();
    if (!text.ok()) return Fail(text.status());
    std::cout << *text;
    return 0;
  }
  if (*watch) {
    while (true) {
      std::cout << "\033[H\033[2J"
                << "bufferd in " << socket_dir << " at "
                << absl::FormatTime("%H:%M:%S", absl::Now(), absl::LocalTimeZone()) << "\n\n";
      if (Heaps(*client, false) != 0) return 1;
      std::cout << "\n";
      if (Clients(*client, false) != 0) return 1;
      std::cout << "\n";
      if (Fences(*client, false, /*pending_only=*/true, 0, /*limit=*/10) != 0) return 1;
      std::cout << std::flush;
      std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<int>(interval * 1000)));
    }
  }
  return 0;
}
