//! The server side of the cluster protocol: an accept loop that places each connection in the
//! member or the stranger pool (`admission.rs`: caps in all and per host, wrong-token
//! throttling, refusals counted and logged), and one task per connection reading frames under
//! an idle timeout and a per-frame deadline. Frame bodies draw on a shared byte budget, so many connections cannot
//! together allocate more than `Limits::max_buffered_bytes`. No byte sequence a peer sends can
//! do more than close its own connection.

mod admission;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

pub use self::admission::{peer_host, PortStats, Refusal};
use self::admission::{Pool, Slot, Throttle};
use crate::network::Limits;
use crate::transport::{BoxStream, Listener, Peer};
use crate::wire::{self, FrameError, RequestFrame, RpcError, RpcReply, PROTOCOL_VERSION};

/// Answers decoded requests.
pub trait Handler: Send + Sync + 'static {
    /// Whether an authenticated peer may talk to this node at all (a removed node's
    /// certificate is refused here, right after its handshake).
    fn admit(&self, peer: Peer) -> Result<(), String>;
    /// Whether `host` (the address part of a peer's address) is a member's: its connections
    /// draw on the members' capacity, everyone else's on the strangers'.
    fn member_host(&self, host: &str) -> bool;
    /// Answers one request from `peer`.
    fn handle(&self, frame: RequestFrame, peer: Peer) -> BoxFuture<'_, Result<RpcReply, RpcError>>;
}

/// The byte budget is counted in KiB permits.
const KIB: u64 = 1024;

/// Serves connections until `shutdown` turns true, counting refusals in `stats`.
pub async fn serve(
    listener: Arc<dyn Listener>,
    handler: Arc<dyn Handler>,
    limits: Limits,
    stats: Arc<PortStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let budget_kib = usize::try_from(limits.max_buffered_bytes / KIB).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
    let port = Arc::new(Port {
        handler,
        limits: limits.clone(),
        budget: Arc::new(Semaphore::new(budget_kib)),
        members: Pool::new(limits.max_connections, limits.max_per_peer),
        strangers: Pool::new(limits.max_strangers, limits.max_strangers_per_host),
        throttle: Throttle::default(),
        stats,
        listener,
    });
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            a = port.listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!("cluster port accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let host = peer_host(&peer).to_string();
        let Some(slot) = port.place(&host, &peer) else {
            drop(stream);
            continue;
        };
        let (port, shutdown) = (port.clone(), shutdown.clone());
        herd_storage::types::spawn(async move {
            if let Some((stream, who, slot)) = port.authenticate(stream, &peer, &host, slot).await {
                port.connection(stream, &peer, &host, who, shutdown).await;
                drop(slot);
            }
        });
    }
}

/// Where a connection stands before its handshake: the pool its source address chose.
enum Place {
    Member(Slot),
    Stranger(Slot),
}

/// The accept loop's shared state.
struct Port {
    handler: Arc<dyn Handler>,
    listener: Arc<dyn Listener>,
    limits: Limits,
    /// Frame bodies being read, across connections (KiB permits).
    budget: Arc<Semaphore>,
    members: Arc<Pool>,
    strangers: Arc<Pool>,
    throttle: Throttle,
    stats: Arc<PortStats>,
}

impl Port {
    /// A place for a new connection from `host`, by the pool its address belongs to.
    fn place(&self, host: &str, peer: &str) -> Option<Place> {
        if self.handler.member_host(host) {
            let slot = self.members.try_take(host);
            if slot.is_none() {
                let detail = format!(
                    "members' connections at their cap ({} in all, {} per host)",
                    self.limits.max_connections, self.limits.max_per_peer
                );
                self.stats.refuse(Refusal::MemberCapacity, peer, &detail);
            }
            return slot.map(Place::Member);
        }
        if self.throttle.blocked(host, Instant::now()) {
            self.stats.refuse(Refusal::Throttled, peer, "repeated wrong join tokens from this host");
            return None;
        }
        let slot = self.strangers.try_take(host);
        if slot.is_none() {
            let detail = format!(
                "connections from hosts that are not members at their cap ({} in all, {} per host)",
                self.limits.max_strangers, self.limits.max_strangers_per_host
            );
            self.stats.refuse(Refusal::StrangerCapacity, peer, &detail);
        }
        slot.map(Place::Stranger)
    }

    /// The transport's handshake under its deadline, then the handler's admission check. A
    /// stranger that turns out to be a member moves to the member pool.
    async fn authenticate(
        &self,
        stream: BoxStream,
        peer: &str,
        host: &str,
        place: Place,
    ) -> Option<(BoxStream, Peer, Slot)> {
        let deadline = match place {
            Place::Member(_) => self.limits.frame_timeout,
            Place::Stranger(_) => self.limits.stranger_timeout,
        };
        let (stream, who) = match tokio::time::timeout(deadline, self.listener.handshake(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.stats.refuse(Refusal::Handshake, peer, &format!("TLS handshake failed: {e}"));
                return None;
            }
            Err(_) => {
                self.stats.refuse(Refusal::Timeout, peer, &format!("no handshake within {deadline:?}"));
                return None;
            }
        };
        if let Err(reason) = self.handler.admit(who) {
            self.stats.refuse(Refusal::Revoked, peer, &reason);
            return None;
        }
        let slot = match (place, who) {
            (Place::Member(slot), _) | (Place::Stranger(slot), Peer::Anonymous) => slot,
            (Place::Stranger(stranger), Peer::Node(_) | Peer::Plain) => {
                drop(stranger);
                let Some(Place::Member(slot)) = self.member_slot(host, peer) else { return None };
                slot
            }
        };
        self.stats.admit(who != Peer::Anonymous);
        Some((stream, who, slot))
    }

    /// A member-pool slot for a member that connected from an address the membership does not
    /// name (it advertises a host name, or sits behind a translation).
    fn member_slot(&self, host: &str, peer: &str) -> Option<Place> {
        let slot = self.members.try_take(host);
        if slot.is_none() {
            self.stats.refuse(Refusal::MemberCapacity, peer, "members' connections at their cap");
        }
        slot.map(Place::Member)
    }
}

async fn read_request(
    stream: &mut BoxStream,
    limits: &Limits,
    idle: Duration,
    budget: &Arc<Semaphore>,
) -> Result<Vec<u8>, FrameError> {
    let len = wire::read_len(stream, limits.max_frame, idle, limits.frame_timeout).await?;
    let kib = u32::try_from(u64::from(len).div_ceil(KIB)).unwrap_or(u32::MAX).max(1);
    let reserve = tokio::time::timeout(limits.frame_timeout, budget.clone().acquire_many_owned(kib)).await;
    let Ok(Ok(_reserved)) = reserve else {
        return Err(FrameError::Timeout(limits.frame_timeout));
    };
    wire::read_body(stream, len, limits.frame_timeout).await
}

impl Port {
    /// Reads and answers requests until the peer closes, the connection idles out or the
    /// daemon stops. A peer without a certificate gets one request (a join's first phase),
    /// which must start within the stranger deadline; then the connection is closed.
    async fn connection(
        &self,
        mut stream: BoxStream,
        peer: &str,
        host: &str,
        who: Peer,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let limits = &self.limits;
        let anonymous = who == Peer::Anonymous;
        let idle = if anonymous { limits.stranger_timeout } else { limits.idle_timeout };
        loop {
            let read = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return,
                r = read_request(&mut stream, limits, idle, &self.budget) => r,
            };
            let body = match read {
                Ok(b) => b,
                Err(FrameError::Closed) => return,
                Err(FrameError::Timeout(t)) if anonymous => {
                    self.stats.refuse(Refusal::Timeout, peer, &format!("no join request within {t:?}"));
                    return;
                }
                Err(e) => {
                    tracing::debug!(%peer, "cluster connection dropped: {e}");
                    return;
                }
            };
            let (reply, keep) = match wire::decode::<RequestFrame>(&body) {
                Err(e) => (Err(RpcError::BadRequest(e.to_string())), false),
                Ok(frame) if frame.version != PROTOCOL_VERSION => (Err(RpcError::Version(frame.version)), false),
                Ok(frame) => {
                    // The sender stops waiting after its timeout: do no work past it.
                    let within = Duration::from_millis(frame.timeout_ms).min(limits.max_request_time);
                    match tokio::time::timeout(within, self.handler.handle(frame, who)).await {
                        Ok(r) => (r, !anonymous),
                        Err(_) => (Err(RpcError::Unavailable(format!("no result within {within:?}"))), !anonymous),
                    }
                }
            };
            drop(body);
            match &reply {
                Err(RpcError::Unauthenticated(why)) => self.stats.refuse(Refusal::Unauthenticated, peer, why),
                Err(RpcError::BadToken) if anonymous => {
                    self.throttle.bad_token(host, Instant::now());
                    self.stats.refuse(Refusal::BadToken, peer, "a join with a wrong token");
                }
                _ => {}
            }
            let encoded = match &reply {
                // Encoded once for every session asking the same changes; bounded as any frame
                // (its variant cannot be encoded again: said as what it is, too large).
                Ok(RpcReply::Encoded(b)) => match u32::try_from(b.len()) {
                    Ok(len) if len <= limits.max_frame => Ok(b.clone()),
                    _ => Err(FrameError::TooLarge {
                        len: u32::try_from(b.len()).unwrap_or(u32::MAX),
                        max: limits.max_frame,
                    }),
                },
                _ => wire::encode(&reply, limits.max_frame).map(std::sync::Arc::new),
            };
            let bytes = match encoded {
                Ok(b) => b,
                Err(e) => match wire::encode(&Err::<RpcReply, _>(RpcError::Refused(e.to_string())), limits.max_frame) {
                    Ok(b) => std::sync::Arc::new(b),
                    Err(_) => return,
                },
            };
            if let Err(e) = wire::write_frame(&mut stream, &bytes, limits.frame_timeout).await {
                tracing::debug!(%peer, "cluster connection: reply not sent: {e}");
                return;
            }
            if !keep {
                tracing::debug!(%peer, "cluster connection closed after its one anonymous request or a bad request");
                return;
            }
        }
    }
}
