//! The serving side of following: a member answers a follower's long poll (`Rpc::Follow`,
//! `Rpc::Changes`) from its state machine's ring — encoded once for every session asking the
//! same ([`Answers`]), and, for a node answered a moment ago, changes that do not concern it
//! only once [`LINGER`] has passed.

use std::sync::Arc;
use std::time::Duration;

use herd_storage::changes::Since;
use herd_storage::model;
use herd_storage::sm::StateView;

use crate::wire::{RpcError, RpcReply};

/// At most about this many bytes of changes in one answer (at least one change).
pub const MAX_REPLY_BYTES: usize = 4 << 20;

/// What a follower asks for: the requests (`Rpc::Changes`, a follower of the previous
/// version, which applies them with the model) or the deltas (`Rpc::Follow`), as node `me`
/// follows them when it asks as one (without other nodes' figures).
#[derive(Clone, Copy, Debug)]
pub enum Want {
    Requests,
    Deltas {
        me: Option<model::NodeId>,
    },
    /// Deltas as node `me` follows them with outlines of other nodes' VMs (`Rpc::Outlined`).
    Outlined {
        me: model::NodeId,
    },
}

impl Want {
    fn slot(self) -> usize {
        match self {
            Want::Requests => 0,
            Want::Deltas { .. } => 1,
            Want::Outlined { .. } => 2,
        }
    }

    /// The node asking as itself, if any.
    fn me(self) -> Option<model::NodeId> {
        match self {
            Want::Requests => None,
            Want::Deltas { me } => me,
            Want::Outlined { me } => Some(me),
        }
    }
}

/// The last answer of each kind, encoded, with what it answered (`from`, the applied index).
/// When an entry applies, every session that was caught up asks for exactly it: at 1000
/// clients a coordinator answers some 333 sessions the same bytes, so the first to ask encodes
/// them and the others send that frame (cloning and encoding each answer per session was a
/// tenth of a coordinator's CPU). Deltas that differ per node (a request of keepalives) are
/// encoded per session; they are small (its own record).
#[derive(Default)]
pub struct Answers {
    last: std::sync::Mutex<[Option<Answer>; 3]>,
    /// When each node asking as itself was last answered changes (for [`LINGER`]); at most
    /// [`MAX_LINGERING`] nodes (when full, those answered longer than `LINGER` ago are
    /// forgotten; a node beyond that is not held).
    answered: std::sync::Mutex<std::collections::HashMap<model::NodeId, tokio::time::Instant>>,
    /// Bytes of answers served (changes, steps and whole states), since the start.
    served: std::sync::atomic::AtomicU64,
    /// Answers served, since the start.
    count: std::sync::atomic::AtomicU64,
    /// Where this member's [`LINGER_GRID`] starts: its first answer (on the runtime's clock,
    /// so that a simulated host's grid is its own).
    epoch: std::sync::OnceLock<tokio::time::Instant>,
}

/// `from`, the applied index, the frame body.
type Answer = (u64, u64, Arc<Vec<u8>>);

/// A session answered changes less than this long ago is answered changes that do not
/// concern it ([`model::Delta::concerns`]: another node's record, meta, events) only once the
/// rest of this time has passed, with whatever came meanwhile; a change that concerns it goes
/// at once. Under sustained writes a coordinator answers each session at most a few times a
/// second instead of once per write (at 1000 clients and 10 writes a second, one answer per
/// session per write was most of a coordinator's work); a quiet session is answered at once.
pub const LINGER: Duration = Duration::from_millis(250);

/// A lingering session is answered at the first tick of this grid (one per member, shared by
/// every session it serves) after its [`LINGER`]: the sessions a coordinator holds then wake together, a
/// few dozen times a second, not each on its own timer (at 1000 clients that was some 1 300
/// wake-ups a second per coordinator, each a context switch of a real-time thread), and they
/// ask again from the same index, so more of them share one encoded answer.
pub const LINGER_GRID: Duration = Duration::from_millis(50);

/// `t` rounded up to the next tick of [`LINGER_GRID`] counted from `epoch` (no earlier than
/// `epoch`).
fn on_grid(epoch: tokio::time::Instant, t: tokio::time::Instant) -> tokio::time::Instant {
    let grid = LINGER_GRID.as_nanos();
    let ticks = t.saturating_duration_since(epoch).as_nanos().div_ceil(grid);
    epoch + Duration::from_nanos(u64::try_from(ticks * grid).unwrap_or(u64::MAX))
}

/// Most nodes whose last answer [`Answers`] remembers.
const MAX_LINGERING: usize = 8192;

/// Most entries held back from a lingering session: a follower catching up on a backlog (or a
/// burst of writes) is answered at once, a page at a time.
pub(super) const MAX_HELD: u64 = 64;

impl Answers {
    /// Until when node `me`'s session lingers ([`LINGER`] after its last answer of changes, on
    /// the [`LINGER_GRID`]).
    fn linger_until(&self, me: model::NodeId) -> Option<tokio::time::Instant> {
        let g = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = *self.epoch.get_or_init(tokio::time::Instant::now);
        g.get(&me).map(|t| on_grid(epoch, *t + LINGER)).filter(|t| *t > tokio::time::Instant::now())
    }

    /// Node `me` was answered changes now.
    fn answered(&self, me: model::NodeId) {
        let now = tokio::time::Instant::now();
        let mut g = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= MAX_LINGERING && !g.contains_key(&me) {
            g.retain(|_, t| now.duration_since(*t) < LINGER);
        }
        if g.len() < MAX_LINGERING || g.contains_key(&me) {
            g.insert(me, now);
        }
    }

    fn get(&self, slot: usize, from: u64, applied: u64) -> Option<Arc<Vec<u8>>> {
        let g = self.last.lock().unwrap_or_else(|p| p.into_inner());
        g[slot].as_ref().filter(|(f, a, _)| (*f, *a) == (from, applied)).map(|(_, _, b)| b.clone())
    }

    fn put(&self, slot: usize, from: u64, applied: u64, bytes: Arc<Vec<u8>>) {
        self.last.lock().unwrap_or_else(|p| p.into_inner())[slot] = Some((from, applied, bytes));
    }

    /// Counts an answer's bytes as served.
    fn count(&self, reply: &RpcReply) {
        let n = match reply {
            RpcReply::Encoded(b) => b.len(),
            RpcReply::State { state, .. } => state.len(),
            _ => 0,
        };
        self.served.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Answers and their bytes served since the start (what following costs this member).
    pub fn served(&self) -> (u64, u64) {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        (load(&self.count), load(&self.served))
    }
}

/// Encodes `reply` as the server would (outside any lock).
fn encoded(reply: RpcReply) -> Result<Arc<Vec<u8>>, RpcError> {
    crate::wire::encode(&Ok::<_, RpcError>(reply), u32::MAX).map(Arc::new).map_err(|e| RpcError::Refused(e.to_string()))
}

/// The serving side: what `want` asks from `from` on (the whole state for `None`, or when
/// `from` is older than the ring holds); with none yet, waits up to `wait` for the next apply
/// and answers an empty list if none came. Answers are encoded ([`RpcReply::Encoded`]),
/// through `answers`: the same changes at the same applied index are the same bytes.
pub async fn serve(
    view: &StateView,
    from: Option<u64>,
    wait: Duration,
    answers: &Answers,
    want: Want,
) -> Result<RpcReply, RpcError> {
    let reply = answer(view, from, wait, answers, want).await;
    if let Ok(r) = &reply {
        answers.count(r);
    }
    reply
}

async fn answer(
    view: &StateView,
    from: Option<u64>,
    wait: Duration,
    answers: &Answers,
    want: Want,
) -> Result<RpcReply, RpcError> {
    // Subscribed before reading: an apply in between is not missed.
    let mut applied = view.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    let slot = want.slot();
    let me = want.me();
    // A node answered changes within LINGER waits out the rest for changes not its own.
    let mut linger = me.and_then(|me| answers.linger_until(me)).map(|t| t.min(deadline));
    // The asker's name, looked up once (a scan of the nodes), if a VM record needs it.
    let mut name: Option<Option<String>> = None;
    if let Want::Outlined { me } = want {
        // Which VMs are its business goes by its name: a node whose record this member has not
        // applied yet (a client that just joined, asking a lagging coordinator) would be sent
        // every VM as an outline and keep them so; it asks another, or this one again.
        let g = view.read();
        match name_of(&g, me) {
            Some(n) => name = Some(Some(n)),
            None if g.state.removed.contains(&me) => name = Some(None),
            None => return Err(RpcError::Unavailable(format!("node {me}'s record is not applied here yet"))),
        }
    }
    let (last_applied, state) = loop {
        {
            let g = view.read();
            let at = g.last_applied.map_or(0, |l| l.index);
            let hold = match (from, me, linger) {
                (Some(f), Some(me), Some(_)) => at < f + MAX_HELD && !concerns(&g, f, me, &mut name),
                _ => false,
            };
            if !hold {
                linger = None;
                // With outlines, a node the changes from `from` on do not concern (most, for
                // most changes) gets what every such node gets: one answer serves them all.
                let outlined = match (want, from) {
                    (Want::Outlined { me }, Some(f)) => {
                        let n = name.get_or_insert_with(|| name_of(&g, me)).as_deref();
                        g.changes
                            .outlined_steps_differ_for(f, me, n)
                            .then_some(model::Reader::Outlined { me: Some(me), name: n })
                    }
                    _ => None,
                };
                let shared = from.filter(|_| outlined.is_none()).and_then(|f| answers.get(slot, f, at));
                if let Some(bytes) = shared {
                    return Ok(answered(answers, me, RpcReply::Encoded(bytes)));
                }
                let Some(f) = from else { break (g.last_applied, g.state.clone()) };
                // The answer, and whether every session asking it gets the same.
                let Some(answer) = changes_since(&g, want, f, outlined) else {
                    break (g.last_applied, g.state.clone());
                };
                drop(g);
                if let Some((reply, shared)) = answer {
                    let bytes = encoded(reply)?;
                    if shared {
                        answers.put(slot, f, at, bytes.clone());
                    }
                    return Ok(answered(answers, me, RpcReply::Encoded(bytes)));
                }
            }
        }
        match tokio::time::timeout_at(linger.unwrap_or(deadline), applied.changed()).await {
            Ok(Ok(())) => {}
            // Lingered long enough: what came meanwhile goes now.
            Err(_) if linger.take().is_some() => {}
            // The deadline, or the state machine gone: nothing new.
            Ok(Err(_)) | Err(_) => {
                return Ok(match want {
                    Want::Requests => RpcReply::Changes(Vec::new()),
                    Want::Deltas { .. } | Want::Outlined { .. } => RpcReply::Steps(Vec::new()),
                })
            }
        }
    };
    // Other nodes' flags left out, as in the deltas; encoded outside the lock (applying waits
    // for readers).
    let state = match want {
        Want::Outlined { me } => state.outlined_whole_for(me),
        Want::Deltas { me: Some(me) } => state.without_others_flags(me),
        _ => state,
    };
    let state = herd_storage::sm::encode_state(&state).map_err(|e| RpcError::Refused(e.to_string()))?;
    Ok(answered(answers, me, RpcReply::State { last_applied, state }))
}

/// What `want` gets from `from` on (with outlines, as `outlined` reads them, else as any node
/// they do not concern), and whether every session asking the same gets the same: `Some(None)`
/// when nothing new applied, `None` when `f` is older than the ring holds.
fn changes_since(
    g: &herd_storage::sm::SmState,
    want: Want,
    f: u64,
    outlined: Option<model::Reader<'_>>,
) -> Option<Option<(RpcReply, bool)>> {
    let (steps, shared) = match want {
        Want::Requests => {
            return match g.changes.since(f, MAX_REPLY_BYTES) {
                Since::Changes(c) => Some((!c.is_empty()).then_some((RpcReply::Changes(c), true))),
                Since::TooOld => None,
            }
        }
        Want::Deltas { me } => {
            let reader = me.map_or(model::Reader::All, model::Reader::Node);
            (g.changes.steps_since(f, MAX_REPLY_BYTES, reader), g.changes.steps_same_for_all(f))
        }
        Want::Outlined { .. } => {
            let outsider = model::Reader::Outlined { me: None, name: None };
            (g.changes.steps_since(f, MAX_REPLY_BYTES, outlined.unwrap_or(outsider)), outlined.is_none())
        }
    };
    match steps {
        Since::Changes(c) => Some((!c.is_empty()).then_some((RpcReply::Steps(c), shared))),
        Since::TooOld => None,
    }
}

/// Whether what applied from `from` on concerns node `me` ([`model::Delta::concerns`]); a
/// follower further behind than the ring: yes (its whole state goes at once). `name`: its
/// name, looked up here the first time a VM record must be matched.
fn concerns(g: &herd_storage::sm::SmState, from: u64, me: model::NodeId, name: &mut Option<Option<String>>) -> bool {
    let Some(mut deltas) = g.changes.deltas_since(from) else { return true };
    deltas.any(|d| {
        if d.vms.is_empty() {
            return d.concerns(me, None);
        }
        let n = name.get_or_insert_with(|| name_of(g, me));
        d.concerns(me, n.as_deref())
    })
}

/// Node `me`'s name, as the applied state holds it (`None`: no node has that id).
fn name_of(g: &herd_storage::sm::SmState, me: model::NodeId) -> Option<String> {
    g.state.node_by_id(me).map(|n| n.name.clone())
}

/// Notes that node `me` was answered changes now (for [`LINGER`]); `reply` as it was.
fn answered(answers: &Answers, me: Option<model::NodeId>, reply: RpcReply) -> RpcReply {
    if let Some(me) = me {
        answers.answered(me);
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_rounds_up_to_its_next_tick() {
        let epoch = tokio::time::Instant::now();
        let ms = |n: u64| epoch + Duration::from_millis(n);
        assert_eq!(on_grid(epoch, ms(0)), ms(0));
        assert_eq!(on_grid(epoch, ms(1)), ms(50));
        assert_eq!(on_grid(epoch, ms(50)), ms(50));
        assert_eq!(on_grid(epoch, ms(251)), ms(300));
        assert_eq!(on_grid(epoch, ms(299)), ms(300), "answers due within one tick go together");
        assert_eq!(on_grid(ms(100), ms(30)), ms(100), "never before the epoch");
    }
}
