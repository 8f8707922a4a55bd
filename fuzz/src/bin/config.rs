//! The TOML config parser and its validation.
use herd::config::Config;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = Config::from_toml("fuzz", text);
        }
    });
}
