//! `status`, `node list|info|remove|flush|ready|primary|secondary`.

use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::ServerState;
use serde::Serialize;
use serde_json::{json, Value};

use herd_storage::model::{
    ApplyError, Command, DaemonState, DomainState, NodeRecord, NodeStats, Role, RouterState, State,
};

use super::dto::{FencingView, NodeDetail, StatsView};
use super::{full_view_at, member, read_index, wait_for_state, write_one, AdminError, ErrorCode, WRITE_TIMEOUT};
use crate::daemon::Daemon;
use crate::heartbeat::verdict::Verdict;

/// `node flush|ready --wait` gives up after this long.
const FLUSH_WAIT: Duration = Duration::from_secs(590);
/// The longest `node shutdown --timeout` (a bound, so no deadline overflows).
const SHUTDOWN_MAX_MS: u64 = 24 * 3_600_000;
/// `node primary --wait` gives up after this long.
const PRIMARY_WAIT: Duration = Duration::from_secs(30);

fn no_node(name: &str) -> AdminError {
    ApplyError::NoSuchNode(name.to_string()).into()
}

/// One member as `status` and `node list` show it.
#[derive(Serialize)]
struct MemberRow {
    name: String,
    id: u64,
    role: Role,
    voter: bool,
    raft_member: bool,
    daemon_state: DaemonState,
    domain_state: DomainState,
    router_state: RouterState,
    last_keepalive_age_ms: Option<u64>,
    /// A client outside Raft: how long ago any coordinator last heard its session, as this
    /// coordinator gathered it (its liveness is not in the log; null elsewhere).
    last_heard_age_ms: Option<u64>,
    address: String,
    heartbeat: Value,
    fencing: FencingView,
    /// The freshest figures this node holds of it ([`shown_figures`]).
    stats: StatsView,
    /// How old `stats` are.
    stats_age_ms: Option<u64>,
    /// What keeps it out of Raft, as the leader found (`storage error: …`, `log went
    /// backwards: …`); null while it replicates.
    health: Option<String>,
}

/// The local picture, at once (no quorum needed), with how fresh it is.
pub(super) async fn status(d: &Daemon) -> Value {
    let quorum = d.node.quorum();
    let Some(member) = d.node.member() else {
        if let Some(c) = d.node.session() {
            return client_status(d, &c).await;
        }
        let refused = d.node.refused();
        let state = if !d.resumed() {
            "starting"
        } else if d.node.is_removed() {
            "removed"
        } else if refused.is_some() {
            "refused"
        } else {
            "not-member"
        };
        let raft_error = refused.map(|why| herd_raft::node::refusal_advice(&why, &d.config.name));
        return json!({
            "node": d.config.name, "state": state, "cluster_id": null, "leader": null, "term": 0,
            "quorum": false, "applied_index": 0, "members": [], "raft_error": raft_error,
        });
    };
    let m = member.raft.metrics().borrow_watched().clone();
    let lease_confirmed = m.state == ServerState::Leader && quorum;
    let now = herd_raft::clock::wall_ms();
    let g = member.view.read();
    let voters: Vec<u64> = m.membership_config.voter_ids().collect();
    let learners: Vec<u64> = m.membership_config.membership().learner_ids().collect();
    let name_of = |id: u64| g.state.node_by_id(id).map(|n| n.name.clone());
    let members = rows(d, &g.state, &voters, &learners, now);
    let state = match m.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    };
    json!({
        "node": d.config.name,
        "node_id": member.id,
        "cluster_id": member.cluster_id,
        "state": state,
        // This node's own Raft, stopped by a fatal error (its store cannot write): it
        // acknowledges nothing until it restarts itself once data_dir takes writes again.
        "raft_error": m.running_state.as_ref().err().map(|e| e.to_string()),
        "leader": m.current_leader.and_then(name_of),
        "leader_id": m.current_leader,
        "term": m.current_term,
        "quorum": quorum,
        "applied_index": g.last_applied.as_ref().map_or(0, |l| l.index),
        "lease_confirmed": lease_confirmed,
        "join_pending": d.node.join_pending(),
        "maintenance": g.state.meta.as_ref().is_some_and(|meta| meta.maintenance),
        "primary": primary_of(&g.state),
        "holding_duties": d.primary.holding(),
        "unmanaged_domains": d.reconciler.as_ref().map(|r| r.unmanaged()),
        "tls": tls(d, now),
        // What the kernel granted herd's runtime (issue 19), and how late it ran.
        "scheduling": crate::sched::got(),
        "pauses": crate::sched::pauses(),
        "followers": followers(d),
        "members": members,
        "raft": {
            "voters": voters,
            "learners": learners,
            "membership_index": m.membership_config.log_id().as_ref().map(|l| l.index),
            "joint": m.membership_config.membership().get_joint_config().len() > 1,
            "membership_history": g.membership_history,
            "last_log_index": m.last_log_index,
            "committed": m.local_committed.as_ref().map(|l| l.index),
            "snapshot": m.snapshot.as_ref().map(|l| l.index),
        },
    })
}

/// One row per node of `state`, with what this node's heartbeat agent says of it.
fn rows(d: &Daemon, state: &State, voters: &[u64], learners: &[u64], now: u64) -> Vec<MemberRow> {
    let verdicts = d.agent.verdicts();
    let heartbeat = |id: u64| match verdicts.get(&id) {
        Some(v) if v.verdict == Verdict::Lost => json!(format!("lost {:.1}s", v.lost_for_ms as f64 / 1000.0)),
        Some(_) => json!("alive"),
        None => Value::Null,
    };
    let row = |n: &NodeRecord| {
        let (stats, stats_age_ms) = shown_figures(d, n, now);
        MemberRow {
            name: n.name.clone(),
            id: n.id,
            role: n.role,
            voter: voters.contains(&n.id),
            raft_member: voters.contains(&n.id) || learners.contains(&n.id),
            daemon_state: n.daemon_state,
            domain_state: n.domain_state,
            router_state: n.router_state,
            last_keepalive_age_ms: n.last_keepalive_ms.map(|t| now.saturating_sub(t)),
            last_heard_age_ms: d.node.client_heard_ms(n.id),
            address: n.cluster_addr.clone(),
            heartbeat: heartbeat(n.id),
            fencing: FencingView::of(n),
            stats: StatsView::of(&stats),
            stats_age_ms,
            health: n.health.as_ref().map(|h| h.problem.clone()),
        }
    };
    state.nodes.values().map(row).collect()
}

/// A node's figures as `status` shows them, and their age: a client's as its session's last
/// poll here carried them or as relayed to this node (the leader) when fresher than its
/// record's — they ride on its session; its record's are written only when they move enough
/// to matter (`daemon/clients.rs`) — else its record's. The self-fence flags are always the
/// record's: what the cluster acts on; unmanaged domains as the model would keep them.
fn shown_figures(d: &Daemon, n: &NodeRecord, now: u64) -> (NodeStats, Option<u64>) {
    let of_record = n.last_keepalive_ms.map(|t| now.saturating_sub(t));
    match d.node.client_figures(n.id) {
        Some((age, heard)) if of_record.is_none_or(|r| age < r) => {
            let flags = (n.stats.session_self_fence, n.stats.session_only);
            (NodeStats { session_self_fence: flags.0, session_only: flags.1, ..heard.within_limits() }, Some(age))
        }
        _ => (n.stats.clone(), of_record),
    }
}

/// The status of a client (a hypervisor outside Raft): its followed state and its session.
/// It sees no Raft membership: `voter` and `raft_member` are false in every row. The rows come
/// from the leader's state (`members_from: "leader"`): the client's own copy leaves other
/// nodes' figures out; without a leader within a second, from that copy (`"own copy"`: other
/// nodes' figures and keepalive ages as of their last change of state).
async fn client_status(d: &Daemon, c: &herd_raft::follow::Client) -> Value {
    let leader = super::full_view(d, Duration::from_secs(1)).await.ok();
    let now = herd_raft::clock::wall_ms();
    let session = c.status();
    let g = c.view.read();
    let (members, from) = match &leader {
        Some(l) => (rows(d, &l.view.read().state, &[], &[], now), "leader"),
        None => (rows(d, &g.state, &[], &[], now), "own copy"),
    };
    let name_of = |id: u64| g.state.node_by_id(id).map(|n| n.name.clone());
    // The leader is what answered the rows just now (a client sees no Raft metrics).
    let leader_id = leader.as_ref().and_then(|_| c.link.leader());
    json!({
        "node": d.config.name,
        "node_id": c.id,
        "cluster_id": c.cluster_id,
        "state": "client",
        "raft_error": null,
        "leader": leader_id.and_then(name_of),
        "leader_id": leader_id,
        "term": 0,
        "quorum": d.node.quorum(),
        "applied_index": g.last_applied.as_ref().map_or(0, |l| l.index),
        "lease_confirmed": false,
        "join_pending": false,
        "maintenance": g.state.meta.as_ref().is_some_and(|meta| meta.maintenance),
        "primary": primary_of(&g.state),
        "holding_duties": false,
        "unmanaged_domains": d.reconciler.as_ref().map(|r| r.unmanaged()),
        "tls": tls(d, now),
        "scheduling": crate::sched::got(),
        "pauses": crate::sched::pauses(),
        "session": {
            "coordinator": session.coordinator.as_ref().and_then(|(id, _)| name_of(*id)),
            "coordinator_id": session.coordinator.as_ref().map(|(id, _)| *id),
            "answered_ms_ago": session.answered.map(herd_raft::clock::ms_since),
            "moves": session.moves,
            "failing": session.failing,
        },
        "members": members,
        "members_from": from,
    })
}

/// This node's certificate: whom it names, when it and the CA expire.
fn tls(d: &Daemon, now_ms: u64) -> Value {
    match d.node.pki().and_then(|p| p.info()) {
        None => Value::Null,
        Some(i) => json!({
            "node_id": i.node_id,
            "cert_expires_ms": i.not_after_ms,
            "cert_expires_in_days": i.not_after_ms.saturating_sub(now_ms) / 86_400_000,
            "ca_expires_ms": i.ca_not_after_ms,
            "ca_hash": i.ca_hash,
            "holds_ca_key": i.has_ca_key,
        }),
    }
}

fn primary_of(state: &State) -> Option<String> {
    state.nodes.values().find(|n| n.router_state == RouterState::Primary).map(|n| n.name.clone())
}

/// The members, and how fresh this local answer is.
pub(super) async fn list(d: &Daemon) -> Value {
    let s = status(d).await;
    json!({
        "applied_index": s["applied_index"],
        "quorum": s["quorum"],
        "leader": s["leader"],
        "members": s["members"],
    })
}

/// One node (linearizable unless `local`).
pub(super) async fn info(d: &Daemon, name: String, local: bool) -> Result<Value, AdminError> {
    let index = read_index(d, local).await?;
    // Another node's figures, on a client, are the leader's to tell (unless `local`).
    let member =
        if local || name == d.config.name { member(d)? } else { full_view_at(d, index, super::READ_TIMEOUT).await? };
    let (record, held) = {
        let g = member.view.read();
        let record = g.state.nodes.get(&name).cloned().ok_or_else(|| no_node(&name))?;
        let held = g.state.acked.get(&record.id).map(|h| h.floor());
        (record, held)
    };
    let voter = d
        .node
        .member()
        .is_some_and(|m| m.raft.metrics().borrow_watched().membership_config.voter_ids().any(|id| id == record.id));
    Ok(json!(NodeDetail::of(&record, voter, herd_raft::clock::wall_ms(), index, !local, held)))
}

pub(super) async fn remove(d: &Daemon, name: String, force: bool) -> Result<Value, AdminError> {
    d.node.remove_node(&name, force, WRITE_TIMEOUT * 3).await?;
    Ok(json!({ "removed": name }))
}

/// `herd node shutdown NAME`, on NAME: the primary role moves away first (if it is here),
/// then every VM (flush, waited for), then `daemon_state shutdown` is recorded and the daemon
/// exits after this answer. A flush not done by the timeout leaves the node `flush` and herd
/// running.
pub(super) async fn shutdown(d: &Daemon, name: String, timeout_ms: Option<u64>) -> Result<Value, AdminError> {
    let name = if name.is_empty() { d.config.name.clone() } else { name };
    if name != d.config.name {
        return Err(AdminError::invalid(format!(
            "node shutdown runs on the node that goes down: this is {}, not {name}",
            d.config.name
        )));
    }
    let timeout_ms = timeout_ms.unwrap_or(600_000);
    if !(1_000..=SHUTDOWN_MAX_MS).contains(&timeout_ms) {
        return Err(AdminError::invalid(format!(
            "node shutdown --timeout must be between 1 s and {} h (got {timeout_ms} ms)",
            SHUTDOWN_MAX_MS / 3_600_000
        )));
    }
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(timeout_ms);
    let here = primary_of(&member(d)?.view.read().state).as_deref() == Some(name.as_str());
    let mut primary = None;
    if here || d.primary.holding() {
        let moved = move_primary(d, name.clone(), true, true).await?;
        primary = moved["primary"].as_str().map(str::to_string);
    }
    let flushed = flush_until(d, name.clone(), false, true, deadline).await?;
    d.host_shutdown().await?;
    let took_ms = started.elapsed().as_millis() as u64;
    let message = match &primary {
        Some(p) => format!("{name}: primary moved to {p}; VMs moved off; daemon_state shutdown; herd exits"),
        None => format!("{name}: VMs moved off; daemon_state shutdown; herd exits"),
    };
    Ok(
        json!({ "node": name, "primary": primary, "flush_ms": flushed["took_ms"], "took_ms": took_ms, "message": message }),
    )
}

/// `node flush` (`ready: false`) or `node ready`; with `wait`, answers once done.
pub(super) async fn flush(d: &Daemon, name: String, ready: bool, wait: bool) -> Result<Value, AdminError> {
    flush_until(d, name, ready, wait, tokio::time::Instant::now() + FLUSH_WAIT).await
}

async fn flush_until(
    d: &Daemon,
    name: String,
    ready: bool,
    wait: bool,
    deadline: tokio::time::Instant,
) -> Result<Value, AdminError> {
    let started = tokio::time::Instant::now();
    let (to, done) =
        if ready { (DomainState::Unflush, DomainState::Ready) } else { (DomainState::Flush, DomainState::Flushed) };
    write_one(d, Command::SetDomainState { name: name.clone(), state: to, node_id: None }).await?;
    if !wait {
        return Ok(json!({ "node": name, "domain_state": to }));
    }
    // This node's view must include the write before it is watched.
    read_index(d, false).await?;
    let member = member(d)?;
    let domain_state = |s: &State| s.nodes.get(&name).map(|n| n.domain_state);
    let check = |s: &State| match domain_state(s) {
        Some(now) if now == done => {
            Some(Ok(json!({ "node": name, "domain_state": done, "took_ms": started.elapsed().as_millis() as u64 })))
        }
        Some(now) if now == to => None,
        now => Some(Err(AdminError::new(
            ErrorCode::Conflict,
            format!("{name} is now {} (turned round)", now.map_or("gone".to_string(), |s| s.to_string())),
        ))),
    };
    let late = |_: &State| AdminError::new(ErrorCode::Timeout, format!("{name} is still {to}"));
    wait_for_state(&member, deadline, check, late).await
}

/// `herd node primary|secondary NAME [--wait]`.
pub(super) async fn move_primary(d: &Daemon, name: String, secondary: bool, wait: bool) -> Result<Value, AdminError> {
    let started = tokio::time::Instant::now();
    let member = member(d)?;
    let before = {
        let g = member.view.read();
        if !g.state.nodes.contains_key(&name) {
            return Err(no_node(&name));
        }
        primary_of(&g.state)
    };
    if secondary && before.as_deref() != Some(name.as_str()) {
        return Err(AdminError::invalid(format!(
            "{name} is not the primary (the primary is {})",
            before.as_deref().unwrap_or("none")
        )));
    }
    let to = if secondary { None } else { Some(name.clone()) };
    d.node.leader_call(herd_raft::wire::LeaderOp::MovePrimary { to }, WRITE_TIMEOUT).await?;
    if !wait {
        return Ok(json!({ "requested": true }));
    }
    let check = |s: &State| {
        let now = primary_of(s);
        let done = match (&now, secondary) {
            (Some(p), false) => *p == name,
            (Some(p), true) => *p != name,
            (None, _) => false,
        };
        done.then(|| Ok(json!({ "primary": now, "previous": before, "took_ms": started.elapsed().as_millis() as u64 })))
    };
    let late = |s: &State| {
        let now = primary_of(s);
        AdminError::new(
            ErrorCode::Timeout,
            format!("no new primary within 30 s (primary now: {})", now.as_deref().unwrap_or("none")),
        )
    };
    wait_for_state(&member, started + PRIMARY_WAIT, check, late).await
}

/// The followers outside Raft this node serves (issue 22): how many asked for changes in the
/// last minute, the longest silence among them, and the clients' keepalives this node sent the
/// leader for its aggregate and (while leading) took from other coordinators.
fn followers(d: &Daemon) -> Value {
    let heard = d.node.followers_heard();
    let (sent, taken, written) = d.node.figures_counts();
    let recent: Vec<&Duration> =
        heard.iter().map(|(_, ago)| ago).filter(|ago| **ago < Duration::from_secs(60)).collect();
    json!({
        "count": recent.len(),
        "longest_silence_ms": recent.iter().map(|d| d.as_millis()).max().unwrap_or(0),
        "served_answers": d.node.followers_served().0,
        "served_bytes": d.node.followers_served().1,
        "figures_sent": sent,
        "figures_taken": taken,
        "keepalives_written": written,
    })
}
