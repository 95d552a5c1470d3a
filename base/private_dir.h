// The socket directory, made and checked without following links: the one
// place both sides decide whether a directory may be trusted.
//
// The daemon makes (or takes over) its socket dir with OpenPrivateDir and,
// once it holds the dir's lock, SecurePrivateDir: owned
// by its euid, mode 0700, or 0750 with a group, so nobody but the daemon can
// create, rename or replace an entry (a group member who could write the dir
// could swap fd.sock for a relay, or plant a symlink at the lock file). Files
// in it are opened relative to the dir's fd, never following a link, and
// checked (OpenPrivateFile). A client trusts a dir only if CheckTrustedDir
// says so: not a symlink, a directory owned by the caller or root, writable
// by nobody else (so a dir another user made in /tmp is never trusted).
#ifndef BUFFERD_BASE_PRIVATE_DIR_H_
#define BUFFERD_BASE_PRIVATE_DIR_H_

#include <sys/types.h>

#include <string>

#include "absl/status/statusor.h"
#include "base/unique_fd.h"

namespace bufferd {

// The socket dir as OpenPrivateDir found it.
struct PrivateDir {
  UniqueFd fd;
  // Made by this call (so the daemon may set its owner and mode), rather
  // than found.
  bool created = false;
};

// Creates `path` (its parent must exist; parents are never created) mode
// 0700, or opens the existing directory, which must be a real directory (not
// a symlink) owned by `owner` or the caller's euid. Changes nothing else.
// FAILED_PRECONDITION or PERMISSION_DENIED naming the path, the problem and
// what to do otherwise.
absl::StatusOr<PrivateDir> OpenPrivateDir(const std::string& path, uid_t owner);

// OK if the daemon may use `dir` for a config with `group` (< 0: none) and
// owner `owner`: always if it made it. One it found must be private: no
// access for others, and for its group none, or at most read and search
// for the configured group. One a bufferd made before (it holds
// bufferd.lock) may then be adjusted by SecurePrivateDir; any other must
// already be exactly what bufferd would make, since nothing of it may
// change. FAILED_PRECONDITION saying what it is, what it should be and what
// to do otherwise. (The daemon checks this after it has ruled out a live
// daemon in the dir: that refusal says more.)
absl::Status CheckFoundDir(const PrivateDir& dir, const std::string& path, uid_t owner,
                           int64_t group);

// Gives the dir to `owner` and group `group` (group < 0: none), mode 0700,
// or 0750 with a group. Only for a dir OpenPrivateDir created or found
// private.
absl::Status SecurePrivateDir(int dir_fd, const std::string& path, int64_t group, uid_t owner);

// Opens (creating if missing, mode 0600) the regular file `name` in the dir
// `dir_fd` (shown as `dir_path` in errors) without following a link, and
// checks it is a regular file owned by `owner` or the caller's euid with
// one link.
absl::StatusOr<UniqueFd> OpenPrivateFile(int dir_fd, const std::string& dir_path,
                                         const std::string& name, uid_t owner);

// OK if `path` is a directory a client of uid `uid` may trust to hold the
// daemon's sockets: not a symlink, not writable by group or others, and
// owned by `uid` or root, or by anyone inside a parent only root can write
// (/run/bufferd of a daemon running as its own user: only root could have
// made it and handed it over). Returns its owner. UNAVAILABLE when it does
// not exist; PERMISSION_DENIED naming the problem and the fix otherwise.
absl::StatusOr<uid_t> CheckTrustedDir(const std::string& path, uid_t uid);

// "; a daemon started as root serves /run/bufferd: ..." for a client that
// found no daemon in its default dir `path` (DefaultSocketDir()), unless
// that is /run/bufferd; "" for a dir it was pointed at.
std::string NotTheDefaultHint(const std::string& path);

}  // namespace bufferd

#endif  // BUFFERD_BASE_PRIVATE_DIR_H_
