#!/usr/bin/env bash
# A local herd cluster on loopback: 3 coordinators + 1 hypervisor, joined, then `herd status`.
#   deploy/demo.sh          start (or restart) the demo cluster and print its status
#   deploy/demo.sh stop     stop it and remove its files
# Everything lives under $HERD_DEMO_DIR (default /tmp/herd-demo); nothing else is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${HERD_DEMO_DIR:-/tmp/herd-demo}
BIN=${HERD_BIN:-target/debug/herd}
NODES=(hv1:coordinator:127.0.0.11 hv2:coordinator:127.0.0.12 hv3:coordinator:127.0.0.13 hv4:hypervisor:127.0.0.14)

stop() {
  for pidfile in "$DIR"/*/herd.pid; do
    [ -f "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for pidfile in "$DIR"/*/herd.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$DIR"
}

if [ "${1:-}" = stop ]; then stop; echo "demo cluster stopped"; exit 0; fi

[ -x "$BIN" ] || cargo build --bin herd
stop
mkdir -p "$DIR"
for spec in "${NODES[@]}"; do
  IFS=: read -r name role ip <<<"$spec"
  mkdir -p "$DIR/$name"
  cat >"$DIR/$name/herd.toml" <<TOML
name = "$name"
role = "$role"
data_dir = "$DIR/$name/data"
admin_socket = "$DIR/$name/admin.sock"
[cluster]
listen = "$ip:7400"
[keepalive]
interval_ms = 1000
TOML
  "$BIN" daemon --config "$DIR/$name/herd.toml" >"$DIR/$name/herd.log" 2>&1 &
  echo $! >"$DIR/$name/herd.pid"
done
# Wait for each admin socket to answer (a condition with a deadline, not a fixed sleep).
for spec in "${NODES[@]}"; do
  IFS=: read -r name _ _ <<<"$spec"
  for i in $(seq 100); do
    "$BIN" --socket "$DIR/$name/admin.sock" status >/dev/null 2>&1 && break
    [ "$i" = 100 ] && { echo "node $name did not start; see $DIR/$name/herd.log" >&2; exit 1; }
    sleep 0.1
  done
done
"$BIN" --socket "$DIR/hv1/admin.sock" --json init-cluster | sed -n 's/.*"token": "\(.*\)".*/\1/p' >"$DIR/token"
chmod 600 "$DIR/token"
for spec in "${NODES[@]:1}"; do
  IFS=: read -r name role _ <<<"$spec"
  "$BIN" --socket "$DIR/$name/admin.sock" join-cluster --peer 127.0.0.11:7400 --token-file "$DIR/token" --role "$role"
done
# Every node reports `run` once its first write has committed.
for i in $(seq 100); do
  [ "$("$BIN" --socket "$DIR/hv4/admin.sock" --json status | grep -c '"daemon_state": "run"')" = 4 ] && break
  sleep 0.1
done
"$BIN" --socket "$DIR/hv4/admin.sock" status
cat <<MSG

The demo cluster keeps running. Try:
  $BIN --socket $DIR/hv4/admin.sock node list
  kill -9 \$(cat $DIR/hv1/herd.pid); $BIN --socket $DIR/hv4/admin.sock status
Logs: $DIR/*/herd.log      Stop: deploy/demo.sh stop
MSG
