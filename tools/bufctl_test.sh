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
if tools/bufctl --socket-dir "$root/nothing" heaps 2>"$root/err"; then fail "no daemon accepted"; fi
grep -q 'UNAVAILABLE' "$root/err" || fail "no-daemon error: $(cat "$root/err")"
echo PASS
