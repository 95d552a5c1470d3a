#!/usr/bin/env bash
# The chaos soak for 10 s in the suite (plain and under ASan): 32 clients,
# one killed with -9 every 100 ms and one session ended by the controller
# every second, while they share buffers, fences and timelines (tests/chaos.cc
# says what fails it). A random seed each run, printed first and in the
# summary line; `--test_env=CHAOS_SEED=N` replays one.
set -euo pipefail
args=(--seconds 10 --clients 32 --kill-every-ms 100 --progress-seconds 0)
if [ -n "${CHAOS_SEED:-}" ]; then args+=(--seed "$CHAOS_SEED"); fi
exec tests/chaos "${args[@]}"
