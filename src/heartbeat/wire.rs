//! Heartbeat datagrams: versioned, size-bounded, compact rmp-serde, and (in a TLS cluster)
//! authenticated: an HMAC-SHA256 tag, truncated to [`TAG_LEN`] bytes, under the cluster's
//! heartbeat key follows the body. Replays are the agent's business (sequence numbers).
//!
//! ```text
//!   ┌──────────────────────────────┬──────────────────────────────────────┐
//!   │ rmp-serde Datagram           │ HMAC-SHA256(key, body)[..16] (keyed)  │
//!   └──────────────────────────────┴──────────────────────────────────────┘
//! ```
//!
//! A pulse carries the sender's *summary* — the (host, network) pairs it currently misses, each
//! with how long ago it was last heard, plus per-network counts — never the whole history ring,
//! so a pulse stays one small datagram at 1000 hosts ([`MAX_MISSING`] entries at most). Every
//! time in a summary is relative ("ms ago when the summary was made"): no clocks are compared.

use herd_storage::model::NodeId;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{LinkState, NetName};

/// Bumped on any incompatible change.
pub const VERSION: u16 = 1;
/// Marks our datagrams ("HBT1"); anything else on the port is foreign.
pub const MAGIC: u32 = 0x4842_5431;
/// The largest datagram we send or accept.
pub const MAX_DATAGRAM: usize = 8192;
/// Missing pairs listed in one summary; beyond that it says `truncated`.
pub const MAX_MISSING: usize = 48;
/// Networks per summary.
pub const MAX_NETS: usize = 8;
/// Bytes of the authentication tag.
pub const TAG_LEN: usize = 16;

/// The cluster's heartbeat key (every member receives it over TLS when it joins).
pub type Key = [u8; 32];

fn mac(key: &Key) -> Hmac<Sha256> {
    // HMAC takes keys of any length: this cannot fail for 32 bytes.
    <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
}

/// One missed (host, network) pair in a summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missing {
    pub host: NodeId,
    pub state: LinkState,
    pub misses: u32,
    /// How long ago the host last answered on this network (None: never since this view began).
    pub last_heard_ago_ms: Option<u64>,
    /// How long the link has been in `state`.
    pub state_for_ms: u64,
}

/// One network in a summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSummary {
    pub net: NetName,
    /// Hosts this coordinator pulses on this network.
    pub enabled: u32,
    /// Of those, how many answered in the last closed period.
    pub responding: u32,
    /// This coordinator hears no host at all on this network: its view of it does not count.
    pub isolated: bool,
    /// Multi-node failure avoidance is active on this network in this view.
    pub mnfa: bool,
    /// Pairs with at least two consecutive misses, worst first.
    pub missing: Vec<Missing>,
    /// More pairs were missing than listed (hosts not listed must then be taken as not lost).
    pub truncated: bool,
}

/// A coordinator's view, as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub coordinator: NodeId,
    /// The coordinator's period counter when it made the summary.
    pub seq: u64,
    pub nets: Vec<NetSummary>,
}

impl Summary {
    pub fn net(&self, net: &str) -> Option<&NetSummary> {
        self.nets.iter().find(|n| n.net == net)
    }
}

/// A relayed summary and how long the relaying node has held it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relayed {
    pub summary: Summary,
    pub age_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Coordinator → node.
    Pulse { from: NodeId, net: NetName, seq: u64, summary: Summary },
    /// Node → coordinator `to`, echoing the pulse's `seq`, with (at most) one other
    /// coordinator's summary.
    Answer { from: NodeId, to: NodeId, net: NetName, seq: u64, relayed: Option<Relayed> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datagram {
    pub magic: u32,
    pub version: u16,
    pub cluster_id: String,
    pub body: Body,
}

/// Why a datagram was dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("malformed")]
    Malformed,
    #[error("foreign (not ours, other version or other cluster)")]
    Foreign,
    #[error("not authenticated (no or a wrong tag: spoofed, altered, or another key)")]
    Unauthenticated,
}

/// Encodes (and tags, with a key); `None` if it would exceed [`MAX_DATAGRAM`].
pub fn encode(d: &Datagram, key: Option<&Key>) -> Option<Vec<u8>> {
    let mut bytes = rmp_serde::to_vec(d).ok()?;
    if let Some(key) = key {
        let mut m = mac(key);
        m.update(&bytes);
        bytes.extend_from_slice(&m.finalize().into_bytes()[..TAG_LEN]);
    }
    Some(bytes).filter(|b| b.len() <= MAX_DATAGRAM)
}

/// Checks the tag (with a key), then decodes and checks a datagram for `cluster_id`.
pub fn decode(bytes: &[u8], cluster_id: &str, key: Option<&Key>) -> Result<Datagram, DropReason> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(DropReason::Malformed);
    }
    let body = match key {
        None => bytes,
        Some(key) => {
            let split = bytes.len().checked_sub(TAG_LEN).ok_or(DropReason::Unauthenticated)?;
            let (body, tag) = bytes.split_at(split);
            let mut m = mac(key);
            m.update(body);
            // Constant time.
            m.verify_truncated_left(tag).map_err(|_| DropReason::Unauthenticated)?;
            body
        }
    };
    let d: Datagram = rmp_serde::from_slice(body).map_err(|_| DropReason::Malformed)?;
    if d.magic != MAGIC || d.version != VERSION || d.cluster_id != cluster_id {
        return Err(DropReason::Foreign);
    }
    let nets = match &d.body {
        Body::Pulse { summary, .. } => Some(summary),
        Body::Answer { relayed, .. } => relayed.as_ref().map(|r: &Relayed| &r.summary),
    };
    if let Some(s) = nets {
        if s.nets.len() > MAX_NETS || s.nets.iter().any(|n| n.missing.len() > MAX_MISSING) {
            return Err(DropReason::Malformed);
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(missing: usize) -> Summary {
        let m = (0..missing as u64)
            .map(|h| Missing {
                host: 1000 + h,
                state: LinkState::Lost,
                misses: 99,
                last_heard_ago_ms: Some(123_456),
                state_for_ms: 99_999,
            })
            .collect();
        Summary {
            coordinator: 3,
            seq: u64::MAX / 3,
            nets: vec![
                NetSummary {
                    net: "mgmt".into(),
                    enabled: 1000,
                    responding: 990,
                    isolated: false,
                    mnfa: true,
                    missing: m,
                    truncated: true,
                },
                NetSummary {
                    net: "storage".into(),
                    enabled: 1000,
                    responding: 1000,
                    isolated: false,
                    mnfa: false,
                    missing: vec![],
                    truncated: false,
                },
            ],
        }
    }

    #[test]
    fn a_full_pulse_at_1000_hosts_is_one_small_datagram() {
        let d = Datagram {
            magic: MAGIC,
            version: VERSION,
            cluster_id: "0123456789abcdef".into(),
            // Counters start from the wall clock in periods (≈ 1.8e10 at 100 ms): full width.
            body: Body::Pulse { from: 3, net: "mgmt".into(), seq: u64::MAX / 3, summary: summary(MAX_MISSING) },
        };
        let key = [7u8; 32];
        let bytes = encode(&d, Some(&key)).expect("fits");
        assert!(bytes.len() <= 1400, "pulse is {} bytes", bytes.len());
        assert_eq!(decode(&bytes, "0123456789abcdef", Some(&key)), Ok(d));
    }

    #[test]
    fn foreign_and_malformed_datagrams_are_told_apart() {
        let d = Datagram {
            magic: MAGIC,
            version: VERSION,
            cluster_id: "a".into(),
            body: Body::Answer { from: 1, to: 2, net: "mgmt".into(), seq: 1, relayed: None },
        };
        let bytes = encode(&d, None).expect("encode");
        assert_eq!(decode(&bytes, "b", None), Err(DropReason::Foreign));
        assert_eq!(decode(&bytes[..bytes.len() - 1], "a", None), Err(DropReason::Malformed));
        assert_eq!(decode(b"GET / HTTP/1.1\r\n", "a", None), Err(DropReason::Malformed));
        let mut other = d.clone();
        other.version = VERSION + 1;
        assert_eq!(decode(&encode(&other, None).expect("encode"), "a", None), Err(DropReason::Foreign));
        let mut big = d;
        big.body = Body::Pulse { from: 1, net: "mgmt".into(), seq: 1, summary: summary(MAX_MISSING + 1) };
        assert_eq!(decode(&encode(&big, None).expect("encode"), "a", None), Err(DropReason::Malformed));
    }

    #[test]
    fn only_datagrams_tagged_under_the_cluster_key_are_accepted() {
        let d = Datagram {
            magic: MAGIC,
            version: VERSION,
            cluster_id: "a".into(),
            body: Body::Answer { from: 1, to: 2, net: "mgmt".into(), seq: 9, relayed: None },
        };
        let (key, other) = ([1u8; 32], [2u8; 32]);
        let good = encode(&d, Some(&key)).expect("encode");
        assert_eq!(decode(&good, "a", Some(&key)), Ok(d.clone()));
        // Untagged, tagged under another key, altered in one bit, or too short for a tag.
        assert_eq!(decode(&encode(&d, None).expect("encode"), "a", Some(&key)), Err(DropReason::Unauthenticated));
        assert_eq!(decode(&encode(&d, Some(&other)).expect("e"), "a", Some(&key)), Err(DropReason::Unauthenticated));
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert_eq!(decode(&bad, "a", Some(&key)), Err(DropReason::Unauthenticated), "bit flip at {i}");
        }
        assert_eq!(decode(&good[..TAG_LEN - 1], "a", Some(&key)), Err(DropReason::Unauthenticated));
    }
}
