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
    let session = Session::new(Arc::new(SimConnector), cluster_id, FOLLOWER_ID, seeds, settings);
    world.lock().follower = Some((session.view(), session.status()));
    world.trace("follower: started");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(session.run(stopped));
    while !world.lock().finished {
        sleep_ms(100).await;
    }
    stop.send_replace(true);
    let _ = task.await;
    Ok(())
}
