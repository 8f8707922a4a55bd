//! The admin socket: a Unix socket, one JSON request per line, one JSON response per line.
//! The protocol is documented in `docs/admin-protocol.md`; keep the two in step.
//!
//! Bounds: a request line is at most [`MAX_LINE`] bytes; a connection idle for the configured
//! `limits.admin_idle_timeout_ms` is closed; connections are capped per class of peer and per
//! user ([`MAX_CONNECTIONS`], [`MAX_PER_UID`]), so no group member can lock root out.
//!
//! Access: file modes are not trusted alone. Each connection's peer credentials (SO_PEERCRED)
//! decide what it may do: root and the daemon's own user everything; members of
//! `admin_socket_group` (primary or supplementary group) what `admin_group_access` allows
//! (`read` by default: requests that change nothing); anyone else is refused.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::protocol::{AdminError, AdminRequest, AdminResponse, ErrorCode};
use super::Handler;
use crate::config::GroupAccess;

/// What one peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    None,
    Read,
    /// A member of a full-access group.
    Full,
    /// Root or the daemon's own user.
    Owner,
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
            return Access::Owner;
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
/// Connections served at once, per class of peer: root and the daemon's user have their own
/// capacity, which group members can never take; a full-access group has its own again, so a
/// read-only member cannot lock out those who may change things; one group user holds at
/// most [`MAX_PER_UID`]. Refused peers get a few short-lived connections of their own.
pub const MAX_CONNECTIONS: [(Access, usize); 4] =
    [(Access::Owner, 32), (Access::Full, 32), (Access::Read, 32), (Access::None, 8)];
pub const MAX_PER_UID: usize = 16;

/// The admin socket's connection counts, by class and by user.
#[derive(Default)]
struct Slots(std::sync::Mutex<std::collections::BTreeMap<(Access, Option<u32>), usize>>);

/// One connection's place, given back on drop.
struct Slot {
    slots: Arc<Slots>,
    keys: [(Access, Option<u32>); 2],
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<(Access, Option<u32>), usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a connection of class `access` from `uid`, if its class and its user have
    /// room (the owner class has no per-user cap).
    fn take(self: &Arc<Self>, access: Access, uid: u32) -> Option<Slot> {
        let max = MAX_CONNECTIONS.iter().find(|(a, _)| *a == access).map_or(0, |(_, n)| *n);
        let per_uid = if access == Access::Owner { max } else { MAX_PER_UID };
        let keys = [(access, None), (access, Some(uid))];
        let mut g = self.lock();
        if g.get(&keys[0]).copied().unwrap_or(0) >= max || g.get(&keys[1]).copied().unwrap_or(0) >= per_uid {
            return None;
        }
        for k in keys {
            *g.entry(k).or_insert(0) += 1;
        }
        Some(Slot { slots: self.clone(), keys })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.slots.lock();
        for k in self.keys {
            if let Some(n) = g.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    g.remove(&k);
                }
            }
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
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    policy: AccessPolicy,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Slots::default());
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
        let (access, uid) = match stream.peer_cred() {
            // Supplementary groups (a /proc read) only when user and primary group do not decide.
            Ok(c) => match policy.access(c.uid(), c.gid(), &[]) {
                Access::None if policy.group.is_some() => {
                    (policy.access(c.uid(), c.gid(), &supplementary_groups(c.pid())), c.uid())
                }
                a => (a, c.uid()),
            },
            Err(_) => (Access::None, u32::MAX),
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
        let Some(permit) = slots.take(access, uid) else {
            refused += 1;
            if last_warning.is_none_or(|t: tokio::time::Instant| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(refused, uid, ?access, "admin socket: this peer's connections are at their cap ({MAX_PER_UID} per user, {MAX_CONNECTIONS:?} per class), refusing more");
                last_warning = Some(tokio::time::Instant::now());
                refused = 0;
            }
            // Say why before closing (best effort, never blocking the accept loop).
            let _ = stream.try_write(&response_line(&AdminResponse::from_result(Err(AdminError::new(
                ErrorCode::Busy,
                "too many admin connections from this user",
            )))));
            continue;
        };
        let handler = handler.clone();
        herd_storage::types::spawn(async move {
            connection(stream, &*handler, access, idle).await;
            drop(permit);
        });
    }
}

async fn connection<H: Handler>(stream: UnixStream, handler: &H, access: Access, idle: Duration) {
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
            let denied = AdminError::new(
                ErrorCode::PermissionDenied,
                "permission denied: not root, not the daemon's user, not in admin_socket_group",
            );
            let _ = write.write_all(&response_line(&AdminResponse::from_result(Err(denied)))).await;
            return;
        }
        let too_long = line.len() > MAX_LINE || (line.last() != Some(&b'\n') && line.len() == MAX_LINE + 1);
        let response = if too_long {
            AdminResponse::from_result(Err(AdminError::new(
                ErrorCode::BadRequest,
                format!("request line longer than {MAX_LINE} bytes"),
            )))
        } else {
            match serde_json::from_slice::<AdminRequest>(&line) {
                Ok(req) if access < Access::Full && !req.is_read_only() => {
                    AdminResponse::from_result(Err(AdminError::new(
                        ErrorCode::PermissionDenied,
                        "permission denied: this request changes the cluster; your group has read access \
                         (admin_group_access = \"read\")",
                    )))
                }
                Ok(req) => AdminResponse::from_result(handler.handle(req).await),
                Err(e) => {
                    AdminResponse::from_result(Err(AdminError::new(ErrorCode::BadRequest, format!("bad request: {e}"))))
                }
            }
        };
        if write.write_all(&response_line(&response)).await.is_err() || too_long {
            return;
        }
    }
}

/// One response as a JSON line (an encoding failure — none is known — answers `internal`).
fn response_line(response: &AdminResponse) -> Vec<u8> {
    let mut out = serde_json::to_vec(response)
        .unwrap_or_else(|_| br#"{"ok":false,"code":"internal","error":"unencodable answer"}"#.to_vec());
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_by_user_and_groups() {
        let open = AccessPolicy { owner_uid: 0, group: None };
        assert_eq!(open.access(0, 0, &[]), Access::Owner);
        assert_eq!(open.access(1000, 1000, &[]), Access::None, "no group: root only");
        let read = AccessPolicy { owner_uid: 0, group: Some((990, GroupAccess::Read)) };
        assert_eq!(read.access(1000, 990, &[]), Access::Read, "primary group");
        assert_eq!(read.access(1000, 1000, &[4, 990]), Access::Read, "supplementary group");
        assert_eq!(read.access(1000, 1000, &[4]), Access::None);
        let full = AccessPolicy { owner_uid: 500, group: Some((990, GroupAccess::Full)) };
        assert_eq!(full.access(1000, 990, &[]), Access::Full);
        assert_eq!(full.access(500, 500, &[]), Access::Owner, "the daemon's own user");
    }

    #[test]
    fn a_group_user_cannot_take_the_owners_capacity() {
        let slots = Arc::new(Slots::default());
        let held: Vec<Slot> = (0..MAX_PER_UID).filter_map(|_| slots.take(Access::Read, 1000)).collect();
        assert_eq!(held.len(), MAX_PER_UID);
        assert!(slots.take(Access::Read, 1000).is_none(), "per-user cap");
        assert!(slots.take(Access::Read, 1001).is_some(), "another reader still gets in");
        assert!(slots.take(Access::Full, 1002).is_some(), "a full-access member still gets in");
        assert!(slots.take(Access::Owner, 0).is_some(), "root still gets in");
        drop(held);
        assert!(slots.take(Access::Read, 1000).is_some(), "slots come back on drop");
    }
}
