#!/usr/bin/env bash
# hot_swapdirs.sh - litefleet HOT tier (daemon) under directory exchanges.
#
# NDB pairs: R/db/NNN/x.db (matched, tree tag 'A') and R/twin/NNN/x.db (not
# matched, tag 'B'); same schema; 300 rows checkpointed + 150 in the WAL.
# A python writer holds one connection per tree open (wal_autocheckpoint=0)
# and inserts one row per tree per tick (id = next, tag = its tree's tag),
# logging every commit (time, count). The daemon `BIN -c cfg.yml replicate`
# runs (hot tier on, sync-interval 1s, watch on, addr 127.0.0.1:PORT).
# Once every key is hot (/stats), a C flipper exchanges each pair
# (renameat2 RENAME_EXCHANGE) without pause for FLIP_SECS. Then flipper and
# writer stop, the daemon gets GRACE seconds, then SIGTERM (must exit in 30 s).
# Then: latest bulk restore + point-in-time bulk restores at times taken
# during the run, and one restore at the commit time of every hot generation
# snapshot and WAL part in the replica; every restored db is classified:
#   okA/okB  one tag, integrity ok, ids exactly 1..N, 450 <= N <= what that
#            tree had committed (at the end, or by T+0.25 s for --timestamp T)
#   MIXED    both tags, or integrity not ok / unreadable on an exit-0 restore
#   ODD      anything else (non-contiguous ids, impossible N, in list but
#            not restored and no failure line)
#   failed   restore refused/failed for that key (message kept)
# Also: source trees checked at the end (SRC-BAD: source damaged), daemon log
# scanned for panics, "/proc/" paths, SIGBUS; hang at SIGTERM.
#
# Usage: hot_swapdirs.sh BIN [NDB=8] [FLIP_SECS=30] [PAUSE_US=0] [PORT=47211]
# Env: KEEP=0 removes the work dir (default keeps it; under ${TMPDIR:-/tmp}), GRACE=5, CKPT_PAGES=
# (multi-db.checkpoint-pages, default unset), WATCH=true, WRITER_FIRST=1:
# stop the writer first and keep flipping FLIP_TAIL=8 more seconds
# Exit: 0 clean, 1 MIXED/ODD/SRC-BAD/panic/hang/proc-leak, 2 setup error.
# Needs Linux (renameat2), gcc, python3 and curl; binds 127.0.0.1:PORT only.
set -u
if [ $# -lt 1 ] || [ ! -x "$1" ]; then
    echo "usage: $0 BIN [NDB=8] [FLIP_SECS=30] [PAUSE_US=0] [PORT=47211]" >&2; exit 2
fi
BIN=$(realpath "$1"); NDB=${2:-8}; FLIP_SECS=${3:-30}; PAUSE_US=${4:-0}; PORT=${5:-47211}
KEEP=${KEEP:-1}; GRACE=${GRACE:-5}; CKPT_PAGES=${CKPT_PAGES:-}; WATCH=${WATCH:-true}; WRITER_FIRST=${WRITER_FIRST:-0}; FLIP_TAIL=${FLIP_TAIL:-8}
HERE=$(dirname "$(realpath "$0")")
R=$(mktemp -d "${TMPDIR:-/tmp}/hot_swapdirs.XXXXXX") || exit 2
WPID=""; FPID=""; DPID=""
cleanup() {
    [ -n "$FPID" ] && kill -TERM "$FPID" 2>/dev/null
    [ -n "$WPID" ] && kill -KILL "$WPID" 2>/dev/null
    [ -n "$DPID" ] && kill -KILL "$DPID" 2>/dev/null
    wait 2>/dev/null
    if [ "$KEEP" = 1 ]; then echo "work dir: $R" >&2; else rm -rf "$R"; fi
}
trap cleanup EXIT
trap 'exit 2' INT TERM
now() { date -u +%Y-%m-%dT%H:%M:%S.%3NZ; }

gcc -O2 -Wall -o "$R/flipper" "$HERE/../flipper.c" || exit 2
mkdir -p "$R/tmp" "$R/state" "$R/replica"
{
cat <<EOF
multi-db:
  patterns: ["$R/db/*/x.db"]
  temp-dir: $R/tmp
  state-dir: $R/state
  scan-interval: 1s
  max-hot-databases: 100
  sync-interval: 1s
  watch: $WATCH
EOF
[ -n "$CKPT_PAGES" ] && echo "  checkpoint-pages: $CKPT_PAGES"
cat <<EOF
  replica:
    url: file://$R/replica
    path: "{{n}}"
addr: 127.0.0.1:$PORT
EOF
} >"$R/cfg.yml"

# 1. writer
python3 "$HERE/hot_writer.py" "$R" "$NDB" >"$R/writer.out" 2>"$R/writer.err" &
WPID=$!
for _ in $(seq 1 400); do grep -q ready "$R/writer.out" 2>/dev/null && break; kill -0 $WPID 2>/dev/null || break; sleep 0.05; done
grep -q ready "$R/writer.out" || { echo "writer failed"; cat "$R/writer.err"; exit 2; }

# 2. daemon
T_START=$(now)
"$BIN" -c "$R/cfg.yml" replicate >"$R/daemon.log" 2>&1 &
DPID=$!
stats() { curl -s -m 2 "http://127.0.0.1:$PORT/stats"; }
hot=0
for _ in $(seq 1 60); do
    sleep 0.5
    kill -0 $DPID 2>/dev/null || { echo "daemon died at start"; cat "$R/daemon.log"; exit 2; }
    hot=$(stats | python3 -c 'import json,sys; print(json.load(sys.stdin).get("hot",0))' 2>/dev/null || echo 0)
    [ "$hot" -ge "$NDB" ] 2>/dev/null && break
done
echo "hot before flipping: $hot/$NDB"
stats >"$R/stats.before.json"
sleep 2

# 3. flipper, with point-in-time marks
pairs=()
for k in $(seq 0 $((NDB - 1))); do n=$(printf %03d "$k"); pairs+=("$R/db/$n" "$R/twin/$n"); done
T_FLIP0=$(now)
"$R/flipper" "$PAUSE_US" "${pairs[@]}" >"$R/flipper.out" 2>"$R/flipper.err" &
FPID=$!
: >"$R/pit.txt"
echo "$T_FLIP0" >>"$R/pit.txt"
step=$(( FLIP_SECS / 5 )); [ $step -lt 1 ] && step=1
el=0
while [ $el -lt "$FLIP_SECS" ]; do
    sleep "$step"; el=$((el + step))
    [ $el -lt "$FLIP_SECS" ] && now >>"$R/pit.txt"
    kill -0 $DPID 2>/dev/null || { echo "DAEMON DIED during flipping"; break; }
done
if [ "$WRITER_FIRST" = 1 ]; then
    # writers stop while the flipping goes on: the last uploads are taken
    # under the flipping, with nothing written after them
    kill -TERM $WPID; wait $WPID 2>/dev/null; WPID=""
    now >>"$R/pit.txt"
    sleep "$FLIP_TAIL"
    kill -TERM $FPID; wait $FPID 2>/dev/null; FPID=""
else
    kill -TERM $FPID; wait $FPID 2>/dev/null; FPID=""
    now >>"$R/pit.txt"
    sleep 1.5
    kill -TERM $WPID; wait $WPID 2>/dev/null; WPID=""
fi
# 4. grace, then SIGTERM the daemon
sleep "$GRACE"
stats >"$R/stats.after.json"
now >>"$R/pit.txt"
daemon_alive=0; kill -0 $DPID 2>/dev/null && daemon_alive=1
t0=$(date +%s.%N)
hang=0
if [ $daemon_alive = 1 ]; then
    kill -TERM $DPID
    for _ in $(seq 1 300); do kill -0 $DPID 2>/dev/null || break; sleep 0.1; done
    if kill -0 $DPID 2>/dev/null; then hang=1; kill -KILL $DPID; fi
fi
wait $DPID; drc=$?; DPID=""
tstop=$(python3 -c "import time; print(round(time.time()-$t0,2))")
echo "daemon: alive_before_term=$daemon_alive rc=$drc stop_secs=$tstop hang=$hang $(cat "$R/flipper.out")"

# 5. restores
"$BIN" -c "$R/cfg.yml" list >"$R/list.txt" 2>"$R/list.err"
awk '$1 ~ /^[0-9][0-9][0-9]$/ {print $1}' "$R/list.txt" >"$R/keys.txt"
"$BIN" -c "$R/cfg.yml" restore --prefix / -o "$R/out_latest" --if-replica-exists >"$R/restore_latest.log" 2>&1
echo "latest $? -" >"$R/restores.txt"
i=0
while read -r T; do
    i=$((i + 1))
    "$BIN" -c "$R/cfg.yml" restore --prefix / -o "$R/out_pit$i" --timestamp "$T" >"$R/restore_pit$i.log" 2>&1
    echo "pit$i $? $T" >>"$R/restores.txt"
done <"$R/pit.txt"

# 5b. every hot generation snapshot and WAL part, restored at its own
# commit time (names and pack indexes of the file:// replica)
: >"$R/gens.txt"
mkdir -p "$R/out_gen"
python3 "$HERE/gen_times.py" "$R/replica" >"$R/gen_times.txt"
while read -r key gen T kind; do
    id="${key}_${gen}_$(echo "$T" | tr -d ':.-')"
    "$BIN" -c "$R/cfg.yml" restore "$key" -o "$R/out_gen/$id.db" --timestamp "$T" \
        >"$R/out_gen/$id.log" 2>&1
    echo "$key $gen $T $? $id $kind" >>"$R/gens.txt"
done <"$R/gen_times.txt"

# 6. classify
python3 "$HERE/hot_classify.py" "$R" "$NDB" "$hang" "$drc" "$daemon_alive"
rc=$?
for k in $(cat "$R/bad_keys.txt" 2>/dev/null); do
    "$BIN" -c "$R/cfg.yml" generations "$k" >"$R/generations_$k.txt" 2>&1
done
exit $rc
