#!/usr/bin/env bash
# Installs bufferd under a prefix: the daemon, bufctl, the C header, the
# shared library and its pkg-config file, the default config and the systemd
# units. Runs from Bazel's runfiles (bazel run //packaging:install, which
# tools/install does with -c opt; or as a test's data), so every file it
# copies is built and found at its workspace path.
#
#   install.sh [--prefix /usr/local] [--destdir DIR] [--no-system-setup]
#
# --destdir stages the files under DIR (for a package) and implies
# --no-system-setup. Without it, as root, it also creates the `bufferd`
# system user, runs ldconfig and reloads systemd (when systemd runs).
# An existing config is never overwritten: the default goes next to it as
# bufferd.conf.default.
set -euo pipefail

VERSION=1.0.0
prefix=/usr/local
destdir=""
system_setup=1
while (($#)); do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --prefix=*) prefix="${1#*=}"; shift ;;
    --destdir) destdir="${2:?--destdir needs a directory}"; system_setup=0; shift 2 ;;
    --destdir=*) destdir="${1#*=}"; system_setup=0; shift ;;
    --no-system-setup) system_setup=0; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
# bazel run starts us in the runfiles: a relative path means the caller's.
case "$prefix" in
  /*) ;;
  *) prefix="${BUILD_WORKING_DIRECTORY:-$PWD}/$prefix" ;;
esac
if [[ -n "$destdir" && "$destdir" != /* ]]; then
  destdir="${BUILD_WORKING_DIRECTORY:-$PWD}/$destdir"
fi
prefix="${prefix%/}"
case "$prefix" in
  *[!A-Za-z0-9_./-]*) echo "install: --prefix '$prefix' has characters a unit file cannot hold" >&2; exit 2 ;;
esac

bindir="$prefix/bin"
libdir="$prefix/lib"
includedir="$prefix/include"
docdir="$prefix/share/doc/bufferd"
# /usr keeps its config in /etc, as Debian's packages do.
if [ "$prefix" = /usr ]; then sysconfdir=/etc; else sysconfdir="$prefix/etc"; fi
unitdir="$prefix/lib/systemd/system"
sysusersdir="$prefix/lib/sysusers.d"

fill() {
  sed -e "s|@PREFIX@|$prefix|g" -e "s|@BINDIR@|$bindir|g" -e "s|@SYSCONFDIR@|$sysconfdir|g" \
      -e "s|@DOCDIR@|$docdir|g" -e "s|@VERSION@|$VERSION|g" "$1"
}
put() {  # put MODE SOURCE DEST: DEST under destdir, made atomically
  local mode="$1" source="$2" dest="$destdir$3"
  install -d -m 0755 "$(dirname "$dest")"
  install -m "$mode" "$source" "$dest.tmp.$$"
  mv -f "$dest.tmp.$$" "$dest"
  echo "  $3"
}
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "bufferd: installing under ${destdir}$prefix"
put 0755 daemon/bufferd "$bindir/bufferd"
put 0755 tools/bufctl "$bindir/bufctl"
put 0755 client/libbufferd.so.1 "$libdir/libbufferd.so.1"
ln -sfn libbufferd.so.1 "$destdir$libdir/libbufferd.so"
echo "  $libdir/libbufferd.so -> libbufferd.so.1"
put 0644 client/bufferd.h "$includedir/bufferd/bufferd.h"
fill packaging/bufferd.pc.in >"$tmp/bufferd.pc"
put 0644 "$tmp/bufferd.pc" "$libdir/pkgconfig/bufferd.pc"
daemon/bufferd --print-default-config >"$tmp/bufferd.conf"
if [ -e "$destdir$sysconfdir/bufferd/bufferd.conf" ]; then
  put 0644 "$tmp/bufferd.conf" "$sysconfdir/bufferd/bufferd.conf.default"
  echo "  (kept your $sysconfdir/bufferd/bufferd.conf)"
else
  put 0644 "$tmp/bufferd.conf" "$sysconfdir/bufferd/bufferd.conf"
fi
fill packaging/systemd/bufferd.service.in >"$tmp/bufferd.service"
fill packaging/systemd/bufferd.socket.in >"$tmp/bufferd.socket"
put 0644 "$tmp/bufferd.service" "$unitdir/bufferd.service"
put 0644 "$tmp/bufferd.socket" "$unitdir/bufferd.socket"
put 0644 packaging/systemd/bufferd.sysusers "$sysusersdir/bufferd.conf"
put 0644 README.md "$docdir/README.md"

if ((system_setup)) && [ "$(id -u)" -eq 0 ]; then
  if ! getent passwd bufferd >/dev/null; then
    if command -v systemd-sysusers >/dev/null; then
      systemd-sysusers "$sysusersdir/bufferd.conf"
    else
      useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin bufferd
    fi
    echo "  created the system user bufferd"
  fi
  if command -v ldconfig >/dev/null; then ldconfig; fi
  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
fi
echo "bufferd: installed. As a service: systemctl enable --now bufferd.socket"
