//! Storage faults are health, shown on every node (issue 17): three coordinators on loopback.
//! - A full disk (c3's `data_dir` on a 20 MB tmpfs, filled): c3 acknowledges nothing, every
//!   node shows it unhealthy within 10 s, and within 10 s of freeing space it is healthy again
//!   — the same process (it restarts itself in place), no acknowledged write lost.
//! - A `data_dir` restored from an older copy: refused at start by its log mark (kept outside
//!   `data_dir`). Then data_dir and mark both restored (a machine image), with a leader change
//!   while c3 was down (the new leader never saw c3 acknowledge anything; the cluster's record
//!   of what c3 held tells it):
//!   c3's log went backwards; c3 is refused (its Raft stopped, it says why) and shown unhealthy
//!   on every node within 10 s; the documented recovery (`node remove --force`, empty
//!   `data_dir`, join again) brings it back.
//!
//! The tmpfs needs root; without it the first test says SKIPPED (a failure under `CI=true`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{wait_until, Cluster};

const EXTRA: &str = "[keepalive]\ninterval_ms = 1000\n";

fn specs(base: u8) -> Vec<(String, &'static str, String)> {
    (1..=3).map(|i| (format!("c{i}"), "coordinator", format!("127.0.{base}.{i}:7400"))).collect()
}

fn form(c: &mut Cluster, peer: &str) {
    let token = c.node("c1").admin(json!({"op": "init-cluster"}))["token"].as_str().expect("token").to_string();
    for n in ["c2", "c3"] {
        c.node(n).admin(json!({"op": "join-cluster", "peer": peer, "token": token}));
    }
    wait_until("3 coordinators run with a leader", Duration::from_secs(30), || {
        let s = c.node("c1").try_admin(&json!({"op": "status"})).ok()?;
        let m = s["members"].as_array()?;
        (m.len() == 3 && m.iter().all(|n| n["daemon_state"] == "run") && s["quorum"] == true).then_some(())
    });
}

/// c3's health as `node list` on `via` shows it.
fn health_of_c3(c: &mut Cluster, via: &str) -> Option<Value> {
    let s = c.node(via).try_admin(&json!({"op": "node-list"})).ok()?;
    s["members"].as_array()?.iter().find(|m| m["name"] == "c3").map(|m| m["health"].clone())
}

fn maintenance(c: &mut Cluster, via: &str, on: bool) {
    c.node(via).admin(json!({"op": "maintenance", "on": on}));
}

/// A tmpfs mounted for the test, unmounted on drop (even when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output();
        assert!(out.as_ref().is_ok_and(|o| o.status.success()), "mount tmpfs: {out:?}");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn a_full_disk_is_shown_everywhere_and_recovers_without_an_operator() {
    let test = "a_full_disk_is_shown_everywhere_and_recovers_without_an_operator";
    if !nix::unistd::Uid::effective().is_root() {
        crate::harness::skip(test, "mounting a tmpfs needs root");
        return;
    }
    let specs = specs(32);
    let refs: Vec<(&str, &str, &str)> = specs.iter().map(|(n, r, a)| (n.as_str(), *r, a.as_str())).collect();
    let mut c = Cluster::new(&refs, EXTRA);
    let disk = Tmpfs::mount(&c.node("c3").data_dir(), "20m");
    for n in ["c1", "c2", "c3"] {
        c.node(n).start();
    }
    form(&mut c, "127.0.32.1:7400");
    let pid = c.node("c3").child.as_ref().expect("running").id();

    // The disk fills up; a write acknowledged now is one c3 never stored.
    let filler = disk.0.join("filler");
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=1M", "count=64"])
        .output();
    let full = Instant::now();
    maintenance(&mut c, "c1", true);
    for via in ["c1", "c2"] {
        let h = wait_until(&format!("c3 unhealthy in {via}'s node list"), Duration::from_secs(10), || {
            health_of_c3(&mut c, via)?.as_str().map(str::to_string)
        });
        assert!(h.starts_with("storage error:") && h.contains("No space left"), "{h}");
    }
    eprintln!("disk full → c3 shown unhealthy everywhere in {} ms", full.elapsed().as_millis());
    let own = c.node("c3").status();
    assert!(own["raft_error"].as_str().is_some_and(|e| e.contains("No space left")), "c3 says why: {own}");

    // Space again: c3 comes back by itself, the same process, with the write it missed.
    std::fs::remove_file(&filler).expect("free the space");
    let freed = Instant::now();
    wait_until("c3 healthy again everywhere", Duration::from_secs(10), || {
        let healthy = ["c1", "c2"].iter().all(|via| health_of_c3(&mut c, via).is_some_and(|h| h.is_null()));
        let own = c.node("c3").try_admin(&json!({"op": "status"})).ok()?;
        (healthy && own["raft_error"].is_null() && own["maintenance"] == true).then_some(())
    });
    eprintln!("space freed → c3 healthy everywhere, the missed write applied, in {} ms", freed.elapsed().as_millis());
    c.node("c3").assert_alive();
    assert_eq!(c.node("c3").child.as_ref().expect("running").id(), pid, "the same process (restarted in place)");
    maintenance(&mut c, "c3", false);
}

#[test]
fn a_restored_data_dir_is_refused_and_the_documented_recovery_works() {
    let specs = specs(33);
    let refs: Vec<(&str, &str, &str)> = specs.iter().map(|(n, r, a)| (n.as_str(), *r, a.as_str())).collect();
    let mut c = Cluster::new(&refs, EXTRA);
    for n in ["c1", "c2", "c3"] {
        c.node(n).start();
    }
    form(&mut c, "127.0.33.1:7400");
    // c3 must be a follower: the leader's memory of what c3 acknowledged is the evidence.
    let leader = c.node("c1").status()["leader"].as_str().expect("leader").to_string();
    if leader == "c3" {
        c.node("c1").admin(json!({"op": "node-primary", "name": "c1", "wait": true}));
    }

    // The copy, then c3 runs on (and acknowledges more), then the copy is put back.
    c.node("c3").terminate(Duration::from_secs(10));
    let data = c.node("c3").data_dir();
    let copy = c.node("c3").dir.join("data.copy");
    let cp = Command::new("cp").arg("-a").arg(&data).arg(&copy).output().expect("cp");
    assert!(cp.status.success(), "copy data_dir: {cp:?}");
    // The log mark beside data_dir (`<data_dir>-mark/`), copied too: a whole-machine image.
    let mark = data.with_file_name(format!("{}-mark", data.file_name().expect("name").to_string_lossy()));
    let mark_copy = c.node("c3").dir.join("mark.copy");
    let cp = Command::new("cp").arg("-a").arg(&mark).arg(&mark_copy).output().expect("cp");
    assert!(cp.status.success(), "copy the log mark: {cp:?}");
    c.node("c3").start();
    for i in 0..10 {
        maintenance(&mut c, "c1", i % 2 == 0);
    }
    let target = c.node("c1").status()["applied_index"].as_u64().expect("applied");
    wait_until("c3 caught up", Duration::from_secs(10), || {
        (c.node("c3").try_admin(&json!({"op": "status"})).ok()?["applied_index"].as_u64()? >= target).then_some(())
    });
    // ... and the cluster recorded it holding entries the copy lacks.
    wait_until("the cluster's record of what c3 holds passes the copy", Duration::from_secs(10), || {
        let info = c.node("c1").try_admin(&json!({"op": "node-info", "name": "c3"})).ok()?;
        (info["log_held"].as_u64()? >= target).then_some(())
    });
    // ... and c3's log mark (written once a second) too.
    wait_until("c3's log mark passes the copy", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(mark.join("log-mark")).ok()?;
        let index: u64 = text.split_whitespace().find_map(|f| f.strip_prefix("index="))?.parse().ok()?;
        (index >= target).then_some(())
    });
    c.node("c3").terminate(Duration::from_secs(10));
    let put_back = |from: &Path, to: &Path| {
        std::fs::remove_dir_all(to).expect("remove");
        let cp = Command::new("cp").arg("-a").arg(from).arg(to).output().expect("cp");
        assert!(cp.status.success(), "restore {}: {cp:?}", to.display());
    };
    // data_dir alone put back: the log mark, outside it, refuses c3 at once.
    put_back(&copy, &data);
    let started = Instant::now();
    c.node("c3").start();
    let s = c.node("c3").status();
    assert_eq!(s["state"], "refused", "{s}");
    assert!(s["raft_error"].as_str().is_some_and(|e| e.contains("log mark") && e.contains("went backwards")), "{s}");
    eprintln!(
        "data_dir restored (mark kept) → refused at start in {} ms: {}",
        started.elapsed().as_millis(),
        s["raft_error"]
    );
    c.node("c3").terminate(Duration::from_secs(10));
    // Both put back (a whole-machine image): only the cluster's record can tell.
    put_back(&copy, &data);
    put_back(&mark_copy, &mark);
    // The leader changes while c3 is down: the new leader never saw c3 acknowledge anything,
    // only the cluster's record of what c3 held (`RecordAcked`) can tell.
    let old = c.node("c1").status()["leader"].as_str().expect("leader").to_string();
    let new = if old == "c1" { "c2" } else { "c1" };
    let out = c.node(new).cli(&["node", "primary", new, "--wait"]);
    assert!(out.status.success(), "node primary {new}: {}", String::from_utf8_lossy(&out.stderr));
    wait_until("the leader changed", Duration::from_secs(10), || {
        (c.node("c1").try_admin(&json!({"op": "status"})).ok()?["leader"] == new).then_some(())
    });
    let restored = Instant::now();
    c.node("c3").start();

    for via in ["c1", "c2"] {
        let h = wait_until(&format!("c3 unhealthy in {via}'s node list"), Duration::from_secs(10), || {
            health_of_c3(&mut c, via)?.as_str().map(str::to_string)
        });
        assert!(h.contains("log went backwards"), "{h}");
    }
    let own = wait_until("c3 refused", Duration::from_secs(10), || {
        let s = c.node("c3").try_admin(&json!({"op": "status"})).ok()?;
        (s["state"] == "refused").then_some(s)
    });
    eprintln!(
        "restored copy → refused and shown everywhere in {} ms: {}",
        restored.elapsed().as_millis(),
        own["raft_error"]
    );
    assert!(own["raft_error"].as_str().is_some_and(|e| e.contains("node remove c3 --force")), "{own}");
    // A restart stays refused.
    c.node("c3").terminate(Duration::from_secs(10));
    c.node("c3").start();
    assert_eq!(c.node("c3").status()["state"], "refused");

    // The documented recovery: remove it, empty data_dir, join again.
    let out = c.node("c1").cli(&["node", "remove", "c3", "--force"]);
    assert!(out.status.success(), "node remove: {}", String::from_utf8_lossy(&out.stderr));
    c.node("c3").terminate(Duration::from_secs(10));
    std::fs::remove_dir_all(&data).expect("empty data_dir");
    c.node("c3").start();
    let token = c.node("c1").cli(&["token", "create", "--json", "--uses", "1"]);
    let token: Value = serde_json::from_slice(&token.stdout).expect("token json");
    c.node("c3").admin(json!({"op": "join-cluster", "peer": "127.0.33.1:7400", "token": token["token"]}));
    wait_until("c3 back, healthy, a voter", Duration::from_secs(30), || {
        let s = c.node("c1").try_admin(&json!({"op": "status"})).ok()?;
        let c3 = s["members"].as_array()?.iter().find(|m| m["name"] == "c3")?.clone();
        (c3["daemon_state"] == "run" && c3["health"].is_null() && c3["voter"] == true).then_some(())
    });
}
