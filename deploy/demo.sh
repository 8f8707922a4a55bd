#!/usr/bin/env bash
# A local herd cluster: 3 coordinators + 1 hypervisor, joined, then `herd status`; VMs placed;
# the primary killed (as root); then the hypervisor hung, fenced through its simulated BMC
# (ipmi_sim) and its VMs started elsewhere, with a timeline; it boots again fenced and
# `herd node ready` brings its VMs home.
#   deploy/demo.sh          start (or restart) the demo cluster and print its status
#   deploy/demo.sh stop     stop it and remove its files (and namespaces)
#
# As root (with iproute2), each node runs in a network namespace of its own on a demo bridge
# (10.211.0.0/24, inside namespaces this script creates), the coordinators share a floating
# address 10.211.0.100, and the demo kills the primary to show the address move. Otherwise the
# nodes run on loopback addresses 127.0.0.11-14 and the floating address part is skipped.
# With namespaces and QEMU (qemu-system-x86, libvirt-daemon-driver-qemu: deploy/install-deps.sh)
# every node gets a qemu libvirtd of its own (deploy/qemu-host.sh) and the VMs are real 64 MiB
# guests: the demo then also moves one live and flushes a node by live migration. Otherwise
# (or with HERD_DEMO_GUESTS=test) libvirt's test driver stands in.
# Everything lives under $HERD_DEMO_DIR (default /tmp/herd-demo); nothing else is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${HERD_DEMO_DIR:-/tmp/herd-demo}
BIN=$(realpath "${HERD_BIN:-target/debug/herd}" 2>/dev/null || echo target/debug/herd)
NODES=(hv1:coordinator:1 hv2:coordinator:2 hv3:coordinator:3 hv4:hypervisor:4)
FLOAT=10.211.0.100
NS_PREFIX=herddemo

use_netns() { [ "$(id -u)" = 0 ] && ip netns list >/dev/null 2>&1; }

stop() {
  for q in "$DIR"/*/qemu; do
    [ -d "$q" ] && deploy/qemu-host.sh stop "$q"
  done
  for pidfile in "$DIR"/*/bmc/ipmi_sim.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for pidfile in "$DIR"/*/herd.pid; do
    [ -f "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for pidfile in "$DIR"/*/herd.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill -CONT "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  if use_netns; then
    for ns in $(ip netns list | awk '{print $1}' | grep "^$NS_PREFIX" || true); do ip netns del "$ns"; done
  fi
  rm -rf "$DIR"
}

if [ "${1:-}" = stop ]; then stop; echo "demo cluster stopped"; exit 0; fi

[ -x "$BIN" ] || { cargo build --bin herd; BIN=$(realpath target/debug/herd); }
stop
mkdir -p "$DIR"

if use_netns; then
  MODE=netns
  ip netns add ${NS_PREFIX}sw
  ip -n ${NS_PREFIX}sw link add br0 type bridge
  ip -n ${NS_PREFIX}sw link set br0 up
else
  MODE=loopback
fi

addr_of() { if [ $MODE = netns ]; then echo "10.211.0.$1"; else echo "127.0.0.1$1"; fi; }
GUESTS=test
if [ $MODE = netns ] && [ "${HERD_DEMO_GUESTS:-qemu}" = qemu ] && command -v qemu-system-x86_64 >/dev/null &&
  [ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ]; then
  GUESTS=qemu
  # KVM when /dev/kvm works, else TCG (slower, the same behaviour).
  if [ -w /dev/kvm ]; then ACCEL=kvm; else ACCEL=qemu; fi
  # The guests' firmware: 64 KiB of `hlt` (0xF4); the vCPU halts at its reset vector. A real,
  # migratable guest that costs nothing once running (SeaBIOS burns about 2 s of a core per
  # start under nested KVM, which on a 2-core machine slows every other guest's start).
  head -c 65536 /dev/zero | tr '\0' '\364' >"$DIR/halt.rom"
  : >"$DIR/hosts"
  echo "127.0.0.1 localhost" >>"$DIR/hosts"
  for spec in "${NODES[@]}"; do
    IFS=: read -r name _ i <<<"$spec"
    echo "$(addr_of "$i") $name" >>"$DIR/hosts"
  done
fi
# The command prefix that runs a program on node $1 (`ip netns exec` execs it: same pid).
on_node() { if [ $MODE = netns ]; then echo "ip netns exec ${NS_PREFIX}$1"; fi; }

for spec in "${NODES[@]}"; do
  IFS=: read -r name role i <<<"$spec"
  mkdir -p "$DIR/$name"
  ip_addr=$(addr_of "$i")
  extra=""
  if [ $MODE = netns ]; then
    ns=${NS_PREFIX}$i
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n ${NS_PREFIX}sw link add "s$i" type veth peer name "eth0" netns "$ns"
    ip -n ${NS_PREFIX}sw link set "s$i" master br0
    ip -n ${NS_PREFIX}sw link set "s$i" up
    ip -n "$ns" addr add "$ip_addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    [ "$role" = coordinator ] && extra="[primary]
floating_ips = [\"$FLOAT/24 dev eth0\"]
notify_timeout_ms = 500"
  fi
  # Each node's BMC: ipmi_sim on the node's address (netns) or a loopback port; its chassis
  # power-off kills the node's herd daemon (whose pid goes into bmc/kill.herd.pid).
  if [ $MODE = netns ]; then bmc_ip=$ip_addr bmc_port=623; else bmc_ip=127.0.0.1 bmc_port=$((9620 + i)); fi
  deploy/bmc-sim/start.sh "$DIR/$name/bmc" "$bmc_ip" "$bmc_port" "demo-pw-$i" "$([ $MODE = netns ] && echo "${NS_PREFIX}$i")"
  # Power on after a fence (fence_action = reboot) boots the node: its herd daemon starts again.
  boot_hv=""
  if [ $GUESTS = qemu ]; then
    uri=$(deploy/qemu-host.sh start "$DIR/$name/qemu" "${NS_PREFIX}$i" "$ip_addr" "$i" "$DIR/hosts")
    cp "$DIR/$name/qemu/libvirtd.pid" "$DIR/$name/bmc/kill.libvirtd.pid"
    # A boot starts the node's libvirtd again (the power-off killed it and its guests).
    boot_hv="$PWD/deploy/qemu-host.sh start $DIR/$name/qemu ${NS_PREFIX}$i $ip_addr $i $DIR/hosts >/dev/null
cp $DIR/$name/qemu/libvirtd.pid $DIR/$name/bmc/kill.libvirtd.pid"
  else
    uri="test://$DIR/$name/node.xml"
  fi
  cat >"$DIR/$name/bmc/boot.sh" <<BOOT
#!/bin/bash
$boot_hv
echo \$\$ >"$DIR/$name/herd.pid"; echo \$\$ >"$DIR/$name/bmc/kill.herd.pid"
exec $(on_node "$i") "$BIN" daemon --config "$DIR/$name/herd.toml" >>"$DIR/$name/herd.log" 2>&1
BOOT
  chmod 755 "$DIR/$name/bmc/boot.sh"
  # Each node's hypervisor: libvirt's test driver on a node file of its own (in-process: the
  # node's VMs live as long as its daemon).
  cat >"$DIR/$name/node.xml" <<XML
<?xml version="1.0"?>
<node><cpu><mhz>2400</mhz><model>x86_64</model><active>8</active><nodes>1</nodes><sockets>1</sockets><cores>8</cores><threads>1</threads></cpu><memory>16777216</memory></node>
XML
  cat >"$DIR/$name/herd.toml" <<TOML
name = "$name"
role = "$role"
data_dir = "$DIR/$name/data"
admin_socket = "$DIR/$name/admin.sock"
[cluster]
listen = "$ip_addr:7400"
[keepalive]
interval_ms = 1000
[hypervisor]
uri = "$uri"
shutdown_timeout_ms = 5000
[fence]
check_interval_ms = 1000
[fencing]
agent = "ipmi"
bmc = "$bmc_ip:$bmc_port"
user = "admin"
password_file = "$DIR/$name/bmc/bmc.pass"
$extra
TOML
  # shellcheck disable=SC2046  # the prefix is meant to split into words
  $(on_node "$i") "$BIN" daemon --config "$DIR/$name/herd.toml" >"$DIR/$name/herd.log" 2>&1 &
  echo $! >"$DIR/$name/herd.pid"
  cp "$DIR/$name/herd.pid" "$DIR/$name/bmc/kill.herd.pid"
  disown
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
  "$BIN" --socket "$DIR/$name/admin.sock" join-cluster --peer "$(addr_of 1):7400" --token-file "$DIR/token" --role "$role"
done
# Every node reports `run` once its first write has committed; a primary holds its duties.
for i in $(seq 100); do
  s=$("$BIN" --socket "$DIR/hv4/admin.sock" --json status)
  [ "$(grep -c '"daemon_state": "run"' <<<"$s")" = 4 ] && grep -q '"primary": "hv' <<<"$s" && break
  sleep 0.1
done
"$BIN" --socket "$DIR/hv4/admin.sock" status

holder() {
  for spec in "${NODES[@]}"; do
    IFS=: read -r name _ i <<<"$spec"
    if ip -n ${NS_PREFIX}$i -brief addr show dev eth0 2>/dev/null | grep -q "$FLOAT/"; then echo "$name"; fi
  done
  return 0
}

# A few VMs, placed by the cluster (selector: fewest VMs), started by each node's reconciler.
for n in 1 2 3 4 5; do
  if [ $GUESTS = qemu ]; then
    # A real guest: 64 MiB, no disk, its firmware halting the vCPU.
    cat >"$DIR/vm$n.xml" <<XML
<domain type='$ACCEL'><name>vm$n</name><uuid>00000000-0000-4000-8000-00000000000$n</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><loader readonly='yes' type='rom'>$DIR/halt.rom</loader></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator><controller type='usb' model='none'/><memballoon model='none'/></devices></domain>
XML
  else
    cat >"$DIR/vm$n.xml" <<XML
<domain type='test'><name>vm$n</name><uuid>00000000-0000-4000-8000-00000000000$n</uuid><memory unit='MiB'>$((256 * n))</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>
XML
  fi
  "$BIN" --socket "$DIR/hv4/admin.sock" vm define "$DIR/vm$n.xml" --selector vms
done
for i in $(seq 100); do
  [ "$("$BIN" --socket "$DIR/hv4/admin.sock" --json vm list | grep -c '"actual": "running"')" = 5 ] && break
  sleep 0.1
done
"$BIN" --socket "$DIR/hv4/admin.sock" vm list
[ $GUESTS = qemu ] && [ ! -d /var/tmp/herd-demo-qemu-caps/qemu ] && mkdir -p /var/tmp/herd-demo-qemu-caps &&
  cp -a "$DIR/hv1/qemu/cache/qemu" /var/tmp/herd-demo-qemu-caps/ 2>/dev/null || true

if [ $GUESTS = qemu ]; then
  R=(--socket "$DIR/hv4/admin.sock")
  node_of() { "$BIN" "${R[@]}" --json vm info "$1" | sed -n 's/^  "node": "\(.*\)",/\1/p'; }
  from=$(node_of vm1)
  to=hv1; [ "$from" = hv1 ] && to=hv2
  echo
  echo "real guests ($ACCEL): moving vm1 live from $from to $to (herd vm migrate vm1 --to $to --force-live) ..."
  start=$(date +%s%N)
  "$BIN" "${R[@]}" vm migrate vm1 --to "$to" --force-live
  for i in $(seq 300); do
    "$BIN" "${R[@]}" --json vm info vm1 | grep -q '"ended_ms": [0-9]' && break
    [ "$i" = 300 ] && { echo "vm1 did not arrive on $to; see $DIR/*/herd.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "vm1 runs on $to after $(( ($(date +%s%N) - start) / 1000000 )) ms; the cluster recorded:"
  "$BIN" "${R[@]}" events | grep 'vm1 moved' | tail -1
  busiest=$("$BIN" "${R[@]}" vm list | awk 'NR > 1 {n[$3]++} END {for (k in n) if (n[k] > m) {m = n[k]; b = k}; print b}')
  echo
  echo "flushing $busiest by live migration (herd node flush $busiest --wait) ..."
  start=$(date +%s%N)
  "$BIN" "${R[@]}" node flush "$busiest" --wait
  echo "$busiest flushed in $(( ($(date +%s%N) - start) / 1000000 )) ms:"
  "$BIN" "${R[@]}" events | grep 'moved live' | tail -n +2
  "$BIN" "${R[@]}" vm list
  start=$(date +%s%N)
  "$BIN" "${R[@]}" node ready "$busiest" --wait
  echo "$busiest ready again, its VMs home (live) in $(( ($(date +%s%N) - start) / 1000000 )) ms"
fi

if [ $MODE = netns ]; then
  old=$(holder)
  echo
  echo "floating address $FLOAT is on: $old"
  oldi=${old#hv}
  echo "killing the primary ($old) with SIGKILL, then the unit's stop-post step (herd release) ..."
  kill -9 "$(cat "$DIR/$old/herd.pid")"
  $(on_node "$oldi") "$BIN" release --config "$DIR/$old/herd.toml" >/dev/null
  start=$(date +%s%N)
  new=""
  for _ in $(seq 200); do
    new=$(holder)
    [ -n "$new" ] && [ "$new" != "$old" ] && break
    sleep 0.02
  done
  echo "floating address $FLOAT moved to: $new after $(( ($(date +%s%N) - start) / 1000000 )) ms (polled every 20 ms)"
  "$BIN" --socket "$DIR/hv4/admin.sock" status
  echo "restarting $old: it rejoins as a secondary"
  $(on_node "$oldi") "$BIN" daemon --config "$DIR/$old/herd.toml" >>"$DIR/$old/herd.log" 2>&1 &
  echo $! >"$DIR/$old/herd.pid"
  cp "$DIR/$old/herd.pid" "$DIR/$old/bmc/kill.herd.pid"
  disown
else
  echo
  echo "(not root, or no network namespaces: the floating-address part of the demo is skipped;"
  echo " as root, the demo runs every node in a namespace of its own and moves the address)"
fi

# Fencing: wait until every node runs and the primary found every BMC ready, then hang hv4.
Q=(--socket "$DIR/hv2/admin.sock")
for i in $(seq 300); do
  s=$("$BIN" "${Q[@]}" --json status 2>/dev/null || true)
  [ "$(grep -c '"can_fence": true' <<<"$s")" = 4 ] && [ "$(grep -c '"daemon_state": "run"' <<<"$s")" = 4 ] && break
  [ "$i" = 300 ] && { echo "fencing never became ready; see $DIR/*/herd.log" >&2; exit 1; }
  sleep 0.1
done
echo
# The power-off kills hv4's guests with it (a real host's power-off does).
for f in "$DIR"/hv4/qemu/run/qemu/*.pid; do
  if [ -f "$f" ] && grep -qs "guest=" "/proc/$(cat "$f")/cmdline"; then
    cp "$f" "$DIR/hv4/bmc/kill.qemu-$(basename "$f")"
  fi
done
echo "every node can be fenced (its BMC answers). Hanging hv4 (SIGSTOP), which runs:"
"$BIN" "${Q[@]}" vm list | awk 'NR == 1 || / hv4 /'
start=$(date +%s%N)
kill -STOP "$(cat "$DIR/hv4/herd.pid")"
for i in $(seq 400); do
  l=$("$BIN" "${Q[@]}" --json vm list 2>/dev/null || true)
  [ "$(grep -c '"actual": "running"' <<<"$l")" = 5 ] && ! grep -q '"node": "hv4"' <<<"$l" && break
  [ "$i" = 400 ] && { echo "hv4's VMs did not come back elsewhere; see $DIR/*/herd.log" >&2; exit 1; }
  sleep 0.05
done
echo "hv4 fenced through its BMC; all its VMs run elsewhere $(( ($(date +%s%N) - start) / 1000000 )) ms after the hang:"
"$BIN" "${Q[@]}" vm list
echo
echo "timeline (the cluster's event log):"
"$BIN" "${Q[@]}" events | grep -E 'time|fence|hv4' || true
# fence_action = reboot: the BMC powered hv4 on again and it booted (bmc/boot.sh).
for i in $(seq 200); do
  "$BIN" "${Q[@]}" events 2>/dev/null | grep -q 'hv4 is back' && break
  sleep 0.1
done
echo
"$BIN" "${Q[@]}" node info hv4 | grep -E 'daemon_state|domain_state' || true
echo "hv4 booted again and stays fenced/flushed until: herd node ready hv4"
"$BIN" "${Q[@]}" node ready hv4 --wait
"$BIN" "${Q[@]}" vm list

cat <<MSG

The demo cluster keeps running ($MODE). Try:
  $BIN --socket $DIR/hv4/admin.sock node list
  $BIN --socket $DIR/hv4/admin.sock heartbeat
  $BIN --socket $DIR/hv4/admin.sock node primary hv3 --wait
  $BIN --socket $DIR/hv4/admin.sock events
Logs: $DIR/*/herd.log      Stop: deploy/demo.sh stop
MSG
