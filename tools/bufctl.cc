// bufctl: inspect a running bufferd. Built on the client library only.
//
//   bufctl heaps | clients | buffers [--heap H] [--session S] | tokens | metrics
//   bufctl fences [--pending] [--owner S] [--limit N] | why BUFFER
//   bufctl holders            every process holding an fd or a mapping of a buffer
//   bufctl watch [--interval SECONDS]
//   bufctl can-allocate --usage camera_frame --frame 3840x2160:NV12 [--count 3]
//   bufctl end-session SESSION   (root and the daemon's uid only)
//   bufctl heaps --json     (protobuf JSON instead of a table; options go anywhere)
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/client_text.h"
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

// Protobuf JSON with every field, zero-valued ones too (root's uid 0, used
// 0): a reader never has to guess what a missing field means. One line
// when `compact` (watch prints one snapshot a line).
template <typename Message>
int PrintJson(const Message& message, bool compact = false) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = !compact;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  if (!google::protobuf::util::MessageToJsonString(message, &json, options).ok()) return 1;
  std::cout << json << (compact ? "\n" : "");
  return 0;
}

// "comm[pid]", with " exited" when that process is gone.
std::string ProcessText(uint32_t pid, const std::string& comm, bool exited) {
  if (pid == 0) return "-";
  return absl::StrCat(comm, "[", pid, "]", exited ? " exited" : "");
}

int Fail(const absl::Status& status) {
  std::cerr << "bufctl: " << status << "\n";
  return 1;
}

void PrintHeaps(const bufferd::v1::ListHeapsResponse* heaps);

int Heaps(const bufferd::Client& client, bool json) {
  auto heaps = client.ListHeaps();
  if (!heaps.ok()) return Fail(heaps.status());
  if (json) return PrintJson(*heaps);
  PrintHeaps(&*heaps);
  return 0;
}

void PrintHeaps(const bufferd::v1::ListHeapsResponse* heaps) {
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
    if (!h.buffers_by_backing().empty() &&
        !(h.buffers_by_backing().size() == 1 && h.buffers_by_backing().contains(backing))) {
      std::map<std::string, uint64_t> live(h.buffers_by_backing().begin(),
                                           h.buffers_by_backing().end());
      std::vector<std::string> names;
      if (live.contains(backing)) names.push_back(backing);
      for (const auto& [name, count] : live) {
        if (name != backing) names.push_back(name);
      }
      backing = absl::StrCat(absl::StrJoin(names, "+"),
                             live.contains(backing) ? "" : absl::StrCat(" (wants ", backing, ")"));
    }
    rows.push_back(
        {h.name(), type, backing, Bytes(h.page_size()), h.capacity() ? Bytes(h.capacity()) : "-",
         Bytes(h.used()), Bytes(h.free()), Bytes(h.peak()), absl::StrCat(h.buffer_count()),
         absl::StrCat(h.failures()), pool,
         h.type() == bufferd::v1::HEAP_TYPE_CARVEOUT
             ? absl::StrCat(Bytes(h.reserved_resident()), h.locked() ? " locked" : "")
             : "-",
         by_backing.empty() || h.note().empty() ? absl::StrCat(by_backing, h.note())
                                                : absl::StrCat(by_backing, "; ", h.note())});
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
      "fds %d/%d (exports %d, sessions %d, control connections %d, in flight %d, fences %d, "
      "fence pages %d); %d per uid, %d of RLIMIT_NOFILE %d kept for the daemon\n",
      heaps->live_buffers(), heaps->live_handles(), heaps->pending_tokens(), fds.in_use(),
      fds.budget(), fds.exports(), fds.sessions(), fds.control_connections(), fds.deliveries(),
      fds.fences(), fds.fence_pages(), fds.per_uid(), fds.reserve(), fds.rlimit_nofile());
}

std::string HeapBytesText(const google::protobuf::RepeatedPtrField<bufferd::v1::HeapBytes>& bytes) {
  std::string text;
  for (const auto& b : bytes) {
    absl::StrAppend(&text, text.empty() ? "" : " ", b.heap(), "=", Bytes(b.bytes()));
  }
  return text.empty() ? "-" : text;
}

void PrintClients(const bufferd::v1::ListClientsResponse& clients) {
  std::vector<Row> rows;
  for (const auto& c : clients.clients()) {
    rows.push_back({absl::StrCat(c.session_id()), absl::StrCat(c.pid()), absl::StrCat(c.uid()),
                    c.comm(), absl::StrCat(c.handles()), absl::StrCat(c.fences()),
                    absl::StrCat(c.fences_held()), absl::StrCat(c.queued_deliveries()),
                    Age(c.connected_since()), HeapBytesText(c.bytes()), HeapBytesText(c.held())});
  }
  PrintTable({"SESSION", "PID", "UID", "COMM", "HANDLES", "FENCES", "FENCES HELD", "QUEUED",
              "CONNECTED", "CHARGED", "HELD"},
             rows);
  // Charged is what the quotas count: each session pays for every buffer
  // it holds, so a buffer two sessions of a uid hold is charged twice to
  // the uid; held counts each distinct buffer once.
  bool differs = false;
  for (const auto& u : clients.uids()) differs |= u.charged() != u.held();
  if (clients.uids_size() == 0) return;
  std::cout << "\n";
  std::vector<Row> uids;
  for (const auto& u : clients.uids()) {
    uids.push_back(
        {absl::StrCat(u.uid()), absl::StrCat(u.sessions()), Bytes(u.charged()), Bytes(u.held())});
  }
  PrintTable({"UID", "SESSIONS", "CHARGED", "HELD"}, uids);
  if (differs) {
    std::cout << "(charged > held: buffers held by more than one session of a uid are charged "
                 "to each session)\n";
  }
}

int Clients(const bufferd::Client& client, bool json) {
  auto clients = client.ListClients();
  if (!clients.ok()) return Fail(clients.status());
  if (json) return PrintJson(*clients);
  PrintClients(*clients);
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

int Buffers(const bufferd::Client& client, bool json, const std::string& heap, uint64_t session) {
  bufferd::v1::ListBuffersRequest request;
  request.set_heap(heap);
  request.set_session_id(session);
  auto buffers = client.ListAllBuffers(request);
  // An unknown heap is the daemon's NOT_FOUND, naming the heaps.
  if (!buffers.ok()) return Fail(buffers.status());
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
                    absl::StrCat(b.creator_session(), " ",
                                 ProcessText(entry.creator_pid(), entry.creator_comm(),
                                             entry.creator_exited())),
                    Age(b.created_at()), fences, holders.empty() ? "-" : holders,
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

// The tables from responses (watch prints them from one snapshot).
void PrintFences(const bufferd::v1::ListFencesResponse* fences, uint32_t limit);

int Fences(const bufferd::Client& client, bool json, bool pending_only, uint64_t owner,
           uint32_t limit) {
  bufferd::v1::ListFencesRequest request;
  if (pending_only) request.set_state(bufferd::v1::FENCE_STATE_PENDING);
  request.set_owner_session(owner);
  // No --limit: every page, 1,000 fences each (the first alone lists the
  // timelines).
  request.set_limit(limit != 0 ? limit : 1000);
  auto fences = client.ListFences(request);
  if (!fences.ok()) return Fail(fences.status());
  for (std::string next = fences->next_page_token(); limit == 0 && !next.empty();) {
    request.set_page_token(next);
    auto page = client.ListFences(request);
    if (!page.ok()) return Fail(page.status());
    for (auto& fence : *page->mutable_fences()) *fences->add_fences() = std::move(fence);
    next = page->next_page_token();
  }
  if (limit == 0) fences->clear_next_page_token();
  if (owner != 0 && fences->fences_size() == 0 && fences->timelines_size() == 0) {
    // An empty table would not say whether the session exists.
    auto clients = client.ListClients();
    if (!clients.ok()) return Fail(clients.status());
    const bool open = std::any_of(clients->clients().begin(), clients->clients().end(),
                                  [&](const auto& c) { return c.session_id() == owner; });
    if (!open) {
      return Fail(absl::NotFoundError(absl::StrCat(
          "no session ", owner, " is open or owns a fence (bufctl clients lists sessions)")));
    }
  }
  if (json) return PrintJson(*fences);
  PrintFences(&*fences, limit);
  return 0;
}

void PrintFences(const bufferd::v1::ListFencesResponse* fences, uint32_t limit) {
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
  const bool cut = limit != 0 && static_cast<uint32_t>(fences->fences_size()) == limit;
  PrintTable({"ID", "NAME", "TIMELINE", "KIND", "OWNER", "STATUS", "AGE", "WAITERS", "EXPORTED",
              "DEADLINE IN", "NEEDED IN", "MESSAGE"},
             rows);
  if (cut) std::cout << "(the first " << rows.size() << " fences; --limit N for another cut)\n";
  if (fences->timelines_size() == 0) return;
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
  PrintTable(
      {"TIMELINE", "NAME", "OWNER", "STATE", "POINT", "WAITED (POINT@AGE)", "FAILS IN", "NEEDED IN",
       "WAKERS", "BEHIND FENCES", "EXPORTED", "DEADLINE FAILS", "HOLDERS", "AGE"},
      timelines);
}

// bufctl why BUFFER: what a read and a write of it would wait for right
// now, and who must signal each.
int Why(const bufferd::Client& client, bool json, uint64_t buffer_id) {
  // A page of one, starting right before it.
  bufferd::v1::ListBuffersRequest request;
  request.set_page_size(1);
  if (buffer_id > 1) request.set_page_token(absl::StrCat(buffer_id - 1));
  auto buffers = client.ListBuffers(request);
  if (!buffers.ok()) return Fail(buffers.status());
  const bufferd::v1::BufferDebugInfo* entry = nullptr;
  for (const auto& candidate : buffers->buffers()) {
    if (candidate.buffer().buffer_id() == buffer_id) entry = &candidate;
  }
  if (entry == nullptr) {
    std::cerr << "bufctl: NOT_FOUND: no buffer " << buffer_id << " (bufctl buffers lists them)\n";
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
  const absl::string_view original = text;
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
  if (!bufferd::AllDigits(text) || !absl::SimpleAtoi(text, &value) || value > UINT64_MAX / unit) {
    return absl::InvalidArgumentError(
        absl::StrCat("--size '", absl::CHexEscape(original),
                     "' is not a whole number of bytes, optionally with K, M ",
                     "or G (binary units), that fits in 64 bits"));
  }
  return value * unit;
}

// "3840x2160:NV12[:ALIGNMENT]". A bad --frame (or --size, above) names what
// is wrong in it. (The daemon judges the
// values: a zero width, a stride alignment that is no power of two.)
absl::StatusOr<bufferd::FrameRequest> ParseFrame(absl::string_view text) {
  const std::string shown = absl::StrCat("--frame '", absl::CHexEscape(text), "'");
  // WIDTHxHEIGHT, then :FOURCC, then an optional :STRIDE_ALIGNMENT.
  const std::vector<std::string> fields = absl::StrSplit(text, ':');
  const std::vector<std::string> size = absl::StrSplit(fields[0], absl::ByAnyChar("xX"));
  if (fields.size() < 2 || fields.size() > 3 || size.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        shown, " is not WIDTHxHEIGHT:FOURCC[:STRIDE_ALIGNMENT] (e.g. 1920x1080:NV12)"));
  }
  auto number = [&](const std::string& digits, const char* what, uint32_t& out) -> absl::Status {
    if (!bufferd::AllDigits(digits) || !absl::SimpleAtoi(digits, &out)) {
      return absl::InvalidArgumentError(
          absl::StrCat(shown, ": the ", what, " '", absl::CHexEscape(digits),
                       "' is not a whole number from 0 to 4294967295"));
    }
    return absl::OkStatus();
  };
  bufferd::FrameRequest frame;
  RETURN_IF_ERROR(number(size[0], "width", frame.width));
  RETURN_IF_ERROR(number(size[1], "height", frame.height));
  const std::optional<uint32_t> fourcc = bufferd::FourccByName(fields[1]);
  if (!fourcc.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(shown, ": unknown fourcc '",
                                                   absl::CHexEscape(fields[1]), "' (one of ",
                                                   bufferd::SupportedFourccs(), ")"));
  }
  frame.fourcc = *fourcc;
  if (fields.size() == 3) {
    RETURN_IF_ERROR(number(fields[2], "stride alignment", frame.stride_alignment));
  }
  return frame;
}

// can-allocate's request from its command line; INVALID_ARGUMENT naming
// what is wrong in it (a bad command line: exit status 2, before any daemon
// is asked).
absl::StatusOr<bufferd::AllocateOptions> CanAllocateOptions(const std::vector<std::string>& heaps,
                                                            bool usage_given,
                                                            const std::string& usage,
                                                            const std::string& size,
                                                            const std::string& frame) {
  // An empty name would leave the choice to the library's default heap.
  for (const std::string& heap : heaps) {
    if (heap.empty()) return absl::InvalidArgumentError("--heap is empty");
  }
  if (usage_given && usage.empty()) return absl::InvalidArgumentError("--usage is empty");
  bufferd::AllocateOptions options;
  if (heaps.size() == 1) {
    options.heap = heaps[0];
  } else {
    options.heaps = heaps;
  }
  options.usage = usage;
  if (!frame.empty()) {
    ASSIGN_OR_RETURN(options.frame, ParseFrame(frame));
  }
  if (!size.empty()) {
    ASSIGN_OR_RETURN(options.size, ParseSize(size));
  }
  if (options.frame.has_value() == !size.empty()) {
    return absl::InvalidArgumentError("give one of --frame and --size");
  }
  return options;
}

// Exit status: 0 if the allocation would succeed now, 4 if not, 1 for an
// error (a bad request, no daemon); 2 for a bad command line, as for every
// bufctl command.
int CanAllocate(const bufferd::Client& client, bool json, const bufferd::AllocateOptions& options,
                uint32_t count) {
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

// bufctl tokens: share tokens out and not redeemed. Never the token: it is
// the capability to take the buffer.
int Tokens(const bufferd::Client& client, bool json) {
  auto tokens = client.ListTokens();
  if (!tokens.ok()) return Fail(tokens.status());
  if (json) return PrintJson(*tokens);
  std::vector<Row> rows;
  for (const auto& t : tokens->tokens()) {
    rows.push_back(
        {absl::StrCat(t.buffer_id()), t.heap().empty() ? "-" : t.heap(),
         t.size() != 0 ? Bytes(t.size()) : "-", t.buffer_name().empty() ? "-" : t.buffer_name(),
         Lower(bufferd::v1::Access_Name(t.access()), "access_"), FromNow(t.expires_at()),
         absl::StrCat(t.exporter_session(), " ",
                      ProcessText(t.exporter_pid(), t.exporter_comm(), t.exporter_exited()))});
  }
  PrintTable({"BUFFER", "HEAP", "SIZE", "NAME", "ACCESS", "EXPIRES IN", "EXPORTER"}, rows);
  return 0;
}

// bufctl end-session: ends a stuck session as its disconnect would.
int EndSession(const bufferd::Client& client, bool json, uint64_t session_id) {
  auto ended = client.EndSession(session_id);
  if (!ended.ok()) return Fail(ended.status());
  if (json) return PrintJson(*ended);
  const auto& s = ended->session();
  std::cout << "ended session " << s.session_id() << " (" << s.comm() << "[" << s.pid() << "], uid "
            << s.uid() << "): ";
  if (ended->lingering()) {
    std::cout << "it takes no more calls, but fds the daemon sent it are still unread, so its "
              << s.handles()
              << " handles are released only once its client reads or drops them (kill the "
                 "client to end it now)\n";
    return 0;
  }
  std::cout << "its " << s.handles()
            << " handles are released; memory its process still maps stays until it unmaps "
               "(bufctl holders)\n";
  return 0;
}

// --- bufctl holders: who holds buffers' memory, from /proc ---------------

// The prefix the daemon names every buffer's memfd with
// (heaps/memfd.h: kBufferNamePrefix), as /proc/<pid>/maps and the fd links
// show it.
constexpr absl::string_view kMemfdPrefix = "/memfd:bufferd:";

struct MemfdKey {
  uint64_t dev = 0;
  uint64_t ino = 0;
  auto operator<=>(const MemfdKey&) const = default;
};

// "bufferd:system:frame0" from "/memfd:bufferd:system:frame0 (deleted)".
std::string MemfdName(absl::string_view path) {
  absl::ConsumePrefix(&path, "/memfd:");
  absl::ConsumeSuffix(&path, " (deleted)");
  return std::string(path);
}

// What one process holds of one memfd.
struct Held {
  std::string path;
  uint32_t fds = 0;
  uint32_t mappings = 0;
  uint64_t mapped = 0;
  uint64_t resident = 0;
  // st_blocks of the memfd, through one of the fds (0: mappings only).
  uint64_t allocated = 0;
};

// Reads /proc/<pid>/smaps and its fds: what the process holds of memfds
// that are the daemon's (`known`) or named like them. false: not allowed
// to look (another uid's process); a process that exits meanwhile holds
// nothing.
bool InspectProcess(const std::string& pid, const std::set<MemfdKey>& known,
                    std::map<MemfdKey, Held>& held) {
  const std::string root = absl::StrCat("/proc/", pid);
  // The kernel checks at open whether bufctl may trace the process
  // (EACCES if not); ENOENT: it exited.
  const std::string smaps_path = absl::StrCat(root, "/smaps");
  const int smaps_fd = ::open(smaps_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (smaps_fd < 0) return errno != EACCES;
  ::close(smaps_fd);  // readable: read it as a stream
  std::ifstream smaps(smaps_path);
  std::string line;
  Held* current = nullptr;
  while (std::getline(smaps, line)) {
    // A mapping's header: "start-end perms offset MAJ:MIN inode   path".
    const std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (f.size() >= 5 && absl::StrContains(f[0], '-') && absl::StrContains(f[3], ':') &&
        !absl::EndsWith(f[0], ":")) {
      current = nullptr;
      const std::vector<absl::string_view> range = absl::StrSplit(f[0], '-');
      const std::vector<absl::string_view> dev = absl::StrSplit(f[3], ':');
      uint64_t start = 0, end = 0, major_dev = 0, minor_dev = 0, ino = 0;
      if (range.size() != 2 || dev.size() != 2 || !absl::SimpleHexAtoi(range[0], &start) ||
          !absl::SimpleHexAtoi(range[1], &end) || !absl::SimpleHexAtoi(dev[0], &major_dev) ||
          !absl::SimpleHexAtoi(dev[1], &minor_dev) || !absl::SimpleAtoi(f[4], &ino) || ino == 0) {
        continue;
      }
      const size_t at = line.find(" /");
      const std::string path = at == std::string::npos ? "" : line.substr(at + 1);
      const MemfdKey key{
          ::makedev(static_cast<unsigned>(major_dev), static_cast<unsigned>(minor_dev)), ino};
      if (!known.contains(key) && !absl::StartsWith(path, kMemfdPrefix)) continue;
      current = &held[key];
      current->path = path;
      ++current->mappings;
      current->mapped += end - start;
      continue;
    }
    if (current == nullptr) continue;
    // Rss, and hugetlb pages (which Rss does not count).
    for (absl::string_view field : {"Rss:", "Shared_Hugetlb:", "Private_Hugetlb:"}) {
      if (!absl::StartsWith(line, field)) continue;
      uint64_t kb = 0;
      const std::vector<absl::string_view> v = absl::StrSplit(line, ' ', absl::SkipEmpty());
      if (v.size() >= 2 && absl::SimpleAtoi(v[1], &kb)) current->resident += kb * 1024;
    }
  }
  const std::string fd_dir = absl::StrCat(root, "/fd");
  DIR* dir = ::opendir(fd_dir.c_str());
  if (dir == nullptr) return errno != EACCES;
  while (struct dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    const std::string link = absl::StrCat(fd_dir, "/", entry->d_name);
    char target[512];
    const ssize_t n = ::readlink(link.c_str(), target, sizeof(target) - 1);
    if (n <= 0) continue;
    const std::string path(target, static_cast<size_t>(n));
    if (!absl::StartsWith(path, "/memfd:")) continue;
    struct stat st {};
    if (::stat(link.c_str(), &st) != 0) continue;
    const MemfdKey key{st.st_dev, st.st_ino};
    if (!known.contains(key) && !absl::StartsWith(path, kMemfdPrefix)) continue;
    Held& h = held[key];
    h.path = path;
    h.allocated = static_cast<uint64_t>(st.st_blocks) * 512;
    ++h.fds;
  }
  ::closedir(dir);
  return true;
}

absl::StatusOr<bufferd::v1::HoldersReport> FindHolders(const bufferd::Client& client) {
  bufferd::v1::ListBuffersRequest request;
  request.set_include_released(true);
  auto buffers = client.ListAllBuffers(request);
  if (!buffers.ok()) return buffers.status();
  std::map<MemfdKey, const bufferd::v1::BufferDebugInfo*> live;
  std::map<MemfdKey, const bufferd::v1::ReleasedBuffer*> released;
  std::set<MemfdKey> known;
  for (const auto& b : buffers->buffers()) {
    const MemfdKey key{b.memfd_dev(), b.memfd_inode()};
    live[key] = &b;
    known.insert(key);
  }
  for (const auto& r : buffers->released()) {
    const MemfdKey key{r.memfd_dev(), r.memfd_inode()};
    if (live.contains(key)) continue;  // an inode reused: the live buffer's
    released[key] = &r;
    known.insert(key);
  }
  bufferd::v1::HoldersReport report;
  report.set_daemon_pid(buffers->daemon_pid());
  const std::string self = absl::StrCat(::getpid());
  const std::string daemon = absl::StrCat(buffers->daemon_pid());
  DIR* proc = ::opendir("/proc");
  if (proc == nullptr) return bufferd::ErrnoError("opendir(/proc)", errno);
  while (struct dirent* entry = ::readdir(proc)) {
    const std::string pid = entry->d_name;
    uint32_t pid_number = 0;
    if (!absl::SimpleAtoi(pid, &pid_number) || pid == self || pid == daemon) continue;
    std::map<MemfdKey, Held> held;
    if (!InspectProcess(pid, known, held)) {
      report.set_uninspected_processes(report.uninspected_processes() + 1);
      continue;
    }
    if (held.empty()) continue;
    struct stat st {};
    ::stat(absl::StrCat("/proc/", pid).c_str(), &st);
    const std::string comm = bufferd::ReadComm(static_cast<pid_t>(pid_number));
    for (const auto& [key, h] : held) {
      bufferd::v1::ProcessHolding* out = report.add_holdings();
      out->set_pid(pid_number);
      out->set_comm(comm);
      out->set_uid(st.st_uid);
      out->set_memfd_dev(key.dev);
      out->set_memfd_inode(key.ino);
      out->set_fds(h.fds);
      out->set_mappings(h.mappings);
      out->set_mapped_bytes(h.mapped);
      out->set_resident_bytes(h.resident);
      out->set_allocated_bytes(h.allocated);
      if (auto l = live.find(key); l != live.end()) {
        const auto& b = l->second->buffer();
        out->set_state(bufferd::v1::ProcessHolding::STATE_LIVE);
        out->set_buffer_id(b.buffer_id());
        out->set_heap(b.heap());
        out->set_name(b.name());
        out->set_size(b.size());
      } else if (auto r = released.find(key); r != released.end()) {
        out->set_state(bufferd::v1::ProcessHolding::STATE_RELEASED);
        out->set_buffer_id(r->second->buffer_id());
        out->set_heap(r->second->heap());
        out->set_name(r->second->name());
        out->set_size(r->second->size());
      } else {
        // Named like ours, unknown to the daemon: only the name says so,
        // "bufferd:<heap>:<name>".
        out->set_state(bufferd::v1::ProcessHolding::STATE_UNVERIFIED);
        const std::vector<std::string> parts =
            absl::StrSplit(MemfdName(h.path), absl::MaxSplits(':', 2));
        if (parts.size() == 3) {
          out->set_heap(parts[1]);
          out->set_name(parts[2]);
        } else {
          out->set_name(MemfdName(h.path));
        }
      }
    }
  }
  ::closedir(proc);
  std::sort(report.mutable_holdings()->begin(), report.mutable_holdings()->end(),
            [](const auto& a, const auto& b) {
              return a.resident_bytes() != b.resident_bytes()
                         ? a.resident_bytes() > b.resident_bytes()
                         : a.pid() < b.pid();
            });
  return report;
}

int Holders(const bufferd::Client& client, bool json) {
  absl::StatusOr<bufferd::v1::HoldersReport> report = FindHolders(client);
  if (!report.ok()) return Fail(report.status());
  if (json) return PrintJson(*report);
  std::vector<Row> rows;
  uint64_t resident = 0, released_resident = 0, unverified_resident = 0;
  std::set<uint32_t> pids;
  for (const auto& h : report->holdings()) {
    pids.insert(h.pid());
    resident += h.resident_bytes();
    std::string state;
    switch (h.state()) {
      case bufferd::v1::ProcessHolding::STATE_LIVE:
        state = "live";
        break;
      case bufferd::v1::ProcessHolding::STATE_RELEASED:
        state = "released (every handle gone)";
        released_resident += h.resident_bytes();
        break;
      default:
        state = "not verified by the daemon";
        unverified_resident += h.resident_bytes();
    }
    rows.push_back({absl::StrCat(h.pid()), h.comm(), absl::StrCat(h.uid()),
                    h.buffer_id() != 0 ? absl::StrCat(h.buffer_id()) : "?",
                    h.heap().empty() ? "-" : h.heap(), h.name().empty() ? "-" : h.name(),
                    h.size() != 0 ? Bytes(h.size()) : "-",
                    h.mappings() == 0 ? "fd only" : Bytes(h.resident_bytes()),
                    h.mappings() == 0 ? "-" : Bytes(h.mapped_bytes()), absl::StrCat(h.fds()),
                    h.fds() == 0 ? "-" : Bytes(h.allocated_bytes()), state});
  }
  PrintTable({"PID", "COMM", "UID", "BUFFER", "HEAP", "NAME", "SIZE", "RESIDENT", "MAPPED", "FDS",
              "ALLOCATED", "STATE"},
             rows);
  std::cout << "\n"
            << pids.size() << (pids.size() == 1 ? " process holds " : " processes hold ")
            << Bytes(resident) << " resident in bufferd buffers";
  std::cout << ".\n";
  if (released_resident != 0) {
    std::cout << Bytes(released_resident)
              << " of it is in buffers whose every handle is released: bufctl heaps and "
                 "clients no longer count it.\n";
  }
  if (std::any_of(report->holdings().begin(), report->holdings().end(), [](const auto& h) {
        return h.state() == bufferd::v1::ProcessHolding::STATE_UNVERIFIED;
      })) {
    std::cout << Bytes(unverified_resident)
              << " is in memfds \"not verified by the daemon\": named like its buffers, but "
                 "not its inodes (released before the last 4096, another bufferd's, or a "
                 "client's look-alike).\n";
  }
  std::cout << "The daemon (pid " << report->daemon_pid()
            << ") holds no fd of a live buffer, only those share tokens keep until redeemed; it "
               "is not listed.\n";
  if (report->uninspected_processes() != 0) {
    const uint64_t n = report->uninspected_processes();
    std::cout << n << (n == 1 ? " process" : " processes") << " could not be inspected: "
              << (::geteuid() == 0 ? "their /proc entries are closed even to root here (another "
                                     "pid namespace's, or the container's init)"
                                   : "run as root to see them")
              << "\n";
  }
  return 0;
}

// --- bufctl watch ---------------------------------------------------------

// A call failed during watch: the daemon stopped (its fd.sock no longer
// listens), it ended this session, or another error.
int WatchFailed(const absl::Status& status, const std::string& socket_dir) {
  const absl::StatusCode code = status.code();
  if (code == absl::StatusCode::kCancelled || code == absl::StatusCode::kUnavailable ||
      code == absl::StatusCode::kUnauthenticated || code == absl::StatusCode::kAborted) {
    // A daemon that is stopping cancels calls and ends sessions a moment
    // before its sockets go: give it 2 s to be gone.
    const absl::Time give_up = absl::Now() + absl::Seconds(2);
    while (bufferd::UnixSocket::SeqPacketListening(bufferd::FdSocketPath(socket_dir))) {
      if (absl::Now() > give_up) break;
      absl::SleepFor(absl::Milliseconds(20));
    }
  }
  if (!bufferd::UnixSocket::SeqPacketListening(bufferd::FdSocketPath(socket_dir))) {
    std::cerr << "bufctl: bufferd at " << socket_dir << " stopped\n";
    return 1;
  }
  if (status.code() == absl::StatusCode::kUnauthenticated) {
    std::cerr << "bufctl: bufferd at " << socket_dir << " ended this session (" << status.message()
              << ")\n";
    return 1;
  }
  return Fail(status);
}

int Watch(const bufferd::Client& client, bool json, const std::string& socket_dir,
          absl::Duration interval) {
  // On a terminal, redraw in place; anything else (a file, a pipe) gets
  // plain snapshots one after another, never terminal escapes.
  const bool terminal = ::isatty(STDOUT_FILENO) == 1;
  while (true) {
    bufferd::v1::ListFencesRequest pending;
    pending.set_state(bufferd::v1::FENCE_STATE_PENDING);
    pending.set_limit(10);
    auto heaps = client.ListHeaps();
    if (!heaps.ok()) return WatchFailed(heaps.status(), socket_dir);
    auto clients = client.ListClients();
    if (!clients.ok()) return WatchFailed(clients.status(), socket_dir);
    auto fences = client.ListFences(pending);
    if (!fences.ok()) return WatchFailed(fences.status(), socket_dir);
    const absl::Time now = absl::Now();
    if (json) {
      bufferd::v1::WatchSnapshot snapshot;
      snapshot.mutable_at()->set_seconds(absl::ToUnixSeconds(now));
      *snapshot.mutable_heaps() = *std::move(heaps);
      *snapshot.mutable_clients() = *std::move(clients);
      *snapshot.mutable_fences() = *std::move(fences);
      if (PrintJson(snapshot, /*compact=*/true) != 0) return 1;
    } else {
      if (terminal) std::cout << "\033[H\033[2J";
      std::cout << (terminal ? "" : "=== ") << "bufferd in " << socket_dir << " at "
                << absl::FormatTime("%H:%M:%S", now, absl::LocalTimeZone()) << "\n\n";
      PrintHeaps(&*heaps);
      std::cout << "\n";
      PrintClients(*clients);
      std::cout << "\n";
      PrintFences(&*fences, 10);
      if (!terminal) std::cout << "\n";
    }
    std::cout << std::flush;
    absl::SleepFor(interval);
  }
}

// A whole number from `least` to T's maximum, in plain decimal: CLI11 alone
// takes "-1" or 2^64 for an unsigned and wraps or clamps it, so an id that
// is none would name another.
template <typename T>
CLI::Validator WholeNumber(T least = 0) {
  return CLI::Validator(
      [least](std::string& text) -> std::string {
        T value = 0;
        if (!bufferd::AllDigits(text) || !absl::SimpleAtoi(text, &value) || value < least) {
          return absl::StrCat("'", absl::CHexEscape(text), "' is not a whole number from ", least,
                              " to ", std::numeric_limits<T>::max());
        }
        return std::string();
      },
      "");
}

// The commands, for the message about a word that is none of them.
std::vector<std::string> CommandNames(const CLI::App& app) {
  std::vector<std::string> names;
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
    names.push_back(sub->get_name());
  }
  return names;
}

// The first word of the command line that is not an option or an option's
// value: the command ("" if none). Options that take a value: --socket-dir
// and the commands' own (--heap, --session, --owner, --limit, --interval,
// --usage, --size, --frame, --count).
std::string CommandWord(int argc, char** argv) {
  static const std::set<std::string> kTakesValue = {
      "--socket-dir", "--heap",  "--session", "--owner", "--limit",
      "--interval",   "--usage", "--size",    "--frame", "--count"};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--") return i + 1 < argc ? argv[i + 1] : "";
    if (absl::StartsWith(arg, "-")) {
      if (kTakesValue.contains(arg)) ++i;
      continue;
    }
    return arg;
  }
  return "";
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bufctl: inspect a running bufferd"};
  std::string socket_dir = bufferd::DefaultSocketDir();
  bool json = false;
  std::string heap;
  uint64_t buffers_session = 0;
  double interval = 1.0;
  app.add_option("--socket-dir", socket_dir, "bufferd's socket dir")
      ->envname("BUFFERD_SOCKET_DIR")
      ->capture_default_str();
  app.add_flag("--json", json, "print protobuf JSON (every field, zeros too) instead of a table");
  app.set_version_flag("--version", bufferd::VersionText("bufctl"));
  app.require_subcommand(1);
  app.footer(R"(Examples:
  bufctl heaps                       heaps: capacity, used, free, peak (human units)
  bufctl heaps --json                the same as protobuf JSON (exact bytes)
  bufctl clients                     sessions: bytes charged (quotas) and held (distinct)
  bufctl buffers --heap carveout     buffers of one heap, with creator and holders
  bufctl holders                     every process holding an fd or a mapping of a
                                     buffer, resident bytes, released buffers too
  bufctl tokens                      share tokens not yet imported (never the token)
  bufctl fences --pending            what is pending, oldest first, and who must signal
  bufctl why 42                      what a read or a write of buffer 42 waits for
  bufctl can-allocate --usage camera_frame --frame 3840x2160:NV12 --count 3
  bufctl end-session 7               end a stuck session (root or the daemon's uid)
  bufctl watch --interval 0.5        live view; plain snapshots when not a terminal
  BUFFERD_SOCKET_DIR=/run/bufferd bufctl metrics

Options go before or after the command; --json works with every command.
The socket dir is --socket-dir, else $BUFFERD_SOCKET_DIR, else
$XDG_RUNTIME_DIR/bufferd (/run/bufferd as root; /tmp/bufferd-<uid> without
$XDG_RUNTIME_DIR). A daemon started as root serves /run/bufferd.
Debug calls are for operators: the daemon's uid, root, and the config's
debug_uids and debug_groups; end-session only root and the daemon's uid.
holders reads /proc: as root it sees every process, else only your own.
Exit status: 0 ok; 1 an error (the daemon's code and message on stderr);
2 a bad command line; can-allocate: 4 when the allocation would fail.)");
  // --socket-dir and --json before or after the subcommand alike.
  app.fallthrough();
  auto* heaps = app.add_subcommand("heaps", "heaps: capacity, used, peak, failures, backing");
  auto* clients = app.add_subcommand(
      "clients", "sessions: pid, uid, comm, bytes charged and held per heap; per uid");
  auto* buffers = app.add_subcommand("buffers", "buffers: size, backing, name, creator, holders");
  buffers->add_option("--heap", heap, "only this heap");
  buffers->add_option("--session", buffers_session, "only buffers this session holds")
      ->check(WholeNumber<uint64_t>());
  auto* holders = app.add_subcommand(
      "holders",
      "every process holding an fd or a mapping of a buffer (from /proc), with resident bytes; "
      "buffers whose handles are all released too");
  auto* tokens = app.add_subcommand(
      "tokens", "share tokens not imported yet: buffer, access, expiry, exporter");
  auto* fences = app.add_subcommand(
      "fences", "fences: pending first (oldest first), owner, waiters, time to deadline; then "
                "timelines: point reached, points waited on and for how long");
  bool pending_only = false;
  uint64_t owner = 0;
  uint32_t limit = 0;
  fences->add_flag("--pending", pending_only, "only pending fences");
  fences->add_option("--owner", owner, "only fences this session owns")
      ->check(WholeNumber<uint64_t>());
  fences->add_option("--limit", limit, "only the first N fences (default: every one)")
      ->check(WholeNumber<uint32_t>());
  auto* why = app.add_subcommand(
      "why", "what a read and a write of BUFFER would wait for now, and who must signal");
  uint64_t why_buffer = 0;
  why->add_option("BUFFER", why_buffer, "buffer id (bufctl buffers)")
      ->required()
      ->check(WholeNumber<uint64_t>());
  auto* can = app.add_subcommand(
      "can-allocate",
      "would an allocation succeed now, on which heap, with which plane layout; or every reason "
      "why not (exit 0: yes, 4: no, 1: error)");
  std::vector<std::string> can_heaps;
  std::string can_usage, can_size, can_frame;
  uint32_t can_count = 1;
  can->add_option(
      "--heap", can_heaps,
      "heap to try (repeat for a list, tried in order; with no --heap or --usage: system)");
  CLI::Option* can_usage_given =
      can->add_option("--usage", can_usage, "a usage from the daemon's config (camera_frame, ...)");
  can->add_option("--size", can_size, "bytes (K, M, G: binary units)");
  can->add_option("--frame", can_frame,
                  "WIDTHxHEIGHT:FOURCC[:STRIDE_ALIGNMENT], e.g. 3840x2160:NV12");
  can->add_option("--count", can_count, "that many buffers (AllocateSet)")
      ->check(WholeNumber<uint32_t>(1))
      ->capture_default_str();
  auto* end = app.add_subcommand(
      "end-session",
      "end SESSION as its client's disconnect would: every handle released, its fences failed "
      "(root and the daemon's uid only)");
  uint64_t end_session = 0;
  end->add_option("SESSION", end_session, "session id (bufctl clients)")
      ->required()
      ->check(WholeNumber<uint64_t>());
  auto* metrics = app.add_subcommand("metrics", "Prometheus text metrics (--json: in a message)");
  auto* watch = app.add_subcommand(
      "watch",
      "live view of heaps, clients and pending fences (Ctrl-C stops); --json: one "
      "snapshot a line");
  watch->add_option("--interval", interval, "seconds between refreshes (at least 0.1)")
      ->capture_default_str();

  // A word that is no command: say which, and what the commands are
  // (CLI11 would only say one is required).
  bool asks_for_help = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    asks_for_help |= arg == "--help" || arg == "-h" || arg == "--version";
  }
  if (!asks_for_help) {
    const std::string word = CommandWord(argc, argv);
    const std::vector<std::string> names = CommandNames(app);
    if (std::find(names.begin(), names.end(), word) == names.end()) {
      std::cerr << "bufctl: "
                << (word.empty() ? std::string("a command is required")
                                 : absl::StrCat("unknown command '", absl::CEscape(word), "'"))
                << " (commands: " << absl::StrJoin(names, ", ") << "; bufctl --help)\n";
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; a bad command line exits 2, never one of
    // CLI11's own codes.
    return app.exit(e) == 0 ? 0 : 2;
  }
  absl::StatusOr<bufferd::AllocateOptions> can_options = absl::UnknownError("unused");
  if (*can) {
    can_options =
        CanAllocateOptions(can_heaps, can_usage_given->count() > 0, can_usage, can_size, can_frame);
    if (!can_options.ok()) {
      std::cerr << "bufctl: " << can_options.status().message() << "\n";
      return 2;
    }
  }
  if (*watch && !(interval >= 0.1)) {
    std::cerr << "bufctl: watch --interval must be at least 0.1 seconds (got " << interval << ")\n";
    return 2;
  }

  absl::StatusOr<bufferd::Client> client = bufferd::Client::Connect(socket_dir);
  if (!client.ok()) return Fail(client.status());
  if (*heaps) return Heaps(*client, json);
  if (*clients) return Clients(*client, json);
  if (*buffers) return Buffers(*client, json, heap, buffers_session);
  if (*holders) return Holders(*client, json);
  if (*tokens) return Tokens(*client, json);
  if (*fences) return Fences(*client, json, pending_only, owner, limit);
  if (*why) return Why(*client, json, why_buffer);
  if (*can) {
    return CanAllocate(*client, json, *can_options, can_count);
  }
  if (*end) return EndSession(*client, json, end_session);
  if (*metrics) {
    bufferd::v1::GetMetricsResponse response;
    auto text = client->Metrics();
    if (!text.ok()) return Fail(text.status());
    if (json) {
      response.set_text(*text);
      return PrintJson(response);
    }
    std::cout << *text;
    return 0;
  }
  if (*watch) return Watch(*client, json, socket_dir, absl::Seconds(interval));
  return 0;
}
