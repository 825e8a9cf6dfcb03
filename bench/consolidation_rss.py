"""Peak RSS of the daemon while many busy hot databases consolidate their
fleet log parts at the same time (README: "Consolidation"), and a checked
restore of each afterwards.

Usage: LF=./target/release/litefleet python3 bench/consolidation_rss.py [N] [KB] [S]
N hot WAL databases (default 20), all streaming from the daemon's start, so
that they consolidate together; each commits KB kilobytes of random
(incompressible) rows a second (default 1000) for S seconds (default 40),
with `log-consolidate-interval: 30s`. Prints the daemon's peak RSS (VmHWM)
before the first consolidation and at the end, then stops the daemon and
restores and compares every database. Binds 127.0.0.1:19292.
"""
import os, sys, time, sqlite3, subprocess, json, urllib.request, shutil, hashlib
LF = os.environ.get("LF", "./target/release/litefleet")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
KB = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
S = int(sys.argv[3]) if len(sys.argv) > 3 else 40
base = os.environ.get("DIR", "/tmp/lf-consolidation")
shutil.rmtree(base, ignore_errors=True)
for d in ["data", "replica", "tmp", "state", "out"]:
    os.makedirs(f"{base}/{d}")
conns = []
for i in range(N):
    c = sqlite3.connect(f"{base}/data/db{i:04d}.db", isolation_level=None)
    c.execute("pragma journal_mode=wal")
    c.execute("create table t(id integer primary key, b blob)")
    conns.append(c)
open(f"{base}/c.yml", "w").write(f"""multi-db:
  patterns: ["{base}/data/*.db"]
  temp-dir: {base}/tmp
  state-dir: {base}/state
  scan-interval: 5s
  log-consolidate-interval: 30s
  replica:
    url: file://{base}/replica
addr: 127.0.0.1:19292
""")
d = subprocess.Popen([LF, "-c", f"{base}/c.yml", "--log-level", "warn", "replicate"],
                     stdout=open(f"{base}/d.log", "w"), stderr=subprocess.STDOUT)
def stats():
    try: return json.load(urllib.request.urlopen("http://127.0.0.1:19292/stats", timeout=2))
    except Exception: return None
def rss():
    s = open(f"/proc/{d.pid}/status").read()
    g = lambda k: int([l for l in s.splitlines() if l.startswith(k)][0].split()[1])
    return g("VmRSS:") // 1024, g("VmHWM:") // 1024
time.sleep(3)
for c in conns: c.execute("insert into t(b) values (randomblob(100))")
for _ in range(60):
    time.sleep(1)
    s = stats()
    if s and s.get("hot_databases", s.get("hot", 0)) >= N: break
packs = lambda: (stats() or {}).get("log_packs", 0)
print("streaming", {k: v for k, v in (stats() or {}).items() if "hot" in k}, flush=True)
t0 = time.time()
before = None
rows = KB // 100
while time.time() - t0 < S:
    t = time.time()
    for c in conns:
        c.execute("begin")
        for _ in range(rows): c.execute("insert into t(b) values (randomblob(100000))")
        c.execute("commit")
    if before is None and packs() > 0:
        before = rss()
    time.sleep(max(0, 1 - (time.time() - t)))
print("peak RSS MB before the first consolidation finished:", before, flush=True)
time.sleep(5)
print("log packs", packs(), "RSS (now, peak) MB:", rss(), flush=True)
d.terminate(); d.wait()
bad = 0
for i in range(N):
    src = f"{base}/data/db{i:04d}.db"
    out = f"{base}/out/db{i:04d}.db"
    r = subprocess.run([LF, "-c", f"{base}/c.yml", "--log-level", "error", "restore", "-o", out, src],
                       capture_output=True, text=True)
    q = lambda p: hashlib.sha256(repr(sqlite3.connect(p).execute("select id, b from t order by id").fetchall()).encode()).hexdigest()
    if r.returncode != 0 or q(src) != q(out):
        bad += 1
        print("MISMATCH", i, r.returncode, r.stderr[-300:])
print(f"restored {N - bad}/{N} exact")
shutil.rmtree(base, ignore_errors=True)
