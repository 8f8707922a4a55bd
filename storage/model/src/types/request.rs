//! A replicated write (`Request` of `Op`s), its outcome (`Reply`, `ApplyError`, `Response`) and
//! the bounded memory of applied request ids used to deduplicate retries.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::*;

/// The outcome of a request, remembered for deduplication of retries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub index: u64,
    pub time_ms: u64,
    pub result: Result<Reply, ApplyError>,
}

/// Recently applied request ids and their outcomes, with the oldest found in O(log n).
///
/// Serialized as the plain map `id → record` (snapshots and stores keep that shape); the
/// order by log index is derived from it and rebuilt on decoding. One request per log index,
/// so the index names one id.
#[derive(Clone, Debug, Default)]
pub struct RequestLog {
    by_id: BTreeMap<String, RequestRecord>,
    /// Derived from `by_id`: each id under the index that applied it.
    by_index: BTreeMap<u64, String>,
}

impl RequestLog {
    pub fn get(&self, id: &str) -> Option<&RequestRecord> {
        self.by_id.get(id)
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_id.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &RequestRecord)> {
        self.by_id.iter()
    }

    /// Remembers `record` under `id`, replacing what `id` or `record.index` held before.
    pub fn insert(&mut self, id: String, record: RequestRecord) {
        if let Some(old) = self.by_id.remove(&id) {
            self.by_index.remove(&old.index);
        }
        if let Some(other) = self.by_index.insert(record.index, id.clone()) {
            self.by_id.remove(&other);
        }
        self.by_id.insert(id, record);
    }

    /// Forgets the request applied at the smallest index and returns its id.
    pub fn pop_oldest(&mut self) -> Option<String> {
        let (_, id) = self.by_index.pop_first()?;
        self.by_id.remove(&id);
        Some(id)
    }
}

impl PartialEq for RequestLog {
    fn eq(&self, other: &Self) -> bool {
        self.by_id == other.by_id
    }
}

impl Eq for RequestLog {}

impl std::ops::Index<&str> for RequestLog {
    type Output = RequestRecord;

    fn index(&self, id: &str) -> &RequestRecord {
        &self.by_id[id]
    }
}

impl FromIterator<(String, RequestRecord)> for RequestLog {
    fn from_iter<I: IntoIterator<Item = (String, RequestRecord)>>(iter: I) -> Self {
        let mut log = RequestLog::default();
        for (id, record) in iter {
            log.insert(id, record);
        }
        log
    }
}

impl Serialize for RequestLog {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.by_id.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RequestLog {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<String, RequestRecord>::deserialize(d)?.into_iter().collect())
    }
}

/// A replicated write: one or more operations applied atomically, identified by a client
/// request id so that a retry applies once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Unique per logical write; retries reuse it.
    pub id: String,
    /// Leader wall-clock time in ms since the Unix epoch, stamped when the leader proposes it.
    pub time_ms: u64,
    pub ops: Vec<Op>,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req {} @{}:", self.id, self.time_ms)?;
        for op in &self.ops {
            write!(f, " {}", op.cmd.name())?;
            if let Some(rev) = op.expect_revision {
                write!(f, "(rev={rev})")?;
            }
        }
        Ok(())
    }
}

/// One command with an optional compare-and-set on the revision of the object it targets.
/// `expect_revision = Some(0)` means "the object must not exist".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub cmd: Command,
    #[serde(default)]
    pub expect_revision: Option<u64>,
}

impl From<Command> for Op {
    fn from(cmd: Command) -> Self {
        Op { cmd, expect_revision: None }
    }
}

/// What a successful command returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    NodeRegistered { id: NodeId },
}

/// Why `apply` refused a request. Refusals are values recorded in the log's outcome, never panics.
///
/// `Display` is written by hand (the model depends on serde alone); tests and operators match
/// on these messages, so they do not change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyError {
    RevisionMismatch { object: String, expected: u64, actual: u64 },
    NoSuchNode(String),
    NodeExists { name: String, id: NodeId },
    AddressInUse { addr: String, name: String },
    AlreadyInitialized,
    NotInitialized,
    BadToken,
    Invalid(String),
    NoSuchVm(String),
    VmExists { name: String, uuid: String },
    NoNodeFits(String),
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyError::RevisionMismatch { object, expected, actual } => {
                write!(f, "revision mismatch on {object}: expected {expected}, found {actual}")
            }
            ApplyError::NoSuchNode(name) => write!(f, "no node named {name:?}"),
            ApplyError::NodeExists { name, id } => {
                write!(f, "a node named {name:?} is already a member (id {id}); remove it first")
            }
            ApplyError::AddressInUse { addr, name } => write!(f, "the address {addr} is already used by node {name:?}"),
            ApplyError::AlreadyInitialized => f.write_str("the cluster is already initialised"),
            ApplyError::NotInitialized => f.write_str("the cluster is not initialised"),
            ApplyError::BadToken => f.write_str("join token refused (unknown, expired, used up or revoked)"),
            ApplyError::Invalid(why) => write!(f, "invalid request: {why}"),
            ApplyError::NoSuchVm(name) => write!(f, "no VM named {name:?}"),
            ApplyError::VmExists { name, uuid } => write!(f, "a VM named {name:?} or with uuid {uuid} already exists"),
            ApplyError::NoNodeFits(why) => write!(f, "no node fits: {why}"),
        }
    }
}

impl std::error::Error for ApplyError {}

/// The state machine's answer to one log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Log index of the entry.
    pub index: u64,
    pub result: Result<Reply, ApplyError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages `thiserror` used to derive, word for word: operators and tests match on them.
    #[test]
    fn apply_error_messages_are_unchanged() {
        let s = |x: &str| x.to_string();
        let cases = [
            (
                ApplyError::RevisionMismatch { object: s("node a"), expected: 3, actual: 4 },
                "revision mismatch on node a: expected 3, found 4",
            ),
            (ApplyError::NoSuchNode(s("a")), "no node named \"a\""),
            (
                ApplyError::NodeExists { name: s("a"), id: 2 },
                "a node named \"a\" is already a member (id 2); remove it first",
            ),
            (
                ApplyError::AddressInUse { addr: s("a:1"), name: s("b") },
                "the address a:1 is already used by node \"b\"",
            ),
            (ApplyError::AlreadyInitialized, "the cluster is already initialised"),
            (ApplyError::NotInitialized, "the cluster is not initialised"),
            (ApplyError::BadToken, "join token refused (unknown, expired, used up or revoked)"),
            (ApplyError::Invalid(s("why")), "invalid request: why"),
            (ApplyError::NoSuchVm(s("web")), "no VM named \"web\""),
            (ApplyError::VmExists { name: s("web"), uuid: s("u") }, "a VM named \"web\" or with uuid u already exists"),
            (ApplyError::NoNodeFits(s("none")), "no node fits: none"),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
            let source = std::error::Error::source(&e);
            assert!(source.is_none(), "{e:?} has no source");
        }
    }
}
