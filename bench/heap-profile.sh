#!/bin/bash
# Where the idle daemon's heap goes, by allocation site: heaptrack records a
# daemon restarted on a fully synced state (the steady state of a large
# idle fleet: every database tracked, nothing to upload) for three scans,
# then the daemon is killed (SIGKILL: nothing is freed), so heaptrack's
# "leaked" figure is the heap live at that moment, by call site.
#
#   litefleet bench scan --databases 100000 --iterations 1 --dir /tmp/lf-tree
#   bench/heap-profile.sh ./target/release/litefleet /tmp/lf-tree 100000 19091
#
# Args: the litefleet binary, the tree `bench scan --dir` built, its number of
# databases, a free port on 127.0.0.1 for /stats. Needs heaptrack (Debian
# package `heaptrack`), curl and python3. Prints heaptrack's summary and the
# largest live allocation sites.
set -euo pipefail
BIN=$1; TREE=$2; N=$3; PORT=$4
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
. "$(dirname "$0")/common.sh"
daemon_config "$W/c.yml" "$PORT" "$TREE/*/databases/*/branches/*/tenants/*.db" 5s "$W"
# The first backup, without the profiler.
backup_once "$BIN" "$W/c.yml" "$PORT" "$N"
# The restart, profiled: its first scan finds everything synced.
heaptrack -o "$W/heap" "$BIN" --log-level warn replicate --config "$W/c.yml" > "$W/heaptrack.log" 2>&1 &
until [ "$(stat_of "$PORT" 'int(d["scans"] >= 3)' 0)" = 1 ]; do sleep 1; done
echo "after 3 scans: $(stat_of "$PORT" 'd["databases"], d["pending"], d["uploads_ok"]' '?') (databases, pending, uploads)"
APP=$(pgrep -f -x "$BIN --log-level warn replicate --config $W/c.yml")
grep VmRSS "/proc/$APP/status"
kill -KILL "$APP"
wait || true
# Each live allocation site with its two innermost frames, then the totals.
heaptrack_print -l 1 -p 0 -a 0 -T 0 -n 12 "$W"/heap*.zst 2>/dev/null |
  awk '/^MEMORY LEAKS/ {on = 1; next}
       on && /leaked over/ {print; k = 2; next}
       on && k > 0 && /^ +[^ ]/ && !/^ +(in|at) / {print; k--; next}
       /^(total runtime|calls to allocation|peak heap|peak RSS|total memory leaked)/ {print}'
