//! The admin socket: a Unix socket, one JSON request per line, one JSON response per line.
//! The protocol is documented in `docs/admin-protocol.md`; keep the two in step.
//!
//! Bounds: a request line is at most [`MAX_LINE`] bytes; a connection idle for the configured
//! `limits.admin_idle_timeout_ms` is closed; at most [`MAX_CONNECTIONS`] are served at once.

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
    /// The newest entries of the replicated event log (local read).
    Events {
        #[serde(default)]
        limit: Option<usize>,
    },
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
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>, idle: Duration, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Refusals are logged at most every 10 s, with a count.
    let (mut refused, mut last_warning) = (0u64, None);
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
            connection(stream, &daemon, idle).await;
            drop(permit);
        });
    }
}

async fn connection(stream: UnixStream, daemon: &Daemon, idle: Duration) {
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
        let too_long = line.len() > MAX_LINE || (line.last() != Some(&b'\n') && line.len() == MAX_LINE + 1);
        let response = if too_long {
            AdminResponse::from_result(Err(format!("request line longer than {MAX_LINE} bytes")))
        } else {
            match serde_json::from_slice::<AdminRequest>(&line) {
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
