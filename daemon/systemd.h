// The daemon under a service manager: socket activation (sd_listen_fds) and
// readiness notification (sd_notify). Without one, TakeActivatedSockets
// finds nothing and Notify does nothing, so the daemon binds its sockets
// itself as always.
#ifndef BUFFERD_DAEMON_SYSTEMD_H_
#define BUFFERD_DAEMON_SYSTEMD_H_

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "base/unix_socket.h"

namespace bufferd {

// control.sock and fd.sock as the service manager passed them: listening
// Unix sockets named <dir>/control.sock (SOCK_STREAM) and <dir>/fd.sock
// (SOCK_SEQPACKET), close-on-exec.
struct ActivatedSockets {
  UnixSocket control;
  UnixSocket fd;
  std::string dir;
};

// nullopt when the daemon was not socket-activated (no LISTEN_FDS for this
// pid). Otherwise both sockets, told apart by their names
// (FileDescriptorName=control / fd) or else by their type; INVALID_ARGUMENT
// naming the problem when a passed fd is not a listening Unix socket, one of
// the two is missing or passed twice, or they are not control.sock and
// fd.sock of one directory (where clients look for them). The environment
// variables are unset either way (children do not inherit them).
absl::StatusOr<std::optional<ActivatedSockets>> TakeActivatedSockets();

// Whether a service manager listens for notifications ($NOTIFY_SOCKET).
bool ServiceManagerListens();

// Sends `state` ("READY=1\nSTATUS=...") to the service manager; nothing
// without $NOTIFY_SOCKET.
void NotifyServiceManager(const std::string& state);

// How often to send WATCHDOG=1 (half of WatchdogSec=), when the manager
// asked for it.
std::optional<absl::Duration> WatchdogPeriod();

}  // namespace bufferd

#endif  // BUFFERD_DAEMON_SYSTEMD_H_
