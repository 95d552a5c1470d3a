// Debug views: the Debug service's tables, joined from the session table
// (who), DaemonState (what they hold), the heaps and the fd budget. They
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

namespace bufferd {

// Heap statistics (reads sysfs and fstats prefaulted buffers: not for a
// callback thread), live totals and fd usage.
v1::ListHeapsResponse HeapsView(const DaemonState& state);
// One entry per session, without queued_deliveries (the fd channel's).
std::vector<v1::ClientInfo> ClientsView(const SessionTable& sessions, const DaemonState& state);
v1::ListBuffersResponse BuffersView(const SessionTable& sessions, const DaemonState& state,
                                    const v1::ListBuffersRequest& request);

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_DEBUG_VIEWS_H_
