//! Mutual TLS on the cluster port, from the outside: a real 3-node cluster on loopback, and
//! hand-made clients speaking the cluster protocol to it with stolen, forged or no credentials.
//! A member's own credentials are accepted (so every refusal below is the credentials' doing);
//! plain TCP, a certificate the cluster CA did not sign, a certificate used to claim another
//! node, a client without a certificate asking for more than a join, and a removed node's
//! certificate are all refused; a client checks the server's certificate names the node it
//! meant to reach. Heartbeat datagrams: untagged, tagged under another key, and replayed (an
//! old sequence number, correctly tagged) are dropped unanswered and counted; a correctly
//! tagged fresh pulse is answered. `herd cert rotate` gives a node a new key and certificate
//! that it restarts and works with.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use herd_raft::network::{CallError, Limits, PeerClient};
use herd_raft::tls::{Pki, TlsConnector};
use herd_raft::transport::{Connector, TcpConnector};
use herd_raft::wire::{LeaderOp, Rpc, RpcError, RpcReply};
use serde_json::json;

use crate::harness::{wait_until, Cluster};

const SPECS: &[(&str, &str, &str)] = &[
    ("m1", "coordinator", "127.0.9.1:7400"),
    ("m2", "coordinator", "127.0.9.2:7400"),
    ("m3", "hypervisor", "127.0.9.3:7400"),
];

/// One `ReadIndex` leader op (harmless, answered only by a member) as `from` to `target`.
fn read_index(
    rt: &tokio::runtime::Runtime,
    connector: Arc<dyn Connector>,
    addr: &str,
    target: Option<u64>,
    cluster_id: &str,
    from: Option<u64>,
) -> Result<RpcReply, CallError> {
    let mut client =
        PeerClient::new(connector, addr.to_string(), target, cluster_id.to_string(), Limits::default()).from(from);
    rt.block_on(client.call(Rpc::Leader(LeaderOp::ReadIndex), Duration::from_secs(5)))
}

fn tls(pki: &Arc<Pki>) -> Arc<dyn Connector> {
    Arc::new(TlsConnector { inner: Arc::new(TcpConnector), pki: pki.clone() })
}

/// Copies a node's TLS credentials (CA certificate, its certificate and key).
pub(crate) fn copy_dir(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).expect("mkdir");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    for f in ["ca.crt", "node.crt", "node.key"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
}

#[test]
fn only_cluster_signed_certificates_for_the_right_node_get_in() {
    let mut c = Cluster::new(SPECS, "");
    for (name, _, _) in SPECS {
        c.node(name).start();
    }
    let init = c.node("m1").admin(json!({"op": "init-cluster"}));
    let token = init["token"].as_str().expect("token").to_string();
    for n in ["m2", "m3"] {
        c.node(n).admin(json!({"op": "join-cluster", "peer": "127.0.9.1:7400", "token": token}));
    }
    let status = c.node("m1").status();
    let cluster_id = status["cluster_id"].as_str().expect("cluster id").to_string();
    let id_of = |name: &str| {
        status["members"].as_array().and_then(|m| m.iter().find(|n| n["name"] == name)).and_then(|n| n["id"].as_u64())
    };
    let (m1, m2, m3) = (id_of("m1").expect("m1"), id_of("m2").expect("m2"), id_of("m3").expect("m3"));
    assert_eq!(status["tls"]["node_id"], m1, "{status}");
    assert!(status["tls"]["cert_expires_in_days"].as_u64().is_some_and(|d| d >= 360), "{status}");
    assert_eq!(status["tls"]["holds_ca_key"], true);
    let table = String::from_utf8_lossy(&c.node("m1").cli(&["status"]).stdout).to_string();
    assert!(table.contains("certificate expires in 36"), "{table}");
    let m3_status = c.node("m3").status();
    assert_eq!(m3_status["tls"]["holds_ca_key"], false, "a hypervisor never receives the CA key");
    assert!(!c.node("m3").data_dir().join("tls/ca.key").exists());
    assert!(c.node("m2").data_dir().join("tls/ca.key").exists(), "a coordinator does");

    let work = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");

    // m3's own credentials, copied: accepted, as m3.
    copy_dir(&c.node("m3").data_dir().join("tls"), &work.path().join("stolen"));
    let stolen = Arc::new(Pki::open(work.path().join("stolen")).expect("open m3's copy"));
    let ok = read_index(&rt, tls(&stolen), "127.0.9.1:7400", Some(m1), &cluster_id, Some(m3));
    assert!(matches!(ok, Ok(RpcReply::ReadIndex(_))), "a member's own certificate works: {ok:?}");

    // Plain TCP: no TLS handshake, no frame read.
    let plain = read_index(&rt, Arc::new(TcpConnector), "127.0.9.1:7400", Some(m1), &cluster_id, Some(m3));
    assert!(matches!(plain, Err(CallError::Transport { .. })), "plain TCP: {plain:?}");

    // A certificate for m3 signed by another CA (the client trusts the real CA, so only the
    // server's check can stop it).
    let forger = Pki::open(work.path().join("forger")).expect("open");
    forger.create_cluster(&cluster_id, m3, "m3").expect("a CA of the forger's own");
    let read = |f: &str| std::fs::read_to_string(work.path().join("forger").join(f)).expect("read");
    let real_ca = std::fs::read_to_string(work.path().join("stolen/ca.crt")).expect("ca");
    let forged = Arc::new(Pki::open(work.path().join("forged")).expect("open"));
    let e = herd_raft::tls::Enrolment {
        ca_pem: real_ca,
        cert_pem: read("node.crt"),
        ca_key_pem: None,
        heartbeat_key: read("heartbeat.key"),
        coordinator_pub: read("coordinator.pub"),
        coordinator_key: None,
    };
    forged.install(&e, &read("node.key")).expect("install the forged certificate");
    let refused = read_index(&rt, tls(&forged), "127.0.9.1:7400", Some(m1), &cluster_id, Some(m3));
    assert!(refused.is_err(), "a certificate the cluster CA did not sign: {refused:?}");

    // m3's certificate used to claim to be m1.
    let claim = read_index(&rt, tls(&stolen), "127.0.9.2:7400", Some(m2), &cluster_id, Some(m1));
    assert!(
        matches!(&claim, Err(CallError::Remote(RpcError::Unauthenticated(m))) if m.contains(&format!("node {m3}'s"))),
        "another node's name: {claim:?}"
    );

    // The client side: m2 answering where m1 was meant is refused by the client.
    let wrong = read_index(&rt, tls(&stolen), "127.0.9.2:7400", Some(m1), &cluster_id, Some(m3));
    assert!(
        matches!(&wrong, Err(CallError::Untrusted { reason, .. }) if reason.contains("certificate")),
        "a server whose certificate names another node: {wrong:?}"
    );

    // No certificate (what a joiner has): a join's first phase only.
    let joiner = Arc::new(Pki::open(work.path().join("joiner")).expect("open"));
    let ca_hash = token.split_once('.').map(|(_, h)| h).expect("CA hash");
    let mut pin = [0u8; 32];
    hex::decode_to_slice(ca_hash, &mut pin).expect("hex");
    joiner.set_enrol_pin(Some(pin));
    let anon = read_index(&rt, tls(&joiner), "127.0.9.1:7400", None, &cluster_id, None);
    assert!(matches!(anon, Err(CallError::Remote(RpcError::Unauthenticated(_)))), "no certificate: {anon:?}");

    heartbeats_are_authenticated(&mut c, m2, m3, &cluster_id);

    // Rotation: follower m2 gets a new key and certificate from leader m1; restarted, it serves
    // and talks with them.
    let cert = |c: &mut Cluster| std::fs::read_to_string(c.node("m2").data_dir().join("tls/node.crt")).expect("cert");
    let (old_cert, old_key) = (cert(&mut c), std::fs::read(c.node("m2").data_dir().join("tls/node.key")).expect("key"));
    let out = c.node("m2").cli(&["cert", "rotate"]);
    assert!(out.status.success(), "cert rotate: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("certificate renewed"), "{out:?}");
    assert_ne!(cert(&mut c), old_cert, "a new certificate");
    assert_ne!(std::fs::read(c.node("m2").data_dir().join("tls/node.key")).expect("key"), old_key, "a new key");
    c.node("m2").kill9();
    c.node("m2").start();
    wait_until("m2 back in the cluster on its new certificate", Duration::from_secs(20), || {
        let s = c.node("m2").try_admin(&json!({"op": "status"})).ok()?;
        (s["quorum"] == true && s["leader"] == "m1").then_some(())
    });
    c.node("m2").admin(json!({"op": "maintenance", "on": true}));
    assert_eq!(c.node("m1").admin(json!({"op": "cluster-info"}))["maintenance"], true, "a write through m2");

    // Removal revokes: m3's certificate is refused at its next handshake.
    c.node("m1").admin(json!({"op": "node-remove", "name": "m3"}));
    let revoked = read_index(&rt, tls(&stolen), "127.0.9.1:7400", Some(m1), &cluster_id, Some(m3));
    assert!(matches!(revoked, Err(CallError::Transport { .. })), "a removed node's certificate: {revoked:?}");
    let log = std::fs::read_to_string(c.node("m1").log_path()).expect("m1 log");
    assert!(log.contains("its certificate is revoked"), "m1 says why it refused");
    // Each kind of refusal above is logged with its reason (and counted for the metrics).
    for reason in ["tls-handshake", "unauthenticated", "revoked"] {
        assert!(log.contains(&format!("reason=\"{reason}\"")), "m1 logs refusals of kind {reason}");
    }
    // The members still talk to each other.
    let still = c.node("m2").status();
    assert_eq!(still["quorum"], true, "{still}");
}

fn hb_counter(c: &mut Cluster, node: &str, which: &str) -> u64 {
    c.node(node).admin(json!({"op": "heartbeat"}))["counters"][which].as_u64().expect("counter")
}

/// Sends `bytes` to `to` from a fresh socket; the answer, if one comes within `wait`.
fn exchange(bytes: &[u8], to: std::net::SocketAddr, wait: Duration) -> Option<Vec<u8>> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(wait)).expect("timeout");
    s.send_to(bytes, to).expect("send");
    let mut buf = [0u8; 9000];
    s.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

/// Pulses to hypervisor m3 in coordinator m2's name: only a fresh, correctly tagged one is
/// answered; the rest are dropped and counted.
fn heartbeats_are_authenticated(c: &mut Cluster, m2: u64, m3: u64, cluster_id: &str) {
    use herd::heartbeat::wire::{self, Body, Datagram, Summary, MAGIC, VERSION};
    let hb = c.node("m3").admin(json!({"op": "heartbeat"}));
    let (net, addr) = hb["networks"].as_object().and_then(|n| n.iter().next()).expect("a heartbeat network");
    let (net, addr): (String, std::net::SocketAddr) =
        (net.clone(), addr.as_str().expect("addr").parse().expect("addr"));
    let key_hex = std::fs::read_to_string(c.node("m2").data_dir().join("tls/heartbeat.key")).expect("key");
    let mut key = [0u8; 32];
    hex::decode_to_slice(key_hex.trim(), &mut key).expect("hex key");
    let pulse = |seq: u64| Datagram {
        magic: MAGIC,
        version: VERSION,
        cluster_id: cluster_id.to_string(),
        body: Body::Pulse { from: m2, net: net.clone(), seq, summary: Summary { coordinator: m2, seq, nets: vec![] } },
    };
    let wait = Duration::from_millis(300);

    let before = hb_counter(c, "m3", "unauthenticated");
    let untagged = wire::encode(&pulse(u64::MAX / 4), None).expect("encode");
    assert_eq!(exchange(&untagged, addr, wait), None, "an untagged pulse is not answered");
    let other_key = wire::encode(&pulse(u64::MAX / 4), Some(&[9u8; 32])).expect("encode");
    assert_eq!(exchange(&other_key, addr, wait), None, "a pulse under another key is not answered");
    assert_eq!(hb_counter(c, "m3", "unauthenticated"), before + 2, "both counted");

    let before = hb_counter(c, "m3", "replayed");
    let old = wire::encode(&pulse(1), Some(&key)).expect("encode");
    assert_eq!(exchange(&old, addr, wait), None, "an old sequence number (a replay) is not answered");
    assert_eq!(hb_counter(c, "m3", "replayed"), before + 1, "and counted");

    // The positive control: a fresh, tagged pulse (a few periods ahead of m2's own) is answered.
    let seq = c.node("m2").admin(json!({"op": "heartbeat"}))["own_view"]["seq"].as_u64().expect("m2's seq") + 3;
    let answer = exchange(&wire::encode(&pulse(seq), Some(&key)).expect("encode"), addr, Duration::from_secs(2))
        .expect("a fresh tagged pulse is answered");
    let d = wire::decode(&answer, cluster_id, Some(&key)).expect("the answer is tagged too");
    assert!(matches!(d.body, Body::Answer { from, to, seq: s, .. } if from == m3 && to == m2 && s == seq), "{d:?}");
    // Sent again, the very same datagram is a replay (counted among m2's own next few pulses,
    // which this one overtook and which are therefore dropped too).
    let before = hb_counter(c, "m3", "replayed");
    assert_eq!(exchange(&wire::encode(&pulse(seq), Some(&key)).expect("encode"), addr, wait), None);
    wait_until("the replay counted", Duration::from_secs(5), || {
        (hb_counter(c, "m3", "replayed") > before).then_some(())
    });
}
