"""gen_times.py REPLICA_DIR: prints "key gen iso_time kind" for every hot
generation snapshot and every WAL part (segment objects, consolidated packs,
fleet-log packs) in a file:// replica, one line per distinct (key, gen, time)."""
import datetime, glob, json, os, re, struct, sys

rep = sys.argv[1]
seen = set()
def iso(ms):
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
def emit(key, gen, ms, kind):
    if (key, gen, ms) not in seen:
        seen.add((key, gen, ms))
        print(key, gen, iso(ms), kind)
def pack_parts(path):
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    if not data.startswith(b"LFPACK1\n"):
        return []
    for fmt in ("<I", ">I"):
        (n,) = struct.unpack(fmt, data[8:12])
        try:
            return json.loads(data[12:12 + n])["parts"]
        except Exception:
            continue
    return []
for gdir in sorted(glob.glob(f"{rep}/*/generations/*")):
    key = gdir.split("/")[-3]
    gen = os.path.basename(gdir)
    for s in glob.glob(f"{gdir}/snapshots/*.snapshot.lz4"):
        m = re.match(r"[0-9a-f]+_([0-9a-f]+)\.snapshot\.lz4$", os.path.basename(s))
        if m:
            emit(key, gen, int(m.group(1), 16), "snap")
    for w in glob.glob(f"{gdir}/wal/*"):
        b = os.path.basename(w)
        if b.endswith(".pack"):
            for p in pack_parts(w):
                emit(key, p["generation"], p["time"], "part")
        else:
            m = re.match(r"[0-9a-f]+_[0-9a-f]+_([0-9a-f]+)\.wal\.lz4$", b)
            if m:
                emit(key, gen, int(m.group(1), 16), "seg")
for w in glob.glob(f"{rep}/.litefleet/log/*.pack"):
    for p in pack_parts(w):
        emit(p["key"], p["generation"], p["time"], "log")
