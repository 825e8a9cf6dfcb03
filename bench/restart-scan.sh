#!/bin/bash
# The daemon's first scan after a restart on synced state, against `find`
# over the same tree, side by side. Used for the README's "First scan after
# a restart" figures.
#
#   litefleet bench scan --databases 20000 --iterations 1 --dir /tmp/lf-tree
#   bench/restart-scan.sh ./target/release/litefleet /tmp/lf-tree 20000 19090
#
# Args: the litefleet binary, the tree `bench scan --dir` built, its number of
# databases, a free port on 127.0.0.1 for /stats. Needs curl and python3.
set -euo pipefail
BIN=$1; TREE=$2; N=$3; PORT=$4
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
. "$(dirname "$0")/common.sh"
daemon_config "$W/c.yml" "$PORT" "$TREE/*/databases/*/branches/*/tenants/*.db" 1h "$W"
# First run: back everything up, then stop (the state file is written).
backup_once "$BIN" "$W/c.yml" "$PORT" "$N"
for round in 1 2 3; do
  read -r scan pending _ <<< "$(first_scan "$BIN" "$W/c.yml" "$PORT")"
  echo "round $round: first scan after restart ${scan} s ($pending pending), find $(timed_find "$TREE") s"
done
