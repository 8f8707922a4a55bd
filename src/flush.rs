//! `node flush` / `node ready`, carried out by the node itself (as PVC does).
//!
//! ```text
//!  flush:   domain_state flush ─▶ its running VMs move away (temporary migrations, at most
//!           `parallel_migrations` at once, each awaited) ─▶ flushed
//!  unflush: domain_state unflush ─▶ the VMs whose last_node is this node come back ─▶ ready
//! ```
//! A flush or unflush turned round half-way stops at the next batch. A VM that fits nowhere
//! stays, with an event.

use std::sync::Arc;
use std::time::Duration;

use herd_storage::model::{Command, DomainState, State, VmState};
use tokio::time::Instant;

use herd_raft::node::ClusterNode;
use herd_storage::log_store::LogStore;

use crate::WRITE_TIMEOUT;

type Node = ClusterNode<LogStore>;

/// How this node flushes.
pub struct Settings {
    /// This node's name.
    pub name: String,
    /// Moves in flight at once (`hypervisor.parallel_migrations`).
    pub parallel: usize,
    /// How long one batch of moves may take (`hypervisor.migration_timeout_ms`).
    pub migration_timeout: Duration,
}

/// Follows this node's `domain_state` (a local watch) and carries out flushes and unflushes.
pub async fn follow(node: Arc<Node>, s: Settings) {
    let node = &*node;
    loop {
        let Some(member) = node.local() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut applied = member.view.subscribe();
        let state = member.view.read().state.nodes.get(&s.name).map(|n| n.domain_state);
        match state {
            Some(DomainState::Flush) => move_all(node, &s, true).await,
            Some(DomainState::Unflush) => move_all(node, &s, false).await,
            _ => {}
        }
        if applied.changed().await.is_err() || node.is_removed() {
            return;
        }
    }
}

/// How often a client asks the leader's state whether its batch of moves is done.
const CLIENT_RECHECK: Duration = Duration::from_millis(500);

/// The VMs of `moving` (name, target) not yet done: still moving, or not yet running on their
/// target when they should.
fn still_moving(state: &State, moving: &[(String, String)]) -> Vec<String> {
    moving
        .iter()
        .filter(|(n, t)| {
            state.vms.get(n).is_some_and(|v| {
                v.node == *t
                    && (v.migrating_from.is_some()
                        || matches!(v.state, VmState::Migrate | VmState::MigrateLive | VmState::Unmigrate)
                        || (v.state.wants_running() && v.actual != herd_storage::model::ActualState::Running))
            })
        })
        .map(|(n, _)| n.clone())
        .collect()
}

/// The state a flush places its VMs by: this node's copy on a Raft member; on a client — whose
/// copy has no figures of other nodes and other nodes' VMs as outlines — the leader's.
async fn placing_state(node: &Node, member: &herd_raft::node::Local) -> Result<State, String> {
    match node.session() {
        None => Ok(member.view.read().state.clone()),
        Some(c) => c.link.leader_state(WRITE_TIMEOUT).await.map(|(_, state)| state).map_err(|e| e.to_string()),
    }
}

fn own_state(node: &Node, s: &Settings) -> Option<DomainState> {
    let member = node.local()?;
    let g = member.view.read();
    g.state.nodes.get(&s.name).map(|n| n.domain_state)
}

async fn record(node: &Node, s: &Settings, kind: &str, message: String) {
    let cmd = Command::RecordEvent { kind: kind.into(), node: Some(s.name.clone()), message };
    if let Err(e) = node.write(vec![cmd.into()], WRITE_TIMEOUT).await {
        tracing::warn!("could not record a {kind} event: {e}");
    }
}

/// Flush (`away`) or unflush, then record `flushed` / `ready`.
async fn move_all(node: &Node, s: &Settings, away: bool) {
    let me = s.name.clone();
    let (expect, done) =
        if away { (DomainState::Flush, DomainState::Flushed) } else { (DomainState::Unflush, DomainState::Ready) };
    let Some(member) = node.local() else { return };
    // The VMs to move: running ones here (flush), or the ones whose home this is (unflush).
    let names: Vec<String> = {
        let g = member.view.read();
        g.state
            .vms
            .values()
            .filter(|v| v.state.wants_running() || !away)
            .filter(|v| if away { v.node == me } else { v.last_node.as_deref() == Some(me.as_str()) && v.node != me })
            .map(|v| v.spec.name.clone())
            .collect()
    };
    tracing::info!(vms = names.len(), "{} started", if away { "flush" } else { "unflush" });
    let parallel = s.parallel.max(1);
    let timeout = s.migration_timeout;
    for batch in names.chunks(parallel) {
        if own_state(node, s) != Some(expect) {
            tracing::info!("{} turned round: stopping", if away { "flush" } else { "unflush" });
            return;
        }
        let mut moving = Vec::new();
        let mut placing = if away { Some(placing_state(node, &member).await) } else { None };
        for name in batch {
            let target = match placing.as_mut() {
                Some(Ok(state)) => {
                    let Some(vm) = state.vms.get(name) else { continue };
                    let (selector, limit) = (vm.spec.selector.unwrap_or_default(), vm.spec.node_limit.clone());
                    let target = herd_storage::model::place(state, selector, &limit, Some(&me));
                    // The next VM of the batch is placed counting this one where it goes.
                    if let (Ok(t), Some(vm)) = (&target, state.vms.get_mut(name)) {
                        vm.node = t.clone();
                    }
                    target.map_err(|e| e.to_string())
                }
                Some(Err(e)) => Err(e.clone()),
                None => Ok(me.clone()),
            };
            let target = match target {
                Ok(t) => t,
                Err(e) => {
                    record(node, s, "flush-stuck", format!("{name} stays on {me}: {e}")).await;
                    continue;
                }
            };
            let how = if away { VmState::Migrate } else { VmState::Unmigrate };
            let cmd = Command::MigrateVm { name: name.clone(), to: target.clone(), state: how, permanent: false };
            match node.write(vec![cmd.into()], WRITE_TIMEOUT).await {
                Ok(_) => moving.push((name.clone(), target)),
                Err(e) => record(node, s, "flush-stuck", format!("{name} not moved to {target}: {e}")).await,
            }
        }
        // This node's view must include the batch's writes (acknowledged by the leader, perhaps
        // not yet applied here) before it is watched, or the moves would look done already.
        if let Err(e) = node.read_barrier(WRITE_TIMEOUT).await {
            tracing::warn!("flush: this node's view did not catch up: {e}");
        }
        // Each move of the batch: done once the VM runs on its target (or stays stopped there).
        // A client watches the leader's state: a VM that moved away and is no longer its
        // business is only an outline in its own copy, which says nothing of how it runs.
        let deadline = Instant::now() + timeout;
        let mut applied = member.view.subscribe();
        loop {
            let pending = match node.session() {
                None => still_moving(&member.view.read().state, &moving),
                Some(_) => match placing_state(node, &member).await {
                    Ok(state) => still_moving(&state, &moving),
                    Err(e) => {
                        tracing::debug!("flush: the leader's state: {e}");
                        moving.iter().map(|(n, _)| n.clone()).collect()
                    }
                },
            };
            if pending.is_empty() {
                break;
            }
            let next = match node.session() {
                None => tokio::time::timeout_at(deadline, applied.changed()).await.is_ok(),
                Some(_) => {
                    tokio::time::sleep_until(deadline.min(Instant::now() + CLIENT_RECHECK)).await;
                    Instant::now() < deadline
                }
            };
            if !next {
                record(node, s, "flush-stuck", format!("not moved within {timeout:?}: {}", pending.join(", "))).await;
                break;
            }
        }
    }
    let cmd = Command::SetDomainState { name: me, state: done, node_id: Some(member.id) };
    if let Err(e) = node.write(vec![cmd.into()], WRITE_TIMEOUT).await {
        tracing::warn!("could not record domain_state {done}: {e}");
    }
}
