//! A follower outside Raft (issue 22): from the end of the setup until the run is over, a
//! `herd_raft::follow::Session` on a simulated host of its own follows the coordinators, whose
//! crashes, restarts, partitions and storage faults are its faults. The `follower` invariant
//! compares its state with the members'; convergence waits for it to catch up.

use std::sync::Arc;
use std::time::Duration;

use herd_raft::follow::{Session, SessionSettings};
use herd_storage::model::Role;

use crate::net::SimConnector;
use crate::world::World;

/// The id the follower speaks as (no node holds it; the simulation's transport is plain).
pub const FOLLOWER_ID: u64 = 1000;

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The follower's host: waits for the setup, follows until the run is over.
pub async fn run(world: World) -> turmoil::Result {
    let (cluster_id, seeds) = loop {
        let found = {
            let w = world.lock();
            if w.finished {
                return Ok(());
            }
            let member = w.machines.iter().filter_map(|m| m.daemon.as_ref()).find_map(|d| d.node.member());
            member.filter(|_| w.setup_done).map(|m| {
                let g = m.view.read();
                let coordinators = g.state.nodes.values().filter(|n| n.role == Role::Coordinator);
                (m.cluster_id.clone(), coordinators.map(|n| (n.id, n.cluster_addr.clone())).collect::<Vec<_>>())
            })
        };
        match found {
            Some(f) => break f,
            None => sleep_ms(100).await,
        }
    };
    let settings = SessionSettings { wait: Duration::from_secs(1), ..SessionSettings::default() };
    // Every VM whole: the follower invariant then checks deltas of every VM record (the
    // clients, with outlines, check theirs).
    let session = Session::new(Arc::new(SimConnector), cluster_id, FOLLOWER_ID, seeds, settings)
        .asking(herd_raft::follow::Asks::Deltas);
    world.lock().follower = Some((session.view(), session.status()));
    world.trace("follower: started");
    let mut status = session.status();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(session.run(stopped));
    let mut answered = None;
    while !world.lock().finished {
        // Each answer is published with the coordinator that gave it (a move publishes the
        // next one, the answer not yet): recorded when `answered` moves, on this host's clock.
        match tokio::time::timeout(Duration::from_millis(100), status.changed()).await {
            Ok(Ok(())) => {
                let s = status.borrow_and_update().clone();
                if s.answered != answered {
                    answered = s.answered;
                    record_acknowledged(&world, &s);
                }
            }
            // The session ended: nothing more to record (and nothing to spin on).
            Ok(Err(_)) => sleep_ms(100).await,
            Err(_) => {}
        }
    }
    stop.send_replace(true);
    let _ = task.await;
    Ok(())
}

/// Records, in simulated time, the follower's last acknowledgement: which coordinator (by
/// machine) answered, when the poll it answered was sent, and how often the session moved
/// (read on the follower's host, whose clock its instants are on).
fn record_acknowledged(world: &World, s: &herd_raft::follow::SessionStatus) {
    let (Some((_, addr)), Some(acknowledged)) = (&s.coordinator, s.acknowledged) else { return };
    let sent = crate::world::now().saturating_sub(acknowledged.elapsed());
    let mut w = world.lock();
    let machine = addr.parse::<std::net::SocketAddr>().ok().and_then(|a| w.by_ip.get(&a.ip()).copied());
    if let Some(m) = machine {
        w.follower_acked = Some((m, sent, s.moves));
    }
}
