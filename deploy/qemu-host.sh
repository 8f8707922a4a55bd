#!/usr/bin/env bash
# A qemu libvirtd for one demo node, as on a real host, without a system libvirtd: it runs in
# the node's network namespace (listening for its peers' migrations on the node's address) and
# in a private mount namespace where the libvirt directories are bind mounts of DIR (recipe and
# pitfalls: ../shared/notes/qemu-testbed.md; the cluster test t97 does the same in Rust).
#   deploy/qemu-host.sh start DIR NETNS ADDR INDEX HOSTS   start; prints the herd `uri`
#   deploy/qemu-host.sh stop DIR                            its guests, then the daemon
# HOSTS is an /etc/hosts for the daemon (node names -> addresses: herd's migrate_uri names
# nodes). Needs root, libvirtd with its qemu driver and qemu-system-x86_64. Nothing global is
# changed but the five libvirt mountpoint directories, made if missing and left in place.
set -euo pipefail
cmd=${1:-}
DIR=${2:?DIR}

stop() {
  for f in "$DIR"/run/qemu/*.pid; do
    [ -f "$f" ] || continue
    q=$(cat "$f")
    grep -qs "guest=" "/proc/$q/cmdline" && kill -9 "$q" 2>/dev/null || true
  done
  if [ -f "$DIR/libvirtd.pid" ]; then
    p=$(cat "$DIR/libvirtd.pid")
    kill -CONT "$p" 2>/dev/null || true
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  fi
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start DIR NETNS ADDR INDEX HOSTS | stop DIR" >&2; exit 2; }
NS=${3:?NETNS} ADDR=${4:?ADDR} INDEX=${5:?INDEX} HOSTS=${6:?HOSTS}
for m in /run/libvirt /etc/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do mkdir -p "$m"; done
mkdir -p "$DIR"/{run,etc,lib,cache,log}
cat >"$DIR/etc/libvirtd.conf" <<EOF
listen_tls = 0
listen_tcp = 1
listen_addr = "$ADDR"
tcp_port = "16509"
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_rw_perms = "0700"
host_uuid = "6c6d6967-0000-4000-8000-$(printf %012x "$INDEX")"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
cat >"$DIR/etc/qemu.conf" <<EOF
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
migration_host = "$ADDR"
migration_address = "$ADDR"
EOF
cp "$HOSTS" "$DIR/hosts"
# Debian's qemu driver looks up the libvirt-qemu user before it reads qemu.conf.
cp /etc/passwd "$DIR/passwd"; cp /etc/group "$DIR/group"
grep -q '^libvirt-qemu:' "$DIR/passwd" || echo 'libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin' >>"$DIR/passwd"
grep -q '^libvirt-qemu:' "$DIR/group" || echo 'libvirt-qemu:x:64055:' >>"$DIR/group"
# QEMU's capability probe takes seconds; libvirt's cache is kept between runs (it probes
# again when the qemu binary changed).
CAPS=/var/tmp/herd-demo-qemu-caps
[ -d "$CAPS/qemu" ] && cp -a "$CAPS/qemu" "$DIR/cache/"
# A socket left by a daemon that was killed (a power-off) must not pass for the new one's.
rm -f "$DIR/run/libvirt-sock"
# `ip netns exec`, `unshare` and `exec` all exec: $! is libvirtd itself.
ip netns exec "$NS" unshare -m --propagation private sh -ec "
  mount --bind $DIR/passwd /etc/passwd
  mount --bind $DIR/group /etc/group
  mount --bind $DIR/hosts /etc/hosts
  mount --bind $DIR/run /run/libvirt
  mount --bind $DIR/etc /etc/libvirt
  mount --bind $DIR/lib /var/lib/libvirt
  mount --bind $DIR/cache /var/cache/libvirt
  mount --bind $DIR/log /var/log/libvirt
  exec /usr/sbin/libvirtd --listen --config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid
" >"$DIR/libvirtd.out" 2>&1 &
echo $! >"$DIR/libvirtd.pid"
disown
for _ in $(seq 300); do [ -S "$DIR/run/libvirt-sock" ] && break; sleep 0.1; done
[ -S "$DIR/run/libvirt-sock" ] || { echo "libvirtd in $NS did not start: $(cat "$DIR/libvirtd.out")" >&2; exit 1; }
echo "qemu+unix:///system?socket=$DIR/run/libvirt-sock"
