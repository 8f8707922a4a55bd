//! Property-based fuzzing of every decoder that reads bytes from outside (issue 9): the
//! cluster frame reader and decoder, the heartbeat datagram decoder, the admin-socket request
//! parser, the config parser and the fence-agent output interpreter. Each gets arbitrary bytes
//! and mutations of a valid input; none may panic, and a valid input must still decode.
//!
//! `make test` runs a short pass (`PROPTEST_CASES`, default 256 per target here); a longer
//! run: `PROPTEST_CASES=200000 cargo test --release --test fuzz`.

use std::time::Duration;

use herd::admin::AdminRequest;
use herd::config::Config;
use herd::fence::agent::Action;
use herd::fence::external::interpret;
use herd::heartbeat::wire::{self as hb, Body, Datagram};
use herd_raft::wire::{self, RequestFrame, Rpc};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
}

/// `valid` with `edits` applied: (position, byte) overwrites, truncation, or insertion.
fn mutate(valid: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut b = valid.to_vec();
    for (pos, byte, kind) in edits {
        if b.is_empty() {
            b.push(*byte);
            continue;
        }
        let at = pos % b.len();
        match kind % 4 {
            0 | 1 => b[at] = *byte,
            2 => b.truncate(at),
            _ => b.insert(at, *byte),
        }
    }
    b
}

fn valid_frame() -> Vec<u8> {
    let f = RequestFrame {
        version: wire::PROTOCOL_VERSION,
        cluster_id: "c0ffee".into(),
        to: Some(2),
        from: Some(1),
        timeout_ms: 1000,
        body: Rpc::Notify { kind: "primary".into(), args: vec!["a".into(), "b".into()] },
    };
    wire::encode(&f, wire::DEFAULT_MAX_FRAME).expect("encode")
}

fn valid_datagram() -> Vec<u8> {
    let d = Datagram {
        magic: hb::MAGIC,
        version: hb::VERSION,
        cluster_id: "c0ffee".into(),
        body: Body::Answer { from: 3, to: 1, net: "mgmt".into(), seq: 77, relayed: None },
    };
    hb::encode(&d, None).expect("encode")
}

const VALID_CONFIG: &str = "name = \"n1\"\nrole = \"coordinator\"\ndata_dir = \"/var/lib/herd\"\n\
    admin_socket = \"/run/herd/admin.sock\"\n[cluster]\nlisten = \"127.0.0.1:7000\"\n\
    [heartbeat.networks]\nmgmt = \"127.0.0.1:7401\"\n[keepalive]\ninterval_ms = 1000\n";

#[test]
fn valid_inputs_decode() {
    assert!(wire::decode::<RequestFrame>(&valid_frame()).is_ok());
    assert!(hb::decode(&valid_datagram(), "c0ffee", None).is_ok());
    assert!(serde_json::from_slice::<AdminRequest>(br#"{"op":"vm-info","name":"web"}"#).is_ok());
    Config::from_toml("fuzz", VALID_CONFIG).expect("the seed config is valid");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn frame_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                     edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)) {
        let _ = wire::decode::<RequestFrame>(&bytes);
        let _ = wire::decode::<RequestFrame>(&mutate(&valid_frame(), &edits));
    }

    #[test]
    fn frame_reader(stream in proptest::collection::vec(any::<u8>(), 0..512), max in 0u32..1024) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        rt.block_on(async {
            let mut r = &stream[..];
            // Reads frames until the stream ends or is refused; never panics, never allocates
            // more than `max` for a body.
            for _ in 0..8 {
                match wire::read_frame(&mut r, max, Duration::from_millis(50), Duration::from_millis(50)).await {
                    Ok(body) => prop_assert!(body.len() <= max as usize),
                    Err(_) => break,
                }
            }
            Ok(())
        })?;
    }

    #[test]
    fn heartbeat_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..9000),
                         edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)) {
        let _ = hb::decode(&bytes, "c0ffee", None);
        let _ = hb::decode(&bytes, "c0ffee", Some(&[3u8; 32]));
        let _ = hb::decode(&mutate(&valid_datagram(), &edits), "c0ffee", None);
    }

    #[test]
    fn admin_request_parser(bytes in proptest::collection::vec(any::<u8>(), 0..1024),
                            op in "[a-z-]{0,16}", name in "\\PC{0,40}", field in "[a-z_]{0,12}") {
        let _ = serde_json::from_slice::<AdminRequest>(&bytes);
        let line = serde_json::json!({ "op": op, "name": name, field: name }).to_string();
        let _ = serde_json::from_str::<AdminRequest>(&line);
    }

    #[test]
    fn config_parser(text in "\\PC{0,400}",
                     edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)) {
        let _ = Config::from_toml("fuzz", &text);
        let mutated = String::from_utf8_lossy(&mutate(VALID_CONFIG.as_bytes(), &edits)).into_owned();
        let _ = Config::from_toml("fuzz", &mutated);
    }

    #[test]
    fn fence_agent_output(stdout in "\\PC{0,300}", code in proptest::option::of(any::<i32>()), a in 0u8..3) {
        let action = [Action::Status, Action::Off, Action::On][a as usize];
        let _ = interpret(action, code, &stdout);
        let _ = interpret(action, code, &format!("{stdout}\nStatus: {}\n", if a == 0 { "ON" } else { "off" }));
    }
}
