//! Join tokens made with `herd token create`: a single-use token admits one node and refuses
//! the next; an expired or revoked token, a wrong secret, a token without the CA hash or with
//! another CA's hash is refused with a clear message and changes nothing; `herd token list`
//! shows what is left. One coordinator and three would-be members on loopback.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{wait_until, Cluster};

const SPECS: &[(&str, &str, &str)] = &[
    ("k1", "coordinator", "127.0.5.1:7400"),
    ("k2", "hypervisor", "127.0.5.2:7400"),
    ("k3", "hypervisor", "127.0.5.3:7400"),
    ("k4", "hypervisor", "127.0.5.4:7400"),
];

fn create(c: &mut Cluster, args: &[&str]) -> (String, String) {
    let mut all = vec!["token", "create", "--json"];
    all.extend_from_slice(args);
    let out = c.node("k1").cli(&all);
    assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    (v["token"].as_str().expect("token").to_string(), v["id"].as_str().expect("id").to_string())
}

/// A printed token's secret and CA hash.
fn open_token_parts(token: &str) -> (&str, &str) {
    let (secret, hash) = token.split_once('.').expect("<secret>.<CA hash>");
    assert_eq!(hash.len(), 64, "{token}");
    (secret, hash)
}

fn members(c: &mut Cluster) -> usize {
    c.node("k1").status()["members"].as_array().map_or(0, Vec::len)
}

#[test]
fn made_tokens_are_single_use_expire_and_can_be_revoked() {
    let mut c = Cluster::new(SPECS, "");
    for (name, _, _) in SPECS {
        c.node(name).start();
    }
    c.node("k1").admin(json!({"op": "init-cluster"}));
    let join = |c: &mut Cluster, name: &str, token: &str| {
        c.node(name).try_admin(&json!({"op": "join-cluster", "peer": "127.0.5.1:7400", "token": token}))
    };

    // Single use: k2 joins, k3 is refused with the same token.
    let (once, once_id) = create(&mut c, &["--uses", "1"]);
    join(&mut c, "k2", &once).expect("k2 joins with a fresh single-use token");
    let err = join(&mut c, "k3", &once).expect_err("a used-up token is refused");
    assert!(err.contains("join token refused"), "{err}");
    assert_eq!(members(&mut c), 2, "the refused join changed nothing");

    // Lifetime: a 1 s token is refused once it is over.
    let (short, _) = create(&mut c, &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1_500)); // the token's own lifetime, not a sync
    let err = join(&mut c, "k3", &short).expect_err("an expired token is refused");
    assert!(err.contains("join token refused"), "{err}");

    // Revoked: refused; and a wrong token is refused the same way.
    let (revoked, revoked_id) = create(&mut c, &[]);
    let out = c.node("k1").cli(&["token", "revoke", &revoked_id]);
    assert!(out.status.success(), "revoke: {}", String::from_utf8_lossy(&out.stderr));
    let err = join(&mut c, "k3", &revoked).expect_err("a revoked token is refused");
    assert!(err.contains("join token refused"), "{err}");
    let (secret, ca_hash) = open_token_parts(&revoked);
    let err = join(&mut c, "k3", &format!("herd-0000.{ca_hash}")).expect_err("a wrong token is refused");
    assert!(err.contains("join token refused"), "{err}");
    // The CA hash: required, and the joiner checks it before it sends the secret.
    let err = join(&mut c, "k3", secret).expect_err("a token without the CA hash is refused");
    assert!(err.contains("no CA hash"), "{err}");
    let other_ca = "ab".repeat(32);
    let err = join(&mut c, "k3", &format!("{secret}.{other_ca}")).expect_err("another CA's hash is refused");
    assert!(err.contains("does not match the join token's CA hash"), "{err}");
    let err = join(&mut c, "k3", &format!("{secret}.12zz")).expect_err("a mangled hash is refused");
    assert!(err.contains("not 64 hex digits"), "{err}");
    assert_eq!(members(&mut c), 2, "no refused join changed anything");
    assert!(c.node("k3").status()["cluster_id"].is_null(), "k3 stays outside any cluster");

    // The list shows the single-use token spent, the short one spent, the revoked one gone.
    let list = c.node("k1").admin(json!({"op": "token-list"}));
    let by_id = |id: &str| list.as_array().and_then(|a| a.iter().find(|t| t["id"] == id).cloned());
    assert_eq!(by_id(&once_id).map(|t| t["usable"].clone()), Some(json!(false)), "{list}");
    assert!(by_id(&revoked_id).is_none(), "{list}");
    let out = c.node("k1").cli(&["token", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&once_id), "table lists the tokens");

    // A fresh unlimited token still admits k3 and k4.
    let (open, _) = create(&mut c, &["--ttl", "1h"]);
    join(&mut c, "k3", &open).expect("k3 joins");
    join(&mut c, "k4", &open).expect("k4 joins");
    wait_until("four members", Duration::from_secs(20), || (members(&mut c) == 4).then_some(()));
}
