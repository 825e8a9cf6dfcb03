"""Classifier for hot_swapdirs.sh: argv R NDB HANG DAEMON_RC DAEMON_ALIVE.
Prints one summary line per restore set, bad databases, source check and
daemon-log findings. Exit 1 on MIXED/ODD/SRC-BAD/panic/hang/proc-leak."""
import bisect, datetime, os, re, sqlite3, sys

R, ndb, hang, drc, alive = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
keys = [f"{k:03d}" for k in range(ndb)]
listed = set(open(f"{R}/keys.txt").read().split())

# commit log: (k, tag) -> sorted times, counts
hist = {}
for line in open(f"{R}/commits.txt"):
    p = line.split()
    if len(p) != 4:
        continue
    hist.setdefault((int(p[0]), p[1]), []).append((float(p[3]), int(p[2])))
for v in hist.values():
    v.sort()
final = {kt: v[-1][1] for kt, v in hist.items()}

def count_at(kt, t):
    v = hist[kt]
    i = bisect.bisect_right([x[0] for x in v], t)
    return v[i - 1][1] if i else 0

def inspect(path):
    try:
        c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        ic = [r[0] for r in c.execute("PRAGMA integrity_check")]
        tags = dict(c.execute("SELECT tag, count(*) FROM t GROUP BY tag").fetchall())
        mn, mx, cnt = c.execute("SELECT min(id), max(id), count(*) FROM t").fetchone()
        c.close()
    except sqlite3.Error as e:
        return None, f"unreadable: {e}"
    return (ic, tags, mn, mx, cnt), ""

bad = False
bad_keys = set()
total = dict(okA=0, okB=0, mixed=0, odd=0, failed=0, absent=0)
def tally(counts, notes, cls, key, head, detail):
    """Counts one restore of `key` as `cls`; a mixed or odd one makes the run
    bad, and every failure gets a note: `head`, its class, `detail`."""
    global bad
    counts[cls] += 1
    if cls in ("mixed", "odd"):
        bad = True
        bad_keys.add(key)
    if cls in ("mixed", "odd", "failed"):
        notes.append(f"{head} {cls.upper()} {detail}")

def judge(path, limit):
    """Classifies the restored database at `path`, `limit(tag)` the most rows
    its tree had: (class, detail, tag, rows), tag and rows None unless ok."""
    res, err = inspect(path)
    if res is None:
        return "mixed", err, None, None
    ic, tags, mn, mx, n = res
    if ic != ["ok"]:
        return "mixed", f"integrity={ic[:3]} tags={tags}", None, None
    if len(tags) > 1:
        return "mixed", f"tags={tags} ids={mn}..{mx} n={n}", None, None
    tag = next(iter(tags))
    lim = limit(tag)
    if not (mn == 1 and mx == n and 450 <= n <= lim):
        return "odd", f"tag={tag} ids={mn}..{mx} n={n} limit={lim}", None, None
    return "ok" + tag, "", tag, n


for line in open(f"{R}/restores.txt"):
    name, rc, *ts = line.split()
    rc = int(rc)
    T = None
    if ts and ts[0] != "-":
        T = datetime.datetime.strptime(ts[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
    out = f"{R}/out_{name}"
    log = open(f"{R}/restore_{name}.log", errors="replace").read().splitlines()
    cnt = dict(okA=0, okB=0, mixed=0, odd=0, failed=0, absent=0)
    notes, lag = [], []
    for key in keys:
        k = int(key)
        path = os.path.join(out, key + ".db")
        klines = [l for l in log if re.search(rf"(?<![0-9A-Za-z]){key}(?![0-9A-Za-z])", l)
                  and re.search(r"(?i)error|fail|refus|skip|warn", l)]
        if not os.path.exists(path):
            if klines:
                cls, det = "failed", klines[0][-300:]
            elif key not in listed:
                cls, det = "absent", "not in replica"
            else:
                cls, det = "odd", "listed, not restored, no message"
        else:
            lim = (lambda tag: final[(k, tag)]) if T is None else (
                lambda tag: count_at((k, tag), T + 0.25))
            cls, det, tag, n = judge(path, lim)
            if tag is not None:
                ref = final[(k, tag)] if T is None else count_at((k, tag), T)
                lag.append(ref - n)
        tally(cnt, notes, cls, key, f"   {name} {key}", det)
    for c in cnt:
        total[c] += cnt[c]
    lagtxt = f"rows_behind(min/max)={min(lag)}/{max(lag)}" if lag else ""
    print(f" {name:6s} rc={rc} " + " ".join(f"{c}={v}" for c, v in cnt.items()) + f" {lagtxt} {' '.join(ts)}")
    for n in notes:
        print(n)
# every hot generation snapshot, restored at its own commit time
gpath = f"{R}/gens.txt"
if os.path.exists(gpath):
    g = dict(okA=0, okB=0, mixed=0, odd=0, failed=0)
    gnotes = []
    for line in open(gpath):
        key, gen, ts, rc, fid, kind = line.split()
        k = int(key)
        T = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
        path = f"{R}/out_gen/{fid}.db"
        if not os.path.exists(path):
            cls = "failed" if rc != "0" else "odd"
            det = open(f"{R}/out_gen/{fid}.log", errors="replace").read().strip().splitlines()
            det = (det[-1] if det else "")[-300:]
        else:
            cls, det, _, _ = judge(path, lambda tag: count_at((k, tag), T + 0.25))
        tally(g, gnotes, cls, key, f"   gen {key} {gen} {kind} T={ts} rc={rc}", det)
    print(" GENSNAPS " + " ".join(f"{c}={v}" for c, v in g.items()))
    for n in gnotes:
        print(n)
    for c in ("mixed", "odd"):
        total[c] += g[c]

print(" RESTORES " + " ".join(f"{c}={v}" for c, v in total.items()))

# source trees
src_bad = 0
at_path = {}
for key in keys:
    k = int(key)
    for where in ("db", "twin"):
        p = f"{R}/{where}/{key}/x.db"
        res, err = inspect(p)
        if res is None:
            print(f"   SRC-BAD {where}/{key}: {err}")
            src_bad += 1
            continue
        ic, tags, mn, mx, n = res
        tag = next(iter(tags)) if len(tags) == 1 else None
        if ic != ["ok"] or tag is None or not (mn == 1 and mx == n == final[(k, tag)]):
            print(f"   SRC-BAD {where}/{key}: integrity={ic[:3]} tags={tags} ids={mn}..{mx} n={n} "
                  f"final={ {t: final[(k, t)] for t in 'AB'} }")
            src_bad += 1
        if where == "db":
            at_path[key] = tag
print(f" SOURCES bad={src_bad} at_db_path_tagA={sum(1 for v in at_path.values() if v == 'A')}")
wf = open(f"{R}/writer.final").read().split()
print(f" WRITER errors={wf[-1]}; write errors in writer.err: "
      f"{sum(1 for l in open(f'{R}/writer.err') if 'write error' in l)}")

# daemon log
dl = open(f"{R}/daemon.log", errors="replace").read().splitlines()
panics = [l for l in dl if re.search(r"panick|SIGBUS|RUST_BACKTRACE", l)]
procs = [l for l in dl + sum((open(f"{R}/restore_{x.split()[0]}.log", errors="replace").read().splitlines()
                             for x in open(f"{R}/restores.txt")), [])
         if "/proc/" in l]
levels = {}
for l in dl:
    m = re.search(r"\b(ERROR|WARN)\b", l)
    if m:
        levels[m.group(1)] = levels.get(m.group(1), 0) + 1
print(f" DAEMON rc={drc} hang={hang} alive_at_term={alive} panics={len(panics)} proc_paths={len(procs)} "
      f"levels={levels}")
for l in (panics + procs)[:5]:
    print("   " + l[:400])
if panics or procs or hang or not alive or src_bad:
    bad = True
open(f"{R}/bad_keys.txt", "w").write("\n".join(sorted(bad_keys)) + "\n")
sys.exit(1 if bad else 0)
