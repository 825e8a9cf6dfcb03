# Shared by the bench/*.sh scripts: writes the daemon config for a run.
# daemon_config FILE PORT PATTERN SCAN_INTERVAL WORKDIR
daemon_config() {
  cat > "$1" <<Y
addr: 127.0.0.1:$2
multi-db:
  patterns: ["$3"]
  scan-interval: $4
  temp-dir: $5/tmp
  state-dir: $5/state
  replica:
    url: file://$5/replica
Y
}

# stat_of PORT EXPR DEFAULT: a Python expression over the daemon's /stats
# JSON (as `d`), or DEFAULT while it does not answer.
stat_of() {
  curl -s "127.0.0.1:$1/stats" 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print($2)" 2>/dev/null || echo "$3"
}

# first_scan BIN CONFIG PORT: starts the daemon, waits for its first scan,
# stops it, and prints that scan's seconds, then the pending and tracked
# database counts it reported.
first_scan() {
  # The daemon writes no stdout; its stderr stays the terminal's.
  "$1" --log-level warn replicate --config "$2" &
  local pid=$!
  until [ "$(stat_of "$3" 'int(d["scans"] >= 1)' 0)" = 1 ]; do sleep 0.05; done
  stat_of "$3" 'd["last_scan_duration_seconds"], d["pending"], d["databases"]' '? ? ?' | tr -d '(),'
  kill -TERM "$pid"; wait "$pid" || true
}

# timed_find TREE: seconds for `find` to list the tree's databases with size
# and mtime (the reference for a scan).
timed_find() {
  local s
  s=$(date +%s.%N)
  find "$1" -name '*.db' -printf '%s %T@\n' > /dev/null
  echo "$(date +%s.%N) - $s" | bc
}

# backup_once BIN CONFIG PORT N: runs the daemon until /stats says N
# databases are uploaded and nothing is pending, then stops it (its state
# file is written).
backup_once() {
  "$1" --log-level warn replicate --config "$2" &
  local pid=$!
  until [ "$(stat_of "$3" 'int(d["uploads_ok"] >= '"$4"' and d["pending"] == 0)' 0)" = 1 ]; do
    sleep 0.2
  done
  kill -TERM "$pid"; wait "$pid" || true
}
