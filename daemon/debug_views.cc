#include "daemon/debug_views.h"

#include <unistd.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "base/client_text.h"
#include "base/errno_status.h"
#include "daemon/proto_convert.h"

namespace bufferd {
namespace {

// Who each session a page names is (while it is open), looked up in the
// SessionTable once each: a page costs its own sessions, not all of them.
class SessionsSeen {
 public:
  explicit SessionsSeen(const SessionTable& sessions) : sessions_(sessions) {}
  const std::optional<SessionTable::Identity>& operator()(uint64_t session) {
    auto it = seen_.find(session);
    if (it == seen_.end()) it = seen_.emplace(session, sessions_.Lookup(session)).first;
    return it->second;
  }

 private:
  const SessionTable& sessions_;
  std::map<uint64_t, std::optional<SessionTable::Identity>> seen_;
};

// Entries per page of a list view: 0 means 1,000, at most 10,000.
size_t PageSize(uint32_t asked) {
  constexpr size_t kDefault = 1000, kMax = 10000;
  return asked == 0 ? kDefault : std::min<size_t>(asked, kMax);
}

}  // namespace

v1::ListHeapsResponse HeapsView(const DaemonState& state) {
  v1::ListHeapsResponse response;
  const auto refusals = state.Refusals();
  for (const auto& heap : state.heaps().heaps()) {
    HeapStats stats = heap->Stats();
    v1::HeapInfo* info = response.add_heaps();
    info->set_name(heap->name());
    info->set_type(ToProto(heap->kind()));
    info->set_page_size(stats.page_size);
    info->set_capacity(stats.capacity);
    info->set_used(stats.used);
    info->set_peak(stats.peak);
    info->set_free(stats.free);
    info->set_buffer_count(stats.buffer_count);
    info->set_allocations(stats.allocations);
    uint64_t failures = 0;
    if (auto it = refusals.find(heap->name()); it != refusals.end()) {
      for (const auto& [reason, count] : it->second) {
        (*info->mutable_failures_by_reason())[reason] = count;
        failures += count;
      }
    }
    info->set_failures(failures);
    for (const auto& [backing, count] : stats.fallbacks)
      (*info->mutable_fallbacks())[backing] = count;
    info->set_last_fallback(stats.last_fallback);
    info->set_backing(ToProto(stats.backing));
    if (stats.hugepages.page_size != 0) {
      v1::HugepagePool* pool = info->mutable_hugepages();
      pool->set_page_size(stats.hugepages.page_size);
      pool->set_total_pages(stats.hugepages.total);
      pool->set_free_pages(stats.hugepages.free);
      pool->set_reserved_pages(stats.hugepages.reserved);
    }
    info->set_reserved_resident(stats.reserved_resident);
    info->set_locked(stats.locked);
    info->set_note(stats.note);
    for (const auto& [name, count] : stats.buffers_by_backing) {
      (*info->mutable_buffers_by_backing())[name] = count;
    }
  }
  const DaemonState::Totals totals = state.totals();
  response.set_live_buffers(totals.buffers);
  response.set_live_handles(totals.handles);
  response.set_pending_tokens(totals.pending_tokens);
  const FdBudget::Usage fds = state.fd_budget().usage();
  const FdBudget::Limits limits = state.fd_budget().limits();
  response.set_fds_in_use(fds.total);
  response.set_fd_budget(limits.total);
  v1::FdUsage* usage = response.mutable_fds();
  usage->set_rlimit_nofile(limits.rlimit_nofile);
  usage->set_reserve(limits.reserve);
  usage->set_budget(limits.total);
  usage->set_per_uid(limits.uid_share());
  usage->set_in_use(fds.total);
  usage->set_exports(fds.of(FdUse::kExport));
  usage->set_sessions(fds.of(FdUse::kSession));
  usage->set_control_connections(fds.of(FdUse::kControlConnection));
  usage->set_deliveries(fds.of(FdUse::kDelivery));
  usage->set_fences(fds.of(FdUse::kFence));
  usage->set_fence_pages(fds.of(FdUse::kFencePage));
  return response;
}

v1::ListClientsResponse ClientsView(const SessionTable& sessions, const DaemonState& state,
                                    const FenceTable& fences) {
  std::map<uint64_t, DaemonState::Holdings> holdings;
  for (DaemonState::Holdings& h : state.ListHoldings()) holdings[h.session_id] = std::move(h);
  v1::ListClientsResponse response;
  struct UidTotals {
    uint64_t charged = 0;
    std::map<uint64_t, uint64_t> buffers;  // distinct buffer -> size
    uint32_t sessions = 0;
  };
  std::map<uid_t, UidTotals> uids;
  for (const SessionTable::Identity& session : sessions.List()) {
    v1::ClientInfo& info = *response.add_clients();
    info.set_session_id(session.id);
    info.set_pid(static_cast<uint32_t>(session.peer.pid));
    info.set_uid(session.peer.uid);
    info.set_gid(session.peer.gid);
    info.set_comm(session.comm);
    *info.mutable_connected_since() = ToProto(session.connected);
    const FenceTable::SessionCounts counts = fences.session_counts(session.id);
    info.set_fences(counts.pending);
    info.set_fences_held(counts.held);
    UidTotals& uid = uids[session.peer.uid];
    ++uid.sessions;
    auto held = holdings.find(session.id);
    if (held == holdings.end()) continue;
    for (const auto& [heap, bytes] : held->second.bytes) {
      v1::HeapBytes* entry = info.add_bytes();
      entry->set_heap(heap);
      entry->set_bytes(bytes);
      uid.charged += bytes;
    }
    std::map<std::string, uint64_t> distinct;  // heap -> bytes
    for (const auto& [buffer_id, heap_size] : held->second.buffers) {
      distinct[heap_size.first] += heap_size.second;
      uid.buffers[buffer_id] = heap_size.second;
    }
    for (const auto& [heap, bytes] : distinct) {
      v1::HeapBytes* entry = info.add_held();
      entry->set_heap(heap);
      entry->set_bytes(bytes);
    }
    info.set_handles(held->second.handles);
  }
  for (const auto& [uid, totals] : uids) {
    v1::UidBytes* entry = response.add_uids();
    entry->set_uid(uid);
    entry->set_charged(totals.charged);
    uint64_t held = 0;
    for (const auto& [unused, size] : totals.buffers) held += size;
    entry->set_held(held);
    entry->set_sessions(totals.sessions);
  }
  return response;
}

v1::ListTokensResponse TokensView(const DaemonState& state) {
  v1::ListTokensResponse response;
  for (const DaemonState::TokenView& view : state.ListTokens()) {
    v1::ShareTokenInfo* info = response.add_tokens();
    info->set_buffer_id(view.token.buffer);
    info->set_heap(view.heap);
    info->set_buffer_name(view.buffer_name);
    info->set_size(view.size);
    info->set_access(view.token.access);
    *info->mutable_expires_at() = ToProto(view.token.expires);
    info->set_exporter_session(view.token.exporter);
    info->set_exporter_pid(static_cast<uint32_t>(view.token.exporter_process.pid));
    info->set_exporter_comm(view.token.exporter_process.comm);
    info->set_exporter_exited(ProcessExited(view.token.exporter_process));
  }
  return response;
}

absl::StatusOr<v1::ListBuffersResponse> BuffersView(const SessionTable& sessions,
                                                    const DaemonState& state,
                                                    const FenceTable& fences,
                                                    const ReservationTable& reservations,
                                                    const v1::ListBuffersRequest& request) {
  v1::ListBuffersResponse response;
  // A page token is the id of the last buffer listed: the next page starts
  // after it, so buffers made meanwhile come later and none comes twice.
  uint64_t after = 0;
  if (!request.page_token().empty() &&
      (request.page_token().size() > 20 || !AllDigits(request.page_token()) ||
       !absl::SimpleAtoi(request.page_token(), &after))) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_token ", QuoteClientText(request.page_token(), 24),
                     " is not one ListBuffers gave (pass next_page_token back unchanged)"));
  }
  // Filtered by session and heap, a page looks at no more than 4 pages'
  // worth (at least 1,000) of the session's buffers: it may come short,
  // even empty, with a token.
  if (!request.heap().empty() && state.heaps().Find(request.heap()) == nullptr) {
    std::vector<std::string> names;
    for (const auto& heap : state.heaps().heaps()) names.push_back(heap->name());
    return absl::NotFoundError(absl::StrCat("no heap ", QuoteClientText(request.heap()),
                                            " (heaps: ", absl::StrJoin(names, ", "), ")"));
  }
  const size_t page_size = PageSize(request.page_size());
  DaemonState::BufferPage listed =
      state.ListBuffers({.heap = request.heap(),
                         .session_id = request.session_id(),
                         .after = after,
                         .limit = page_size,
                         .scan_limit = std::max<size_t>(4 * page_size, 1000)});
  if (listed.next_after != 0) response.set_next_page_token(absl::StrCat(listed.next_after));
  const std::vector<DaemonState::BufferView>& page = listed.views;
  // Sessions named on the page (holders, fence owners).
  SessionsSeen who(sessions);
  // Whether each creator exited, read from /proc once a process.
  std::map<std::pair<pid_t, uint64_t>, bool> exited;
  for (const DaemonState::BufferView& buffer : page) {
    v1::BufferDebugInfo* entry = response.add_buffers();
    *entry->mutable_buffer() = buffer.info;
    std::set<uint64_t> listed;  // a fence attached with several usages: once
    for (const ReservationTable::Attached& fence :
         reservations.AttachedTo(buffer.info.buffer_id())) {
      std::optional<FenceView> view = fences.Peek(fence.fence_id);
      if (!view.has_value() || view->signaled || !listed.insert(fence.fence_id).second) continue;
      v1::FenceInfo* info = entry->add_fences();
      *info = FenceInfoOf(*view, who(view->owner_session));
      info->set_usage(fence.usage);
    }
    entry->set_memfd_dev(buffer.dev);
    entry->set_memfd_inode(buffer.ino);
    entry->set_creator_pid(static_cast<uint32_t>(buffer.creator.pid));
    entry->set_creator_comm(buffer.creator.comm);
    const std::pair<pid_t, uint64_t> creator{buffer.creator.pid, buffer.creator.start_ticks};
    auto known = exited.find(creator);
    if (known == exited.end()) known = exited.emplace(creator, ProcessExited(buffer.creator)).first;
    entry->set_creator_exited(known->second);
    // Any read-write holder (the creator included) can punch a hole that
    // the others then die of; a frozen buffer cannot be punched.
    std::set<uid_t> writer_uids;
    for (const auto& holder : buffer.holders) {
      if (holder.access == v1::ACCESS_READ_WRITE) writer_uids.insert(holder.uid);
    }
    entry->set_sigbus_risk(PunchMayHurtOthers(buffer.kind, buffer.info.backing()) &&
                           !buffer.info.frozen() && buffer.holders.size() > 1 &&
                           !writer_uids.empty());
    for (const auto& holder : buffer.holders) {
      v1::BufferHolder* out = entry->add_holders();
      out->set_session_id(holder.session_id);
      out->set_handle(holder.handle);
      out->set_access(holder.access);
      out->set_uid(holder.uid);
      if (const auto& identity = who(holder.session_id); identity.has_value()) {
        out->set_pid(static_cast<uint32_t>(identity->peer.pid));
        out->set_comm(identity->comm);
      }
      // Root and the daemon's uid can reopen the memfd read-write; a
      // process of a writer's uid can take the writer's fd (pidfd_getfd).
      out->set_read_only_enforced(
          holder.access == v1::ACCESS_READ_ONLY &&
          (buffer.info.frozen() ||
           (holder.uid != 0 && holder.uid != ::geteuid() && writer_uids.count(holder.uid) == 0)));
    }
  }
  if (request.include_released() && request.session_id() == 0 && after == 0) {
    for (const DaemonState::ReleasedView& released : state.ListReleased(request.heap())) {
      v1::ReleasedBuffer* out = response.add_released();
      out->set_buffer_id(released.buffer_id);
      out->set_heap(released.heap);
      out->set_name(released.name);
      out->set_size(released.size);
      out->set_memfd_dev(released.dev);
      out->set_memfd_inode(released.ino);
      *out->mutable_released_at() = ToProto(released.released);
      out->set_creator_pid(static_cast<uint32_t>(released.creator.pid));
      out->set_creator_comm(released.creator.comm);
    }
  }
  response.set_daemon_pid(static_cast<uint32_t>(::getpid()));
  return response;
}

v1::FenceInfo FenceInfoOf(const FenceView& view,
                          const std::optional<SessionTable::Identity>& owner) {
  v1::FenceInfo info;
  info.set_fence_id(view.id);
  info.set_name(view.name);
  info.set_timeline(view.timeline);
  info.set_owner_session(view.owner_session);
  info.set_state(view.signaled ? v1::FENCE_STATE_SIGNALED : v1::FENCE_STATE_PENDING);
  info.set_status(view.status);
  info.set_message(view.message);
  switch (view.kind) {
    case FenceKind::kCreated:
      info.set_kind(v1::FENCE_KIND_CREATED);
      info.set_page_slot(view.page_slot);
      info.set_page_generation(view.page_generation);
      break;
    case FenceKind::kMerged:
      info.set_kind(v1::FENCE_KIND_MERGED);
      break;
    case FenceKind::kImported:
      info.set_kind(v1::FENCE_KIND_IMPORTED);
      break;
    case FenceKind::kTimelinePoint:
      info.set_kind(v1::FENCE_KIND_TIMELINE_POINT);
      info.set_timeline_id(view.timeline_id);
      info.set_timeline_point(view.timeline_point);
      break;
  }
  *info.mutable_created_at() = ToProto(view.created);
  if (view.signaled) *info.mutable_signaled_at() = ToProto(view.signaled_at);
  *info.mutable_deadline() = ToProto(view.deadline);
  if (view.need_by != absl::InfiniteFuture()) *info.mutable_need_by() = ToProto(view.need_by);
  info.set_waiters(view.waiters);
  info.set_exported_fds(view.exports);
  if (owner) {
    info.set_owner_pid(static_cast<uint32_t>(owner->peer.pid));
    info.set_owner_comm(owner->comm);
  }
  return info;
}

v1::TimelineInfo TimelineInfoOf(const TimelineView& view,
                                const std::optional<SessionTable::Identity>& owner) {
  v1::TimelineInfo info;
  info.set_timeline_id(view.id);
  info.set_name(view.name);
  info.set_owner_session(view.owner_session);
  info.set_reached(view.reached);
  info.set_deadline_failures(view.deadline_failures);
  info.set_ended(view.ended);
  info.set_deadline_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(view.deadline)));
  *info.mutable_created_at() = ToProto(view.created);
  info.set_holders(view.holders);
  info.set_wakers(view.wakers);
  info.set_notify_fds(view.notify_fds);
  for (const TimelineView::Wait& wait : view.waits) {
    v1::TimelineInfo::Wait* out = info.add_waits();
    out->set_point(wait.point);
    *out->mutable_since() = ToProto(wait.since);
    *out->mutable_fails_at() = ToProto(wait.fails_at);
  }
  if (view.need_by != absl::InfiniteFuture()) *info.mutable_need_by() = ToProto(view.need_by);
  info.set_available(view.available);
  for (uint64_t point : view.promised) info.add_promised_points(point);
  info.set_promised_count(view.promised_count);
  info.set_exported_points(view.exported_points);
  if (owner) {
    info.set_owner_pid(static_cast<uint32_t>(owner->peer.pid));
    info.set_owner_comm(owner->comm);
  }
  return info;
}

absl::StatusOr<v1::ListFencesResponse> FencesView(const SessionTable& sessions,
                                                  const FenceTable& fences,
                                                  const TimelineTable& timelines,
                                                  const v1::ListFencesRequest& request) {
  FenceQuery query;
  if (request.state() == v1::FENCE_STATE_PENDING) query.pending = true;
  if (request.state() == v1::FENCE_STATE_SIGNALED) query.pending = false;
  query.owner_session = request.owner_session();
  // A page token names the last fence listed: "p<id>" (pending) or
  // "s<signalled at, ns since the epoch>.<id>".
  const std::string& token = request.page_token();
  if (!token.empty()) {
    FenceQuery::After after;
    bool ok = token.size() <= 48;
    if (ok && token[0] == 'p') {
      const absl::string_view id = absl::string_view(token).substr(1);
      ok = AllDigits(id) && absl::SimpleAtoi(id, &after.id);
    } else if (ok && token[0] == 's') {
      const std::vector<absl::string_view> parts =
          absl::StrSplit(absl::string_view(token).substr(1), '.');
      int64_t ns = 0;
      ok = parts.size() == 2 && AllDigits(parts[0]) && AllDigits(parts[1]) &&
           absl::SimpleAtoi(parts[0], &ns) && absl::SimpleAtoi(parts[1], &after.id);
      after.signaled = true;
      after.signaled_at = absl::FromUnixNanos(ns);
    } else {
      ok = false;
    }
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("page_token ", QuoteClientText(token, 24),
                       " is not one ListFences gave (pass next_page_token back unchanged)"));
    }
    query.after = after;
  }
  const size_t page_size = request.limit() == 0
                               ? FenceQuery::kMaxListed
                               : std::min<size_t>(request.limit(), FenceQuery::kMaxListed);
  query.limit = page_size + 1;
  std::vector<FenceView> page = fences.List(query);
  v1::ListFencesResponse response;
  if (page.size() > page_size) {
    page.pop_back();
    const FenceView& last = page.back();
    response.set_next_page_token(
        last.signaled ? absl::StrCat("s", absl::ToUnixNanos(last.signaled_at), ".", last.id)
                      : absl::StrCat("p", last.id));
  }
  SessionsSeen who(sessions);
  for (const FenceView& view : page)
    *response.add_fences() = FenceInfoOf(view, who(view.owner_session));
  if (request.state() == v1::FENCE_STATE_UNSPECIFIED && token.empty()) {
    for (const TimelineView& view : timelines.List(FenceQuery::kMaxListed)) {
      if (request.owner_session() != 0 && view.owner_session != request.owner_session()) continue;
      *response.add_timelines() = TimelineInfoOf(view, who(view.owner_session));
    }
  }
  return response;
}

}  // namespace bufferd
