// Debug views: the Debug service's tables, joined from the session table
// (who), DaemonState (what they hold), the FenceTable, the heaps and the fd
// budget. They
// judge what the raw state only implies: holes punched out of prefaulted
// buffers, which buffers a holder could make SIGBUS, where read-only access
// is really enforced. Read-only; never shows secrets or tokens.
//
// Thread-safe (each source is read under its own lock).
#ifndef BUFFERD_DAEMON_DEBUG_VIEWS_H_
#define BUFFERD_DAEMON_DEBUG_VIEWS_H_

#include <vector>

#include "bufferd/v1/debug.pb.h"
#include "daemon/sessions.h"
#include "daemon/state.h"
#include "fences/fence_table.h"
#include "fences/reservations.h"
#include "fences/timeline_table.h"

namespace bufferd {

// Heap statistics (reads sysfs and fstats prefaulted buffers: not for a
// callback thread), live totals and fd usage.
v1::ListHeapsResponse HeapsView(const DaemonState& state);
// One entry per session, without queued_deliveries (the fd channel's), and
// per uid what it is charged against what it holds.
v1::ListClientsResponse ClientsView(const SessionTable& sessions, const DaemonState& state,
                                    const FenceTable& fences);
// With `reservations`: each buffer's unsignalled attached fences too. One
// page (ListBuffersRequest.page_size / page_token); INVALID_ARGUMENT for a
// page token that is not one.
absl::StatusOr<v1::ListBuffersResponse> BuffersView(const SessionTable& sessions,
                                                    const DaemonState& state,
                                                    const FenceTable& fences,
                                                    const ReservationTable& reservations,
                                                    const v1::ListBuffersRequest& request);

// Pending share tokens (never the token strings).
v1::ListTokensResponse TokensView(const DaemonState& state);

// A fence as the protocol shows it; `owner` while its session is open.
v1::FenceInfo FenceInfoOf(const FenceView& view,
                          const std::optional<SessionTable::Identity>& owner);
v1::TimelineInfo TimelineInfoOf(const TimelineView& view,
                                const std::optional<SessionTable::Identity>& owner);
// Fences, and (unless the request filters by fence state) every timeline.
absl::StatusOr<v1::ListFencesResponse> FencesView(const SessionTable& sessions,
                                                  const FenceTable& fences,
                                                  const TimelineTable& timelines,
                                                  const v1::ListFencesRequest& request);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_DEBUG_VIEWS_H_
