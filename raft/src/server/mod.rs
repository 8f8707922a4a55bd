//! The server side of the cluster protocol: an accept loop with a connection limit (in total and
//! per peer address), and one task per connection reading frames under an idle timeout and a
//! per-frame deadline. Frame bodies draw on a shared byte budget, so many connections cannot
//! together allocate more than `Limits::max_buffered_bytes`. No byte sequence a peer sends can
//! do more than close its own connection.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::network::Limits;
use crate::transport::{BoxStream, Listener, Peer};
use crate::wire::{self, FrameError, RequestFrame, RpcError, RpcReply, PROTOCOL_VERSION};

/// Answers decoded requests.
pub trait Handler: Send + Sync + 'static {
    /// Whether an authenticated peer may talk to this node at all (a removed node's
    /// certificate is refused here, right after its handshake).
    fn admit(&self, peer: Peer) -> Result<(), String>;
    /// Answers one request from `peer`.
    fn handle(&self, frame: RequestFrame, peer: Peer) -> BoxFuture<'_, Result<RpcReply, RpcError>>;
}

/// The byte budget is counted in KiB permits.
const KIB: u64 = 1024;

/// Connections per peer address, shared by the accept loop and the connection tasks.
#[derive(Default)]
struct PeerCounts(Mutex<BTreeMap<String, usize>>);

impl PeerCounts {
    fn try_add(&self, peer: &str, max: usize) -> bool {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.entry(peer.to_string()).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn remove(&self, peer: &str) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.remove(peer);
            }
        }
    }
}

/// The host part of `host:port` (the whole string if it has no port).
fn peer_host(peer: &str) -> &str {
    match peer.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => peer,
    }
}

/// Serves connections until `shutdown` turns true.
pub async fn serve(
    listener: Arc<dyn Listener>,
    handler: Arc<dyn Handler>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let budget_kib = usize::try_from(limits.max_buffered_bytes / KIB).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
    let budget = Arc::new(Semaphore::new(budget_kib));
    let per_peer = Arc::new(PeerCounts::default());
    // Refusals are logged at most every 10 s, with a count: a flood must not flood the log.
    let (mut refused, mut last_warning) = (0u64, None::<Instant>);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            a = listener.accept() => a,
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
        let permit = slots.clone().try_acquire_owned().ok().filter(|_| per_peer.try_add(&host, limits.max_per_peer));
        let Some(permit) = permit else {
            refused += 1;
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(%peer, refused, "cluster port: connection limit reached ({} in all, {} per peer), refusing", limits.max_connections, limits.max_per_peer);
                last_warning = Some(Instant::now());
                refused = 0;
            }
            drop(stream);
            continue;
        };
        let (handler, limits, shutdown, budget, per_peer, listener) =
            (handler.clone(), limits.clone(), shutdown.clone(), budget.clone(), per_peer.clone(), listener.clone());
        herd_storage::types::spawn(async move {
            if let Some((stream, who)) = authenticate(&*listener, &*handler, stream, &peer, &limits).await {
                connection(stream, &peer, who, handler, &limits, &budget, shutdown).await;
            }
            per_peer.remove(&host);
            drop(permit);
        });
    }
}

async fn read_request(stream: &mut BoxStream, limits: &Limits, budget: &Arc<Semaphore>) -> Result<Vec<u8>, FrameError> {
    let len = wire::read_len(stream, limits.max_frame, limits.idle_timeout, limits.frame_timeout).await?;
    let kib = u32::try_from(u64::from(len).div_ceil(KIB)).unwrap_or(u32::MAX).max(1);
    let reserve = tokio::time::timeout(limits.frame_timeout, budget.clone().acquire_many_owned(kib)).await;
    let Ok(Ok(_reserved)) = reserve else {
        return Err(FrameError::Timeout(limits.frame_timeout));
    };
    wire::read_body(stream, len, limits.frame_timeout).await
}

/// The transport's handshake under the frame deadline, then the handler's admission check.
async fn authenticate(
    listener: &dyn Listener,
    handler: &dyn Handler,
    stream: BoxStream,
    peer: &str,
    limits: &Limits,
) -> Option<(BoxStream, Peer)> {
    let (stream, who) = match tokio::time::timeout(limits.frame_timeout, listener.handshake(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "cluster connection: handshake failed: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "cluster connection: no handshake within {:?}", limits.frame_timeout);
            return None;
        }
    };
    match handler.admit(who) {
        Ok(()) => Some((stream, who)),
        Err(reason) => {
            tracing::warn!(%peer, ?who, "cluster connection refused: {reason}");
            None
        }
    }
}

async fn connection(
    mut stream: BoxStream,
    peer: &str,
    who: Peer,
    handler: Arc<dyn Handler>,
    limits: &Limits,
    budget: &Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let read = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            r = read_request(&mut stream, limits, budget) => r,
        };
        let body = match read {
            Ok(b) => b,
            Err(FrameError::Closed) => return,
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
                match tokio::time::timeout(within, handler.handle(frame, who)).await {
                    Ok(r) => (r, true),
                    Err(_) => (Err(RpcError::Unavailable(format!("no result within {within:?}"))), true),
                }
            }
        };
        drop(body);
        let bytes = match wire::encode(&reply, limits.max_frame) {
            Ok(b) => b,
            Err(e) => match wire::encode(&Err::<RpcReply, _>(RpcError::Refused(e.to_string())), limits.max_frame) {
                Ok(b) => b,
                Err(_) => return,
            },
        };
        if let Err(e) = wire::write_frame(&mut stream, &bytes, limits.frame_timeout).await {
            tracing::debug!(%peer, "cluster connection: reply not sent: {e}");
            return;
        }
        if !keep {
            tracing::debug!(%peer, "cluster connection closed after a bad request");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_counted_by_host_not_by_port() {
        assert_eq!(peer_host("127.0.0.1:4000"), "127.0.0.1");
        assert_eq!(peer_host("[::1]:4000"), "[::1]");
        assert_eq!(peer_host("sim-node"), "sim-node");
        let c = PeerCounts::default();
        assert!(c.try_add("a", 2) && c.try_add("a", 2));
        assert!(!c.try_add("a", 2));
        assert!(c.try_add("b", 2));
        c.remove("a");
        assert!(c.try_add("a", 2));
    }
}
