"""Writer for hot_swapdirs.sh: argv root ndb.
Creates R/db/NNN/x.db (tag A) and R/twin/NNN/x.db (tag B), prints ready,
then inserts one row per tree per tick with every connection held open.
On SIGTERM it finishes the current commit, writes its commit log
(R/commits.txt: "k tag count unixtime" per commit, after the commit returned)
and leaves with os._exit (no close, no checkpoint)."""
import os, signal, sqlite3, sys, time

root, ndb = sys.argv[1], int(sys.argv[2])
PAD = "x" * 200
stop = False
def on_term(sig, frm):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)

def create(path, tag):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    c = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.execute("PRAGMA synchronous=OFF")
    c.execute("PRAGMA busy_timeout=5000")
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, tag TEXT NOT NULL, n INTEGER NOT NULL, pad TEXT)")
    c.execute("BEGIN")
    c.executemany("INSERT INTO t VALUES(?,?,0,?)", [(i, tag, PAD) for i in range(1, 301)])
    c.execute("COMMIT")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for i in range(301, 451):
        c.execute("INSERT INTO t VALUES(?,?,0,?)", (i, tag, PAD))
    return c

trees = []  # (k, tag, conn, count)
for k in range(ndb):
    trees.append([k, "A", create(f"{root}/db/{k:03d}/x.db", "A"), 450])
    trees.append([k, "B", create(f"{root}/twin/{k:03d}/x.db", "B"), 450])
log = []
t0 = time.time()
for tr in trees:
    log.append(f"{tr[0]} {tr[1]} 450 {t0:.6f}")
print("ready", flush=True)

errors = 0
while not stop:
    for tr in trees:
        k, tag, c, n = tr
        try:
            c.execute("INSERT INTO t VALUES(?,?,0,?)", (n + 1, tag, PAD))
        except sqlite3.Error as e:
            errors += 1
            if errors <= 20:
                print(f"write error k={k} tag={tag} n={n}: {e}", file=sys.stderr, flush=True)
            continue
        tr[3] = n + 1
        log.append(f"{k} {tag} {n + 1} {time.time():.6f}")
    time.sleep(0.02)

with open(f"{root}/commits.txt", "w") as f:
    f.write("\n".join(log) + "\n")
with open(f"{root}/writer.final", "w") as f:
    for k, tag, c, n in trees:
        f.write(f"{k} {tag} {n}\n")
    f.write(f"errors {errors}\n")
sys.stdout.flush()
os._exit(0)
