//! Hostile bytes on the cluster port and the admin socket never take the daemon down.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::harness::{wait_until, Cluster, Node};

const ADDR: &str = "127.0.2.1:7400";
const MAX_FRAME: u32 = 65536;
/// Small limits so the test can outlast them.
const EXTRA: &str = "[limits]\nmax_frame_bytes = 65536\ncluster_idle_timeout_ms = 1000\ncluster_frame_timeout_ms = 1000\nadmin_idle_timeout_ms = 1000\nmax_cluster_connections = 64\n";

/// Reads until the peer closes (Ok) or `within` passes (Err).
fn closed_within<S: Read>(s: &mut S, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return Ok(()), // reset: closed
        }
    }
    Err(format!("still open after {within:?}"))
}

fn tcp() -> TcpStream {
    let s = TcpStream::connect(ADDR).expect("connect cluster port");
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    s
}

/// The same daemon process answers `status` (with quorum) and a linearizable read again
/// within a few seconds (the connections of a flood take a moment to be reaped).
fn still_healthy(node: &mut Node) {
    node.assert_alive();
    wait_until("status with quorum after hostile input", Duration::from_secs(10), || {
        node.try_admin(&json!({"op": "status"})).ok().filter(|s| s["quorum"] == true)
    });
    // A linearizable read needs Raft itself to be healthy.
    wait_until("a linearizable read after hostile input", Duration::from_secs(10), || {
        node.try_admin(&json!({"op": "cluster-info"})).ok()
    });
    node.assert_alive();
}

#[test]
fn hostile_input_on_both_ports() {
    let mut c = Cluster::new(&[("r1", "coordinator", ADDR)], EXTRA);
    c.node("r1").start();
    c.node("r1").admin(json!({"op": "init-cluster"}));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4e5d);

    // Random frames: a plausible length and random bytes, or pure noise.
    for i in 0..40 {
        let mut s = tcp();
        let len: u32 = rng.random_range(0..2048);
        let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 2 == 0 {
            let _ = s.write_all(&len.to_be_bytes());
        }
        let _ = s.write_all(&body);
        let _ = closed_within(&mut s, Duration::from_secs(3));
    }
    // A length prefix of u32::MAX and of the maximum plus one: refused, connection closed.
    for len in [u32::MAX, MAX_FRAME + 1] {
        let mut s = tcp();
        s.write_all(&len.to_be_bytes()).expect("write prefix");
        closed_within(&mut s, Duration::from_secs(3)).unwrap_or_else(|e| panic!("prefix {len}: {e}"));
    }
    // A truncated body: the prefix promises 100 bytes, 10 arrive, then silence: the frame
    // deadline (1 s here) closes the connection.
    {
        let mut s = tcp();
        s.write_all(&100u32.to_be_bytes()).expect("write");
        s.write_all(&[0u8; 10]).expect("write");
        closed_within(&mut s, Duration::from_secs(5)).expect("truncated frame: connection closed");
    }
    // A silent half-open connection is closed once the idle timeout (1 s) passes.
    {
        let mut s = tcp();
        closed_within(&mut s, Duration::from_secs(5)).expect("idle connection closed");
    }
    // A flood of connections beyond the limit: the excess is refused, the daemon survives.
    let flood: Vec<TcpStream> = (0..200).filter_map(|_| TcpStream::connect(ADDR).ok()).collect();
    still_healthy(c.node("r1"));
    drop(flood);
    still_healthy(c.node("r1"));

    // The admin socket: garbage, unknown ops, a huge line, a half-open connection, a flood.
    let sock = c.node("r1").socket();
    for line in
        ["garbage\n", "{\"op\":\"explode\"}\n", "{\"op\":\"status\",\"extra\":1}\n", "{\"op\":\n", "\u{0}\u{1}\n"]
    {
        let mut s = UnixStream::connect(&sock).expect("connect admin");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s.write_all(line.as_bytes()).expect("write");
        let mut answer = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut s), &mut answer);
        let v: serde_json::Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{line:?} -> {answer:?}: {e}"));
        assert_eq!(v["ok"], false, "{line:?} accepted: {v}");
    }
    {
        let mut s = UnixStream::connect(&sock).expect("connect admin");
        s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let huge = vec![b'x'; 200 * 1024];
        let _ = s.write_all(&huge);
        closed_within(&mut s, Duration::from_secs(5)).expect("huge line: connection closed");
    }
    {
        let mut s = UnixStream::connect(&sock).expect("connect admin");
        s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        closed_within(&mut s, Duration::from_secs(5)).expect("idle admin connection closed");
    }
    let flood: Vec<UnixStream> = (0..150).filter_map(|_| UnixStream::connect(&sock).ok()).collect();
    drop(flood);
    still_healthy(c.node("r1"));
}
