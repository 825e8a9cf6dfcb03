#!/usr/bin/env bash
# hot_gen_mix.sh - minimal repro: a litefleet HOT-tier generation that joins
# one tree's snapshot with the other tree's WAL frames, restored with exit 0
# and a clean integrity_check but rows of both trees ("MIXED").
#
# Runs hot_swapdirs.sh (same directory; see its header) in short rounds:
# 8 pairs R/db/NNN <-> R/twin/NNN exchanged without pause for 6 s while the
# daemon streams the R/db databases (hot tier, sync-interval 1s) and writers
# insert rows tagged A / B; then every hot generation snapshot and WAL part
# is restored at its own commit time (plus latest and sampled times).
# Stops at the first round with a MIXED/ODD database.
#
# Usage: hot_gen_mix.sh BIN [ROUNDS=6] [PORT=47250]
# Exit: 1 a MIXED/ODD restore (bug present), 0 none in ROUNDS rounds, 2 setup.
set -u
[ $# -ge 1 ] && [ -x "$1" ] || { echo "usage: $0 BIN [ROUNDS=6] [PORT=47250]" >&2; exit 2; }
HERE=$(dirname "$(realpath "$0")")
ROUNDS=${2:-6}; PORT=${3:-47250}
for r in $(seq 1 "$ROUNDS"); do
    out=$(GRACE=3 KEEP=${KEEP:-0} "$HERE/hot_swapdirs.sh" "$1" 8 6 0 "$PORT" 2>&1); rc=$?
    echo "round $r rc=$rc"
    echo "$out" | grep -E 'MIXED|ODD|GENSNAPS|RESTORES|^ latest|SRC-BAD|DAEMON|work dir' | sed 's/^/  /'
    [ $rc = 2 ] && exit 2
    if echo "$out" | grep -qE 'MIXED|ODD'; then echo "BUG: MIXED/ODD restore in round $r"; exit 1; fi
done
echo "no MIXED/ODD in $ROUNDS rounds"; exit 0
