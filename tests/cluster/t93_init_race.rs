//! `init-cluster` never removes the node it initialises (issue 16): a node's first own write
//! could be ordered before the `init-cluster` entry and be refused ("no node named …"); it
//! must wait for its own record, and conclude "removed" only from a tombstone of its id, never
//! from a record it cannot find. Runs `init-cluster` on fresh single nodes, optionally beside
//! CPU hogs; every one must end as a running member, none as removed.
//!
//! `make test` runs 20 inits without hogs; `deploy/stress-init.sh` runs many with hogs
//! (`HERD_T93_RUNS=200 HERD_T93_HOGS=8`).

use std::process::{Child, Command};
use std::time::Duration;

use serde_json::json;

use crate::harness::{wait_until, Cluster};

/// CPU hogs (busy shell loops), killed when dropped.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start(n: usize) -> Hogs {
        Hogs((0..n).map(|_| Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("hog")).collect())
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn init_cluster_never_removes_its_own_node() {
    let (runs, hogs) = (env("HERD_T93_RUNS", 20), env("HERD_T93_HOGS", 0));
    let _hogs = Hogs::start(hogs);
    for run in 1..=runs {
        let mut c = Cluster::new(&[("i1", "coordinator", "127.0.7.1:7400")], "");
        c.node("i1").start();
        let init = c.node("i1").admin(json!({"op": "init-cluster"}));
        assert!(init["token"].is_string(), "run {run}: {init}");
        let status = wait_until("the node runs as a member", Duration::from_secs(30), || {
            let s = c.node("i1").try_admin(&json!({"op": "status"})).ok()?;
            assert_ne!(s["state"], "removed", "run {run}: init-cluster removed its own node: {s}");
            let me = s["members"].as_array()?.iter().find(|m| m["name"] == "i1")?.clone();
            (me["daemon_state"] == "run").then_some(s)
        });
        assert_eq!(status["state"], "leader", "run {run}: {status}");
        let log = std::fs::read_to_string(c.node("i1").log_path()).unwrap_or_default();
        assert!(!log.contains("was removed"), "run {run}: the node concluded it was removed:\n{log}");
        c.node("i1").kill9();
    }
    eprintln!("t93: {runs} init-cluster runs beside {hogs} CPU hogs: no self-removal");
}
