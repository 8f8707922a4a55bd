//! Following the replicated state from outside Raft (issue 22, slice 1): a `Follower` with a
//! member's certificate takes the whole state from one coordinator, then the committed changes
//! (deltas) as a long poll, and its state equals the leader's at the same index (as projected
//! for the node it speaks as) — after writes, after
//! the coordinator it follows was killed and restarted (writes meanwhile), and after moving to
//! another coordinator. A `Session` moves on by itself when the coordinator it follows dies. A
//! `LeaderLink` writes from outside Raft: asked first at a coordinator that does not lead, the
//! write reaches the leader, and after a read barrier the session's state shows it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herd_raft::follow::{Follower, LeaderLink, Session, SessionSettings, Taken};
use herd_raft::network::{Limits, PeerClient};
use herd_raft::tls::{Pki, TlsConnector};
use herd_raft::transport::TcpConnector;
use herd_storage::model::{Command, Op};
use herd_storage::sm::StateView;
use serde_json::json;

use crate::harness::{wait_until, Cluster};
use crate::t56_tls::copy_dir;

const SPECS: &[(&str, &str, &str)] = &[
    ("f1", "coordinator", "127.0.58.1:7400"),
    ("f2", "coordinator", "127.0.58.2:7400"),
    ("f3", "coordinator", "127.0.58.3:7400"),
];

struct Setup {
    rt: tokio::runtime::Runtime,
    pki: Arc<Pki>,
    cluster_id: String,
    ids: Vec<u64>,
}

impl Setup {
    fn client(&self, k: usize) -> PeerClient {
        let connector = Arc::new(TlsConnector { inner: Arc::new(TcpConnector), pki: self.pki.clone() });
        let addr = SPECS[k].2.to_string();
        PeerClient::new(connector, addr, Some(self.ids[k]), self.cluster_id.clone(), Limits::default())
            .from(Some(self.ids[2]))
    }

    /// Polls `f` through `client` until it stands where node `k`'s whole state stands, and
    /// checks both states are the same; returns that index.
    fn caught_up(&self, f: &mut Follower, client: &mut PeerClient, k: usize) -> u64 {
        wait_until("the follower at the leader's state", Duration::from_secs(30), || {
            let mut whole = Follower::new();
            let mut c = self.client(k);
            self.rt.block_on(whole.poll(&mut c, Duration::ZERO)).ok()?;
            let target = whole.next()?;
            while f.next()? < target {
                self.rt.block_on(f.poll(client, Duration::from_millis(500))).ok()?;
            }
            // Equal positions: equal states, or the leader moved on meanwhile (ask again).
            (f.next() == Some(target)).then_some(())?;
            // It speaks as f3 (with f3's certificate): the leader's state as projected for f3.
            let me = self.ids[2];
            let (mine, theirs) = (f.view().read().state.projected_for(me), whole.view().read().state.projected_for(me));
            assert_eq!(mine, theirs, "the follower's state at index {target} is the leader's");
            Some(target)
        })
    }
}

fn tokens(c: &mut Cluster, node: &str, n: usize) {
    for _ in 0..n {
        c.node(node).admin(json!({"op": "token-create", "ttl_ms": 600000}));
    }
}

#[test]
fn a_follower_outside_raft_keeps_the_leaders_state() {
    let mut c = Cluster::new(SPECS, "[keepalive]\ninterval_ms = 1000\n");
    for (name, _, _) in SPECS {
        c.node(name).start();
    }
    let token = c.node("f1").admin(json!({"op": "init-cluster"}))["token"].as_str().expect("token").to_string();
    for n in ["f2", "f3"] {
        c.node(n).admin(json!({"op": "join-cluster", "peer": SPECS[0].2, "token": token}));
    }
    let status = wait_until("3 coordinators with a leader", Duration::from_secs(30), || {
        let s = c.node("f1").try_admin(&json!({"op": "status"})).ok()?;
        let m = s["members"].as_array()?;
        (m.len() == 3 && m.iter().all(|n| n["daemon_state"] == "run") && s["quorum"] == true).then_some(s)
    });
    let id_of = |name: &str| {
        status["members"].as_array().and_then(|m| m.iter().find(|n| n["name"] == name)).and_then(|n| n["id"].as_u64())
    };
    let work = tempfile::tempdir().expect("tempdir");
    copy_dir(&c.node("f3").data_dir().join("tls"), &work.path().join("f3"));
    let s = Setup {
        rt: tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"),
        pki: Arc::new(Pki::open(work.path().join("f3")).expect("f3's credentials")),
        cluster_id: status["cluster_id"].as_str().expect("cluster id").to_string(),
        ids: ["f1", "f2", "f3"].iter().map(|n| id_of(n).expect("id")).collect(),
    };

    // The first answer is the whole state; then changes.
    let mut f = Follower::new();
    let mut via_f2 = s.client(1);
    // f2 serves once its first round trip with the leader was answered (a quarter second
    // after its Raft started): until then it answers `Unavailable`.
    let first = wait_until("f2 serving sessions (a round trip with the leader)", Duration::from_secs(10), || {
        s.rt.block_on(f.poll(&mut via_f2, Duration::ZERO)).ok()
    });
    assert_eq!(first, Taken::Whole);
    tokens(&mut c, "f1", 20);
    let at = s.caught_up(&mut f, &mut via_f2, 0);
    eprintln!("following f2: at index {at}, equal to f1's state");
    // f2 heard the follower (it speaks as f3) moments ago.
    let seen = c.node("f2").status()["followers"].clone();
    assert_eq!(seen["count"], 1, "{seen}");
    assert!(seen["longest_silence_ms"].as_u64().is_some_and(|ms| ms < 5_000), "{seen}");

    // A long poll answers as soon as a change is applied, not at the end of its wait.
    let mut idle = Follower::new();
    s.rt.block_on(idle.poll(&mut via_f2, Duration::ZERO)).expect("whole state");
    let asked = Instant::now();
    let got = s.rt.block_on(idle.poll(&mut via_f2, Duration::from_secs(20))).expect("changes");
    assert!(matches!(got, Taken::Changes(n) if n > 0), "{got:?}");
    assert!(asked.elapsed() < Duration::from_secs(10), "answered after {:?}", asked.elapsed());

    // The followed coordinator killed; writes meanwhile; it comes back and is followed on.
    c.node("f2").kill9();
    tokens(&mut c, "f1", 10);
    assert!(s.rt.block_on(f.poll(&mut via_f2, Duration::ZERO)).is_err(), "f2 is down");
    c.node("f2").start();
    let at = s.caught_up(&mut f, &mut via_f2, 0);
    eprintln!("after f2's restart: at index {at}, equal to f1's state");

    // Moving to another coordinator continues from the same index.
    let mut via_f3 = s.client(2);
    tokens(&mut c, "f2", 5);
    let at = s.caught_up(&mut f, &mut via_f3, 0);
    eprintln!("following f3: at index {at}, equal to f1's state");

    session_moves_on(&mut c, &s);
}

/// A session follows one coordinator; killed, the session moves to another by itself and its
/// state goes on equal to the leader's.
fn session_moves_on(c: &mut Cluster, s: &Setup) {
    let connector = Arc::new(TlsConnector { inner: Arc::new(TcpConnector), pki: s.pki.clone() });
    let settings = SessionSettings { wait: Duration::from_secs(1), ..SessionSettings::default() };
    let seeds = vec![(s.ids[0], SPECS[0].2.to_string())];
    let session = Session::new(connector, s.cluster_id.clone(), s.ids[2], seeds, settings);
    let (view, status) = (session.view(), session.status());
    let bg = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = bg.spawn(session.run(stopped));
    writes_reach_the_leader(c, s, &bg, &view);
    let same_as = |k: usize| {
        let mut whole = Follower::new();
        let mut client = s.client(k);
        s.rt.block_on(whole.poll(&mut client, Duration::ZERO)).ok()?;
        let theirs = whole.view().read();
        let mine = view.read();
        let same = mine.state.projected_for(s.ids[2]) == theirs.state.projected_for(s.ids[2]);
        (mine.last_applied == theirs.last_applied && same).then_some(())
    };
    let first = wait_until("the session answered", Duration::from_secs(20), || {
        let st = status.borrow().clone();
        st.answered.and(st.coordinator)
    });
    let k = s.ids.iter().position(|id| *id == first.0).expect("a coordinator");
    let other = (k + 1) % 3;
    wait_until("the session at the leader's state", Duration::from_secs(20), || same_as(other));
    let name = SPECS[k].0;
    c.node(name).kill9();
    tokens(c, SPECS[other].0, 10);
    let moved = wait_until("the session moved on", Duration::from_secs(20), || {
        let st = status.borrow().clone();
        let now = st.coordinator.filter(|(id, _)| *id != first.0)?;
        same_as(other).map(|()| (now, st.moves))
    });
    eprintln!(
        "session: followed {name}, killed; now follows node {} after {} move(s), equal state",
        moved.0 .0, moved.1
    );
    stop.send_replace(true);
    bg.block_on(task).expect("the session ends on shutdown");
    c.node(name).start();
}

/// With f3 leading, a `LeaderLink` (no leader known yet: it asks f1 first, which answers
/// `NotLeader`) writes maintenance on; after a read barrier the session's state shows it.
fn writes_reach_the_leader(c: &mut Cluster, s: &Setup, bg: &tokio::runtime::Runtime, view: &StateView) {
    c.node("f1").admin(json!({"op": "node-primary", "name": "f3", "wait": true}));
    wait_until("f3 leads", Duration::from_secs(20), || (c.node("f3").status()["leader"] == "f3").then_some(()));
    let connector = Arc::new(TlsConnector { inner: Arc::new(TcpConnector), pki: s.pki.clone() });
    let link = LeaderLink::new(view.clone(), connector, s.cluster_id.clone(), s.ids[2], Limits::default());
    let on = vec![Op::from(Command::SetMaintenance { on: true })];
    let (index, _) = bg.block_on(link.write(on, Duration::from_secs(10))).expect("a write from outside Raft");
    let barrier = bg.block_on(link.read_barrier(Duration::from_secs(10))).expect("a read barrier");
    assert!(barrier >= index, "read index {barrier} before the write's {index}");
    assert!(view.read().state.meta.as_ref().is_some_and(|m| m.maintenance), "the session's state shows the write");
    assert_eq!(c.node("f1").status()["maintenance"], true, "and the cluster's");
    let off = vec![Op::from(Command::SetMaintenance { on: false })];
    bg.block_on(link.write(off, Duration::from_secs(10))).expect("a second write");
    eprintln!("a write from outside Raft applied at index {index}; the read barrier at {barrier}");
}
