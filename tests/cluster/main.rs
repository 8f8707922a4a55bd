//! Integration tests with real `herd daemon` processes on loopback addresses.
//!
//! One harness binary (so the slow tests build once); each `tNN_` file is one layer:
//! t10 config handling, t15 systemd notify/watchdog and CLI comforts, t20 robustness of both ports, t50 the cluster lifecycle, t55 join tokens, t56 mutual TLS, t57 strangers holding connections on the cluster and metrics ports, t58 a follower outside Raft that keeps the leader's state, t59 hypervisors as clients outside Raft (root) and a learner made a client by rejoining, t60 the
//! heartbeat in network namespaces, t70 never two primaries (both root only; skipped loudly
//! otherwise), t80 VMs through libvirt's test driver, t85 VMs against one libvirtd per node
//! (root only), t86 the VM lifecycle in namespaces (a failed move, a waiting VM, a host
//! shutdown, maintenance), t90 fencing: the IPMI agent against a live `ipmi_sim`, then fencing and recovery
//! in namespaces with a simulated BMC and a libvirtd per node (root only); t92-t95 the fence
//! under a primary restart, the init race, auto_ready, and an executor deposed mid-fence; t96
//! real-time scheduling and a busy host; t97 real QEMU guests, one qemu libvirtd per node (root).

mod bmc;
mod fencelab;
mod harness;
mod libvirtd;
mod netns;
mod qemud;
mod t10_config;
mod t15_service;
mod t17_admin_access;
mod t20_robustness;
mod t30_operator;
mod t32_storage;
mod t50_cluster;
mod t55_tokens;
mod t56_tls;
mod t57_hostile;
mod t58_follow;
mod t59_clients;
mod t59_convert;
mod t60_heartbeat;
mod t70_primary;
mod t80_vms;
mod t85_libvirtd;
mod t86_lifecycle;
mod t90_fence;
mod t91_fencing;
mod t92_fence_restart;
mod t93_init_race;
mod t94_auto_ready;
mod t95_deposed_executor;
mod t96_busy_host;
mod t97_real_guests;
