#!/usr/bin/env bash
# Tests the install step and the C API from outside Bazel: installs into a
# temp prefix, checks what went where, compiles examples/c_share.c with
# `cc $(pkg-config --cflags --libs bufferd)` against the installed header and
# library only, and runs it (a writer and a reader process sharing a buffer)
# against the installed daemon; the installed bufctl lists the buffer's
# session.
set -euo pipefail
root="$(mktemp -d /tmp/bufferd-install-XXXXXX)"
prefix="$root/prefix"
dir="$root/sock"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$root"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$root/log" ] && cat "$root/log"; exit 1; }

for tool in cc pkg-config; do
  command -v "$tool" >/dev/null || fail "$tool is missing (tools/setup installs it)"
done

packaging/install.sh --prefix "$prefix" --no-system-setup >"$root/install.out" \
  || fail "install: $(cat "$root/install.out")"
for file in bin/bufferd bin/bufctl lib/libbufferd.so.1 lib/libbufferd.so include/bufferd/bufferd.h \
    lib/pkgconfig/bufferd.pc etc/bufferd/bufferd.conf lib/systemd/system/bufferd.service \
    lib/systemd/system/bufferd.socket lib/sysusers.d/bufferd.conf share/doc/bufferd/README.md; do
  [ -e "$prefix/$file" ] || fail "not installed: $file"
done
grep -q "^ExecStart=$prefix/bin/bufferd --config $prefix/etc/bufferd/bufferd.conf$" \
  "$prefix/lib/systemd/system/bufferd.service" || fail "ExecStart does not name the prefix"
grep -q 'SONAME.*\[libbufferd.so.1\]' <<<"$(readelf -d "$prefix/lib/libbufferd.so.1")" || fail "SONAME"
# Only the C API and the C++ client API are exported (besides a few inline
# std::string members other shared libraries of the link reference, which
# the linker keeps dynamic: the same code as libstdc++'s).
unexpected="$(nm -DC --defined-only "$prefix/lib/libbufferd.so.1" | awk '{ $1 = ""; $2 = ""; print }' \
  | grep -vE '^ *(bufferd_|bufferd::|BUFFERD_1|descriptor_table_bufferd|TableStruct_bufferd|typeinfo (name )?for bufferd::|vtable for bufferd::|std::)' \
  || true)"
[ -z "$unexpected" ] || fail "unexpected exports: $(head -5 <<<"$unexpected")"
# ... and the internals are not among them.
exports="$(nm -DC --defined-only "$prefix/lib/libbufferd.so.1")"
grep -q ' bufferd_connect@@BUFFERD_1$' <<<"$exports" || fail "bufferd_connect is not exported"
grep -q 'bufferd::Client::Connect' <<<"$exports" || fail "the C++ client API is not exported"
if grep -q 'bufferd::internal::Connection::\|bufferd::UnixSocket::' <<<"$exports"; then
  fail "internals exported: $(grep 'internal::\|UnixSocket' <<<"$exports" | head -3)"
fi
# A second install keeps an edited config.
echo '# edited' >>"$prefix/etc/bufferd/bufferd.conf"
packaging/install.sh --prefix "$prefix" --no-system-setup >/dev/null || fail "second install"
grep -q '^# edited$' "$prefix/etc/bufferd/bufferd.conf" || fail "the second install replaced the config"
[ -e "$prefix/etc/bufferd/bufferd.conf.default" ] || fail "no bufferd.conf.default"
status=0; packaging/install.sh --prefix "$prefix" --bogus >/dev/null 2>&1 || status=$?
[ "$status" -eq 2 ] || fail "a bad argument exited $status, not 2"

export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
[ "$(pkg-config --modversion bufferd)" = 1.0.0 ] || fail "pkg-config --modversion"
# Outside Bazel: the example source, the installed header and library only.
cp examples/c_share.c "$root/c_share.c"
# shellcheck disable=SC2046
(cd "$root" && cc -std=c11 -Wall -Wextra -Werror -o c_share c_share.c $(pkg-config --cflags --libs bufferd)) \
  || fail "compiling c_share.c against the installed files"

"$prefix/bin/bufferd" --socket-dir "$dir" --config "$prefix/etc/bufferd/bufferd.conf" 2>"$root/log" &
pid=$!
for _ in $(seq 200); do [ -S "$dir/fd.sock" ] && [ -S "$dir/control.sock" ] && break; sleep 0.05; done
# An instrumented library (--config=asan) needs its runtime loaded first.
preload=""
if grep -q 'NEEDED.*libasan' <<<"$(readelf -d "$prefix/lib/libbufferd.so.1")"; then
  preload="$(cc -print-file-name=libasan.so)"
fi
out="$(LD_PRELOAD="$preload" LD_LIBRARY_PATH="$prefix/lib" "$root/c_share" --socket-dir "$dir" 2>&1)" \
  || fail "c_share: $out"
echo "$out"
grep -q '^reader pid [0-9]* read: hello from C, pid [0-9]*, buffer [0-9]*$' <<<"$out" || fail "reader did not read"
grep -q '^reader: writable mapping refused: Permission denied$' <<<"$out" || fail "read-only import"
grep -q '^reader: importing a made-up token: INVALID_ARGUMENT: \|^reader: importing a made-up token: NOT_FOUND: ' <<<"$out" \
  || fail "the daemon's code and message"
BUFFERD_SOCKET_DIR="$dir" "$prefix/bin/bufctl" heaps --json | grep -q '"name": "system"' || fail "installed bufctl"
echo PASS
