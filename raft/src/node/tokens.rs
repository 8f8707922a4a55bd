//! Join tokens (the secret, its stored hash, the CA hash it pins), request ids, and the
//! source of random ids, which the simulation replaces on its thread.

use rand::Rng;
use sha2::{Digest, Sha256};

use super::NodeError;

/// SHA-256 of a join token, hex: the only form in which tokens are stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Fills a buffer with random bytes.
type RandomSource = fn(&mut [u8]);

thread_local! {
    /// The simulation's replacement for the OS random source on its thread (see
    /// [`set_thread_random_source`]).
    static RANDOM_SOURCE: std::cell::Cell<Option<RandomSource>> = const { std::cell::Cell::new(None) };
}

/// Makes ids (cluster id, tokens, request ids) on this thread come from `f`: the simulation's
/// seeded generator, so a seed replays with the same ids. `None` restores the OS source.
pub fn set_thread_random_source(f: Option<RandomSource>) {
    RANDOM_SOURCE.with(|s| s.set(f));
}

pub(super) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    match RANDOM_SOURCE.with(std::cell::Cell::get) {
        Some(f) => f(buf.as_mut_slice()),
        None => rand::rng().fill(buf.as_mut_slice()),
    }
    hex::encode(buf)
}

/// A random id (a boot of this node's Raft: see `Member::boot`).
pub(crate) fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    match RANDOM_SOURCE.with(std::cell::Cell::get) {
        Some(f) => f(buf.as_mut_slice()),
        None => rand::rng().fill(buf.as_mut_slice()),
    }
    u64::from_le_bytes(buf)
}

/// A fresh join token (`herd-` and 48 hex digits); the cluster keeps only its hash.
pub fn new_join_token() -> String {
    format!("herd-{}", random_hex(24))
}

/// Splits an operator's join token into the secret and the CA hash it pins. With TLS the hash
/// is required: without it the joiner could not tell the cluster from an impostor.
pub fn split_token(token: &str, tls: bool) -> Result<(&str, Option<[u8; 32]>), NodeError> {
    let token = token.trim();
    let Some((secret, hash)) = token.split_once('.') else {
        if tls {
            return Err(NodeError::Tls(
                "the join token has no CA hash: use the whole token `herd init-cluster` or `herd token create` printed (<secret>.<64 hex digits>)".into(),
            ));
        }
        return Ok((token, None));
    };
    let mut pin = [0u8; 32];
    hex::decode_to_slice(hash, &mut pin).map_err(|_| {
        NodeError::Tls("the join token's CA hash is not 64 hex digits: copy the whole token again".into())
    })?;
    Ok((secret, Some(pin)))
}

/// A fresh request id for a write.
pub fn request_id() -> String {
    random_hex(16)
}
