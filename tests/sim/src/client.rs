//! The operator: sets the cluster up through the admin handler (init, joins, VMs), then sends
//! random VM commands to random nodes while the faults run, and records the history of each
//! VM's register (the `<description>` in its domain XML: written by `vm modify`, read by a
//! linearizable `vm info`) for the linearizability check.

use std::collections::BTreeMap;
use std::time::Duration;

use herd::admin::{AdminRequest, ErrorCode};
use herd_storage::model::{DaemonState, VmState};
use rand::Rng;

use crate::host::CALL_TIMEOUT;
use crate::linearizable::{Op, OpKind};
use crate::world::{now, World};

/// VMs the client defines.
pub const VMS: usize = 4;

pub fn vm_name(v: usize) -> String {
    format!("vm{v}")
}

/// VM `v`'s domain XML with register value `value`.
pub fn vm_xml(v: usize, value: u64) -> String {
    format!(
        "<domain type='test'><name>vm{v}</name><uuid>00000000-0000-4000-8000-0000000000{v:02}</uuid>\
         <description>w{value}</description><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type></os></domain>"
    )
}

fn register_of(xml: &str) -> Option<u64> {
    let start = xml.find("<description>w")? + "<description>w".len();
    let end = xml[start..].find("</description>")? + start;
    xml[start..end].parse().ok()
}

/// What the client did, per VM register.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub ops: BTreeMap<String, Vec<Op>>,
    /// VMs whose definition was acknowledged.
    pub defined: Vec<String>,
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// A random node whose daemon is up.
/// A node whose daemon answers and is not refused (a refused node's log went backwards: it
/// answers nothing about the cluster until the operator removes it and joins it afresh).
fn pick_up(world: &World) -> Option<usize> {
    let mut w = world.lock();
    let up: Vec<usize> = (0..w.machines.len())
        .filter(|i| w.machines[*i].inbox.is_some())
        .filter(|i| w.machines[*i].daemon.as_ref().is_none_or(|d| d.node.refused().is_none()))
        .collect();
    if up.is_empty() {
        return None;
    }
    let k = w.rng.random_range(0..up.len());
    Some(up[k])
}

/// Calls `req` on node `i` until it succeeds (or `deadline` passes); an `exists` refusal
/// (the action was done already) counts as success.
async fn until_ok(world: &World, i: usize, req: impl Fn() -> AdminRequest, deadline: Duration) -> Result<(), String> {
    let end = now() + deadline;
    loop {
        match world.call(i, req(), CALL_TIMEOUT).await {
            Ok(_) => return Ok(()),
            Err(e) if e.code == ErrorCode::Exists => return Ok(()),
            Err(e) if now() >= end => return Err(e.to_string()),
            Err(_) => sleep_ms(200).await,
        }
    }
}

/// Init on node 0, join every other node, define and start the VMs. Returns when every node
/// is `run`.
pub async fn setup(world: &World, history: &mut History) -> Result<(), String> {
    let token = loop {
        match world.call(0, AdminRequest::InitCluster {}, CALL_TIMEOUT).await {
            Ok(v) => break v["token"].as_str().unwrap_or_default().to_string(),
            Err(e) if e.message == crate::world::NODE_DOWN => sleep_ms(50).await,
            Err(e) => return Err(format!("init-cluster: {e}")),
        }
    };
    world.trace("client: cluster initialised");
    let peer = format!("{}:{}", turmoil::lookup(world.name(0).as_str()), crate::net::CLUSTER_PORT);
    for i in 1..world.len() {
        let (peer, token) = (peer.clone(), token.clone());
        until_ok(
            world,
            i,
            move || AdminRequest::JoinCluster { peer: peer.clone(), token: token.clone(), role: None },
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| format!("join {}: {e}", world.name(i)))?;
        world.trace(format!("client: {} joined", world.name(i)));
    }
    // Every node `run`, as node 0 sees it.
    let end = now() + Duration::from_secs(30);
    loop {
        let all_run = {
            let w = world.lock();
            w.machines[0].daemon.as_ref().and_then(|d| d.node.member()).is_some_and(|m| {
                let g = m.view.read();
                g.state.nodes.len() == w.machines.len()
                    && g.state.nodes.values().all(|n| n.daemon_state == DaemonState::Run)
            })
        };
        if all_run {
            break;
        }
        if now() >= end {
            return Err("not every node reached `run` within 30 s".into());
        }
        sleep_ms(100).await;
    }
    let place_on = world.lock().place_on.clone();
    for v in 0..VMS {
        let call = now();
        let node = place_on.clone();
        until_ok(
            world,
            0,
            move || AdminRequest::VmDefine {
                xml: vm_xml(v, 0),
                node: node.clone(),
                selector: None,
                limit: Vec::new(),
                autostart: true,
                method: None,
            },
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| format!("define vm{v}: {e}"))?;
        history.defined.push(vm_name(v));
        history.ops.entry(vm_name(v)).or_default().push(Op { call, ret: Some(now()), kind: OpKind::Write(0) });
        until_ok(
            world,
            0,
            move || AdminRequest::VmState { name: vm_name(v), state: VmState::Start },
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| format!("start vm{v}: {e}"))?;
    }
    world.trace("client: setup done");
    Ok(())
}

/// One client worker: random commands until the driver says the faults are over.
pub async fn worker(world: World, id: usize) -> Vec<(String, Op)> {
    let mut ops = Vec::new();
    let mut next_value = (id as u64 + 1) * 1_000_000;
    while !world.lock().healed {
        let pause = world.lock().rng.random_range(50..400);
        sleep_ms(pause).await;
        let Some(i) = pick_up(&world) else { continue };
        let (v, roll, handover) = {
            let mut w = world.lock();
            let handover = std::mem::take(&mut w.handover_requests);
            (w.rng.random_range(0..VMS), w.rng.random_range(0..100), handover)
        };
        let vm = vm_name(v);
        if handover > 0 {
            let coordinators: Vec<String> =
                world.lock().machines.iter().filter(|m| m.coordinator).map(|m| m.name.clone()).collect();
            let to = coordinators[world.lock().rng.random_range(0..coordinators.len())].clone();
            let r = world
                .call(i, AdminRequest::NodePrimary { name: to.clone(), secondary: false, wait: false }, CALL_TIMEOUT)
                .await;
            world.trace(format!("client{id}: primary to {to} via {}: {}", world.name(i), ok_or(&r)));
            continue;
        }
        let call = now();
        match roll {
            0..=39 => {
                next_value += 1;
                let value = next_value;
                let r = world
                    .call(i, AdminRequest::VmModify { name: vm.clone(), xml: vm_xml(v, value) }, CALL_TIMEOUT)
                    .await;
                world.trace(format!("client{id}: {vm} := w{value} via {}: {}", world.name(i), ok_or(&r)));
                // A failed write may still have been committed: it is pending (no return).
                let ret = r.is_ok().then(now);
                ops.push((vm, Op { call, ret, kind: OpKind::Write(value) }));
            }
            40..=79 => {
                let r = world.call(i, AdminRequest::VmInfo { name: vm.clone(), local: false }, CALL_TIMEOUT).await;
                if let Ok(v) = &r {
                    let value = v["xml"].as_str().and_then(register_of);
                    world.trace(format!("client{id}: {vm} read w{} via {}", value.unwrap_or(u64::MAX), world.name(i)));
                    ops.push((vm, Op { call, ret: Some(now()), kind: OpKind::Read(value) }));
                }
            }
            80..=89 => {
                let r = world
                    .call(
                        i,
                        AdminRequest::VmMigrate {
                            name: vm.clone(),
                            to: None,
                            live: false,
                            permanent: false,
                            unmigrate: false,
                        },
                        CALL_TIMEOUT,
                    )
                    .await;
                world.trace(format!("client{id}: migrate {vm} via {}: {}", world.name(i), ok_or(&r)));
            }
            90..=94 => {
                let r =
                    world.call(i, AdminRequest::VmState { name: vm.clone(), state: VmState::Stop }, CALL_TIMEOUT).await;
                world.trace(format!("client{id}: stop {vm} via {}: {}", world.name(i), ok_or(&r)));
            }
            _ => {
                let r = world
                    .call(i, AdminRequest::VmState { name: vm.clone(), state: VmState::Start }, CALL_TIMEOUT)
                    .await;
                world.trace(format!("client{id}: start {vm} via {}: {}", world.name(i), ok_or(&r)));
            }
        }
    }
    ops
}

fn ok_or(r: &Result<serde_json::Value, herd::admin::AdminError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("error: {}", e.message.chars().take(80).collect::<String>()),
    }
}

/// The operator's calls after the faults: short, so that one waiting on a cluster without
/// quorum does not hold the next step back.
const OPERATOR_TIMEOUT: Duration = Duration::from_secs(3);

/// After the faults: a machine still off after 10 s switched on, every fenced node made ready again (the operator's `herd node ready`) —
/// but a refused one (restored from an earlier copy), whose way back is remove + re-join,
/// shown on real processes by the cluster test t32 —,
/// every VM started again (a VM stopped by the client or failed gets its desired state back),
/// then the final reads once the driver has judged convergence.
pub async fn finish(world: &World, history: &mut History) {
    let began = now();
    let mut switched_on = false;
    // 25 s of the operator's time.
    while now() - began < Duration::from_secs(25) {
        // A fence cut short (its primary crashed between the power-off and the power-on) can
        // leave a coordinator off with no quorum left to finish it: after 10 s the operator
        // switches on whatever is still off.
        if !switched_on && now() - began >= Duration::from_secs(10) {
            switched_on = true;
            for i in 0..world.len() {
                crate::bmc::power_on(world, i);
            }
        }
        let (fenced, refused, stranded): (Vec<String>, Vec<String>, Vec<String>) = {
            let w = world.lock();
            let refused: Vec<String> = w
                .machines
                .iter()
                .filter(|m| m.daemon.as_ref().is_some_and(|d| d.node.refused().is_some()))
                .map(|m| m.name.clone())
                .collect();
            let view = w.machines.iter().filter_map(|m| m.daemon.as_ref()).find_map(|d| d.node.member());
            match view {
                None => (Vec::new(), Vec::new(), Vec::new()),
                Some(m) => {
                    let g = m.view.read();
                    let present = |name: &String| g.state.nodes.values().any(|n| &n.name == name);
                    // VMs left on a refused node (a stopped one is not recovered by its fence):
                    // the operator moves them before the removal, as its refusal asks.
                    let stranded = g
                        .state
                        .vms
                        .values()
                        .filter(|v| refused.contains(&v.node))
                        .map(|v| v.spec.name.clone())
                        .collect();
                    let fenced = g
                        .state
                        .nodes
                        .values()
                        .filter(|n| n.daemon_state == DaemonState::Fenced)
                        .map(|n| n.name.clone())
                        .filter(|name| !refused.contains(name))
                        .collect();
                    (fenced, refused.into_iter().filter(present).collect(), stranded)
                }
            }
        };
        // A refused node's way back begins with `herd node remove NAME --force`, which also
        // recovers its VMs (a move away from it no longer waits for it); the rest (empty its
        // data_dir, join again) is shown on real processes by the cluster test t32.
        for vm in &stranded {
            if let Some(i) = pick_up(world) {
                let r = world
                    .call(
                        i,
                        AdminRequest::VmMigrate {
                            name: vm.clone(),
                            to: None,
                            live: false,
                            permanent: true,
                            unmigrate: false,
                        },
                        OPERATOR_TIMEOUT,
                    )
                    .await;
                world.trace(format!("client: move {vm} off a refused node: {}", ok_or(&r)));
            }
        }
        for name in &refused {
            if let Some(i) = pick_up(world) {
                let r =
                    world.call(i, AdminRequest::NodeRemove { name: name.clone(), force: true }, OPERATOR_TIMEOUT).await;
                world.trace(format!("client: remove refused {name}: {}", ok_or(&r)));
            }
        }
        if fenced.is_empty() && refused.is_empty() {
            break;
        }
        for name in fenced {
            if let Some(i) = pick_up(world) {
                let r = world
                    .call(i, AdminRequest::NodeFlush { name: name.clone(), ready: true, wait: false }, OPERATOR_TIMEOUT)
                    .await;
                world.trace(format!("client: ready {name}: {}", ok_or(&r)));
            }
        }
        sleep_ms(500).await;
    }
    for v in 0..VMS {
        if let Some(i) = pick_up(world) {
            let r =
                world.call(i, AdminRequest::VmState { name: vm_name(v), state: VmState::Start }, CALL_TIMEOUT).await;
            world.trace(format!("client: final start vm{v}: {}", ok_or(&r)));
        }
    }
    world.lock().settled = true;
    while !world.lock().finished {
        sleep_ms(100).await;
    }
    // Final reads: the last word of every register.
    for v in 0..VMS {
        for _ in 0..10 {
            let Some(i) = pick_up(world) else {
                sleep_ms(200).await;
                continue;
            };
            let call = now();
            if let Ok(r) = world.call(i, AdminRequest::VmInfo { name: vm_name(v), local: false }, CALL_TIMEOUT).await {
                let value = r["xml"].as_str().and_then(register_of);
                world.trace(format!("client: final read vm{v} = w{}", value.unwrap_or(u64::MAX)));
                history.ops.entry(vm_name(v)).or_default().push(Op {
                    call,
                    ret: Some(now()),
                    kind: OpKind::Read(value),
                });
                break;
            }
            sleep_ms(200).await;
        }
    }
}
