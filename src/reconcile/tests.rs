use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use herd_storage::model::{ActualState, Command, VmRecord, VmSpec, VmState};

use super::*;
use crate::hypervisor::{Domain, Hypervisor, HypervisorError};

fn vm(name: &str, node: &str, state: VmState, actual: ActualState) -> VmRecord {
    VmRecord {
        last_move: None,
        spec: VmSpec {
            uuid: "00000000-0000-0000-0000-000000000001".into(),
            name: name.into(),
            xml: format!("<domain><name>{name}</name></domain>"),
            memory_mib: 256,
            vcpus: 1,
            selector: None,
            node_limit: vec![],
            autostart: false,
            migration_method: Default::default(),
        },
        state,
        node: node.into(),
        last_node: None,
        failure_reason: None,
        actual,
        migrating_from: None,
        waiting: None,
        seen_on: Default::default(),
        desired_at: 0,
        revision: 7,
    }
}

fn dom(name: &str, state: ActualState) -> Domain {
    Domain { name: name.into(), uuid: String::new(), state, id: (state == ActualState::Running).then_some(3) }
}

/// A round on node `me` at `now_ms` with quorum contact, shutdown timeout 1 s, no maintenance.
fn at(me: &str, now_ms: u64) -> Round<'_> {
    Round { me, can_start: true, now_ms, shutdown_timeout_ms: 1000, meta: None }
}

fn vms(list: Vec<VmRecord>) -> BTreeMap<String, VmRecord> {
    list.into_iter().map(|v| (v.spec.name.clone(), v)).collect()
}

#[test]
fn starts_what_should_run_and_adopts_what_runs() {
    let v = vms(vec![
        vm("a", "me", VmState::Start, ActualState::Unknown),
        vm("b", "me", VmState::Start, ActualState::Unknown),
    ]);
    let p = plan(&at("me", 0), &v, &[dom("b", ActualState::Running)], &mut Memory::default());
    assert_eq!(
        p.actions,
        vec![Action::Define { vm: "a".into(), xml: v["a"].spec.xml.clone() }, Action::Start { vm: "a".into() }]
    );
    assert_eq!(p.reports, vec![("a".into(), ActualState::Missing), ("b".into(), ActualState::Running)]);
}

#[test]
fn a_vm_waiting_for_a_node_that_fits_is_started_by_no_one() {
    let mut waiting = vm("a", "me", VmState::Start, ActualState::Unknown);
    waiting.waiting = Some("waiting: no node in node_limit is ready".into());
    let p = plan(&at("me", 0), &vms(vec![waiting]), &[], &mut Memory::default());
    assert_eq!(p.actions, vec![]);
}

#[test]
fn a_foreign_domain_with_a_managed_name_is_listed_unmanaged_and_never_touched() {
    let v = vms(vec![vm("a", "other", VmState::Start, ActualState::Running)]);
    let foreign = Domain { uuid: "11111111-2222-4333-8444-555555555555".into(), ..dom("a", ActualState::Running) };
    let p = plan(&at("me", 0), &v, std::slice::from_ref(&foreign), &mut Memory::default());
    assert_eq!(p.actions, vec![], "not destroyed: it is not the managed VM");
    assert_eq!(p.strays, vec![], "nor reported as the VM");
    assert_eq!(p.unmanaged, vec!["a".to_string()]);
    assert_eq!(p.strays, vec![]);
    // The managed VM's own domain (same uuid) running here while assigned elsewhere is a stray.
    let own = Domain { uuid: v["a"].spec.uuid.to_uppercase(), ..dom("a", ActualState::Running) };
    let p = plan(&at("me", 0), &v, &[own], &mut Memory::default());
    assert_eq!(p.strays, vec![("a".to_string(), true)]);
    assert!(p.unmanaged.is_empty());
}

#[test]
fn without_quorum_contact_it_stops_but_never_starts() {
    let v = vms(vec![
        vm("a", "me", VmState::Start, ActualState::Shutoff),
        vm("b", "me", VmState::Stop, ActualState::Running),
    ]);
    let p = plan(
        &Round { me: "me", can_start: false, now_ms: 0, shutdown_timeout_ms: 1000, meta: None },
        &v,
        &[dom("a", ActualState::Shutoff), dom("b", ActualState::Running)],
        &mut Memory::default(),
    );
    assert_eq!(p.actions, vec![Action::Destroy { vm: "b".into() }]);
    assert_eq!(p.held_back, 1, "the start it did not make is counted, so a client can ask for contact");
    let with = plan(
        &at("me", 0),
        &v,
        &[dom("a", ActualState::Shutoff), dom("b", ActualState::Running)],
        &mut Memory::default(),
    );
    assert_eq!(with.held_back, 0);
}

#[test]
fn a_crashed_vm_that_should_run_is_restarted() {
    let v = vms(vec![vm("a", "me", VmState::Start, ActualState::Running)]);
    let p = plan(&at("me", 0), &v, &[dom("a", ActualState::Crashed)], &mut Memory::default());
    assert!(p.actions.contains(&Action::Start { vm: "a".into() }));
    assert_eq!(p.reports, vec![("a".into(), ActualState::Crashed)]);
}

/// In maintenance (turned on at index 100): a VM no one commanded since is reported, never
/// acted on — neither restarted after a crash nor stopped where it runs against its record;
/// one commanded since (`desired_at` > 100) or with a command in flight is handled as usual.
#[test]
fn in_maintenance_only_commanded_vms_are_acted_on() {
    let meta = herd_storage::model::ClusterMeta {
        cluster_id: "c".into(),
        created_ms: 0,
        maintenance: true,
        maintenance_at: 100,
        join_token_hashes: Default::default(),
        join_tokens: Default::default(),
        next_node_id: 2,
        revision: 100,
    };
    let round = Round { meta: Some(&meta), ..at("me", 0) };
    let crashed = vm("a", "me", VmState::Start, ActualState::Running);
    let stray_run = vm("b", "me", VmState::Stop, ActualState::Shutoff);
    let started = VmRecord { desired_at: 101, ..vm("c", "me", VmState::Start, ActualState::Shutoff) };
    let restarting = vm("d", "me", VmState::Restart, ActualState::Running);
    let leaving =
        VmRecord { migrating_from: Some("me".into()), ..vm("e", "other", VmState::Migrate, ActualState::Unknown) };
    let v = vms(vec![crashed, stray_run, started, restarting, leaving]);
    let doms = [
        dom("a", ActualState::Crashed),
        dom("b", ActualState::Running),
        dom("d", ActualState::Running),
        dom("e", ActualState::Running),
    ];
    let p = plan(&round, &v, &doms, &mut Memory::default());
    let touched: BTreeSet<&str> = p.actions.iter().map(|a| a.vm()).collect();
    assert_eq!(touched, BTreeSet::from(["c", "d", "e"]), "{:?}", p.actions);
    assert!(
        p.reports.contains(&("a".into(), ActualState::Crashed))
            && p.reports.contains(&("b".into(), ActualState::Running))
    );
    // Out of maintenance the same round restarts a and stops b.
    let p = plan(&at("me", 0), &v, &doms, &mut Memory::default());
    let touched: BTreeSet<&str> = p.actions.iter().map(|a| a.vm()).collect();
    assert!(touched.contains("a") && touched.contains("b"), "{:?}", p.actions);
}

#[test]
fn unknown_domains_are_reported_and_left_alone() {
    let p = plan(&at("me", 0), &BTreeMap::new(), &[dom("test", ActualState::Running)], &mut Memory::default());
    assert!(p.actions.is_empty());
    assert_eq!(p.unmanaged, vec!["test".to_string()]);
}

#[test]
fn graceful_shutdown_then_destroy_after_the_timeout() {
    let v = vms(vec![vm("a", "me", VmState::Shutdown, ActualState::Running)]);
    let mut m = Memory::default();
    let running = [dom("a", ActualState::Running)];
    assert_eq!(plan(&at("me", 0), &v, &running, &mut m).actions, vec![Action::Shutdown { vm: "a".into() }]);
    assert!(plan(&at("me", 500), &v, &running, &mut m).actions.is_empty(), "waits for the guest");
    assert_eq!(plan(&at("me", 1000), &v, &running, &mut m).actions, vec![Action::Destroy { vm: "a".into() }]);
}

#[test]
fn a_restart_happens_once_per_request() {
    let v = vms(vec![vm("a", "me", VmState::Restart, ActualState::Running)]);
    let mut m = Memory::default();
    let running = [dom("a", ActualState::Running)];
    let first = plan(&at("me", 0), &v, &running, &mut m);
    assert_eq!(first.actions.first(), Some(&Action::Destroy { vm: "a".into() }));
    assert!(plan(&at("me", 10), &v, &running, &mut m).actions.is_empty(), "not again for the same request");
}

#[test]
fn a_vm_assigned_elsewhere_running_here_is_reported_never_destroyed() {
    let mut v = vms(vec![vm("a", "other", VmState::Start, ActualState::Running)]);
    let p = plan(&at("me", 0), &v, &[dom("a", ActualState::Running)], &mut Memory::default());
    assert_eq!(p.actions, vec![], "no node destroys a copy on its own initiative");
    assert_eq!(p.strays, vec![("a".to_string(), true)]);
    assert!(p.reports.is_empty(), "only the assigned node reports its state");
    // Once the record says so, nothing more; gone from here, that is said too.
    v.get_mut("a").map(|r| r.seen_on.insert("me".into()));
    let p = plan(&at("me", 0), &v, &[dom("a", ActualState::Running)], &mut Memory::default());
    assert_eq!(p.strays, vec![]);
    let p = plan(&at("me", 0), &v, &[], &mut Memory::default());
    assert_eq!(p.strays, vec![("a".to_string(), false)]);
    // Its own node does not start it while a copy is seen elsewhere.
    let mut own = vm("a", "me", VmState::Start, ActualState::Shutoff);
    own.seen_on.insert("other".into());
    let p = plan(&at("me", 0), &vms(vec![own]), &[], &mut Memory::default());
    assert_eq!(p.actions, vec![]);
}

#[test]
fn a_move_stops_on_the_source_before_the_target_starts() {
    let mut moving = vm("a", "target", VmState::Migrate, ActualState::Unknown);
    moving.migrating_from = Some("source".into());
    let v = vms(vec![moving.clone()]);
    // The target waits while the source has not released it.
    assert!(plan(&at("target", 0), &v, &[], &mut Memory::default()).actions.is_empty());
    // The source tries a live migration once (method `none`: live first)...
    let mut m = Memory::default();
    let running = [dom("a", ActualState::Running)];
    assert_eq!(
        plan(&at("source", 0), &v, &running, &mut m).actions,
        vec![Action::MigrateLive { vm: "a".into(), to: "target".into() }]
    );
    assert!(plan(&at("source", 0), &v, &running, &mut m).actions.is_empty(), "tried once");
    // ... refused (as on the test driver), it shuts it down gracefully, then destroys.
    m.live_failed.insert("a".into());
    assert_eq!(plan(&at("source", 0), &v, &running, &mut m).actions, vec![Action::Shutdown { vm: "a".into() }]);
    assert_eq!(plan(&at("source", 1000), &v, &running, &mut m).actions, vec![Action::Destroy { vm: "a".into() }]);
    // Released: the target starts it.
    moving.migrating_from = None;
    let v = vms(vec![moving]);
    assert!(plan(&at("target", 0), &v, &[], &mut Memory::default())
        .actions
        .contains(&Action::Start { vm: "a".into() }));
}

#[test]
fn the_migration_method_decides_live_and_fallback() {
    use herd_storage::model::MigrationMethod;
    let running = [dom("a", ActualState::Running)];
    let actions = |state: VmState, method: MigrationMethod, failed: bool| {
        let mut v = vm("a", "target", state, ActualState::Unknown);
        v.migrating_from = Some("source".into());
        v.spec.migration_method = method;
        let mut m = Memory::default();
        if failed {
            m.live_tried.insert("a".into());
            m.live_failed.insert("a".into());
        }
        plan(&at("source", 0), &vms(vec![v]), &running, &mut m).actions
    };
    let live = vec![Action::MigrateLive { vm: "a".into(), to: "target".into() }];
    let shut = vec![Action::Shutdown { vm: "a".into() }];
    assert_eq!(actions(VmState::Migrate, MigrationMethod::Shutdown, false), shut, "shutdown: never live");
    assert_eq!(actions(VmState::Migrate, MigrationMethod::Live, false), live);
    assert_eq!(actions(VmState::Migrate, MigrationMethod::Live, true), vec![], "live: never shut down");
    assert_eq!(actions(VmState::MigrateLive, MigrationMethod::Shutdown, false), live, "forced live");
    assert_eq!(actions(VmState::MigrateLive, MigrationMethod::None, true), vec![], "forced live: no fallback");
    assert_eq!(actions(VmState::Unmigrate, MigrationMethod::None, true), shut, "none: falls back");
}

/// Waits (bounded) until a live migration of `r` landed.
async fn landed(r: &Reconciler) {
    tokio::time::timeout(Duration::from_secs(5), r.migrations.landing.notified()).await.expect("a flight landed");
}

#[tokio::test]
async fn a_refused_live_migration_aborts_or_falls_back_by_policy() {
    use crate::hypervisor::memory::MemoryHypervisor;
    let hv = MemoryHypervisor::new();
    let xml = "<domain><name>a</name><uuid>00000000-0000-0000-0000-000000000001</uuid></domain>";
    hv.define(xml).await.expect("define");
    hv.start("a").await.expect("start");
    let r = Reconciler::new("source".into(), Arc::new(hv.clone()), Duration::from_secs(60));
    let mut forced = vm("a", "target", VmState::MigrateLive, ActualState::Unknown);
    forced.migrating_from = Some("source".into());
    // Live only: launched on a task of its own (the round does not wait for it); refused
    // (the memory hypervisor, like the test driver, has no migration), the next round aborts
    // the move through Raft and the domain keeps running here.
    let out = r.round(&vms(vec![forced.clone()]), None, true).await.expect("round");
    assert!(out.commands.is_empty(), "{:?}", out.commands);
    landed(&r).await;
    let out = r.round(&vms(vec![forced.clone()]), None, true).await.expect("round");
    assert!(
        matches!(out.commands.as_slice(), [Command::AbortMigration { name, node, .. }] if name == "a" && node == "source"),
        "{:?}",
        out.commands
    );
    let still = hv.list().await.expect("list");
    assert_eq!(still.first().map(|d| d.state), Some(ActualState::Running));
    // Live first (method `none`): refused, it shuts down instead and is released.
    let mut fallback = forced;
    fallback.state = VmState::Migrate;
    let r = Reconciler::new("source".into(), Arc::new(hv.clone()), Duration::from_secs(60));
    r.round(&vms(vec![fallback.clone()]), None, true).await.expect("round");
    landed(&r).await;
    let out = r.round(&vms(vec![fallback]), None, true).await.expect("round");
    assert!(
        matches!(out.commands.as_slice(), [Command::ReleaseVm { name, node }] if name == "a" && node == "source"),
        "{:?}",
        out.commands
    );
    assert_eq!(hv.list().await.expect("list").first().map(|d| d.state), Some(ActualState::Shutoff));
}

#[test]
fn domain_xml_is_read_or_refused_clearly() {
    let s = spec_from_xml("<domain type='test'><name>web</name><uuid>11111111-2222-3333-4444-555555555555</uuid><memory unit='MiB'>256</memory><vcpu>2</vcpu></domain>").expect("parses");
    assert_eq!((s.name.as_str(), s.memory_mib, s.vcpus), ("web", 256, 2));
    let kib = spec_from_xml(
        "<domain><name>x</name><uuid>11111111-2222-3333-4444-555555555555</uuid><memory>524288</memory></domain>",
    )
    .expect("parses");
    assert_eq!(kib.memory_mib, 512);
    for (bad, why) in [
        ("<domain", "invalid domain XML"),
        ("<vm/>", "<vm>"),
        ("<domain><uuid>u</uuid><memory>1</memory></domain>", "<name>"),
        ("<domain><name>x</name><memory>1</memory></domain>", "<uuid>"),
    ] {
        let e = spec_from_xml(bad).expect_err("refused");
        assert!(e.contains(why), "{bad}: {e}");
    }
}

/// A memory hypervisor whose starts each wait until `together` starts are under way at once.
struct StartsTogether {
    inner: crate::hypervisor::memory::MemoryHypervisor,
    barrier: tokio::sync::Barrier,
}

impl Hypervisor for StartsTogether {
    fn list(&self) -> futures::future::BoxFuture<'_, Result<Vec<Domain>, HypervisorError>> {
        self.inner.list()
    }
    fn define<'a>(&'a self, xml: &'a str) -> futures::future::BoxFuture<'a, Result<(), HypervisorError>> {
        self.inner.define(xml)
    }
    fn start<'a>(&'a self, name: &'a str) -> futures::future::BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async move {
            self.barrier.wait().await;
            self.inner.start(name).await
        })
    }
    fn shutdown<'a>(&'a self, name: &'a str) -> futures::future::BoxFuture<'a, Result<(), HypervisorError>> {
        self.inner.shutdown(name)
    }
    fn destroy<'a>(&'a self, name: &'a str) -> futures::future::BoxFuture<'a, Result<(), HypervisorError>> {
        self.inner.destroy(name)
    }
    fn undefine<'a>(&'a self, name: &'a str) -> futures::future::BoxFuture<'a, Result<(), HypervisorError>> {
        self.inner.undefine(name)
    }
    fn arrival<'a>(
        &'a self,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<herd_storage::model::Arrival>, HypervisorError>> {
        self.inner.arrival(name)
    }
    fn abort_job<'a>(&'a self, name: &'a str) -> futures::future::BoxFuture<'a, Result<(), HypervisorError>> {
        self.inner.abort_job(name)
    }
    fn migrate_live<'a>(
        &'a self,
        name: &'a str,
        dest_uri: &'a str,
        deadline: Duration,
    ) -> futures::future::BoxFuture<'a, Result<(), HypervisorError>> {
        self.inner.migrate_live(name, dest_uri, deadline)
    }
}

#[tokio::test]
async fn a_round_starts_several_vms_side_by_side() {
    // Each start waits for the other three: a round that started them one after another
    // would never finish.
    let hv = StartsTogether {
        inner: crate::hypervisor::memory::MemoryHypervisor::new(),
        barrier: tokio::sync::Barrier::new(4),
    };
    let r = Reconciler::new("n".into(), Arc::new(hv), Duration::from_secs(60));
    let list: Vec<VmRecord> = (1..=4)
        .map(|k| {
            let mut v = vm(&format!("v{k}"), "n", VmState::Start, ActualState::Unknown);
            v.spec.uuid = format!("00000000-0000-0000-0000-00000000000{k}");
            v.spec.xml = format!("<domain><name>v{k}</name><uuid>{}</uuid></domain>", v.spec.uuid);
            v
        })
        .collect();
    let out = tokio::time::timeout(Duration::from_secs(5), r.round(&vms(list), None, true))
        .await
        .expect("the four starts ran side by side")
        .expect("round");
    let running =
        out.commands.iter().filter(|c| matches!(c, Command::ReportVm { actual: ActualState::Running, .. })).count();
    assert_eq!(running, 4, "{:?}", out.commands);
}
