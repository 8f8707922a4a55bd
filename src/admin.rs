//! The admin socket: a Unix socket, one JSON request per line, one JSON response per line.
//! The protocol is documented in `docs/admin-protocol.md`; keep the two in step.
//!
//! Bounds: a request line is at most [`MAX_LINE`] bytes; a connection idle for the configured
//! `limits.admin_idle_timeout_ms` is closed; at most [`MAX_CONNECTIONS`] are served at once.
//!
//! Access: file modes are not trusted alone. Each connection's peer credentials (SO_PEERCRED)
//! decide what it may do: root and the daemon's own user everything; members of
//! `admin_socket_group` (primary or supplementary group) what `admin_group_access` allows
//! (`read` by default: requests that change nothing); anyone else is refused.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use herd_storage::model::Role;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use crate::daemon::Daemon;

/// What members of the admin group may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupAccess {
    /// Requests that change nothing.
    #[default]
    Read,
    Full,
}

/// What one peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    None,
    Read,
    Full,
}

/// Who may do what on the admin socket.
#[derive(Clone, Debug)]
pub struct AccessPolicy {
    /// The daemon's own (effective) user.
    pub owner_uid: u32,
    /// The admin group and what its members may do.
    pub group: Option<(u32, GroupAccess)>,
}

impl AccessPolicy {
    /// The policy for this process and `group` (by name) with `access`.
    pub fn new(group: Option<&str>, access: Option<GroupAccess>) -> Result<AccessPolicy, String> {
        let group = match group {
            None => None,
            Some(name) => {
                let gid = nix::unistd::Group::from_name(name)
                    .map_err(|e| format!("admin_socket_group {name:?}: {e}"))?
                    .ok_or_else(|| format!("admin_socket_group: no group named {name:?}"))?
                    .gid
                    .as_raw();
                Some((gid, access.unwrap_or_default()))
            }
        };
        Ok(AccessPolicy { owner_uid: nix::unistd::geteuid().as_raw(), group })
    }

    /// What a peer with user `uid`, primary group `gid` and supplementary `groups` may do.
    pub fn access(&self, uid: u32, gid: u32, groups: &[u32]) -> Access {
        if uid == 0 || uid == self.owner_uid {
            return Access::Full;
        }
        match self.group {
            Some((g, a)) if gid == g || groups.contains(&g) => match a {
                GroupAccess::Read => Access::Read,
                GroupAccess::Full => Access::Full,
            },
            _ => Access::None,
        }
    }
}

/// The supplementary groups of process `pid` (from /proc; empty if it cannot be read — the
/// peer then gets what its user and primary group allow).
fn supplementary_groups(pid: Option<i32>) -> Vec<u32> {
    let Some(pid) = pid.filter(|p| *p > 0) else { return Vec::new() };
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return Vec::new() };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).take(1024).collect())
        .unwrap_or_default()
}

pub const MAX_LINE: usize = 64 * 1024;
pub const MAX_CONNECTIONS: usize = 64;

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
        selector: Option<herd_storage::model::Selector>,
        #[serde(default)]
        limit: Vec<String>,
        #[serde(default)]
        autostart: bool,
        #[serde(default)]
        method: Option<herd_storage::model::MigrationMethod>,
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
        state: herd_storage::model::VmState,
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

/// A response on the admin socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdminResponse {
    pub fn from_result(r: Result<Value, String>) -> Self {
        match r {
            Ok(v) => AdminResponse { ok: true, result: Some(v), error: None },
            Err(e) => AdminResponse { ok: false, result: None, error: Some(e) },
        }
    }
}

/// Errors setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("admin socket {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("admin socket {path}: a file that is not a socket is in the way")]
    NotASocket { path: String },
    #[error("admin socket {path}: no group named {group:?} (admin_socket_group)")]
    NoGroup { path: String, group: String },
}

/// Binds the socket (mode 0600; 0660 owned by `group` when given), replacing a stale socket
/// file left by a previous run.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, BindError> {
    let p = path.display().to_string();
    let io = |source| BindError::Io { path: p.clone(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => return Err(BindError::NotASocket { path: p }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    let mode = match group {
        None => 0o600,
        Some(name) => {
            let gid = nix::unistd::Group::from_name(name)
                .map_err(|e| io(std::io::Error::from(e)))?
                .ok_or_else(|| BindError::NoGroup { path: p.clone(), group: name.to_string() })?
                .gid;
            nix::unistd::chown(path, None, Some(gid)).map_err(|e| io(std::io::Error::from(e)))?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

/// Serves the admin socket until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    policy: AccessPolicy,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Refusals are logged at most every 10 s, with a count.
    let (mut refused, mut last_warning) = (0u64, None);
    let (mut refused_peers, mut last_peer_warning) = (0u64, None);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("admin socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let access = match stream.peer_cred() {
            // Supplementary groups (a /proc read) only when user and primary group do not decide.
            Ok(c) => match policy.access(c.uid(), c.gid(), &[]) {
                Access::None if policy.group.is_some() => {
                    policy.access(c.uid(), c.gid(), &supplementary_groups(c.pid()))
                }
                a => a,
            },
            Err(_) => Access::None,
        };
        if access == Access::None {
            refused_peers += 1;
            if last_peer_warning.is_none_or(|t: tokio::time::Instant| t.elapsed() >= Duration::from_secs(10)) {
                let who = stream.peer_cred().map(|c| format!("uid {} gid {}", c.uid(), c.gid())).unwrap_or_default();
                tracing::warn!(refused = refused_peers, peer = %who, "admin socket: refused a peer that is neither root, the daemon's user nor in admin_socket_group");
                last_peer_warning = Some(tokio::time::Instant::now());
                refused_peers = 0;
            }
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if last_warning.is_none_or(|t: tokio::time::Instant| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(refused, "admin socket: {MAX_CONNECTIONS} connections open, refusing more");
                last_warning = Some(tokio::time::Instant::now());
                refused = 0;
            }
            // Say why before closing (best effort, never blocking the accept loop).
            let _ = stream.try_write(b"{\"ok\":false,\"error\":\"too many admin connections\"}\n");
            continue;
        };
        let daemon = daemon.clone();
        herd_storage::types::spawn(async move {
            connection(stream, &daemon, access, idle).await;
            drop(permit);
        });
    }
}

async fn connection(stream: UnixStream, daemon: &Daemon, access: Access, idle: Duration) {
    // A refused peer gets one answer, soon.
    let idle = if access == Access::None { idle.min(Duration::from_secs(2)) } else { idle };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let n = match tokio::time::timeout(idle, limited.read_until(b'\n', &mut line)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if access == Access::None {
            // Answer the first request (the client reads why, not a broken pipe), then close.
            let mut out = br#"{"ok":false,"error":"permission denied: not root, not the daemon's user, not in admin_socket_group"}"#.to_vec();
            out.push(b'\n');
            let _ = write.write_all(&out).await;
            return;
        }
        let too_long = line.len() > MAX_LINE || (line.last() != Some(&b'\n') && line.len() == MAX_LINE + 1);
        let response = if too_long {
            AdminResponse::from_result(Err(format!("request line longer than {MAX_LINE} bytes")))
        } else {
            match serde_json::from_slice::<AdminRequest>(&line) {
                Ok(req) if access < Access::Full && !req.is_read_only() => AdminResponse::from_result(Err(
                    "permission denied: this request changes the cluster; your group has read access \
                     (admin_group_access = \"read\")"
                        .into(),
                )),
                Ok(req) => AdminResponse::from_result(daemon.handle(req).await),
                Err(e) => AdminResponse::from_result(Err(format!("bad request: {e}"))),
            }
        };
        let mut out = match serde_json::to_vec(&response) {
            Ok(v) => v,
            Err(_) => return,
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || too_long {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_by_user_and_groups() {
        let open = AccessPolicy { owner_uid: 0, group: None };
        assert_eq!(open.access(0, 0, &[]), Access::Full);
        assert_eq!(open.access(1000, 1000, &[]), Access::None, "no group: root only");
        let read = AccessPolicy { owner_uid: 0, group: Some((990, GroupAccess::Read)) };
        assert_eq!(read.access(1000, 990, &[]), Access::Read, "primary group");
        assert_eq!(read.access(1000, 1000, &[4, 990]), Access::Read, "supplementary group");
        assert_eq!(read.access(1000, 1000, &[4]), Access::None);
        let full = AccessPolicy { owner_uid: 500, group: Some((990, GroupAccess::Full)) };
        assert_eq!(full.access(1000, 990, &[]), Access::Full);
        assert_eq!(full.access(500, 500, &[]), Access::Full, "the daemon's own user");
    }

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
}
