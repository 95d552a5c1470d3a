#!/usr/bin/env bash
# Tests that the README's try-it path works: a daemon with the embedded
# config, share_demo across two processes, and bufctl's tables and JSON.
set -euo pipefail
root="$(mktemp -d /tmp/bufctl-test-XXXXXX)"
dir="$root/sock"
daemon/bufferd --socket-dir "$dir" 2>"$root/log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$root"' EXIT
for _ in $(seq 100); do [ -S "$dir/fd.sock" ] && break; sleep 0.05; done

fail() { echo "FAIL: $*"; cat "$root/log"; exit 1; }

out="$(examples/share_demo --socket-dir "$dir")" || fail "share_demo: $out"
echo "$out"
grep -q 'hello from pid' <<<"$out" || fail "reader did not see the message"
grep -q 'writable mapping: Permission denied' <<<"$out" || fail "read-only import was writable"

heaps="$(tools/bufctl --socket-dir "$dir" heaps)"
echo "$heaps"
grep -qE '^HEAP +TYPE +BACKING' <<<"$heaps" || fail "heaps header"
grep -qE '^carveout +carveout .* 64 MiB' <<<"$heaps" || fail "carveout row"
grep -qE '^system +system +base_pages' <<<"$heaps" || fail "system row"

json="$(tools/bufctl --socket-dir "$dir" --json heaps)"
grep -q '"name": "contiguous"' <<<"$json" || fail "json heaps"

# (grep -q reads from a here-string, never a pipe: under pipefail a grep
# that stops early would SIGPIPE bufctl and fail the check.)
grep -qE '^SESSION +PID' <<<"$(tools/bufctl --socket-dir "$dir" clients)" || fail "clients header"
grep -qE '^ID +HEAP' <<<"$(tools/bufctl --socket-dir "$dir" buffers)" || fail "buffers header"
grep -q '^bufferd_heap_capacity_bytes{heap="carveout"} 67108864$' \
  <<<"$(tools/bufctl --socket-dir "$dir" metrics)" || fail "metrics"
# Options after the command, the socket dir from the environment.
json="$(BUFFERD_SOCKET_DIR="$dir" tools/bufctl heaps --json)" || fail "heaps --json: $json"
grep -q '"capacity": "67108864"' <<<"$json" || fail "json sizes are exact bytes: $json"
BUFFERD_SOCKET_DIR="$root/nothing" tools/bufctl --socket-dir "$dir" clients >/dev/null \
  || fail "--socket-dir wins over BUFFERD_SOCKET_DIR"
# Exit codes: 2 for a bad command line, 0 for --help (with examples).
status=0; tools/bufctl --socket-dir "$dir" no-such-command 2>/dev/null || status=$?
[ "$status" -eq 2 ] || fail "bad command exited $status, not 2"
status=0; tools/bufctl heaps --no-such-flag 2>/dev/null || status=$?
[ "$status" -eq 2 ] || fail "bad flag exited $status, not 2"
grep -q '^Examples:' <<<"$(tools/bufctl --help)" || fail "--help has no examples"
status=0; tools/bufctl --socket-dir "$dir" buffers --heap nope 2>"$root/err" || status=$?
[ "$status" -eq 1 ] || fail "an unknown heap exited $status, not 1"
grep -q "NOT_FOUND: no heap 'nope' (heaps: system, contiguous, carveout)" "$root/err" \
  || fail "unknown heap: $(cat "$root/err")"
status=0; tools/bufctl --socket-dir "$dir" why 999999 2>"$root/err" || status=$?
[ "$status" -eq 1 ] || fail "unknown buffer exited $status, not 1"
# An id or count that is no whole number in range is refused, never wrapped
# or clamped into another (exit 2, naming it).
for bad in "why 18446744073709551616" "why -1" "why 0x10" "end-session 1e3" \
    "fences --owner -5" "fences --limit 4294967296" "buffers --session 99999999999999999999"; do
  status=0
  # shellcheck disable=SC2086
  tools/bufctl --socket-dir "$dir" $bad 2>"$root/err" || status=$?
  [ "$status" -eq 2 ] || fail "$bad exited $status, not 2"
  grep -q "is not a whole number from 0 to " "$root/err" || fail "$bad: $(cat "$root/err")"
done
if tools/bufctl --socket-dir "$root/nothing" heaps 2>"$root/err"; then fail "no daemon accepted"; fi
grep -q 'UNAVAILABLE' "$root/err" || fail "no-daemon error: $(cat "$root/err")"
# --version: both binaries, one release.
version="$(tools/bufctl --version)" || fail "bufctl --version"
[[ "$version" =~ ^bufctl\ [0-9]+\.[0-9]+\ \(protocol\ v[0-9]+\)$ ]] || fail "bufctl --version: $version"
daemon_version="$(daemon/bufferd --version)" || fail "bufferd --version"
[ "bufferd ${version#bufctl }" = "$daemon_version" ] || fail "versions: $version / $daemon_version"
# A word that is no command is named, with the commands (exit 2).
status=0; tools/bufctl --socket-dir "$dir" heap 2>"$root/err" || status=$?
[ "$status" -eq 2 ] || fail "unknown command exited $status"
grep -q "^bufctl: unknown command 'heap' (commands: heaps, clients, buffers, holders, tokens, " \
  "$root/err" || fail "unknown command: $(cat "$root/err")"
status=0; tools/bufctl --socket-dir "$dir" 2>"$root/err" || status=$?
[ "$status" -eq 2 ] && grep -q 'a command is required (commands: heaps' "$root/err" \
  || fail "no command: $status $(cat "$root/err")"
tools/bufctl --help | grep -q 'end-session' || fail "--help lists end-session"
# can-allocate: a bad command line names what is wrong and exits 2, before
# any daemon is asked (none listens at $root/nothing).
bad_can() {  # expected message, then the arguments
  local expected="$1"; shift
  local status=0
  tools/bufctl --socket-dir "$root/nothing" can-allocate "$@" 2>"$root/err" || status=$?
  [ "$status" -eq 2 ] || fail "can-allocate $* exited $status: $(cat "$root/err")"
  grep -qF -- "$expected" "$root/err" || fail "can-allocate $*: $(cat "$root/err")"
}
bad_can "--frame '3840x2160:NV13': unknown fourcc 'NV13' (one of XRGB8888" --frame 3840x2160:NV13
bad_can "the width '99999999999' is not a whole number from 0 to 4294967295" \
  --frame 99999999999x2:NV12
bad_can "the height '-2' is not a whole number" --frame 2x-2:NV12
bad_can "the stride alignment '+64' is not a whole number" --frame 2x2:NV12:+64
bad_can "--frame '3840x2160' is not WIDTHxHEIGHT:FOURCC[:STRIDE_ALIGNMENT]" --frame 3840x2160
bad_can "--size '16E' is not a whole number of bytes" --size 16E
bad_can "--size '17179869184G' is not a whole number of bytes" --size 17179869184G
bad_can "--heap is empty" --heap "" --size 4096
bad_can "--heap is empty" --heap system --heap "" --size 4096
bad_can "--usage is empty" --usage "" --size 4096
bad_can "give one of --frame and --size" --heap system
bad_can "'0' is not a whole number from 1 to 4294967295" --count 0 --size 4096
bad_can "'-1' is not a whole number from 1 to 4294967295" --count -1 --size 4096
# An upper-case X and a lower-case fourcc are fine.
tools/bufctl --socket-dir "$dir" can-allocate --frame 64X48:nv12 >"$root/out" \
  || fail "64X48:nv12: $(cat "$root/out")"
grep -q 'frame 64x48 NV12 LINEAR' "$root/out" || fail "64X48:nv12: $(cat "$root/out")"
# --json on every command, zero-valued fields included (nothing allocated now).
for command in heaps clients buffers holders tokens fences metrics \
    "can-allocate --heap system --size 4096"; do
  # shellcheck disable=SC2086
  tools/bufctl --socket-dir "$dir" $command --json >"$root/json" || fail "$command --json"
  jq -e . "$root/json" >/dev/null || fail "$command --json is not JSON: $(cat "$root/json")"
done
json="$(tools/bufctl --socket-dir "$dir" heaps --json)"
grep -q '"used": "0"' <<<"$json" || fail "zero used is printed: $json"
json="$(tools/bufctl --socket-dir "$dir" clients --json)"
grep -q "\"uid\": $(id -u)," <<<"$json" || fail "uid $(id -u) is printed: $json"
# watch: below 100 ms refused; on a file, plain snapshots (no terminal
# escapes), and a daemon that stops ends it with one clear line (exit 1).
status=0; tools/bufctl --socket-dir "$dir" watch --interval 0.05 2>"$root/err" || status=$?
[ "$status" -eq 2 ] && grep -q 'at least 0.1 seconds' "$root/err" || fail "tiny interval: $status"
dir2="$root/sock2"
daemon/bufferd --socket-dir "$dir2" 2>"$root/log2" &
pid2=$!
for _ in $(seq 100); do [ -S "$dir2/fd.sock" ] && break; sleep 0.05; done
tools/bufctl --socket-dir "$dir2" watch --interval 0.2 >"$root/watch" 2>"$root/watch.err" &
watch_pid=$!
tools/bufctl --socket-dir "$dir2" watch --json --interval 0.2 >"$root/watch.json" \
  2>"$root/watch.json.err" &
watch_json_pid=$!
sleep 1.5
kill "$pid2"; wait "$pid2" || true
status=0; wait "$watch_pid" || status=$?
[ "$status" -eq 1 ] || fail "watch exited $status after the daemon stopped"
status=0; wait "$watch_json_pid" || status=$?
[ "$status" -eq 1 ] || fail "watch --json exited $status after the daemon stopped"
[ "$(grep -c '^=== bufferd in' "$root/watch")" -ge 2 ] || fail "snapshots: $(cat "$root/watch")"
if grep -q $'\033' "$root/watch"; then fail "terminal escapes on a file"; fi
for err in "$root/watch.err" "$root/watch.json.err"; do
  [ "$(cat "$err")" = "bufctl: bufferd at $dir2 stopped" ] || fail "watch said: $(cat "$err")"
done
[ "$(wc -l <"$root/watch.json")" -ge 2 ] || fail "json snapshots: $(cat "$root/watch.json")"
jq -e '.heaps.live_buffers == "0" and (.clients.clients | length) >= 1' "$root/watch.json" \
  >/dev/null || fail "watch --json lines: $(cat "$root/watch.json")"
echo PASS
