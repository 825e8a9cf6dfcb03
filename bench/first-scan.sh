#!/bin/bash
# The first scan of a new daemon (no state file, empty replica), against
# `find` over the same tree, side by side, three rounds. Used for the
# README's "First scan of a new daemon" figures.
#
#   litefleet bench scan --databases 100000 --iterations 1 --dir /tmp/lf-tree
#   bench/first-scan.sh ./target/release/litefleet /tmp/lf-tree 19090
#
# Args: the litefleet binary, the tree `bench scan --dir` built, a free port
# on 127.0.0.1 for /stats. Needs curl and python3.
set -euo pipefail
BIN=$1; TREE=$2; PORT=$3
. "$(dirname "$0")/common.sh"
# Warm the dentry and inode caches for both.
timed_find "$TREE" > /dev/null
for round in 1 2 3; do
  W=$(mktemp -d)
  daemon_config "$W/c.yml" "$PORT" "$TREE/*/databases/*/branches/*/tenants/*.db" 1h "$W"
  read -r scan _ dbs <<< "$(first_scan "$BIN" "$W/c.yml" "$PORT")"
  rm -rf "$W"
  echo "round $round: first scan of a new daemon ${scan} s ($dbs databases), find $(timed_find "$TREE") s"
done
