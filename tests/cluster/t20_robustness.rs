//! Hostile bytes on the cluster port and the admin socket never take the daemon down. The
//! cluster port speaks mutual TLS, so the frame reader is reached only past the handshake: the
//! hostile frames below come over a connection holding a member's certificate (the node's own),
//! and plain TCP is shown refused before any frame is read.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herd_raft::tls::{Pki, TlsConnector};
use herd_raft::transport::{BoxStream, Connector, TcpConnector};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Connections that passed the mutual-TLS handshake as a member.
struct MemberLink {
    rt: tokio::runtime::Runtime,
    connector: Arc<dyn Connector>,
}

impl MemberLink {
    fn new(pki: Pki) -> MemberLink {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        MemberLink { rt, connector: Arc::new(TlsConnector { inner: Arc::new(TcpConnector), pki: Arc::new(pki) }) }
    }

    /// A connection to the cluster port, past the handshake (so the frame reader is reached).
    fn connect(&self) -> BoxStream {
        self.rt.block_on(self.connector.connect(ADDR, None)).expect("a member's certificate passes the handshake")
    }

    /// Writes `bytes` (a write to a connection the server closed may fail: that is fine).
    fn send(&self, s: &mut BoxStream, bytes: &[u8]) {
        let _ = self.rt.block_on(async {
            s.write_all(bytes).await?;
            s.flush().await
        });
    }

    /// Reads until the server closes (Ok) or `within` passes (Err).
    fn closed_within(&self, s: &mut BoxStream, within: Duration) -> Result<(), String> {
        self.rt.block_on(async {
            let mut buf = [0u8; 4096];
            let read_all = async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => continue,
                    }
                }
            };
            tokio::time::timeout(within, read_all).await.map_err(|_| format!("still open after {within:?}"))
        })
    }
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

    let creds = tempfile::tempdir().expect("tempdir");
    crate::t56_tls::copy_dir(&c.node("r1").data_dir().join("tls"), creds.path());
    let member = MemberLink::new(Pki::open(creds.path().to_path_buf()).expect("r1's credentials"));

    // Plain TCP is refused at the handshake, before any frame is read.
    {
        let mut s = tcp();
        let _ = s.write_all(&16u32.to_be_bytes());
        let _ = s.write_all(&[0u8; 16]);
        closed_within(&mut s, Duration::from_secs(5)).expect("plain TCP: connection closed");
    }
    // Random frames from a member: a plausible length and random bytes, or pure noise.
    for i in 0..40 {
        let mut s = member.connect();
        let len: u32 = rng.random_range(0..2048);
        let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 2 == 0 {
            member.send(&mut s, &len.to_be_bytes());
        }
        member.send(&mut s, &body);
        let _ = member.closed_within(&mut s, Duration::from_secs(3));
    }
    // A length prefix of u32::MAX and of the maximum plus one: refused, connection closed.
    for len in [u32::MAX, MAX_FRAME + 1] {
        let mut s = member.connect();
        member.send(&mut s, &len.to_be_bytes());
        member.closed_within(&mut s, Duration::from_secs(3)).unwrap_or_else(|e| panic!("prefix {len}: {e}"));
    }
    // A truncated body: the prefix promises 100 bytes, 10 arrive, then silence: the frame
    // deadline (1 s here) closes the connection.
    {
        let mut s = member.connect();
        member.send(&mut s, &100u32.to_be_bytes());
        member.send(&mut s, &[0u8; 10]);
        member.closed_within(&mut s, Duration::from_secs(5)).expect("truncated frame: connection closed");
    }
    // A silent member connection is closed once the idle timeout (1 s) passes.
    {
        let mut s = member.connect();
        member.closed_within(&mut s, Duration::from_secs(5)).expect("idle connection closed");
    }
    // The frame reader survived all of it: a member's well-formed connection still works.
    still_healthy(c.node("r1"));
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
