#!/usr/bin/env bash
# Installs the Debian packages herd's build, tests and demo need, if any is missing.
# Idempotent and quiet when everything is there; needs root (or sudo) only to install.
set -euo pipefail
# gcc/libc6-dev: C toolchain some -sys crates build with; pkg-config: finding system libraries;
# iproute2: `ip` (floating addresses, network-namespace tests); iputils-arping: gratuitous ARP;
# libvirt-dev: the virt crate links libvirt (its test driver serves the VM tests);
# libvirt-daemon: libvirtd, one per node in the cluster test that checks each node's own libvirt.
# openipmi: ipmi_sim, the simulated BMC of the fencing tests and the demo; ipmitool: checks that
# herd leaves a BMC usable by other clients; fence-agents: fence_ipmilan, driven by herd's external
# agent in the tests. qemu-system-x86 + libvirt-daemon-driver-qemu: real guests (one qemu libvirtd per
# node) in the real-guest cluster tests and the demo.
PACKAGES=(gcc libc6-dev pkg-config iproute2 iputils-arping libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 openipmi ipmitool fence-agents)
# `--bench` adds what `make bench` needs: etcd (the side-by-side write benchmark) and protoc with
# the protobuf well-known types (the etcd-client crate compiles etcd's protos).
if [ "${1:-}" = --bench ]; then
  PACKAGES+=(etcd-server protobuf-compiler libprotobuf-dev)
fi
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo is missing: install a Rust toolchain (rustup) first" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt 2>/dev/null || true
