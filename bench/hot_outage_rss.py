"""Peak RSS of the daemon while many hot databases fall behind during a store
outage, and a checked restore of each afterwards (README: "Many streams
behind at once").

Usage (root: mounts a tmpfs as the file:// replica and fills it to stop every
write): LF=./target/release/litefleet python3 bench/hot_outage_rss.py [N] [MB]
N hot WAL databases (default 40) each get MB megabytes of random rows
(default 18, 100 KB per transaction) while the replica is full; then the
replica grows, the daemon catches up for 90 s, stops, and every database is
restored and compared with its source. Binds 127.0.0.1:19291.
"""
import os, sys, time, sqlite3, subprocess, json, urllib.request, shutil, hashlib
LF = os.environ.get("LF", "./target/release/litefleet")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 40
MB = int(sys.argv[2]) if len(sys.argv) > 2 else 18
base = os.environ.get("DIR", "/tmp/lf-hot-outage")
subprocess.run(["umount", base + "/replica"], stderr=subprocess.DEVNULL)
shutil.rmtree(base, ignore_errors=True)
for d in ["data", "replica", "tmp", "state"]:
    os.makedirs(f"{base}/{d}")
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256M", "tmpfs", base + "/replica"], check=True)
conns = []
for i in range(N):
    c = sqlite3.connect(f"{base}/data/db{i:04d}.db", isolation_level=None)
    c.execute("pragma journal_mode=wal"); c.execute("pragma wal_autocheckpoint=0")
    c.execute("create table t(id integer primary key, b blob)")
    conns.append(c)
open(f"{base}/c.yml", "w").write(f"""multi-db:
  patterns: ["{base}/data/*.db"]
  temp-dir: {base}/tmp
  state-dir: {base}/state
  scan-interval: 5s
  release-after: 10m
  max-concurrent: 2
  replica:
    url: file://{base}/replica
addr: 127.0.0.1:19291
""")
d = subprocess.Popen([LF, "-c", f"{base}/c.yml", "--log-level", "warn", "replicate"], stdout=open(f"{base}/d.log","w"), stderr=subprocess.STDOUT)
def stats():
    try: return json.load(urllib.request.urlopen("http://127.0.0.1:19291/stats", timeout=2))
    except Exception as e: return None
def rss():
    s = open(f"/proc/{d.pid}/status").read()
    g = lambda k: int([l for l in s.splitlines() if l.startswith(k)][0].split()[1])
    return g("VmRSS:")//1024, g("VmHWM:")//1024
time.sleep(3)
for c in conns: c.execute("insert into t(b) values (randomblob(100))")
for _ in range(60):
    time.sleep(1)
    s = stats()
    if s and s.get("hot_databases", s.get("hot", 0)) >= N: break
print("stats", {k: v for k, v in (stats() or {}).items() if "hot" in k}, "rss", rss(), flush=True)
# outage: fill the replica
subprocess.run(f"dd if=/dev/zero of={base}/replica/fill bs=1M 2>/dev/null", shell=True)
t0 = time.time()
blob = MB * 10
for c in conns:
    for _ in range(blob):
        c.execute("insert into t(b) values (randomblob(100000))")
print("wrote", N*MB, "MB in", round(time.time()-t0,1), "s; rss", rss(), flush=True)
time.sleep(3)
os.remove(f"{base}/replica/fill")
subprocess.run(["mount", "-o", "remount,size=12G", base + "/replica"], check=True)
peak = 0
t1 = time.time()
while time.time() - t1 < 90:
    r, h = rss(); peak = max(peak, r)
    time.sleep(0.2)
print("after: rss", rss(), "peak sampled", peak, flush=True)
big = []
for root, _, fs in os.walk(base + "/replica"):
    for f in fs:
        p = os.path.join(root, f); big.append((os.path.getsize(p), p))
big.sort(reverse=True)
print("largest objects:", [(s//(1<<20), p[len(base):]) for s, p in big[:4]])
print("stats", {k: v for k, v in (stats() or {}).items() if k in ("log_objects","wal_catch_up_parts","hot_databases","errors","upload_errors")})
d.terminate(); rc = d.wait(); print("daemon exit", rc)
for c in conns: c.close()
bad = 0
def digest(p):
    c = sqlite3.connect(p); h = hashlib.sha256()
    for r in c.execute("select id, b from t order by id"): h.update(str(r[0]).encode()); h.update(r[1])
    c.close(); return h.hexdigest()
for i in range(N):
    out = f"{base}/r{i}.db"
    r = subprocess.run([LF, "-c", f"{base}/c.yml", "--log-level", "error", "restore", f"db{i:04d}", "-o", out], capture_output=True, text=True)
    if r.returncode != 0 or digest(out) != digest(f"{base}/data/db{i:04d}.db"):
        bad += 1; print("BAD", i, r.returncode, r.stderr[-300:])
    os.remove(out)
print("restores checked", N, "bad", bad)
subprocess.run(["umount", base + "/replica"])
