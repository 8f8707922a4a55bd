//! The server side of the cluster protocol: an accept loop with a connection limit, and one
//! task per connection reading frames under an idle timeout and a per-frame deadline.
//! No byte sequence a peer sends can do more than close its own connection.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{watch, Semaphore};

use crate::network::Limits;
use crate::transport::{BoxStream, Listener};
use crate::wire::{self, FrameError, RequestFrame, RpcError, RpcReply, PROTOCOL_VERSION};

/// Answers decoded requests.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, frame: RequestFrame) -> BoxFuture<'_, Result<RpcReply, RpcError>>;
}

/// Serves connections until `shutdown` turns true.
pub async fn serve(
    listener: Arc<dyn Listener>,
    handler: Arc<dyn Handler>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Refusals are logged at most every 10 s, with a count: a flood must not flood the log.
    let (mut refused, mut last_warning) = (0u64, None);
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
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if last_warning.is_none_or(|t: tokio::time::Instant| t.elapsed() >= std::time::Duration::from_secs(10)) {
                tracing::warn!(%peer, refused, "cluster port: {} connections open, refusing more", limits.max_connections);
                last_warning = Some(tokio::time::Instant::now());
                refused = 0;
            }
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            connection(stream, &peer, handler, limits, shutdown).await;
            drop(permit);
        });
    }
}

async fn connection(
    mut stream: BoxStream,
    peer: &str,
    handler: Arc<dyn Handler>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let read = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            r = wire::read_frame(&mut stream, limits.max_frame, limits.idle_timeout, limits.frame_timeout) => r,
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
            Ok(frame) => (handler.handle(frame).await, true),
        };
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
