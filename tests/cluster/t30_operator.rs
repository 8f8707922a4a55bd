//! Operator mistakes are refused loudly and change nothing (issue 17): a node started under
//! another name than its `data_dir` records exits at once naming both, and the cluster keeps
//! it as it was; `data_dir` is private; a join the leader refuses leaves no record and spends
//! no token. Three coordinators on loopback.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herd_raft::network::{CallError, Limits, PeerClient};
use herd_raft::tls::{Pki, TlsConnector};
use herd_raft::transport::TcpConnector;
use herd_raft::wire::{JoinRequest, LeaderOp, Rpc, RpcError};
use herd_storage::model::Role;
use serde_json::{json, Value};

use crate::harness::{wait_until, Cluster};

const SPECS: &[(&str, &str, &str)] = &[
    ("c1", "coordinator", "127.0.3.1:7400"),
    ("c2", "coordinator", "127.0.3.2:7400"),
    ("c3", "coordinator", "127.0.3.3:7400"),
];

fn names(c: &mut Cluster) -> Vec<String> {
    let s = c.node("c1").status();
    s["members"]
        .as_array()
        .map(|m| m.iter().filter_map(|n| n["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn formed(c: &mut Cluster) -> Value {
    wait_until("3 coordinators run with a leader", Duration::from_secs(30), || {
        let s = c.node("c1").try_admin(&json!({"op": "status"})).ok()?;
        let m = s["members"].as_array()?;
        (m.len() == 3 && m.iter().all(|n| n["daemon_state"] == "run") && s["quorum"] == true).then_some(s)
    })
}

#[test]
fn operator_mistakes_are_refused_and_change_nothing() {
    let mut c = Cluster::new(SPECS, "");
    for (name, _, _) in SPECS {
        c.node(name).start();
    }
    c.node("c1").admin(json!({"op": "init-cluster"}));
    let token = |c: &mut Cluster| {
        let out = c.node("c1").cli(&["token", "create", "--json", "--uses", "1"]);
        assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v["token"].as_str().expect("token").to_string()
    };

    // A join refused by the leader (a valid single-use token, no certificate request) leaves
    // no record and spends no token: the real joiner gets in with it afterwards.
    let once = token(&mut c);
    let work = tempfile::tempdir().expect("tempdir");
    let joiner = Arc::new(Pki::open(work.path().join("joiner")).expect("open"));
    let mut pin = [0u8; 32];
    let (secret, ca_hash) = once.split_once('.').expect("<secret>.<CA hash>");
    hex::decode_to_slice(ca_hash, &mut pin).expect("hex");
    joiner.set_enrol_pin(Some(pin));
    let connector = Arc::new(TlsConnector { inner: Arc::new(TcpConnector), pki: joiner });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // A joiner does not know the cluster id yet.
    let mut client = PeerClient::new(connector, "127.0.3.1:7400".into(), None, String::new(), Limits::default());
    let join = JoinRequest {
        token: secret.to_string(),
        name: "ghost".into(),
        role: Role::Hypervisor,
        cluster_addr: "127.0.3.9:7400".into(),
        request_id: "ghost-1".into(),
        csr: None,
    };
    let refused = rt.block_on(client.call(Rpc::Leader(LeaderOp::Join(join)), Duration::from_secs(5)));
    assert!(
        matches!(&refused, Err(CallError::Remote(RpcError::Refused(m))) if m.contains("certificate request")),
        "{refused:?}"
    );
    assert_eq!(names(&mut c), ["c1"], "a refused join leaves no record");
    c.node("c2").admin(json!({"op": "join-cluster", "peer": "127.0.3.1:7400", "token": once}));
    let more = token(&mut c);
    c.node("c3").admin(json!({"op": "join-cluster", "peer": "127.0.3.1:7400", "token": more}));
    formed(&mut c);

    // data_dir is the node's alone: the directory 0700, the store's files 0600.
    let data = c.node("c1").data_dir();
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data_dir");
    for entry in std::fs::read_dir(data.join("db")).expect("db") {
        let p = entry.expect("entry").path();
        if p.is_file() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }

    // c3 started as "c2" (another member's name) and as "c9" (a new one): it exits at once,
    // naming both, and the cluster keeps c3 as it was.
    c.node("c3").terminate(Duration::from_secs(10));
    for wrong in ["c2", "c9"] {
        let node = &mut c.nodes[2];
        node.name = wrong.into();
        let started = Instant::now();
        node.spawn();
        let status = node.wait_exit(Duration::from_secs(5));
        let took = started.elapsed();
        node.name = "c3".into();
        let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
        let code = status.and_then(|s| s.code());
        assert!(code.is_some_and(|c| c != 0), "started as {wrong}: exit {status:?} after {took:?}\n{log}");
        let last = log.lines().rev().find(|l| l.contains("belongs to node")).unwrap_or_default();
        assert!(last.contains("\"c3\"") && last.contains(&format!("{wrong:?}")), "names both: {last}");
        eprintln!("started as {wrong}: exit {code:?} in {} ms: {last}", took.as_millis());
    }
    let s = c.node("c1").status();
    assert_eq!(s["raft"]["voters"].as_array().map(Vec::len), Some(3), "still 3 voters: {s}");
    assert_eq!(names(&mut c), ["c1", "c2", "c3"], "the cluster keeps c3");
    let events = c.node("c1").admin(json!({"op": "events"}));
    assert!(!events.to_string().contains("removed"), "nothing was removed: {events}");

    // Under its own name it starts and takes part again.
    c.node("c3").start();
    wait_until("c3 back", Duration::from_secs(30), || {
        let s = c.node("c3").try_admin(&json!({"op": "status"})).ok()?;
        (s["quorum"] == true && s["leader"].is_string()).then_some(())
    });
    formed(&mut c);
}
