//! `herd daemon`: brings a node up, serves the cluster port and the admin socket, keeps its
//! keepalive going, and on SIGTERM records `stop` with a `return_by` deadline before exiting.
//!
//! ```text
//!  start: config ─▶ sled open ─▶ heartbeat responder (first: a restarted daemon answers pulses
//!         at once) ─▶ cluster port + admin socket ─▶ resume Raft (if joined) ─▶ member tasks:
//!         publish heartbeat addresses + daemon_state run, keepalive, heartbeat targets from the
//!         replicated node records (a local watch), MNFA notices into the event log
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herd_raft::network::Limits;
use herd_raft::node::{ClusterNode, NodeError, NodeSettings};
use herd_raft::server::{self, Handler};
use herd_raft::tls::{Pki, TlsConnector, TlsListener};
use herd_raft::transport::{Connector, Listener, TcpConnector, TcpListener};
use herd_storage::identity::IdentityStore;
use herd_storage::log_store::LogStore;
use herd_storage::model::{ApplyError, Command, DaemonState, DomainState, FailedFence, FencePolicy, NodeStats};
use herd_storage::sled_store;
use herd_storage::sm::Backend;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::ServerState;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};

use crate::admin::{self, AdminRequest};
use crate::config::Config;
use crate::fence::manager::FenceManager;
use crate::heartbeat::agent::{Agent, DatagramSocket, Notice, Target};
use crate::heartbeat::verdict::Verdict;
use crate::heartbeat::NetName;
use crate::hypervisor::Hypervisor;
use crate::primary::manager::{self as primary, Manager, ManagerExtension};
use crate::service::{self, Progress};
use crate::stats::{self, HostStats};

/// Timeouts of admin operations.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A node renews its certificate when fewer days than this are left.
const RENEW_BEFORE_DAYS: u64 = 30;
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] sled_store::OpenError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Admin(#[from] admin::BindError),
    #[error("cannot resume cluster membership: {0}")]
    Resume(NodeError),
    #[error("config: {0}")]
    Config(String),
    #[error("heartbeat: {0}")]
    Heartbeat(std::io::Error),
    #[error(transparent)]
    Identity(std::io::Error),
    #[error("cluster TLS: {0}")]
    Tls(#[from] herd_raft::tls::TlsError),
}

/// The running daemon: what the admin socket talks to.
pub struct Daemon {
    pub config: Config,
    pub node: Arc<ClusterNode<LogStore>>,
    pub agent: Arc<Agent>,
    pub primary: Arc<Manager>,
    /// The main loops' heartbeat for systemd's watchdog.
    pub progress: Arc<Progress>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// This node's reconciler (when it has a hypervisor).
    pub reconciler: Option<Arc<crate::reconcile::Reconciler>>,
    /// When a write of this node's own was last committed (ms since start; 0: never): a node
    /// without recent quorum contact starts no VMs.
    last_own_commit_ms: std::sync::atomic::AtomicU64,
    /// The log index of that write: VMs are started only from a local view that has applied it
    /// (a node back from a long absence must not act on its stale view of where VMs run).
    last_own_commit_index: std::sync::atomic::AtomicU64,
    started: tokio::time::Instant,
    vms_running: std::sync::atomic::AtomicU32,
    /// Woken when this node becomes a member (init, join or resume).
    member_started: Notify,
    /// Set once the node has resumed (or found no) membership from disk.
    resumed: AtomicBool,
    /// How this node is fenced (from `[fencing]`), published in its record.
    pub fencing: Option<FencePolicy>,
    /// The primary's fencing (coordinators).
    pub fence: Arc<FenceManager>,
    /// Set when this node self-fenced: it starts nothing any more.
    self_fenced: AtomicBool,
    host_stats: Arc<dyn HostStats>,
}

fn json_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Daemon {
    /// Answers one admin request.
    pub async fn handle(&self, req: AdminRequest) -> Result<Value, String> {
        match req {
            AdminRequest::Status {} => Ok(self.status().await),
            AdminRequest::NodeList {} => {
                // The members, and how fresh this local answer is.
                let s = self.status().await;
                Ok(json!({
                    "applied_index": s["applied_index"],
                    "quorum": s["quorum"],
                    "leader": s["leader"],
                    "members": s["members"],
                }))
            }
            AdminRequest::InitCluster {} => {
                let out = self.node.init_cluster(WRITE_TIMEOUT).await.map_err(json_err)?;
                self.member_started.notify_one();
                Ok(json!({ "cluster_id": out.cluster_id, "token": out.token }))
            }
            AdminRequest::JoinCluster { peer, token, role } => {
                if let Some(r) = role {
                    if r != self.config.role {
                        return Err(format!(
                            "--role {r} disagrees with this node's configured role {}",
                            self.config.role
                        ));
                    }
                }
                let out = self.node.join_cluster(&peer, token.trim(), JOIN_TIMEOUT).await.map_err(json_err)?;
                self.member_started.notify_one();
                Ok(json!({ "node_id": out.node_id, "cluster_id": out.cluster_id, "voter": out.voter }))
            }
            AdminRequest::ClusterInfo { local } => {
                let index = self.read_index(local).await?;
                let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
                let g = member.view.read();
                let meta = g.state.meta.as_ref().ok_or("the cluster is not initialised")?;
                Ok(json!({
                    "cluster_id": meta.cluster_id,
                    "created_ms": meta.created_ms,
                    "maintenance": meta.maintenance,
                    "next_node_id": meta.next_node_id,
                    "revision": meta.revision,
                    "nodes": g.state.nodes.len(),
                    "applied_index": g.last_applied.as_ref().map_or(0, |l| l.index),
                    "read_index": index,
                    "linearizable": !local,
                }))
            }
            AdminRequest::NodeInfo { name, local } => {
                let index = self.read_index(local).await?;
                let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
                let record = member
                    .view
                    .read()
                    .state
                    .nodes
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| format!("no node named {name:?}"))?;
                let voters = member.raft.metrics().borrow_watched().membership_config.voter_ids().collect::<Vec<_>>();
                let mut v = serde_json::to_value(&record).map_err(json_err)?;
                v["fencing"] = fencing_json(&record);
                v["voter"] = json!(voters.contains(&record.id));
                v["last_keepalive_age_ms"] =
                    json!(record.last_keepalive_ms.map(|t| herd_raft::clock::wall_ms().saturating_sub(t)));
                v["read_index"] = json!(index);
                v["linearizable"] = json!(!local);
                Ok(v)
            }
            AdminRequest::NodeFence { name, yes } => {
                if !yes {
                    return Err(format!("fencing powers {name} off at once: confirm with --yes"));
                }
                let reason = "asked for by an operator (herd node fence)".to_string();
                let cmd = Command::DecideFence { name: name.clone(), reason, manual: true };
                self.node.write(vec![cmd.into()], WRITE_TIMEOUT).await.map_err(json_err)?;
                Ok(json!({ "node": name, "fence": "decided" }))
            }
            AdminRequest::NodeRemove { name, force } => {
                self.node.remove_node(&name, force, WRITE_TIMEOUT * 3).await.map_err(json_err)?;
                Ok(json!({ "removed": name }))
            }
            AdminRequest::Heartbeat {} => Ok(self.agent.report()),
            AdminRequest::NodeFlush { name, ready, wait } => {
                let started = tokio::time::Instant::now();
                let (to, done) = if ready {
                    (DomainState::Unflush, DomainState::Ready)
                } else {
                    (DomainState::Flush, DomainState::Flushed)
                };
                let cmd = Command::SetDomainState { name: name.clone(), state: to, node_id: None };
                self.node.write(vec![cmd.into()], WRITE_TIMEOUT).await.map_err(json_err)?;
                if !wait {
                    return Ok(json!({ "node": name, "domain_state": to }));
                }
                // This node's view must include the write before it is watched.
                self.read_index(false).await?;
                let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
                let mut applied = member.view.subscribe();
                let deadline = started + Duration::from_secs(590);
                loop {
                    let now = member.view.read().state.nodes.get(&name).map(|n| n.domain_state);
                    if now == Some(done) {
                        return Ok(
                            json!({ "node": name, "domain_state": done, "took_ms": started.elapsed().as_millis() as u64 }),
                        );
                    }
                    if now != Some(to) {
                        return Err(format!(
                            "{name} is now {} (turned round)",
                            now.map_or("gone".to_string(), |s| s.to_string())
                        ));
                    }
                    if tokio::time::timeout_at(deadline, applied.changed()).await.is_err() {
                        return Err(format!("{name} is still {to}"));
                    }
                }
            }
            AdminRequest::VmDefine { xml, node, selector, limit, autostart, method } => {
                let mut spec = crate::reconcile::spec_from_xml(&xml)?;
                spec.selector = selector;
                spec.node_limit = limit;
                spec.autostart = autostart;
                spec.migration_method = method.unwrap_or_default();
                // Place on an up-to-date view of the cluster (a linearizable read first).
                self.read_index(false).await?;
                let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
                let target = match node {
                    Some(n) => n,
                    None => {
                        let g = member.view.read();
                        herd_storage::model::place(&g.state, spec.selector.unwrap_or_default(), &spec.node_limit, None)
                            .map_err(json_err)?
                    }
                };
                let name = spec.name.clone();
                let define = Command::DefineVm { spec, node: target.clone() };
                self.node.write(vec![define.into()], WRITE_TIMEOUT).await.map_err(json_err)?;
                Ok(json!({ "name": name, "node": target, "message": format!("{name} defined on {target}") }))
            }
            AdminRequest::TokenCreate { ttl_ms, uses } => {
                let token = herd_raft::node::new_join_token();
                let hash = herd_raft::node::token_hash(&token);
                let cmd = Command::CreateJoinToken { token_hash: hash.clone(), ttl_ms, uses };
                self.node.write(vec![cmd.into()], WRITE_TIMEOUT).await.map_err(json_err)?;
                let token = self.node.printable_token(&token);
                let id: String = hash.chars().take(12).collect();
                Ok(json!({ "token": token, "id": id, "ttl_ms": ttl_ms, "uses": uses }))
            }
            AdminRequest::TokenList {} => {
                self.read_index(false).await?;
                let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
                let g = member.view.read();
                let meta = g.state.meta.as_ref().ok_or_else(|| "the cluster is not initialised".to_string())?;
                let now = g.state.clock_ms;
                let first = meta.join_token_hashes.iter().map(|h| {
                    json!({ "id": h.chars().take(12).collect::<String>(), "first": true, "created_ms": meta.created_ms,
                            "expires_ms": null, "uses_left": null, "usable": true })
                });
                let made = meta.join_tokens.iter().map(|(h, t)| {
                    let usable = t.expires_ms.is_none_or(|e| now < e) && t.uses_left != Some(0);
                    json!({ "id": h.chars().take(12).collect::<String>(), "first": false, "created_ms": t.created_ms,
                            "expires_ms": t.expires_ms, "uses_left": t.uses_left, "usable": usable })
                });
                Ok(Value::Array(first.chain(made).collect()))
            }
            AdminRequest::CertRotate {} => {
                let info = self.node.renew_certificate(WRITE_TIMEOUT).await.map_err(json_err)?;
                tracing::info!(expires_ms = info.not_after_ms, "certificate renewed");
                Ok(json!({
                    "node_id": info.node_id,
                    "cert_expires_ms": info.not_after_ms,
                    "message": format!("certificate renewed: valid {} more days", herd_raft::tls::NODE_CERT_DAYS),
                }))
            }
            AdminRequest::TokenRevoke { id } => {
                let cmd = Command::RevokeJoinToken { id: id.clone() };
                self.node.write(vec![cmd.into()], WRITE_TIMEOUT).await.map_err(json_err)?;
                Ok(json!({ "id": id, "message": format!("join token {id} revoked") }))
            }
            AdminRequest::VmList {} => {
                let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
                let g = member.view.read();
                Ok(Value::Array(g.state.vms.values().map(vm_json).collect()))
            }
            AdminRequest::VmInfo { name, local } => {
                self.read_index(local).await?;
                let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
                let g = member.view.read();
                let vm = g.state.vms.get(&name).ok_or_else(|| format!("no VM named {name:?}"))?;
                let mut v = vm_json(vm);
                v["xml"] = json!(vm.spec.xml);
                v["memory_mib"] = json!(vm.spec.memory_mib);
                v["vcpus"] = json!(vm.spec.vcpus);
                v["node_limit"] = json!(vm.spec.node_limit);
                v["selector"] = json!(vm.spec.selector);
                v["autostart"] = json!(vm.spec.autostart);
                v["migration_method"] = json!(vm.spec.migration_method);
                v["revision"] = json!(vm.revision);
                Ok(v)
            }
            AdminRequest::VmState { name, state } => {
                self.node
                    .write(vec![Command::SetVmState { name: name.clone(), state }.into()], WRITE_TIMEOUT)
                    .await
                    .map_err(json_err)?;
                Ok(json!({ "name": name, "state": state, "message": format!("{name}: {state}") }))
            }
            AdminRequest::VmMigrate { name, to, live, permanent, unmigrate } => {
                if live && unmigrate {
                    return Err("--force-live is for vm migrate".into());
                }
                self.read_index(false).await?;
                let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
                let (target, how) = {
                    let g = member.view.read();
                    let vm = g.state.vms.get(&name).ok_or_else(|| format!("no VM named {name:?}"))?;
                    if unmigrate {
                        let home = vm
                            .last_node
                            .clone()
                            .ok_or_else(|| format!("{name} was not migrated: it is home on {}", vm.node))?;
                        (home, herd_storage::model::VmState::Unmigrate)
                    } else {
                        let target = match to {
                            Some(t) => t,
                            None => herd_storage::model::place(
                                &g.state,
                                vm.spec.selector.unwrap_or_default(),
                                &vm.spec.node_limit,
                                Some(&vm.node),
                            )
                            .map_err(json_err)?,
                        };
                        let how = if live {
                            herd_storage::model::VmState::MigrateLive
                        } else {
                            herd_storage::model::VmState::Migrate
                        };
                        (target, how)
                    }
                };
                let cmd = Command::MigrateVm { name: name.clone(), to: target.clone(), state: how, permanent };
                self.node.write(vec![cmd.into()], WRITE_TIMEOUT).await.map_err(json_err)?;
                Ok(json!({ "name": name, "node": target, "message": format!("{name} moving to {target}") }))
            }
            AdminRequest::VmModify { name, xml } => {
                let spec = crate::reconcile::spec_from_xml(&xml)?;
                if spec.name != name {
                    return Err(format!("the XML names {:?}, not {name:?}: a VM cannot be renamed", spec.name));
                }
                self.read_index(false).await?;
                let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
                let revision = {
                    let g = member.view.read();
                    let vm = g.state.vms.get(&name).ok_or_else(|| format!("no VM named {name:?}"))?;
                    if vm.spec.uuid != spec.uuid {
                        return Err(format!(
                            "the XML has uuid {}, {name} has {}: a VM keeps its uuid",
                            spec.uuid, vm.spec.uuid
                        ));
                    }
                    vm.revision
                };
                let cmd = Command::ModifyVm {
                    name: name.clone(),
                    xml,
                    memory_mib: Some(spec.memory_mib),
                    vcpus: Some(spec.vcpus),
                };
                // Compare-and-set: a change in between (another modify, a move) is not overwritten.
                let op = herd_storage::model::Op { cmd, expect_revision: Some(revision) };
                if !crate::breakage::is(crate::breakage::Breakage::AckWithoutCommit) {
                    self.node.write(vec![op], WRITE_TIMEOUT).await.map_err(json_err)?;
                }
                Ok(
                    json!({ "name": name, "message": format!("{name} modified: the new XML is used at its next start (herd vm restart {name})") }),
                )
            }
            AdminRequest::VmUndefine { name } => {
                self.node
                    .write(vec![Command::UndefineVm { name: name.clone() }.into()], WRITE_TIMEOUT)
                    .await
                    .map_err(json_err)?;
                Ok(json!({ "name": name, "message": format!("{name} undefined") }))
            }
            AdminRequest::NodePrimary { name, secondary, wait } => self.move_primary(name, secondary, wait).await,
            AdminRequest::Events { limit } => {
                let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
                let g = member.view.read();
                let skip = g.state.events.len().saturating_sub(limit.unwrap_or(100));
                let events: Vec<&herd_storage::model::Event> = g.state.events.iter().skip(skip).collect();
                Ok(json!({ "applied_index": g.last_applied.as_ref().map_or(0, |l| l.index), "events": events }))
            }
            AdminRequest::Maintenance { on } => {
                self.node.write(vec![Command::SetMaintenance { on }.into()], WRITE_TIMEOUT).await.map_err(json_err)?;
                Ok(json!({ "maintenance": on }))
            }
        }
    }

    /// `herd node primary|secondary NAME [--wait]`.
    async fn move_primary(&self, name: String, secondary: bool, wait: bool) -> Result<Value, String> {
        let started = tokio::time::Instant::now();
        let member = self.node.member().ok_or_else(|| NodeError::NotMember.to_string())?;
        let current = || {
            let g = member.view.read();
            g.state
                .nodes
                .values()
                .find(|n| n.router_state == herd_storage::model::RouterState::Primary)
                .map(|n| n.name.clone())
        };
        if !member.view.read().state.nodes.contains_key(&name) {
            return Err(format!("no node named {name:?}"));
        }
        let before = current();
        if secondary && before.as_deref() != Some(name.as_str()) {
            return Err(format!("{name} is not the primary (the primary is {})", before.as_deref().unwrap_or("none")));
        }
        let to = if secondary { None } else { Some(name.clone()) };
        self.node.leader_call(herd_raft::wire::LeaderOp::MovePrimary { to }, WRITE_TIMEOUT).await.map_err(json_err)?;
        if !wait {
            return Ok(json!({ "requested": true }));
        }
        let deadline = started + Duration::from_secs(30);
        let mut applied = member.view.subscribe();
        loop {
            let now = current();
            let done = match (&now, secondary) {
                (Some(p), false) => *p == name,
                (Some(p), true) => *p != name,
                (None, _) => false,
            };
            if done {
                return Ok(
                    json!({ "primary": now, "previous": before, "took_ms": started.elapsed().as_millis() as u64 }),
                );
            }
            if tokio::time::timeout_at(deadline, applied.changed()).await.is_err() {
                return Err(format!("no new primary within 30 s (primary now: {})", now.as_deref().unwrap_or("none")));
            }
        }
    }

    /// For a linearizable read: the read index this node has applied up to; `None` for --local.
    async fn read_index(&self, local: bool) -> Result<Option<u64>, String> {
        if local || crate::breakage::is(crate::breakage::Breakage::StaleReads) {
            return Ok(None);
        }
        self.node.read_barrier(READ_TIMEOUT).await.map(Some).map_err(json_err)
    }

    /// The local picture, at once (no quorum needed), with how fresh it is.
    pub async fn status(&self) -> Value {
        let quorum = self.node.quorum();
        let Some(member) = self.node.member() else {
            let state = if !self.resumed.load(Ordering::Acquire) {
                "starting"
            } else if self.node.is_removed() {
                "removed"
            } else {
                "not-member"
            };
            return json!({
                "node": self.config.name, "state": state, "cluster_id": null, "leader": null, "term": 0,
                "quorum": false, "applied_index": 0, "members": [],
            });
        };
        let m = member.raft.metrics().borrow_watched().clone();
        let lease_confirmed = m.state == ServerState::Leader && quorum;
        let now = herd_raft::clock::wall_ms();
        let g = member.view.read();
        let voters: Vec<u64> = m.membership_config.voter_ids().collect();
        let learners: Vec<u64> = m.membership_config.membership().learner_ids().collect();
        let name_of = |id: u64| g.state.node_by_id(id).map(|n| n.name.clone());
        let verdicts = self.agent.verdicts();
        let heartbeat = |id: u64| match verdicts.get(&id) {
            Some(v) if v.verdict == Verdict::Lost => json!(format!("lost {:.1}s", v.lost_for_ms as f64 / 1000.0)),
            Some(_) => json!("alive"),
            None => Value::Null,
        };
        let members: Vec<Value> = g
            .state
            .nodes
            .values()
            .map(|n| {
                json!({
                    "name": n.name, "id": n.id, "role": n.role, "voter": voters.contains(&n.id),
                    "raft_member": voters.contains(&n.id) || learners.contains(&n.id),
                    "daemon_state": n.daemon_state, "domain_state": n.domain_state, "router_state": n.router_state,
                    "last_keepalive_age_ms": n.last_keepalive_ms.map(|t| now.saturating_sub(t)),
                    "address": n.cluster_addr,
                    "heartbeat": heartbeat(n.id),
                    "fencing": fencing_json(n),
                    "stats": n.stats,
                })
            })
            .collect();
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        json!({
            "node": self.config.name,
            "node_id": member.id,
            "cluster_id": member.cluster_id,
            "state": state,
            "leader": m.current_leader.and_then(name_of),
            "leader_id": m.current_leader,
            "term": m.current_term,
            "quorum": quorum,
            "applied_index": g.last_applied.as_ref().map_or(0, |l| l.index),
            "lease_confirmed": lease_confirmed,
            "join_pending": self.node.join_pending(),
            "maintenance": g.state.meta.as_ref().is_some_and(|meta| meta.maintenance),
            "primary": g.state.nodes.values().find(|n| n.router_state == herd_storage::model::RouterState::Primary).map(|n| n.name.clone()),
            "holding_duties": self.primary.holding(),
            "unmanaged_domains": self.reconciler.as_ref().map(|r| r.unmanaged()),
            "tls": self.tls_json(now),
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

    /// This node's certificate: whom it names, when it and the CA expire.
    fn tls_json(&self, now_ms: u64) -> Value {
        match self.node.pki().and_then(|p| p.info()) {
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

    /// The VM side of the keepalive: what runs here and what is assigned here.
    fn vm_figures(&self, stats: &mut NodeStats) {
        let Some(member) = self.node.member() else { return };
        let g = member.view.read();
        let mine = || g.state.vms.values().filter(|v| v.node == self.config.name);
        let running = || mine().filter(|v| v.actual == herd_storage::model::ActualState::Running);
        stats.vms_running = self.vms_running.load(Ordering::Acquire);
        stats.mem_allocated_mib = running().map(|v| v.spec.memory_mib).sum();
        stats.mem_provisioned_mib = mine().map(|v| v.spec.memory_mib).sum();
        stats.vcpus_allocated = running().map(|v| v.spec.vcpus).sum();
        if let Some(r) = &self.reconciler {
            let mut unmanaged = r.unmanaged();
            unmanaged.retain(|d| !d.is_empty() && d.len() <= 256);
            unmanaged.truncate(herd_storage::model::MAX_UNMANAGED);
            stats.unmanaged_domains = unmanaged;
        }
    }

    /// Publishes this node's heartbeat addresses and marks it `run`, then writes a keepalive
    /// every interval, forever. Also keeps the heartbeat agent's targets in step with the
    /// replicated node records.
    async fn member_tasks(self: Arc<Self>) {
        let member = loop {
            self.progress.mark();
            if let Some(m) = self.node.member() {
                break m;
            }
            // Waiting for init/join is healthy: wake up now and then to say so.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.member_started.notified()).await;
        };
        self.agent.set_key(self.node.pki().and_then(|p| p.heartbeat_key()));
        self.agent.set_identity(member.id, &member.cluster_id);
        herd_storage::types::spawn(self.clone().follow_targets(member.clone()));
        let interval = Duration::from_millis(self.config.keepalive.interval_ms);
        let addrs: BTreeMap<String, String> =
            self.agent.addrs().iter().map(|(n, a)| (n.clone(), a.to_string())).collect();
        // Reconcile before reporting `run`: domains already running are adopted, not restarted
        // (no starts yet: this node has not shown quorum contact).
        if self.reconciler.is_some() {
            self.reconcile_once().await;
            herd_storage::types::spawn(self.clone().reconcile_loop());
            herd_storage::types::spawn(crate::flush::follow(self.clone()));
        }
        // `init` → `run` once this node can get a write of its own committed; the heartbeat
        // addresses go in the same atomic request.
        loop {
            let addrs = addrs.clone();
            // The BMC password goes into the log sealed to the coordinators: every node stores
            // the log, only coordinators fence.
            let policy = self.fencing.clone().map(|mut p| {
                if let Some(sealed) = self.node.pki().and_then(|k| k.seal(&p.password)) {
                    p.password = sealed;
                }
                p
            });
            let run = |name: String, node_id| {
                vec![
                    Command::SetHeartbeatAddrs { name: name.clone(), addrs, node_id },
                    Command::SetFencePolicy { name: name.clone(), policy, node_id },
                    Command::SetDaemonState { name, state: DaemonState::Run, return_by_ms: None, node_id },
                ]
            };
            self.progress.mark();
            match self.own_write(run, WRITE_TIMEOUT).await {
                Ok(()) => {
                    tracing::info!("daemon_state run");
                    self.after_run(&member).await;
                    break;
                }
                Err(NodeError::Removed) => return,
                Err(e) => {
                    tracing::warn!("cannot record daemon_state run yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let mut last = NodeStats::default();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.progress.mark();
            last = self.host_stats.collect(&last, interval / 4).await;
            let mut stats = last.clone();
            self.vm_figures(&mut stats);
            match self.own_write(|name, node_id| vec![Command::Keepalive { name, stats, node_id }], interval).await {
                Ok(()) => {}
                Err(NodeError::Removed) => return,
                Err(e) => tracing::warn!("keepalive not committed: {e}"),
            }
        }
    }

    /// Feeds the heartbeat agent the nodes to pulse, from the replicated records: a local watch
    /// on this node's applied state, never a poll of the store.
    async fn follow_targets(self: Arc<Self>, member: Arc<herd_raft::Member>) {
        let mut applied = member.view.subscribe();
        let mut current: Vec<Target> = Vec::new();
        let mut current_sources = std::collections::BTreeSet::new();
        loop {
            let targets: Vec<Target> = {
                let g = member.view.read();
                g.state
                    .nodes
                    .values()
                    // A fenced node is not pulsed until it is made ready again: it would keep
                    // MNFA's count of bad hosts up for as long as it stays off.
                    .filter(|n| n.daemon_state != DaemonState::Fenced)
                    .map(|n| Target {
                        id: n.id,
                        name: n.name.clone(),
                        role: n.role,
                        addrs: n.heartbeat.iter().filter_map(|(net, a)| Some((net.clone(), a.parse().ok()?))).collect(),
                    })
                    .collect()
            };
            if targets != current {
                self.agent.set_targets(targets.clone());
                current = targets;
            }
            // Fenced coordinators are not watched, but their views still count: one that runs
            // again sees the network as well as any other (found by the simulation, seed 2144:
            // a fenced-and-rebooted coordinator still heard a host the others had lost, and
            // that host was fenced without its view).
            let sources: std::collections::BTreeSet<herd_storage::model::NodeId> = {
                let g = member.view.read();
                g.state
                    .nodes
                    .values()
                    .filter(|n| {
                        n.daemon_state == DaemonState::Fenced && n.role == herd_storage::model::Role::Coordinator
                    })
                    .map(|n| n.id)
                    .collect()
            };
            if sources != current_sources {
                self.agent.set_view_sources(sources.clone());
                current_sources = sources;
            }
            if applied.changed().await.is_err() || self.node.is_removed() {
                return;
            }
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Whether a write of this node's own was committed lately (three keepalive intervals) and
    /// the local view at `applied` includes it: only then may this node start VMs from that view.
    /// (A node back after its VMs were recovered elsewhere replays old entries first; in those
    /// the VMs are still its own.)
    fn quorum_contact(&self, applied: u64) -> bool {
        let last = self.last_own_commit_ms.load(Ordering::Acquire);
        last != 0
            && self.now_ms().saturating_sub(last) < 3 * self.config.keepalive.interval_ms.max(1000)
            && applied >= self.last_own_commit_index.load(Ordering::Acquire)
    }

    /// Once `run` is recorded: a node that comes back fenced says so (and readies itself with
    /// `auto_ready`); the self-fence guard starts when the policy asks for it.
    async fn after_run(self: &Arc<Self>, member: &Arc<herd_raft::Member>) {
        let fenced = member
            .view
            .read()
            .state
            .nodes
            .get(&self.config.name)
            .is_some_and(|n| n.daemon_state == DaemonState::Fenced);
        if fenced {
            let auto = self.fencing.as_ref().is_some_and(|p| p.auto_ready);
            if auto {
                let unflush =
                    |name, node_id| vec![Command::SetDomainState { name, state: DomainState::Unflush, node_id }];
                match self.own_write(unflush, WRITE_TIMEOUT).await {
                    Ok(()) => tracing::warn!("this node was fenced; auto_ready: made ready again"),
                    Err(e) => tracing::warn!("this node was fenced; auto_ready failed: {e}"),
                }
            } else {
                tracing::warn!("this node was fenced: it stays fenced/flushed until `herd node ready`");
            }
        }
        if let (Some(p), Some(f)) = (&self.fencing, &self.config.fencing) {
            if p.failed_fence == FailedFence::RecoverAfterSelfFence {
                herd_storage::types::spawn(self.clone().self_fence_guard(f.watchdog.clone(), p.self_fence_after_ms));
            }
        }
    }

    /// Feeds the watchdog while this node's own writes commit; past `self_fence_after_ms`
    /// without one, destroys its VMs and stops feeding (the host resets).
    async fn self_fence_guard(self: Arc<Self>, device: String, after_ms: u64) {
        let mut wd = match crate::fence::selffence::Watchdog::open(&device) {
            Ok(w) => w,
            Err(e) => {
                // Validation required the device; failing to open it is loud, not silent.
                tracing::error!(device = %device, "cannot open the watchdog: {e}; self-fence is NOT armed");
                return;
            }
        };
        tracing::info!(device = %device, after_ms, "self-fence armed: watchdog fed while keepalives commit");
        loop {
            let last = self.last_own_commit_ms.load(Ordering::Acquire);
            let age = self.now_ms().saturating_sub(last);
            if crate::fence::selffence::must_self_fence(age, after_ms) {
                break;
            }
            if let Err(e) = wd.feed(Duration::from_secs(1)).await {
                tracing::error!("watchdog feed failed: {e}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.self_fenced.store(true, Ordering::Release);
        tracing::error!(
            age_ms = self.now_ms().saturating_sub(self.last_own_commit_ms.load(Ordering::Acquire)),
            "SELF-FENCE: no keepalive of this node committed for {after_ms} ms; destroying its VMs and \
             letting the watchdog reset the host"
        );
        if let (Some(r), Some(member)) = (&self.reconciler, self.node.member()) {
            let managed: Vec<String> = member.view.read().state.vms.keys().cloned().collect();
            // Until none of the cluster's domains runs here (the watchdog resets the host
            // meanwhile anyway): a failed list or destroy is retried, never given up on.
            loop {
                match r.hypervisor.list().await {
                    Ok(domains) => {
                        let running: Vec<&crate::hypervisor::Domain> = domains
                            .iter()
                            .filter(|d| {
                                use herd_storage::model::ActualState::{Paused, Running};
                                managed.contains(&d.name) && matches!(d.state, Running | Paused)
                            })
                            .collect();
                        if running.is_empty() {
                            tracing::error!("self-fence: none of the cluster's VMs runs here any more");
                            break;
                        }
                        for d in running {
                            match r.hypervisor.destroy(&d.name).await {
                                Ok(()) => tracing::error!(vm = %d.name, "self-fence: destroyed"),
                                Err(e) => tracing::error!(vm = %d.name, "self-fence: destroy failed: {e}"),
                            }
                        }
                    }
                    Err(e) => tracing::error!("self-fence: cannot list domains: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // The device stays open and unfed: the watchdog fires.
        std::future::pending::<()>().await;
        drop(wd);
    }

    /// One reconcile round; its reports go through Raft.
    async fn reconcile_once(&self) -> Option<u32> {
        if self.self_fenced.load(Ordering::Acquire) {
            return None;
        }
        let r = self.reconciler.as_ref()?;
        let member = self.node.member()?;
        let (vms, applied) = {
            let g = member.view.read();
            (g.state.vms.clone(), g.last_applied.map_or(0, |l| l.index))
        };
        match r.round(&vms, self.quorum_contact(applied)).await {
            Ok(out) => {
                if !out.commands.is_empty() {
                    let ops = out.commands.into_iter().map(Into::into).collect();
                    if let Err(e) = self.node.write(ops, WRITE_TIMEOUT).await {
                        tracing::warn!("VM reports not committed: {e}");
                    }
                }
                Some(out.running)
            }
            Err(e) => {
                tracing::warn!("reconcile: {e}");
                None
            }
        }
    }

    /// Reconciles on every applied change (a local watch) and every interval.
    async fn reconcile_loop(self: Arc<Self>) {
        if self.reconciler.is_none() {
            return;
        }
        let interval = Duration::from_millis(self.config.hypervisor.reconcile_interval_ms);
        loop {
            let Some(member) = self.node.member() else {
                tokio::time::sleep(interval).await;
                continue;
            };
            let mut applied = member.view.subscribe();
            let running = self.reconcile_once().await;
            self.vms_running.store(running.unwrap_or(0), Ordering::Release);
            let _ = tokio::time::timeout(interval, applied.changed()).await;
            if self.node.is_removed() {
                return;
            }
        }
    }

    /// One line for systemd's STATUS=.
    fn service_status(&self) -> String {
        match self.node.member() {
            None if self.node.is_removed() => "removed from the cluster: wipe data_dir to join again".into(),
            None => "not a cluster member: run herd init-cluster or herd join-cluster".into(),
            Some(m) => {
                let leader = m.raft.metrics().borrow_watched().current_leader;
                let name_of = |id| m.view.read().state.node_by_id(id).map(|n| n.name.clone());
                match (self.node.quorum(), leader.and_then(name_of)) {
                    (true, Some(l)) => {
                        format!("member {}, leader {l}{}", m.id, if self.primary.holding() { ", primary" } else { "" })
                    }
                    _ => format!("member {}, waiting for quorum", m.id),
                }
            }
        }
    }

    /// Sends STATUS= whenever the one-line status changes.
    async fn report_status(self: Arc<Self>) {
        let mut last = String::new();
        loop {
            let now = self.service_status();
            if now != last {
                service::status(&now);
                tracing::info!(status = %now, "service status");
                last = now;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Renews this node's certificate once fewer than [`RENEW_BEFORE_DAYS`] days are left
    /// (checked hourly; a failure is retried at the next check and logged).
    async fn renew_certificates(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            let Some(info) = self.node.pki().and_then(|p| p.info()) else { continue };
            let left_ms = info.not_after_ms.saturating_sub(herd_raft::clock::wall_ms());
            if left_ms >= RENEW_BEFORE_DAYS * 86_400_000 || self.node.member().is_none() {
                continue;
            }
            match self.node.renew_certificate(WRITE_TIMEOUT).await {
                Ok(i) => tracing::info!(expires_ms = i.not_after_ms, "certificate renewed before expiry"),
                Err(e) => tracing::warn!(days_left = left_ms / 86_400_000, "certificate renewal failed: {e}"),
            }
        }
    }

    /// Writes this coordinator's MNFA transitions into the cluster's event log.
    async fn record_notices(self: Arc<Self>, mut notices: mpsc::Receiver<Notice>) {
        while let Some(n) = notices.recv().await {
            let cmd = Command::RecordEvent {
                kind: n.kind.to_string(),
                node: Some(self.config.name.clone()),
                message: n.message,
            };
            if let Err(e) = self.node.write(vec![cmd.into()], WRITE_TIMEOUT).await {
                tracing::warn!("could not record a heartbeat event: {e}");
            }
        }
    }

    /// Writes a command about this node itself, naming its id. If the cluster no longer has a
    /// record of this node under this id, it was removed while this daemon was away: leave.
    async fn own_write(
        &self,
        cmds: impl FnOnce(String, Option<u64>) -> Vec<Command>,
        timeout: Duration,
    ) -> Result<(), NodeError> {
        let member =
            self.node.member().ok_or(if self.node.is_removed() { NodeError::Removed } else { NodeError::NotMember })?;
        let ops = cmds(self.config.name.clone(), Some(member.id)).into_iter().map(Into::into).collect();
        match self.node.write_indexed(ops, timeout).await {
            Ok((index, _)) => {
                self.last_own_commit_index.fetch_max(index, Ordering::AcqRel);
                self.last_own_commit_ms.store(self.now_ms(), Ordering::Release);
                Ok(())
            }
            Err(NodeError::Apply(ApplyError::NoSuchNode(_))) => {
                tracing::warn!(node_id = member.id, "the cluster has no record of this node: it was removed");
                self.node.leave().await?;
                Err(NodeError::Removed)
            }
            Err(e) => Err(e),
        }
    }

    /// Records `daemon_state = stop` with a `return_by` deadline (a service stop, not a host
    /// shutdown: VMs keep running and the node must not be fenced before the deadline).
    async fn record_stop(&self) {
        if self.node.member().is_none() {
            return;
        }
        let return_by = herd_raft::clock::wall_ms() + self.config.lifecycle.return_by_ms;
        let stop = |name, node_id| {
            vec![Command::SetDaemonState { name, state: DaemonState::Stop, return_by_ms: Some(return_by), node_id }]
        };
        match self.own_write(stop, Duration::from_secs(3)).await {
            Ok(_) => tracing::info!(return_by_ms = return_by, "daemon_state stop recorded"),
            Err(e) => tracing::warn!("could not record daemon_state stop: {e}"),
        }
    }
}

/// Everything the daemon does IO through: production builds it from the config (sled, TCP,
/// UDP, libvirt, IPMI, /proc); the simulation from its simulated equivalents. The daemon's
/// logic is the same over either.
pub struct Env {
    pub log: LogStore,
    pub backend: Arc<dyn Backend>,
    pub identity: Arc<dyn IdentityStore>,
    /// Opens cluster connections (mutual TLS over TCP in production).
    pub connector: Arc<dyn Connector>,
    /// The cluster port, already bound (mutual TLS in production).
    pub listener: Arc<dyn Listener>,
    /// The cluster CA and this node's certificate, behind `connector` and `listener`. `None`
    /// only where the transport authenticates nobody (the simulation).
    pub pki: Option<Arc<Pki>>,
    /// One bound datagram socket per heartbeat network, and the address it is reached at.
    pub heartbeat: BTreeMap<NetName, (Arc<dyn DatagramSocket>, std::net::SocketAddr)>,
    /// Opens this node's hypervisor (none on a coordinator-only node).
    pub hypervisor: Option<HypervisorOpener>,
    pub fencer: Arc<dyn crate::fence::agent::Fencer>,
    pub host_stats: Arc<dyn HostStats>,
}

impl Env {
    /// The production environment: sled in `data_dir`, the heartbeat sockets and the cluster
    /// port bound, libvirt opened.
    pub async fn production(config: &Config) -> Result<Env, StartError> {
        let listen = config.listen_addr().map_err(StartError::Config)?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| StartError::Config(format!("data_dir {}: {e}", config.data_dir.display())))?;
        let stores = sled_store::open(&config.data_dir.join("db"))?;
        let networks = config.heartbeat_networks().map_err(|(k, e)| StartError::Config(format!("{k}: {e}")))?;
        let mut heartbeat = BTreeMap::new();
        for (net, addr) in &networks {
            let socket = crate::heartbeat::agent::bind_udp(*addr).map_err(|e| {
                StartError::Heartbeat(std::io::Error::new(e.kind(), format!("heartbeat network {net} ({addr}): {e}")))
            })?;
            heartbeat.insert(net.clone(), (Arc::new(socket) as Arc<dyn DatagramSocket>, *addr));
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen { addr: listen.to_string(), source })?;
        let pki = Arc::new(Pki::open(config.data_dir.join("tls"))?);
        let listener = TlsListener { inner: Box::new(listener), pki: pki.clone() };
        let connector = TlsConnector { inner: Arc::new(TcpConnector), pki: pki.clone() };
        let unseal_with = pki.clone();
        let fencer = crate::fence::agent::AgentRegistry::new()
            .unsealing_with(Arc::new(move |sealed: &str| unseal_with.unseal(sealed)));
        // Opened by `start` once the heartbeat responder answers (a slow libvirtd must not
        // make a restarted node look dead).
        let hypervisor: Option<HypervisorOpener> = config.hypervisor.uri.clone().map(|uri| {
            Box::pin(async move {
                let hv = crate::hypervisor::libvirt::Libvirt::open(&uri)
                    .await
                    .map_err(|e| StartError::Config(format!("hypervisor.uri: {e}")))?;
                Ok(Arc::new(hv) as Arc<dyn Hypervisor>)
            }) as HypervisorOpener
        });
        Ok(Env {
            log: stores.log.into(),
            backend: Arc::new(stores.sm),
            identity: Arc::new(stores.local),
            connector: Arc::new(connector),
            listener: Arc::new(listener),
            pki: Some(pki),
            heartbeat,
            hypervisor,
            fencer: Arc::new(fencer),
            host_stats: Arc::new(stats::ProcStats),
        })
    }
}

/// Opens a hypervisor connection when awaited.
pub type HypervisorOpener = futures::future::BoxFuture<'static, Result<Arc<dyn Hypervisor>, StartError>>;

/// A started daemon and the handles to stop it.
pub struct Running {
    pub daemon: Arc<Daemon>,
    shutdown_tx: watch::Sender<bool>,
    duty_stop_tx: watch::Sender<bool>,
    duty_task: tokio::task::JoinHandle<()>,
    cluster_server: tokio::task::JoinHandle<()>,
    /// Aborted at stop, in this order.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts the daemon's logic over `env`: the heartbeat responder first (a daemon restarted
/// after a crash answers pulses before anything else, so it is not taken for dead while it
/// recovers), the cluster port, Raft resumed from the stores, then the member tasks, the
/// primary's duties and the fence manager. The admin socket, metrics and signals are the
/// caller's (`run`).
pub async fn start(config: Config, env: Env) -> Result<Running, StartError> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let addrs = env.heartbeat.iter().map(|(n, (_, a))| (n.clone(), *a)).collect();
    let sockets = env.heartbeat.into_iter().map(|(n, (s, _))| (n, s)).collect();
    let (agent, notices) = Agent::with_sockets(&config.name, config.role, config.heartbeat.params(), sockets, addrs);
    match env.identity.load().map_err(StartError::Identity)? {
        Some(id) if !id.removed => {
            agent.set_key(env.pki.as_ref().and_then(|p| p.heartbeat_key()));
            agent.set_identity(id.node_id, &id.cluster_id);
        }
        _ => {}
    }
    agent.spawn(shutdown_rx.clone());

    let limits = Limits {
        max_frame: config.limits.max_frame_bytes,
        idle_timeout: Duration::from_millis(config.limits.cluster_idle_timeout_ms),
        max_connections: config.limits.max_cluster_connections,
        frame_timeout: Duration::from_millis(config.limits.cluster_frame_timeout_ms),
        ..Limits::default()
    };
    let settings = NodeSettings {
        name: config.name.clone(),
        role: config.role,
        advertise: config.advertise().to_string(),
        heartbeat_ms: config.raft.heartbeat_ms,
        election_timeout_ms: (config.raft.election_timeout_ms[0], config.raft.election_timeout_ms[1]),
        limits: limits.clone(),
    };
    let node = ClusterNode::new(settings, env.connector, env.log, env.backend, env.identity);
    // What an admitted join writes: the node registered as it describes itself.
    node.set_join_policy(Arc::new(herd_raft::node::RegisterJoiner));
    if let Some(pki) = env.pki {
        node.set_pki(pki);
    }
    let duties = config.primary.duties().map_err(|(k, e)| StartError::Config(format!("{k}: {e}")))?;
    let primary_settings = primary::Settings {
        name: config.name.clone(),
        role: config.role,
        lease_ms: config.raft.election_timeout_ms[1],
        takeover_delay_ms: config.primary.takeover_delay_ms,
        notify_timeout: Duration::from_millis(config.primary.notify_timeout_ms),
        status_interval: Duration::from_millis(config.primary.status_interval_ms),
    };
    let manager = Manager::new(primary_settings, node.clone(), duties);
    node.set_extension(Arc::new(ManagerExtension(manager.clone())));
    let reconciler = match env.hypervisor {
        None => None,
        Some(open) => {
            let timeout = Duration::from_millis(config.hypervisor.shutdown_timeout_ms);
            let migration = Duration::from_millis(config.hypervisor.migration_timeout_ms);
            Some(Arc::new(
                crate::reconcile::Reconciler::new(config.name.clone(), open.await?, timeout)
                    .with_migration(&config.hypervisor.migrate_uri, migration),
            ))
        }
    };
    let fencing = match &config.fencing {
        Some(f) => Some(f.policy().map_err(|(k, e)| StartError::Config(format!("{k}: {e}")))?),
        None => None,
    };
    let fencer = env.fencer;
    let fence = FenceManager::new(
        crate::fence::manager::Settings {
            name: config.name.clone(),
            role: config.role,
            max_parallel: config.fence.max_parallel,
            check_interval: Duration::from_millis(config.fence.check_interval_ms),
            call_timeout: Duration::from_millis(config.fence.call_timeout_ms),
            confirm_timeout: Duration::from_millis(config.fence.confirm_timeout_ms),
            retry_after_ms: config.fence.retry_after_ms,
        },
        node.clone(),
        agent.clone(),
        manager.clone(),
        fencer.clone(),
    );
    if let Some(p) = &fencing {
        // Readiness at startup: this node's own BMC, as far as it can reach it.
        let (agent, bmc) = (fencer.agent(p), p.bmc.clone());
        herd_storage::types::spawn(async move {
            match agent.call(crate::fence::agent::Action::Status, Duration::from_secs(5)).await {
                Ok(power) => tracing::info!(%bmc, ?power, "own BMC answers: this node can be fenced"),
                Err(e) => tracing::warn!(%bmc, "own BMC check failed (the primary checks it too): {e}"),
            }
        });
    } else {
        tracing::warn!("no [fencing] section: this node cannot be fenced, and its VMs are not recovered if it fails");
    }
    let daemon = Arc::new(Daemon {
        config: config.clone(),
        node: node.clone(),
        agent: agent.clone(),
        primary: manager.clone(),
        progress: Progress::new(),
        metrics: crate::metrics::Metrics::new(),
        reconciler,
        last_own_commit_ms: std::sync::atomic::AtomicU64::new(0),
        last_own_commit_index: std::sync::atomic::AtomicU64::new(0),
        vms_running: std::sync::atomic::AtomicU32::new(0),
        started: tokio::time::Instant::now(),
        member_started: Notify::new(),
        resumed: AtomicBool::new(false),
        fencing,
        fence: fence.clone(),
        self_fenced: AtomicBool::new(false),
        host_stats: env.host_stats,
    });
    let handler: Arc<dyn Handler> = Arc::new(herd_raft::node::NodeHandler(node.clone()));
    let cluster_server = herd_storage::types::spawn(server::serve(env.listener, handler, limits, shutdown_rx.clone()));
    tracing::info!(name = %config.name, role = %config.role, "herd daemon started");

    let resumed = node.resume().await.map_err(StartError::Resume)?;
    daemon.resumed.store(true, Ordering::Release);
    if resumed {
        tracing::info!("resumed cluster membership from disk");
    } else if node.is_removed() {
        tracing::warn!("this node was removed from its cluster; wipe {} to join again", config.data_dir.display());
    } else {
        tracing::info!("not a cluster member yet: run `herd init-cluster` or `herd join-cluster`");
    }
    let member_tasks = herd_storage::types::spawn(daemon.clone().member_tasks());
    // Local state recovered, heartbeat responder and admin socket up: ready (quorum or not).
    service::ready(&daemon.service_status());
    let status_task = herd_storage::types::spawn(daemon.clone().report_status());
    let renew_task = herd_storage::types::spawn(daemon.clone().renew_certificates());
    let watchdog_task = herd_storage::types::spawn(service::watchdog(daemon.progress.clone(), shutdown_rx.clone()));
    let notice_task = herd_storage::types::spawn(daemon.clone().record_notices(notices));
    if resumed {
        daemon.member_started.notify_one();
    }
    {
        let m = daemon.metrics.clone();
        node.set_write_observer(Arc::new(move |d| m.proposal_seconds.observe(d.as_secs_f64())));
        let m = daemon.metrics.clone();
        agent.set_rtt_observer(Arc::new(move |d| m.pulse_rtt_seconds.observe(d.as_secs_f64())));
    }
    let (duty_stop_tx, duty_stop_rx) = watch::channel(false);
    let duty_task = herd_storage::types::spawn(manager.clone().run(duty_stop_rx));
    let fence_task = herd_storage::types::spawn(fence.run(shutdown_rx.clone()));
    Ok(Running {
        daemon,
        shutdown_tx,
        duty_stop_tx,
        duty_task,
        cluster_server,
        // No new fence decisions from a stopping primary (a running executor's outcome write
        // may still land; a pending fence is executed again by the next primary).
        tasks: vec![status_task, renew_task, watchdog_task, member_tasks, notice_task, fence_task],
    })
}

impl Running {
    /// A service stop (not a host shutdown: VMs keep running): duties off, `daemon_state
    /// stop` recorded with its `return_by`, Raft shut down.
    pub async fn stop(self) {
        service::stopping();
        tracing::info!("stopping (service stop, not a host shutdown: VMs keep running)");
        for t in &self.tasks {
            t.abort();
        }
        // Duties go first: the addresses must be off before this node stops being able to act.
        let _ = self.duty_stop_tx.send(true);
        let _ = self.duty_task.await;
        self.daemon.record_stop().await;
        let _ = self.shutdown_tx.send(true);
        self.daemon.node.shutdown().await;
        let _ = self.cluster_server.await;
        let applied = self.daemon.node.member().map(|m| m.view.read().last_applied.map_or(0, |l| l.index));
        tracing::info!(applied_index = applied.unwrap_or(0), "stopped");
    }

    /// Stops the daemon when this is sent `true` (the admin socket's and metrics' servers).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartError> {
    let listen = config.listen_addr().map_err(StartError::Config)?;
    let env = Env::production(&config).await?;
    let admin_listener = admin::bind(&config.admin_socket, config.admin_socket_group.as_deref())?;
    let access = admin::AccessPolicy::new(config.admin_socket_group.as_deref(), config.admin_group_access)
        .map_err(StartError::Config)?;
    let metrics_addr = config.metrics.addr().map_err(StartError::Config)?;
    let running = start(config.clone(), env).await?;
    let daemon = running.daemon.clone();
    tracing::info!(listen = %listen, socket = %config.admin_socket.display(), "serving");
    let admin_server = herd_storage::types::spawn(admin::serve(
        admin_listener,
        daemon.clone(),
        access,
        Duration::from_millis(config.limits.admin_idle_timeout_ms),
        running.shutdown_signal(),
    ));
    if let Some(addr) = metrics_addr {
        let listener =
            crate::metrics::bind(addr).await.map_err(|source| StartError::Listen { addr: addr.to_string(), source })?;
        herd_storage::types::spawn(crate::metrics::serve(listener, daemon.clone(), running.shutdown_signal()));
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    // SIGUSR2 writes the heartbeat picture (as `herd heartbeat --json` shows it) to the log.
    let dump_task = herd_storage::types::spawn(dump_heartbeat_on_sigusr2(daemon.agent.clone()));
    wait_for_signal().await;
    dump_task.abort();
    running.stop().await;
    let _ = admin_server.await;
    let _ = std::fs::remove_file(&config.admin_socket);
    Ok(())
}

async fn dump_heartbeat_on_sigusr2(agent: Arc<Agent>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        tracing::warn!("cannot install the SIGUSR2 handler");
        return;
    };
    while usr2.recv().await.is_some() {
        tracing::info!(heartbeat = %agent.report(), "heartbeat picture (SIGUSR2)");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// A VM as `vm list` shows it.
/// A node's fencing as operators see it: the policy without its password, and the status.
fn fencing_json(n: &herd_storage::model::NodeRecord) -> Value {
    let Some(p) = &n.fencing else {
        return json!({ "configured": false, "can_fence": false });
    };
    let f = &n.fence;
    let state = n.fence_state();
    json!({
        "configured": true,
        "can_fence": f.ready == Some(true),
        "ready": f.ready,
        "ready_reason": f.ready_reason,
        "state": state,
        "pending": f.pending,
        "fenced_ms": f.fenced_ms,
        "failed_ms": f.failed_ms,
        "failure": f.failure,
        "agent": p.agent,
        "bmc": p.bmc,
        "user": p.user,
        "command": p.command,
        "fence_after_ms": p.fence_after_ms,
        "fence_action": p.fence_action,
        "successful_fence": p.successful_fence,
        "failed_fence": p.failed_fence,
        "self_fence_after_ms": p.self_fence_after_ms,
        "watchdog_armed": p.watchdog_timeout_ms > 0,
        "auto_ready": p.auto_ready,
    })
}

fn vm_json(vm: &herd_storage::model::VmRecord) -> Value {
    json!({
        "name": vm.spec.name,
        "uuid": vm.spec.uuid,
        "state": vm.state,
        "node": vm.node,
        "last_node": vm.last_node,
        "actual": vm.actual,
        "failure_reason": vm.failure_reason,
        "migrating_from": vm.migrating_from,
    })
}
