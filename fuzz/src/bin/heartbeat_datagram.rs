//! The heartbeat port: datagrams without a key (the body decoder) and with one (tag first).
use herd::heartbeat::wire;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = wire::decode(data, "c0ffee", None);
        let _ = wire::decode(data, "c0ffee", Some(&[3u8; 32]));
    });
}
