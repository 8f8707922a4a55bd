//! A client's seeds — the coordinators it asks first when it starts again — follow the
//! coordinators its followed state names, so a client restarted after every coordinator of its
//! join was replaced still finds the cluster (before, the seeds were those of its join).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use herd_storage::identity::IdentityStore;
use herd_storage::sm::StateView;
use tokio::sync::{watch, Mutex};

/// How often a client compares its seeds with the coordinators its state names.
pub const SEEDS_EVERY: Duration = Duration::from_secs(10);

/// Records in `store` the coordinators `view` names, when they differ from the stored seeds
/// (under `lock`, which every other save of a client's identity takes too: a removal recorded
/// meanwhile is never overwritten). Returns whether it saved.
pub async fn refresh(store: &dyn IdentityStore, lock: &Mutex<()>, view: &StateView) -> io::Result<bool> {
    let mut named = super::session::coordinators(view);
    if named.is_empty() {
        return Ok(false);
    }
    named.sort_unstable();
    let _held = lock.lock().await;
    let Some(mut id) = store.load()? else { return Ok(false) };
    if !id.client || id.removed || id.refused.is_some() {
        return Ok(false);
    }
    let mut had = id.seeds.clone();
    had.sort_unstable();
    if had == named {
        return Ok(false);
    }
    id.seeds = named;
    store.save(&id).await?;
    Ok(true)
}

/// [`refresh`] every [`SEEDS_EVERY`] until `stop` turns true (or its sender is gone).
pub async fn keep(
    store: Arc<dyn IdentityStore>,
    lock: Arc<Mutex<()>>,
    view: StateView,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SEEDS_EVERY) => {}
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
        }
        match refresh(&*store, &lock, &view).await {
            Ok(true) => tracing::info!("the coordinators to ask after a restart recorded (they changed)"),
            Ok(false) => {}
            Err(e) => tracing::warn!("could not record the coordinators to ask after a restart: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use herd_storage::identity::{Identity, MemIdentity};
    use herd_storage::model::{self, Command, NewNode, Op, Request, Role};

    use super::*;

    fn identity(seeds: Vec<(u64, String)>) -> Identity {
        Identity {
            node_id: 4,
            cluster_id: "c".into(),
            name: "h1".into(),
            role: Some(Role::Hypervisor),
            removed: false,
            refused: None,
            pending_join: false,
            client: true,
            seeds,
        }
    }

    /// The seeds become the coordinators the state names (c1 kept, c2 replaced by c5), once;
    /// a removed client's identity is left as it is.
    #[tokio::test]
    async fn the_seeds_follow_the_coordinators_the_state_names() {
        let (view, writer) = StateView::standalone();
        writer.update(|sm| {
            let node = NewNode { name: "c1".into(), role: Role::Coordinator, cluster_addr: "c1:7400".into() };
            let init = Command::InitCluster { cluster_id: "c".into(), token_hash: "0".repeat(64), node };
            model::apply(&mut sm.state, 1, &Request { id: "r1".into(), time_ms: 1, ops: vec![Op::from(init)] });
            let mut c5 = sm.state.nodes["c1"].clone();
            (c5.id, c5.name, c5.cluster_addr) = (5, "c5".into(), "c5:7400".into());
            sm.state.nodes.insert("c5".into(), c5);
        });
        let store = MemIdentity::default();
        let lock = Mutex::new(());
        store.save(&identity(vec![(2, "c2:7400".into()), (1, "c1:7400".into())])).await.expect("save");
        assert!(refresh(&store, &lock, &view).await.expect("refresh"), "c2 is gone, c5 came");
        let want = vec![(1, "c1:7400".to_string()), (5, "c5:7400".to_string())];
        assert_eq!(store.load().expect("load").expect("identity").seeds, want);
        assert!(!refresh(&store, &lock, &view).await.expect("refresh"), "nothing changed since");
        let mut removed = identity(vec![(2, "c2:7400".into())]);
        removed.removed = true;
        store.save(&removed).await.expect("save");
        assert!(!refresh(&store, &lock, &view).await.expect("refresh"));
        assert_eq!(store.load().expect("load"), Some(removed), "a removal is never overwritten");
    }
}
