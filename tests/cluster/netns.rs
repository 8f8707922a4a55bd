//! Test networks in network namespaces: a "switch" namespace with one bridge per heartbeat
//! network, and one namespace per node wired to every bridge by a veth pair. Addresses are
//! 10.210.<net>.<node>/24, inside namespaces this test creates and deletes; nothing touches the
//! host's own network. Needs root: without it the tests that use this print a loud SKIPPED.

use std::process::Command;

/// Whether namespace tests can run here; prints why not when they cannot.
pub fn available(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let ip = Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
    if !root || !ip {
        crate::harness::skip(test, &format!("network-namespace tests need root and iproute2 (root: {root}, ip: {ip})"));
        return false;
    }
    true
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Like `ip`, but failures are fine (cleanup, idempotent teardown).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// The namespaces of one test; deleted on drop, even when the test fails.
pub struct Topology {
    prefix: String,
    nodes: usize,
    pub nets: Vec<&'static str>,
}

impl Topology {
    /// `nodes` node namespaces on `nets` bridged networks.
    pub fn new(tag: &str, nodes: usize, nets: &[&'static str]) -> Topology {
        let prefix = format!("herd{tag}{}", std::process::id() % 100_000);
        let t = Topology { prefix, nodes, nets: nets.to_vec() };
        t.teardown();
        let sw = t.switch();
        ip(&["netns", "add", &sw]);
        for (k, _) in nets.iter().enumerate() {
            let br = format!("br{k}");
            ip(&["-n", &sw, "link", "add", &br, "type", "bridge"]);
            ip(&["-n", &sw, "link", "set", &br, "up"]);
        }
        for i in 1..=nodes {
            let ns = t.ns(i);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            for (k, _) in nets.iter().enumerate() {
                let (sw_end, node_end) = (format!("s{k}n{i}"), t.ifname(i, k));
                ip(&["-n", &sw, "link", "add", &sw_end, "type", "veth", "peer", "name", &node_end, "netns", &ns]);
                ip(&["-n", &sw, "link", "set", &sw_end, "master", &format!("br{k}")]);
                ip(&["-n", &sw, "link", "set", &sw_end, "up"]);
                ip(&["-n", &ns, "addr", "add", &format!("{}/24", t.addr(i, k)), "dev", &node_end]);
                ip(&["-n", &ns, "link", "set", &node_end, "up"]);
            }
        }
        t
    }

    fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// Node `i`'s namespace (1-based).
    pub fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    /// Node `i`'s interface on network `k`.
    pub fn ifname(&self, i: usize, k: usize) -> String {
        format!("n{i}e{k}")
    }

    /// Node `i`'s address on network `k`.
    pub fn addr(&self, i: usize, k: usize) -> String {
        format!("10.210.{k}.{i}")
    }

    /// Takes node `i`'s link on network `k` down or up.
    pub fn link(&self, i: usize, k: usize, up: bool) {
        ip(&["-n", &self.ns(i), "link", "set", &self.ifname(i, k), if up { "up" } else { "down" }]);
    }

    /// Cuts (or heals) all direct traffic between nodes `a` and `b`, on every network, with
    /// blackhole routes on both sides: what reaches them through third parties is unaffected.
    pub fn cut_between(&self, a: usize, b: usize, cut: bool) {
        self.cut_between_on(a, b, &(0..self.nets.len()).collect::<Vec<_>>(), cut);
    }

    /// Like `cut_between`, on the networks `nets` only.
    pub fn cut_between_on(&self, a: usize, b: usize, nets: &[usize], cut: bool) {
        for &k in nets {
            for (from, to) in [(a, b), (b, a)] {
                let dst = format!("{}/32", self.addr(to, k));
                let verb = if cut { "add" } else { "del" };
                ip(&["-n", &self.ns(from), "route", verb, "blackhole", &dst]);
            }
        }
    }

    fn teardown(&self) {
        for i in 1..=self.nodes {
            ip_quiet(&["netns", "del", &self.ns(i)]);
        }
        ip_quiet(&["netns", "del", &self.switch()]);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.teardown();
    }
}
