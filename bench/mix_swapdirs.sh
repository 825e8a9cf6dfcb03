#!/usr/bin/env bash
# mix_swapdirs.sh - reproduce litefleet's "mixed snapshot" bug under directory swaps.
#
# What it shows
#   litefleet snapshots a live WAL database D/x.db (cold tier) while directory D
#   is exchanged, back and forth and without pause, with a twin directory that
#   holds a different database of the same name (renameat2 RENAME_EXCHANGE).
#   A correct snapshot is one tree's database, main file and WAL together, or a
#   refusal. The buggy build could take the main file of one tree and the WAL
#   frames of the other ("mixed" state); such a snapshot uploads, restores with
#   exit 0 and even passes PRAGMA integrity_check, but holds rows of both trees.
#
# How
#   Per round: NDB pairs R/db/NNN/x.db (matched by the config pattern, rows
#   tagged 'A') and R/twin/NNN/x.db (not matched, rows tagged 'B'). Both have
#   the same schema and 450 rows: 300 checkpointed into the main file, 150 only
#   in the WAL. A python writer keeps every connection open
#   (wal_autocheckpoint=0) and updates one row per database every 20 ms; it is
#   SIGKILLed at the end so the WAL is never checkpointed. A C flipper loops
#   RENAME_EXCHANGE over the pairs in turn. Meanwhile
#   `BIN -c cfg.yml replicate --once` uploads to a file:// replica (hot tier
#   off: max-hot-databases: 0). Then flipper and writer stop,
#   `BIN restore --prefix / -o out` restores every key, and each restored
#   database is classified:
#     ok-A / ok-B  450 rows, all with one tag, integrity_check ok
#     MIXED        rows with both tags, or integrity_check not ok / unreadable
#     ODD          anything else (wrong row count, a key in the replica whose
#                  restore produced nothing, ...)
#   A key that is not in the replica is a snapshot litefleet refused (counted
#   as "refused"; that is correct behaviour under this churn).
#
#   With TWIN=link, each R/db/NNN is exchanged with a symbolic link to the
#   twin directory instead (R/lnk/NNN -> R/twin/NNN): the twin is then a
#   tree outside the pattern's root, reached through a link below it, which
#   litefleet never follows, so a restored ok-B database (the outside one,
#   uploaded under the key) is a failure too ("OUTSIDE").
#
# Usage
#   mix_swapdirs.sh BIN [NDB=10] [ROUNDS=25] [PAUSE_US=0]
#     BIN       litefleet binary to test
#     NDB       database pairs per round
#     ROUNDS    rounds
#     PAUSE_US  microseconds to sleep between two exchanges (0: none)
#   Env: KEEP=1 keeps the work directory (created with mktemp -d under
#   ${TMPDIR:-/tmp}) with every round's data and logs; otherwise it is removed.
#   TWIN=link exchanges each directory with a link to its twin (see above).
#
# Output
#   One line per round, one line per bad database, and finally
#   TOTAL mixed=M odd=O okA=.. okB=.. refused=.. uploaded=..
#
# Exit code
#   0  no mixed or odd database in any round (the bug did not show)
#   1  at least one MIXED or ODD database, or with TWIN=link an ok-B one
#      (the bug reproduced)
#   2  usage or setup error
#
# Needs Linux (renameat2 with RENAME_EXCHANGE, kernel >= 3.15, on a file
# system that supports it, e.g. ext4, xfs, btrfs, tmpfs), bash, python3 (with
# its sqlite3 module) and gcc. Takes well under a minute at the defaults on a
# 2-core machine.

set -u

if [ $# -lt 1 ] || [ ! -x "$1" ]; then
    echo "usage: $0 BIN [NDB=10] [ROUNDS=25] [PAUSE_US=0]   (BIN: litefleet binary)" >&2
    exit 2
fi
BIN=$(realpath "$1")
NDB=${2:-10}
ROUNDS=${3:-25}
PAUSE_US=${4:-0}
KEEP=${KEEP:-0}
TWIN=${TWIN:-dir}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mix_swapdirs.XXXXXX") || exit 2
WRITER_PID=""
FLIPPER_PID=""

# Stop our own helpers (by pid) and remove the work directory unless KEEP=1.
cleanup() {
    [ -n "$FLIPPER_PID" ] && kill -TERM "$FLIPPER_PID" 2>/dev/null
    [ -n "$WRITER_PID" ] && kill -KILL "$WRITER_PID" 2>/dev/null
    wait 2>/dev/null
    if [ "$KEEP" = 1 ]; then
        echo "kept work directory: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 2' INT TERM

# ---------------------------------------------------------------------------
# Helper 1 (python): the writer. Creates both trees, prints "ready", then
# updates one row per database every 20 ms with every connection held open.
# Killed with SIGKILL, so the 150 WAL-only rows are never checkpointed.
# ---------------------------------------------------------------------------
cat >"$WORK/writer.py" <<'EOF'
import os, sqlite3, sys, time

root, ndb = sys.argv[1], int(sys.argv[2])
PAD = "x" * 200  # a few rows per page: the tables span many pages

def create(path, tag):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA wal_autocheckpoint=0")  # only we checkpoint, once
    c.execute("PRAGMA synchronous=OFF")       # no fsyncs: fast setup, same files
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, tag TEXT NOT NULL, n INTEGER NOT NULL, pad TEXT)")
    c.execute("BEGIN")
    c.executemany("INSERT INTO t VALUES(?,?,0,?)", [(i, tag, PAD) for i in range(1, 301)])
    c.execute("COMMIT")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # rows 1..300: main file
    for i in range(301, 451):                     # rows 301..450: WAL only
        c.execute("INSERT INTO t VALUES(?,?,0,?)", (i, tag, PAD))
    return c

conns = []
for k in range(ndb):
    conns.append(create(f"{root}/db/{k:03d}/x.db", "A"))
    conns.append(create(f"{root}/twin/{k:03d}/x.db", "B"))
print("ready", flush=True)

step = 0
while True:
    row = 1 + step % 450
    for c in conns:
        c.execute("UPDATE t SET n = n + 1 WHERE id = ?", (row,))
    step += 1
    time.sleep(0.02)
EOF

# ---------------------------------------------------------------------------
# Helper 2 (python): the classifier. Prints one line "okA=.. okB=.. mixed=..
# odd=.. refused=.. uploaded=.." then one line per bad database.
# Args: OUT_DIR NDB LISTED_KEYS_FILE
# ---------------------------------------------------------------------------
cat >"$WORK/classify.py" <<'EOF'
import os, sqlite3, sys

out, ndb, listed_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
listed = set(open(listed_file).read().split())
count = dict(okA=0, okB=0, mixed=0, odd=0, refused=0, uploaded=0)
notes = []

def inspect(path):
    """Return (class, detail) for one restored database."""
    try:
        c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        ic = [r[0] for r in c.execute("PRAGMA integrity_check")]
        tags = dict(c.execute("SELECT tag, count(*) FROM t GROUP BY tag").fetchall())
        c.close()
    except sqlite3.Error as e:
        return "mixed", f"unreadable: {e}"
    if ic != ["ok"]:
        return "mixed", f"integrity_check={ic[:3]} tags={tags}"
    if len(tags) > 1:
        return "mixed", f"tags={tags}"
    if tags == {"A": 450}:
        return "okA", ""
    if tags == {"B": 450}:
        return "okB", ""
    return "odd", f"tags={tags}"

for k in range(ndb):
    key = f"{k:03d}"
    path = os.path.join(out, key + ".db")
    if key in listed:
        count["uploaded"] += 1
    if not os.path.exists(path):
        if key in listed:
            cls, detail = "odd", "in the replica but not restored"
        else:
            cls, detail = "refused", ""
    else:
        cls, detail = inspect(path)
        if key not in listed:
            detail = (detail + " (restored but not listed)").strip()
            cls = cls if cls != "okA" and cls != "okB" else "odd"
    count[cls] += 1
    if cls in ("mixed", "odd"):
        notes.append(f"   {key} {cls.upper()} {detail}")

print(" ".join(f"{k}={v}" for k, v in count.items()))
for n in notes:
    print(n)
EOF

# The flipper (bench/flipper.c, shared with bench/hot_swapdirs): exchanges
# each pair a<->b in turn until SIGTERM, then prints "exchanges=N errors=E".
if ! gcc -O2 -Wall -o "$WORK/flipper" "$(dirname "$(realpath "$0")")/flipper.c"; then
    echo "gcc failed" >&2
    exit 2
fi

# Totals over all rounds.
T_okA=0 T_okB=0 T_mixed=0 T_odd=0 T_refused=0 T_uploaded=0

for round in $(seq 1 "$ROUNDS"); do
    R="$WORK/r$round"
    mkdir -p "$R/tmp" "$R/state" "$R/replica" "$R/out"

    # Config: only R/db/*/x.db is matched (key = NNN); hot tier off, so every
    # database goes through the cold-tier snapshot path. No inotify watch:
    # --once is one scan. temp-dir / state-dir inside the round directory.
    cat >"$R/cfg.yml" <<EOF
multi-db:
  patterns: ["$R/db/*/x.db"]
  temp-dir: $R/tmp
  state-dir: $R/state
  max-hot-databases: 0
  watch: false
  replica:
    url: file://$R/replica
    path: "{{n}}"
EOF

    # 1. Writer: build both trees, wait until they are ready.
    python3 "$WORK/writer.py" "$R" "$NDB" >"$R/writer.out" 2>"$R/writer.err" &
    WRITER_PID=$!
    for _ in $(seq 1 300); do
        grep -q ready "$R/writer.out" 2>/dev/null && break
        kill -0 "$WRITER_PID" 2>/dev/null || break
        sleep 0.05
    done
    if ! grep -q ready "$R/writer.out" 2>/dev/null; then
        echo "round $round: writer did not start:" >&2
        cat "$R/writer.err" >&2
        exit 2
    fi

    # 2. Flipper: exchange R/db/NNN <-> R/twin/NNN for every pair, in turn
    # (TWIN=link: R/db/NNN <-> R/lnk/NNN, a link to R/twin/NNN).
    pairs=()
    for k in $(seq 0 $((NDB - 1))); do
        n=$(printf %03d "$k")
        if [ "$TWIN" = link ]; then
            mkdir -p "$R/lnk"
            ln -s "$R/twin/$n" "$R/lnk/$n"
            pairs+=("$R/db/$n" "$R/lnk/$n")
        else
            pairs+=("$R/db/$n" "$R/twin/$n")
        fi
    done
    "$WORK/flipper" "$PAUSE_US" "${pairs[@]}" >"$R/flipper.out" 2>"$R/flipper.err" &
    FLIPPER_PID=$!

    # 3. One replicate cycle while the directories are being exchanged.
    # (Exit 1 just means some database was not backed up: a refusal.)
    "$BIN" -c "$R/cfg.yml" replicate --once >"$R/replicate.log" 2>&1
    rep_rc=$?

    # 4. Stop the flipper, then the writer (SIGKILL: no final checkpoint).
    kill -TERM "$FLIPPER_PID"; wait "$FLIPPER_PID" 2>/dev/null; FLIPPER_PID=""
    kill -KILL "$WRITER_PID"; wait "$WRITER_PID" 2>/dev/null; WRITER_PID=""

    # 5. What is in the replica, then restore everything in it.
    if ! "$BIN" -c "$R/cfg.yml" list >"$R/list.txt" 2>"$R/list.err"; then
        echo "round $round: '$BIN list' failed:" >&2
        cat "$R/list.err" >&2
        exit 2
    fi
    # keys are the first word of list's summary lines that look like NNN
    awk '$1 ~ /^[0-9][0-9][0-9]$/ {print $1}' "$R/list.txt" >"$R/keys.txt"
    "$BIN" -c "$R/cfg.yml" restore --prefix / -o "$R/out" --if-replica-exists >"$R/restore.log" 2>&1
    res_rc=$?

    # 6. Classify.
    python3 "$WORK/classify.py" "$R/out" "$NDB" "$R/keys.txt" >"$R/classify.txt"
    read -r line <"$R/classify.txt"
    # Sets okA okB mixed odd refused uploaded. A key the replica holds but the
    # restore did not produce is counted as odd by the classifier.
    eval "$line"
    echo "round $round: replicate rc=$rep_rc restore rc=$res_rc okA=$okA okB=$okB mixed=$mixed odd=$odd refused=$refused uploaded=$uploaded $(cat "$R/flipper.out")"
    tail -n +2 "$R/classify.txt"
    if [ "$TWIN" = link ] && [ "$okB" -gt 0 ]; then
        echo "   OUTSIDE: $okB database(s) read through a link below the root uploaded"
    fi

    T_okA=$((T_okA + okA)); T_okB=$((T_okB + okB)); T_mixed=$((T_mixed + mixed))
    T_odd=$((T_odd + odd)); T_refused=$((T_refused + refused)); T_uploaded=$((T_uploaded + uploaded))

    [ "$KEEP" = 1 ] || rm -rf "$R"
done

echo "TOTAL mixed=$T_mixed odd=$T_odd okA=$T_okA okB=$T_okB refused=$T_refused uploaded=$T_uploaded  (bin=$BIN ndb=$NDB rounds=$ROUNDS pause_us=$PAUSE_US twin=$TWIN)"
if [ "$TWIN" = link ]; then
    [ $((T_mixed + T_odd + T_okB)) -eq 0 ]
else
    [ $((T_mixed + T_odd)) -eq 0 ]
fi
