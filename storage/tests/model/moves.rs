//! How a move went (issue 20): the target's report that finishes a move records it in the VM's
//! `last_move` and in a `vm-moved` event — live with libvirt's downtime, or by shutdown.

use herd_storage::model::*;

use crate::vm::{run, spec, three};

fn moved_events(s: &State) -> Vec<String> {
    s.events.iter().filter(|e| e.kind == "vm-moved").map(|e| e.message.clone()).collect()
}

#[test]
fn a_finished_move_says_how_it_went() {
    let mut s = three();
    assert_eq!(run(&mut s, 1, Command::DefineVm { spec: spec("web", 1), node: "a".into() }), Ok(Reply::Done));
    let report = |node: &str, moved| Command::ReportVm {
        name: "web".into(),
        node: node.into(),
        actual: ActualState::Running,
        failure: None,
        moved,
    };
    assert_eq!(run(&mut s, 2, report("a", None)), Ok(Reply::Done));
    let live = Command::MigrateVm { name: "web".into(), to: "b".into(), state: VmState::MigrateLive, permanent: false };
    assert_eq!(run(&mut s, 10, live), Ok(Reply::Done));
    let m = s.vms["web"].last_move.clone().expect("a move under way");
    assert_eq!((m.from.as_str(), m.to.as_str(), m.began_ms, m.ended_ms), ("a", "b", 10, None));
    assert_eq!(run(&mut s, 12, Command::ReleaseVm { name: "web".into(), node: "a".into() }), Ok(Reply::Done));
    let arrival = Arrival { live: true, downtime_ms: Some(40), job_ms: Some(2) };
    assert_eq!(run(&mut s, 13, report("b", Some(arrival))), Ok(Reply::Done));
    let m = s.vms["web"].last_move.clone().expect("last move");
    assert_eq!((m.ended_ms, m.live, m.downtime_ms), (Some(13), Some(true), Some(40)));
    assert_eq!(
        moved_events(&s),
        vec!["web moved live a -> b in 3 ms (downtime 40 ms, libvirt's job 2 ms)".to_string()]
    );
    // A later report of the running VM changes nothing of it.
    assert_eq!(run(&mut s, 14, report("b", None)), Ok(Reply::Done));
    assert_eq!(moved_events(&s).len(), 1);
    // A move by shutdown: the target started it.
    let away = Command::MigrateVm { name: "web".into(), to: "c".into(), state: VmState::Migrate, permanent: false };
    assert_eq!(run(&mut s, 20, away), Ok(Reply::Done));
    assert_eq!(run(&mut s, 25, Command::ReleaseVm { name: "web".into(), node: "b".into() }), Ok(Reply::Done));
    assert_eq!(
        run(&mut s, 27, report("c", Some(Arrival { live: false, downtime_ms: None, job_ms: None }))),
        Ok(Reply::Done)
    );
    let m = s.vms["web"].last_move.clone().expect("last move");
    assert_eq!((m.from.as_str(), m.to.as_str(), m.live, m.ended_ms), ("b", "c", Some(false), Some(27)));
    assert_eq!(
        moved_events(&s).last().map(String::as_str),
        Some("web moved by shutdown b -> c in 7 ms (stopped there, started here)")
    );
}
