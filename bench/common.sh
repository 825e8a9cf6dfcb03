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
