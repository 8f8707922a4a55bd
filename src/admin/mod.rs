//! The admin socket and its protocol: one JSON request per line, one JSON response per line
//! (`docs/admin-protocol.md`).
//!
//! ```text
//!   socket.rs    bind, access from peer credentials, bounded lines and connections
//!      │ AdminRequest (protocol.rs)
//!      ▼
//!   Handler ──▶ node.rs  vm.rs  cluster.rs  token.rs  fence.rs   (one handler per family)
//!      │                    │ reads the applied state, writes commands
//!      ▼                    ▼
//!   AdminResponse ◀── dto.rs (what the protocol shows of the model) / AdminError (a stable code)
//! ```
//!
//! `serve` takes any [`Handler`]; the daemon's is [`DaemonHandler`]. The admin layer sits above
//! the daemon: it reads the daemon's state, the daemon never imports it.

mod cluster;
pub mod dto;
mod fence;
mod node;
pub mod protocol;
mod socket;
mod token;
mod vm;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use herd_raft::Local;
use herd_storage::model::{Command, Op, State};
use serde_json::Value;

pub use protocol::{AdminError, AdminRequest, AdminResponse, ErrorCode};
pub use socket::{bind, serve, Access, AccessPolicy, BindError, MAX_CONNECTIONS, MAX_LINE};

use crate::daemon::Daemon;

pub(crate) use crate::WRITE_TIMEOUT;
/// A linearizable read waits at most this long for its read index.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A join (token check, catch-up, promotion) may take this long.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);

/// What the admin socket serves requests with: a narrow seam, so the socket knows nothing of
/// the daemon behind it.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: AdminRequest) -> impl Future<Output = Result<Value, AdminError>> + Send;
}

/// The daemon's admin requests.
pub struct DaemonHandler(pub Arc<Daemon>);

impl Handler for DaemonHandler {
    async fn handle(&self, req: AdminRequest) -> Result<Value, AdminError> {
        handle(&self.0, req).await
    }
}

/// Answers one admin request for `d`.
pub async fn handle(d: &Daemon, req: AdminRequest) -> Result<Value, AdminError> {
    use AdminRequest as R;
    match req {
        R::Status {} => Ok(node::status(d).await),
        R::NodeList {} => Ok(node::list(d).await),
        R::NodeInfo { name, local } => node::info(d, name, local).await,
        R::NodeRemove { name, force } => node::remove(d, name, force).await,
        R::NodeFlush { name, ready, wait } => node::flush(d, name, ready, wait).await,
        R::NodeShutdown { name, timeout_ms } => node::shutdown(d, name, timeout_ms).await,
        R::NodePrimary { name, secondary, wait } => node::move_primary(d, name, secondary, wait).await,
        R::NodeFence { name, yes } => fence::fence(d, name, yes).await,
        R::InitCluster {} => cluster::init(d).await,
        R::JoinCluster { peer, token, role } => cluster::join(d, peer, token, role).await,
        R::ClusterInfo { local } => cluster::info(d, local).await,
        R::Maintenance { on } => cluster::maintenance(d, on).await,
        R::Heartbeat {} => Ok(d.agent.report()),
        R::Events { limit } => cluster::events(d, limit),
        R::CertRotate {} => cluster::cert_rotate(d).await,
        R::TokenCreate { ttl_ms, uses } => token::create(d, ttl_ms, uses).await,
        R::TokenList {} => token::list(d).await,
        R::TokenRevoke { id } => token::revoke(d, id).await,
        R::VmDefine { xml, node, selector, limit, autostart, method } => {
            vm::define(d, vm::Define { xml, node, selector, limit, autostart, method }).await
        }
        R::VmList {} => vm::list(d).await,
        R::VmInfo { name, local } => vm::info(d, name, local).await,
        R::VmState { name, state } => vm::set_state(d, name, state).await,
        R::VmUndefine { name } => vm::undefine(d, name).await,
        R::VmModify { name, xml } => vm::modify(d, name, xml).await,
        R::VmMigrate { name, to, live, permanent, unmigrate } => {
            vm::migrate(d, name, vm::Migrate { to, live, permanent, unmigrate }).await
        }
    }
}

/// This node's copy of the cluster's state (a Raft member's or a client's), or `not-member`.
fn member(d: &Daemon) -> Result<Local, AdminError> {
    d.node.local().ok_or_else(|| herd_raft::node::NodeError::NotMember.into())
}

/// The cluster's state with every node's figures, for what shows or weighs them (node rows,
/// placement): this node's own copy on a Raft member; on a client — whose followed copy
/// leaves other nodes' keepalive figures out (`State::projected_for`) — the leader's, fetched
/// within `timeout`.
async fn full_view(d: &Daemon, timeout: Duration) -> Result<Local, AdminError> {
    full_view_at(d, None, timeout).await
}

/// [`full_view`], on a client no older than log index `at` (a read index: what a
/// linearizable read must reflect). A state that applied it holds every write acknowledged
/// before the read index was taken; a deposed leader's older one is asked again, until
/// `timeout`.
async fn full_view_at(d: &Daemon, at: Option<u64>, timeout: Duration) -> Result<Local, AdminError> {
    let local = member(d)?;
    let Some(c) = d.node.session() else { return Ok(local) };
    let deadline = tokio::time::Instant::now() + timeout;
    let (last_applied, state) = loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (last_applied, state) = c.link.leader_state(remaining).await?;
        let applied = last_applied.map_or(0, |l| l.index);
        if at.is_none_or(|at| applied >= at) {
            break (last_applied, state);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(herd_raft::node::NodeError::Refused(format!(
                "the leader's state stands at index {applied}, not yet at the read index {}",
                at.unwrap_or(0)
            ))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (view, writer) = herd_storage::sm::StateView::standalone();
    writer.update(|sm| {
        sm.state = state;
        sm.last_applied = last_applied;
    });
    Ok(Local { view, ..local })
}

/// For a linearizable read: the read index this node has applied up to; `None` for --local.
async fn read_index(d: &Daemon, local: bool) -> Result<Option<u64>, AdminError> {
    if local || crate::breakage::is(crate::breakage::Breakage::StaleReads) {
        return Ok(None);
    }
    Ok(Some(d.node.read_barrier(READ_TIMEOUT).await?))
}

/// Commits `ops` (forwarded to the leader when this node is not it).
async fn write(d: &Daemon, ops: Vec<Op>) -> Result<(), AdminError> {
    d.node.write(ops, WRITE_TIMEOUT).await?;
    Ok(())
}

/// Commits one command.
async fn write_one(d: &Daemon, cmd: Command) -> Result<(), AdminError> {
    write(d, vec![cmd.into()]).await
}

/// Waits until `check` on this node's applied state gives an answer (`Some`), re-checking on
/// every applied change, until `deadline`; then `late` is the error.
async fn wait_for_state<T>(
    member: &Local,
    deadline: tokio::time::Instant,
    mut check: impl FnMut(&State) -> Option<Result<T, AdminError>>,
    late: impl FnOnce(&State) -> AdminError,
) -> Result<T, AdminError> {
    let mut applied = member.view.subscribe();
    loop {
        let answer = check(&member.view.read().state);
        if let Some(answer) = answer {
            return answer;
        }
        if tokio::time::timeout_at(deadline, applied.changed()).await.is_err() {
            let error = late(&member.view.read().state);
            return Err(error);
        }
    }
}
