//! The cluster port: the frame reader (length prefix, bounded body) and the frame decoder.
use std::time::Duration;

use herd_raft::wire::{self, RequestFrame};

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    afl::fuzz!(|data: &[u8]| {
        let _ = wire::decode::<RequestFrame>(data);
        rt.block_on(async {
            let mut r = data;
            for _ in 0..4 {
                match wire::read_frame(&mut r, 4096, Duration::from_millis(5), Duration::from_millis(5)).await {
                    Ok(body) => {
                        assert!(body.len() <= 4096, "a body over the limit");
                        let _ = wire::decode::<RequestFrame>(&body);
                    }
                    Err(_) => break,
                }
            }
        });
    });
}
