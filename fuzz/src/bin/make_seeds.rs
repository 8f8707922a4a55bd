//! Writes one directory of valid inputs per target (AFL's starting corpus): `make_seeds DIR`.
use std::path::Path;

use herd::heartbeat::wire::{self as hb, Body, Datagram, Summary};
use herd_raft::wire::{self, LeaderOp, RequestFrame, Rpc};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("seed dir");
    std::fs::write(d.join(name), bytes).expect("seed");
}

fn frame(body: Rpc) -> Vec<u8> {
    let f = RequestFrame {
        version: wire::PROTOCOL_VERSION,
        cluster_id: "c0ffee".into(),
        to: Some(2),
        from: Some(1),
        timeout_ms: 1000,
        body,
    };
    let mut framed = Vec::new();
    let bytes = wire::encode(&f, wire::DEFAULT_MAX_FRAME).expect("encode");
    framed.extend_from_slice(&u32::try_from(bytes.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(&bytes);
    framed
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: make_seeds DIR");
    let dir = Path::new(&dir);
    write(dir, "cluster_frame", "notify", &frame(Rpc::Notify { kind: "primary".into(), args: vec!["a".into()] }));
    write(dir, "cluster_frame", "read_index", &frame(Rpc::Leader(LeaderOp::ReadIndex)));
    write(dir, "cluster_frame", "renew", &frame(Rpc::RenewCert { csr: "-----BEGIN CERTIFICATE REQUEST-----".into() }));
    let answer = Datagram {
        magic: hb::MAGIC,
        version: hb::VERSION,
        cluster_id: "c0ffee".into(),
        body: Body::Answer { from: 3, to: 1, net: "mgmt".into(), seq: 77, relayed: None },
    };
    write(dir, "heartbeat_datagram", "answer", &hb::encode(&answer, None).expect("encode"));
    let pulse = Datagram {
        body: Body::Pulse {
            from: 1,
            net: "mgmt".into(),
            seq: 9,
            summary: Summary { coordinator: 1, seq: 9, nets: vec![] },
        },
        ..answer
    };
    write(dir, "heartbeat_datagram", "pulse", &hb::encode(&pulse, None).expect("encode"));
    write(dir, "heartbeat_datagram", "pulse_tagged", &hb::encode(&pulse, Some(&[3u8; 32])).expect("encode"));
    write(dir, "admin_request", "status", br#"{"op":"status"}"#);
    write(dir, "admin_request", "vm_define", br#"{"op":"vm-define","xml":"<domain/>","node":"h1","selector":"mem"}"#);
    write(dir, "admin_request", "token", br#"{"op":"token-create","ttl_ms":3600000,"uses":1}"#);
    let config = "name = \"n1\"\nrole = \"coordinator\"\ndata_dir = \"/var/lib/herd\"\n\
        admin_socket = \"/run/herd/admin.sock\"\n[cluster]\nlisten = \"127.0.0.1:7000\"\n\
        [heartbeat.networks]\nmgmt = \"127.0.0.1:7401\"\n[keepalive]\ninterval_ms = 1000\n";
    write(dir, "config", "minimal", config.as_bytes());
    write(dir, "fence_agent_output", "on", b"\x00Status: ON\n");
    write(dir, "fence_agent_output", "off", b"\x04Success: Powered OFF\n");
}
