#!/bin/bash
# Memory and threads of the `replicate` daemon after its first full backup of
# a tree of tiny databases, and after two idle scans, against the same daemon
# tracking nothing (the empty process). Used for the README's "Daemon memory
# after a first backup" figures.
#
#   litefleet bench scan --databases 20000 --iterations 1 --dir /tmp/lf-tree
#   bench/daemon-rss.sh ./target/release/litefleet /tmp/lf-tree 20000 19090
#
# Args: the litefleet binary, the tree `bench scan --dir` built, its number of
# databases, a free port on 127.0.0.1 for /stats. Needs curl and python3.
set -euo pipefail
BIN=$1; TREE=$2; N=$3; PORT=$4
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
. "$(dirname "$0")/common.sh"
config() { daemon_config "$W/c.yml" "$PORT" "$1" 5s "$W"; }
field() { awk -v f="$1" '$1 == f":" {print $2}' "/proc/$P/status"; }
# The empty process: two scans of a pattern that matches nothing.
mkdir -p "$W/none"
config "$W/none/*.db"
"$BIN" --log-level warn replicate --config "$W/c.yml" &
P=$!
sleep 11
empty=$(field VmRSS)
kill -TERM "$P"
wait "$P" || true
rm -rf "$W/state" "$W/replica"

config "$TREE/*/databases/*/branches/*/tenants/*.db"
start=$(date +%s)
"$BIN" --log-level warn replicate --config "$W/c.yml" &
P=$!
peak=0
while true; do
  t=$(field Threads || echo 0)
  [ "${t:-0}" -gt "$peak" ] && peak=$t
  read -r ok pending < <(curl -s "127.0.0.1:$PORT/stats" 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["uploads_ok"], d["pending"])' 2>/dev/null ||
    echo "0 1")
  if [ "$ok" -ge "$N" ] && [ "$pending" -eq 0 ]; then break; fi
  sleep 0.2
done
took=$(( $(date +%s) - start ))
after=$(field VmRSS)
sleep 12
idle=$(field VmRSS)
threads=$(field Threads)
kill -TERM "$P"
wait "$P" || true
echo "first backup of $N databases: ${took} s, at most $peak threads"
echo "RSS: ${empty} kB tracking nothing, ${after} kB after the backup, ${idle} kB after two idle scans ($threads threads)"
echo "above the empty process, per database: $(( (after - empty) * 1024 / N )) B after the backup, $(( (idle - empty) * 1024 / N )) B idle"
