//! The admin protocol's types: requests, responses and errors with stable codes. Documented in
//! `docs/admin-protocol.md`; keep the two in step (a test checks that every code is listed).

use herd_raft::network::CallError;
use herd_raft::node::NodeError;
use herd_raft::wire::RpcError;
use herd_storage::model::{ApplyError, MigrationMethod, Role, Selector, VmState};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request on the admin socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AdminRequest {
    // Unit-like variants are written `{}` so that unknown fields are refused for them too.
    Status {},
    InitCluster {},
    JoinCluster {
        peer: String,
        token: String,
        #[serde(default)]
        role: Option<Role>,
    },
    NodeList {},
    NodeInfo {
        name: String,
        /// Answer from local state at once instead of a linearizable read.
        #[serde(default)]
        local: bool,
    },
    NodeRemove {
        name: String,
        #[serde(default)]
        force: bool,
    },
    Maintenance {
        on: bool,
    },
    ClusterInfo {
        /// Answer from local state at once instead of a linearizable read.
        #[serde(default)]
        local: bool,
    },
    /// Move the primary role to `name` (or away from `name` with `secondary`); with `wait`,
    /// answer once the new primary holds its duties.
    NodePrimary {
        name: String,
        #[serde(default)]
        secondary: bool,
        #[serde(default)]
        wait: bool,
    },
    /// `node flush` (`ready: false`) or `node ready`; with `wait`, answer once done.
    NodeFlush {
        name: String,
        #[serde(default)]
        ready: bool,
        #[serde(default)]
        wait: bool,
    },
    /// `node shutdown`: this host is going down — the primary role moves away first, then
    /// every VM (live first, then shutdown migration), `daemon_state shutdown` is recorded and
    /// the daemon exits. Answers before the exit; refused for another node.
    NodeShutdown {
        /// This node's name; empty means this node.
        #[serde(default)]
        name: String,
        /// How long the flush may take before the shutdown is refused (nothing recorded).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// `node fence`: power NAME off through its BMC now (needs `yes`).
    NodeFence {
        name: String,
        #[serde(default)]
        yes: bool,
    },
    /// Define a VM from its libvirt domain XML, on `node` or where the selector places it.
    VmDefine {
        xml: String,
        #[serde(default)]
        node: Option<String>,
        #[serde(default)]
        selector: Option<Selector>,
        #[serde(default)]
        limit: Vec<String>,
        #[serde(default)]
        autostart: bool,
        #[serde(default)]
        method: Option<MigrationMethod>,
    },
    /// Every VM (local read).
    VmList {},
    /// One VM (linearizable unless `local`).
    VmInfo {
        name: String,
        #[serde(default)]
        local: bool,
    },
    /// start, stop, shutdown, restart or disable.
    VmState {
        name: String,
        state: VmState,
    },
    VmUndefine {
        name: String,
    },
    /// Replace a VM's domain XML of record (same name and uuid); used at its next start.
    VmModify {
        name: String,
        xml: String,
    },
    /// Move a VM: `to` (or where its selector places it, away from its node); `permanent`
    /// forgets its home (`vm move`); `unmigrate` sends it back to its `last_node`.
    VmMigrate {
        name: String,
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        live: bool,
        #[serde(default)]
        permanent: bool,
        #[serde(default)]
        unmigrate: bool,
    },
    /// This node's heartbeat picture: its own view (coordinators), peer views, MNFA, verdicts.
    Heartbeat {},
    /// Make a join token: valid `ttl_ms` (default: until revoked), for `uses` joins (default:
    /// any number). The token is in the answer, once; the cluster keeps only its hash.
    TokenCreate {
        #[serde(default)]
        ttl_ms: Option<u64>,
        #[serde(default)]
        uses: Option<u32>,
    },
    /// The join tokens (ids = hash prefixes, lifetimes, uses left); a linearizable read.
    TokenList {},
    /// Revoke the join token `id` (a hash prefix from `token-list`, at least 8 hex digits).
    TokenRevoke {
        id: String,
    },
    /// Renew this node's certificate now (a new key; the leader signs it).
    CertRotate {},
    /// The newest entries of the replicated event log (local read).
    Events {
        #[serde(default)]
        limit: Option<usize>,
    },
}

impl AdminRequest {
    /// Whether this request changes nothing (allowed with read-only access).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            AdminRequest::Status {}
                | AdminRequest::NodeList {}
                | AdminRequest::NodeInfo { .. }
                | AdminRequest::ClusterInfo { .. }
                | AdminRequest::VmList {}
                | AdminRequest::VmInfo { .. }
                | AdminRequest::Heartbeat {}
                | AdminRequest::Events { .. }
                | AdminRequest::TokenList {}
        )
    }
}

/// A response on the admin socket: `{"ok":true,"result":…}` or
/// `{"ok":false,"code":"not-found","error":"no VM named \"web\""}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// What went wrong, for people: one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What went wrong, for programs: stable across releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

impl AdminResponse {
    pub fn from_result(r: Result<Value, AdminError>) -> Self {
        match r {
            Ok(v) => AdminResponse { ok: true, result: Some(v), error: None, code: None },
            Err(e) => AdminResponse { ok: false, result: None, error: Some(e.message), code: Some(e.code) },
        }
    }
}

/// The stable error codes of the admin protocol. A client decides by the code, never by the
/// message's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The request could not be read: not JSON, an unknown op or field, a line too long.
    BadRequest,
    /// The peer may not make this request (admin socket access).
    PermissionDenied,
    /// The admin socket serves as many connections as it may: try again later.
    Busy,
    /// An argument is wrong (a missing confirmation, bad domain XML, a role that disagrees…).
    Invalid,
    /// The named node, VM or token does not exist.
    NotFound,
    /// What the request would create exists already (a node, a VM, an initialised cluster,
    /// this node's membership).
    Exists,
    /// The object changed since it was read (a compare-and-set lost), or the state turned
    /// round while the request waited.
    Conflict,
    /// The cluster has not been initialised.
    NotInitialised,
    /// This node is not a cluster member yet.
    NotMember,
    /// This node was removed from its cluster.
    Removed,
    /// The join token is unknown, expired, used up or revoked.
    BadToken,
    /// No node satisfies the VM's placement (`node_limit`, states, resources).
    NoNodeFits,
    /// The cluster refused the operation (e.g. a removal that would leave too few voters).
    Refused,
    /// No leader could be reached in time, or the peer failed: retrying may succeed.
    Unavailable,
    /// The request was carried out, but the state it waits for did not arrive in time.
    Timeout,
    /// A certificate or TLS failure (an untrusted peer, a CA mismatch).
    Tls,
    /// This node's storage failed.
    Storage,
    /// A bug or an unexpected answer: the message says what.
    Internal,
    /// A code this client does not know (sent by a newer daemon).
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// Every code a daemon sends.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::BadRequest,
        ErrorCode::PermissionDenied,
        ErrorCode::Busy,
        ErrorCode::Invalid,
        ErrorCode::NotFound,
        ErrorCode::Exists,
        ErrorCode::Conflict,
        ErrorCode::NotInitialised,
        ErrorCode::NotMember,
        ErrorCode::Removed,
        ErrorCode::BadToken,
        ErrorCode::NoNodeFits,
        ErrorCode::Refused,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::Tls,
        ErrorCode::Storage,
        ErrorCode::Internal,
    ];

    /// The code as it appears in the protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::PermissionDenied => "permission-denied",
            ErrorCode::Busy => "busy",
            ErrorCode::Invalid => "invalid",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Exists => "exists",
            ErrorCode::Conflict => "conflict",
            ErrorCode::NotInitialised => "not-initialised",
            ErrorCode::NotMember => "not-member",
            ErrorCode::Removed => "removed",
            ErrorCode::BadToken => "bad-token",
            ErrorCode::NoNodeFits => "no-node-fits",
            ErrorCode::Refused => "refused",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Tls => "tls",
            ErrorCode::Storage => "storage",
            ErrorCode::Internal => "internal",
            ErrorCode::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An admin request's failure: a stable code and a one-line message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    pub code: ErrorCode,
    pub message: String,
}

impl AdminError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> AdminError {
        AdminError { code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> AdminError {
        AdminError::new(ErrorCode::Invalid, message)
    }

    pub fn not_found(message: impl Into<String>) -> AdminError {
        AdminError::new(ErrorCode::NotFound, message)
    }
}

impl From<&ApplyError> for ErrorCode {
    fn from(e: &ApplyError) -> ErrorCode {
        match e {
            ApplyError::RevisionMismatch { .. } => ErrorCode::Conflict,
            ApplyError::NoSuchNode(_) | ApplyError::NoSuchVm(_) => ErrorCode::NotFound,
            ApplyError::NodeExists { .. }
            | ApplyError::AddressInUse { .. }
            | ApplyError::AlreadyInitialized
            | ApplyError::VmExists { .. } => ErrorCode::Exists,
            ApplyError::NotInitialized => ErrorCode::NotInitialised,
            ApplyError::BadToken => ErrorCode::BadToken,
            ApplyError::Invalid(_) => ErrorCode::Invalid,
            ApplyError::NoNodeFits(_) => ErrorCode::NoNodeFits,
        }
    }
}

impl From<&RpcError> for ErrorCode {
    fn from(e: &RpcError) -> ErrorCode {
        match e {
            RpcError::BadToken => ErrorCode::BadToken,
            RpcError::Refused(_) | RpcError::Unauthenticated(_) => ErrorCode::Refused,
            RpcError::BadRequest(_) => ErrorCode::Invalid,
            RpcError::WrongNode { .. }
            | RpcError::WrongCluster { .. }
            | RpcError::Version(_)
            | RpcError::NotMember
            | RpcError::NotLeader { .. }
            | RpcError::Raft(_)
            | RpcError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

impl From<&NodeError> for ErrorCode {
    fn from(e: &NodeError) -> ErrorCode {
        match e {
            NodeError::NotMember => ErrorCode::NotMember,
            NodeError::Removed => ErrorCode::Removed,
            NodeError::AlreadyMember(_) => ErrorCode::Exists,
            NodeError::NoLeader(..) | NodeError::Raft(_) => ErrorCode::Unavailable,
            NodeError::BadToken => ErrorCode::BadToken,
            NodeError::Refused(_) => ErrorCode::Refused,
            NodeError::Apply(a) => a.into(),
            NodeError::Call(CallError::Remote(r)) => r.into(),
            NodeError::Call(CallError::Transport { .. }) => ErrorCode::Unavailable,
            NodeError::Call(CallError::Untrusted { .. }) | NodeError::Tls(_) => ErrorCode::Tls,
            NodeError::Call(CallError::Unexpected { .. }) => ErrorCode::Internal,
            NodeError::Storage(_) => ErrorCode::Storage,
        }
    }
}

impl From<NodeError> for AdminError {
    fn from(e: NodeError) -> AdminError {
        AdminError::new((&e).into(), e.to_string())
    }
}

impl From<ApplyError> for AdminError {
    fn from(e: ApplyError) -> AdminError {
        AdminError::new((&e).into(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_requests_change_nothing() {
        let parse = |s: &str| serde_json::from_str::<AdminRequest>(s).expect("request");
        for r in [
            r#"{"op":"status"}"#,
            r#"{"op":"vm-info","name":"web"}"#,
            r#"{"op":"events"}"#,
            r#"{"op":"heartbeat"}"#,
            r#"{"op":"node-list"}"#,
        ] {
            assert!(parse(r).is_read_only(), "{r}");
        }
        for r in [
            r#"{"op":"init-cluster"}"#,
            r#"{"op":"vm-state","name":"web","state":"stop"}"#,
            r#"{"op":"node-fence","name":"h1","yes":true}"#,
            r#"{"op":"maintenance","on":true}"#,
        ] {
            assert!(!parse(r).is_read_only(), "{r}");
        }
    }

    /// Every code a daemon sends has a source that produces it, and the same source always
    /// gives the same code (clients rely on it).
    #[test]
    fn every_code_has_a_source() {
        use std::time::Duration;
        let io = || std::io::Error::other("disk");
        let from_apply = |e: ApplyError| AdminError::from(e).code;
        let from_node = |e: NodeError| AdminError::from(e).code;
        let transport = || CallError::Transport {
            addr: "a".into(),
            source: herd_raft::wire::FrameError::Io(std::io::Error::other("reset")),
        };
        let cases: Vec<(ErrorCode, ErrorCode)> = vec![
            (
                ErrorCode::BadRequest,
                serde_json::from_str::<AdminRequest>("{}")
                    .map_err(|_| ErrorCode::BadRequest)
                    .err()
                    .unwrap_or(ErrorCode::Internal),
            ),
            (ErrorCode::Invalid, from_apply(ApplyError::Invalid("x".into()))),
            (ErrorCode::NotFound, from_apply(ApplyError::NoSuchVm("web".into()))),
            (ErrorCode::NotFound, from_apply(ApplyError::NoSuchNode("h1".into()))),
            (ErrorCode::Exists, from_apply(ApplyError::AlreadyInitialized)),
            (ErrorCode::Exists, from_node(NodeError::AlreadyMember("c".into()))),
            (
                ErrorCode::Conflict,
                from_apply(ApplyError::RevisionMismatch { object: "vm".into(), expected: 1, actual: 2 }),
            ),
            (ErrorCode::NotInitialised, from_apply(ApplyError::NotInitialized)),
            (ErrorCode::NotMember, from_node(NodeError::NotMember)),
            (ErrorCode::Removed, from_node(NodeError::Removed)),
            (ErrorCode::BadToken, from_node(NodeError::BadToken)),
            (ErrorCode::BadToken, from_node(NodeError::Call(CallError::Remote(RpcError::BadToken)))),
            (ErrorCode::NoNodeFits, from_apply(ApplyError::NoNodeFits("none ready".into()))),
            (ErrorCode::Refused, from_node(NodeError::Refused("too few voters".into()))),
            (ErrorCode::Unavailable, from_node(NodeError::NoLeader(Duration::from_secs(1), "election".into()))),
            (ErrorCode::Unavailable, from_node(NodeError::Call(transport()))),
            (ErrorCode::Tls, from_node(NodeError::Tls("bad".into()))),
            (ErrorCode::Storage, from_node(NodeError::Storage(io()))),
            (
                ErrorCode::Internal,
                from_node(NodeError::Call(CallError::Unexpected { addr: "a".into(), reply: "?".into() })),
            ),
        ];
        for (want, got) in &cases {
            assert_eq!(want, got);
        }
        // The socket's own codes are made where they are sent (socket.rs); the handlers' in
        // their families. Every code is produced somewhere in this list or named here.
        let socket_and_handlers = [ErrorCode::PermissionDenied, ErrorCode::Busy, ErrorCode::Timeout];
        for code in ErrorCode::ALL {
            assert!(
                cases.iter().any(|(c, _)| *c == code) || socket_and_handlers.contains(&code),
                "{code} has no source in this test"
            );
        }
    }

    #[test]
    fn codes_round_trip_and_unknown_codes_are_other() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).expect("encodes");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).expect("decodes"), code);
        }
        assert_eq!(serde_json::from_str::<ErrorCode>("\"from-the-future\"").expect("decodes"), ErrorCode::Other);
        let r = AdminResponse::from_result(Err(AdminError::not_found("no VM named \"web\"")));
        let line = serde_json::to_string(&r).expect("encodes");
        assert_eq!(line, r#"{"ok":false,"error":"no VM named \"web\"","code":"not-found"}"#);
    }

    /// docs/admin-protocol.md lists every code.
    #[test]
    fn the_protocol_document_lists_every_code() {
        let doc = include_str!("../../docs/admin-protocol.md");
        for code in ErrorCode::ALL {
            assert!(doc.contains(&format!("`{}`", code.as_str())), "docs/admin-protocol.md does not list `{code}`");
        }
    }
}
