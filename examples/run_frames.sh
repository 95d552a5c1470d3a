#!/usr/bin/env bash
# Frame sharing in one command: a compositor and N frame_producers on
# bufferd, for some seconds.
#
#   examples/run_frames.sh [--producers 2] [--seconds 10] [--width 1920] [--height 1080]
#                          [--fps 60] [--png out.png] [--png-every 60]
#                          [--socket-dir DIR] [-- extra producer flags]
#
# --producers is 1 to 4. With --socket-dir, it uses the daemon serving
# there; without, it starts a private one (embedded default config) in a
# temporary dir and stops it at the end. The compositor prints a summary per
# producer every second and a RESULT line per producer at the end; each
# producer prints what it did. Exits non-zero if any of them failed.
set -euo pipefail

producers=2 seconds=10 width=1920 height=1080 fps=60 png="" png_every=60 socket_dir=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --producers) producers="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --width) width="$2"; shift 2 ;;
    --height) height="$2"; shift 2 ;;
    --fps) fps="$2"; shift 2 ;;
    --png) png="$2"; shift 2 ;;
    --png-every) png_every="$2"; shift 2 ;;
    --socket-dir) socket_dir="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "run_frames.sh: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done
if ! [[ "$producers" =~ ^[1-4]$ ]]; then
  echo "run_frames.sh: --producers must be 1 to 4" >&2
  exit 2
fi
# Paths given relative to where we were called from, before moving to the
# repository.
[ -n "$png" ] && png="$(realpath -m -- "$png")"
[ -n "$socket_dir" ] && socket_dir="$(realpath -m -- "$socket_dir")"
cd "$(dirname "$0")/.."

tools/setup
bazel build //daemon:bufferd //examples:compositor //examples:frame_producer
bin=bazel-bin

work="$(mktemp -d /tmp/bufferd-frames.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if [ -z "$socket_dir" ]; then
  socket_dir="$work/bufferd"
  "$bin/daemon/bufferd" --socket-dir "$socket_dir" --log-level warn >"$work/bufferd.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$socket_dir/fd.sock" ] && break; sleep 0.05; done
  [ -S "$socket_dir/fd.sock" ] || { cat "$work/bufferd.log" >&2; exit 1; }
fi

png_args=()
[ -n "$png" ] && png_args=(--png "$png" --png-every "$png_every")
"$bin/examples/compositor" --socket-dir "$socket_dir" --listen "$work/compositor.sock" \
  --producers "$producers" --width "$width" --height "$height" --exit-when-done \
  "${png_args[@]}" &
compositor=$!
pids+=("$compositor")
for _ in $(seq 200); do
  [ -S "$work/compositor.sock" ] && break
  kill -0 "$compositor" 2>/dev/null || break
  sleep 0.05
done
if ! [ -S "$work/compositor.sock" ]; then
  echo "run_frames.sh: the compositor did not start" >&2
  exit 1
fi

producer_pids=()
for i in $(seq 0 $((producers - 1))); do
  "$bin/examples/frame_producer" --socket-dir "$socket_dir" --compositor "$work/compositor.sock" \
    --name "producer-$i" --width "$width" --height "$height" --fps "$fps" \
    --seconds "$seconds" "${extra[@]}" &
  producer_pids+=($!)
done
status=0
for pid in "${producer_pids[@]}"; do wait "$pid" || status=1; done
# The compositor ends by itself once every producer that joined has left;
# one that never joined (it failed first) would keep it waiting.
for _ in $(seq 40); do kill -0 "$compositor" 2>/dev/null || break; sleep 0.05; done
kill -TERM "$compositor" 2>/dev/null || true
wait "$compositor" || status=1
exit "$status"
