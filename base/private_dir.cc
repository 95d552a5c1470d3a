#include "base/private_dir.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "base/errno_status.h"
#include "base/protocol.h"

namespace bufferd {
namespace {

std::string Mode(mode_t mode) { return absl::StrFormat("%04o", mode & 07777); }

std::string ParentOf(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const std::string parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? "." : parent;
}

// A directory (links followed: /var/run is /run) that only root can add to.
bool OnlyRootWrites(const std::string& dir) {
  struct stat st {};
  return ::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == 0 &&
         (st.st_mode & (S_IWGRP | S_IWOTH)) == 0;
}

}  // namespace

std::string NotTheDefaultHint(const std::string& path) {
  // Only for a client that looked in its default dir: one pointed at a dir
  // meant it.
  if (path == "/run/bufferd" || path != DefaultSocketDir()) return "";
  return "; a daemon started as root serves /run/bufferd: point the client there "
         "(BUFFERD_SOCKET_DIR=/run/bufferd, or bufctl --socket-dir /run/bufferd)";
}

absl::StatusOr<PrivateDir> OpenPrivateDir(const std::string& path, uid_t owner) {
  PrivateDir result;
  if (::mkdir(path.c_str(), 0700) == 0) {
    result.created = true;
  } else if (errno != EEXIST) {
    if (errno == ENOENT) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot create socket dir ", path, ": its parent ", ParentOf(path),
          " does not exist (bufferd creates only the last component; create the parent "
          "yourself, or choose another --socket-dir)"));
    }
    return ErrnoError(absl::StrCat("mkdir ", path), errno);
  }
  result.fd = UniqueFd(RetryOnEintr(
      [&] { return ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC); }));
  if (!result.fd.valid()) {
    if (errno == ELOOP || errno == ENOTDIR) {
      return absl::FailedPreconditionError(absl::StrCat(
          "socket dir ", path, " is a symlink or not a directory; the daemon uses only a real "
          "directory of its own"));
    }
    return ErrnoError(absl::StrCat("open ", path), errno);
  }
  struct stat st {};
  if (::fstat(result.fd.get(), &st) != 0) return ErrnoError(absl::StrCat("stat ", path), errno);
  if (st.st_uid != owner && st.st_uid != ::geteuid()) {
    const struct passwd* user = ::getpwuid(st.st_uid);
    const std::string name = user != nullptr ? user->pw_name : "";
    return absl::PermissionDeniedError(absl::StrCat(
        "socket dir ", path, " is owned by uid ", st.st_uid,
        name.empty() ? "" : absl::StrCat(" (", name, ")"), ", not by the daemon's uid ", owner,
        name.empty() ? "" : absl::StrCat("; if it is that user's daemon dir, start with --user ", name),
        "; else remove it or choose another --socket-dir"));
  }
  return result;
}

absl::Status CheckFoundDir(const PrivateDir& dir, const std::string& path, uid_t owner,
                           int64_t group) {
  if (dir.created) return absl::OkStatus();
  struct stat st {};
  if (::fstat(dir.fd.get(), &st) != 0) return ErrnoError(absl::StrCat("stat ", path), errno);
  // Found, not made. Others' bits are never allowed, and the group may only
  // read and search the configured group's dir: anything else is some other
  // program's dir (or a shared one like /tmp), and bufferd neither takes it
  // over nor makes it private behind its owner's back. One a bufferd made
  // before (it holds bufferd.lock) may then be adjusted to this config (a
  // group added or dropped, handed to --user); any other must already be
  // exactly what bufferd would make, since nothing of it will be changed.
  const mode_t want_mode = group >= 0 ? 0750 : 0700;
  const std::string want = absl::StrCat(Mode(want_mode), " owned by uid ", owner,
                                        group >= 0 ? absl::StrCat(" and gid ", group) : "");
  const auto refuse = [&](absl::string_view why) {
    return absl::FailedPreconditionError(absl::StrCat(
        "socket dir ", path, " already exists with mode ", Mode(st.st_mode), " (uid ", st.st_uid,
        ", gid ", st.st_gid, ")", why,
        "; bufferd never changes a dir it did not make. Give a "
        "--socket-dir that does not exist yet (bufferd makes it; its parent must exist), or, if "
        "this dir is meant only for bufferd, make it ",
        want, " yourself"));
  };
  const bool group_ok =
      (st.st_mode & 0070) == 0 ||
      (group >= 0 && static_cast<int64_t>(st.st_gid) == group && (st.st_mode & 0020) == 0);
  if ((st.st_mode & 0007) != 0 || !group_ok) return refuse(": not private");
  struct stat lock {};
  const bool made_by_bufferd =
      ::fstatat(dir.fd.get(), "bufferd.lock", &lock, AT_SYMLINK_NOFOLLOW) == 0 &&
      S_ISREG(lock.st_mode);
  const bool exact = st.st_uid == owner && (st.st_mode & 07777) == want_mode &&
                     (group < 0 || static_cast<int64_t>(st.st_gid) == group);
  if (!made_by_bufferd && !exact) return refuse(absl::StrCat(": not ", want));
  return absl::OkStatus();
}

absl::Status SecurePrivateDir(int dir_fd, const std::string& path, int64_t group, uid_t owner) {
  const gid_t gid = group >= 0 ? static_cast<gid_t>(group) : static_cast<gid_t>(-1);
  struct stat st {};
  if (::fstat(dir_fd, &st) != 0) return ErrnoError(absl::StrCat("stat ", path), errno);
  if ((st.st_uid != owner || group >= 0) && ::fchown(dir_fd, owner, gid) != 0) {
    return ErrnoError(absl::StrCat("chown ", path, " to uid ", owner, " gid ", group), errno);
  }
  if (::fchmod(dir_fd, group >= 0 ? 0750 : 0700) != 0) {
    return ErrnoError(absl::StrCat("chmod ", path), errno);
  }
  return absl::OkStatus();
}

absl::StatusOr<UniqueFd> OpenPrivateFile(int dir_fd, const std::string& dir_path,
                                         const std::string& name, uid_t owner) {
  const std::string path = absl::StrCat(dir_path, "/", name);
  UniqueFd fd(RetryOnEintr([&] {
    return ::openat(dir_fd, name.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
  }));
  if (!fd.valid()) {
    if (errno == ELOOP) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, " is a symlink; remove it (someone may have planted it)"));
    }
    if (errno == EISDIR || errno == ENXIO) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, " is not a regular file; remove it (someone may have planted it)"));
    }
    return ErrnoError(absl::StrCat("open ", path), errno);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return ErrnoError(absl::StrCat("stat ", path), errno);
  if (!S_ISREG(st.st_mode) || (st.st_uid != owner && st.st_uid != ::geteuid()) ||
      st.st_nlink != 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, " is not a regular file of uid ", owner, " with one link (mode ", Mode(st.st_mode),
        ", uid ", st.st_uid, ", ", st.st_nlink, " links); remove it (someone may have planted it)"));
  }
  return fd;
}

absl::StatusOr<uid_t> CheckTrustedDir(const std::string& path, uid_t uid) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) {
      return absl::UnavailableError(absl::StrCat("cannot connect to bufferd in ", path,
                                                 " (is it running?): no such directory",
                                                 NotTheDefaultHint(path)));
    }
    return ErrnoError(absl::StrCat("stat ", path), errno);
  }
  const std::string why = absl::StrCat("bufferd socket dir ", path);
  if (S_ISLNK(st.st_mode)) {
    return absl::PermissionDeniedError(absl::StrCat(
        why, " is a symlink; not trusted (point the client at the real directory)"));
  }
  if (!S_ISDIR(st.st_mode)) {
    return absl::PermissionDeniedError(absl::StrCat(why, " is not a directory"));
  }
  if (st.st_uid != uid && st.st_uid != 0 && !OnlyRootWrites(ParentOf(path))) {
    return absl::PermissionDeniedError(absl::StrCat(
        why, " is owned by uid ", st.st_uid, ", neither you (uid ", uid,
        ") nor root, in a directory others can write: another user may be posing as bufferd "
        "there; not trusted (point XDG_RUNTIME_DIR or the socket dir at a directory of your own, "
        "or ask an admin to remove it)"));
  }
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return absl::PermissionDeniedError(absl::StrCat(
        why, " has mode ", Mode(st.st_mode),
        ": others may write it and replace its sockets; not trusted (it must not be writable by "
        "group or others; a current bufferd makes it 0700 or 0750)"));
  }
  return st.st_uid;
}

}  // namespace bufferd
