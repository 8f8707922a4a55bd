//! The admin socket: one request line.
use herd::admin::AdminRequest;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(r) = serde_json::from_slice::<AdminRequest>(data) {
            let _ = r.is_read_only();
        }
    });
}
