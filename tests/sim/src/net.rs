//! The simulated network under herd's transport seams.
//!
//! TCP (Raft, joins, forwarding) is turmoil's: partitions, holds and latency come from the
//! `Sim`. Heartbeat UDP is turmoil's too, wrapped to add what turmoil cannot express: a cut of
//! one heartbeat network only (all networks share a host's one address, a port each) and
//! random loss; and to record the ground truth the fence invariant needs (who heard whom,
//! when, and which pulse carried which view).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures::future::BoxFuture;
use herd::heartbeat::agent::DatagramSocket;
use herd::heartbeat::wire::{Body, Datagram};
use herd_raft::transport::{BoxStream, Connector, Listener};
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::world::{now, SummaryProof, World};

/// The cluster port on every simulated host.
pub const CLUSTER_PORT: u16 = 7000;
/// Heartbeat networks and their ports.
pub const NETWORKS: [(&str, u16); 2] = [("mgmt", 7401), ("storage", 7402)];

pub struct SimConnector;

impl Connector for SimConnector {
    fn connect<'a>(
        &'a self,
        addr: &'a str,
        _target: Option<herd_storage::model::NodeId>,
    ) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            let s = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::new(s) as BoxStream)
        })
    }
}

pub struct SimListener(turmoil::net::TcpListener);

impl SimListener {
    pub async fn bind(port: u16) -> io::Result<SimListener> {
        Ok(SimListener(turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).await?))
    }
}

impl Listener for SimListener {
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxStream, String)>> {
        Box::pin(async move {
            let (s, peer) = self.0.accept().await?;
            Ok((Box::new(s) as BoxStream, peer.to_string()))
        })
    }

    fn local_addr(&self) -> io::Result<String> {
        Ok(self.0.local_addr()?.to_string())
    }
}

/// A heartbeat socket of node `me` on network `net`.
pub struct SimSocket {
    sock: turmoil::net::UdpSocket,
    me: usize,
    net: String,
    world: World,
}

/// A datagram is evidence of life only if it arrived within one heartbeat interval.
const TIMELY: Duration = Duration::from_millis(100);

/// Datagrams older than this are forgotten if still "in flight" (lost or cut).
const IN_FLIGHT_KEEP: Duration = Duration::from_secs(5);

impl SimSocket {
    pub async fn bind(world: World, me: usize, net: &str, port: u16) -> io::Result<SimSocket> {
        let sock = turmoil::net::UdpSocket::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).await?;
        Ok(SimSocket { sock, me, net: net.to_string(), world })
    }

    fn body(buf: &[u8]) -> Option<Body> {
        rmp_serde::from_slice::<Datagram>(buf).ok().map(|d| d.body)
    }

    /// Whether a datagram from `from` to `to` on this network is dropped (cut or lost).
    fn dropped(&self, from: usize, to: usize) -> bool {
        let mut w = self.world.lock();
        if w.cuts.contains(&(self.net.clone(), from, to)) {
            return true;
        }
        let loss = w.udp_loss_pct;
        loss > 0 && w.rng.random_range(0..100) < loss
    }

    /// Records a delivery to this node; `false` if it must be dropped instead. A datagram is
    /// evidence that its sender was alive when it sent it — if it arrived within one heartbeat
    /// interval (a burst of old datagrams released from a held link proves nothing recent).
    fn deliver(&self, buf: &[u8], from: SocketAddr) -> bool {
        let Some(src) = self.world.lock().by_ip.get(&from.ip()).copied() else {
            return true;
        };
        if self.dropped(src, self.me) {
            return false;
        }
        let t = now();
        let body = Self::body(buf);
        let pulse = matches!(body, Some(Body::Pulse { .. }));
        let mut w = self.world.lock();
        let key = (src, self.me, <[u8; 32]>::from(Sha256::digest(buf)));
        let Some(proof) = w.in_flight.remove(&key) else { return true };
        // An answer proves its sender alive recently only as the answer to a pulse sent within
        // one interval (seed 40277: answers to pulses held for 5 s, released at once).
        let round_trip = match &body {
            Some(Body::Answer { net, seq, .. }) => {
                w.pulses_sent.get(&(self.me, net.clone(), *seq)).is_some_and(|p| t.saturating_sub(*p) <= TIMELY)
            }
            _ => true,
        };
        if round_trip && t.saturating_sub(proof.sent) <= TIMELY {
            let q = &mut w.heard[self.me][src];
            q.push_back((proof.sent, t));
            if q.len() > crate::world::KEEP_HEARD {
                q.pop_front();
            }
        }
        if pulse {
            let q = &mut w.received[self.me][src];
            q.push_back((t, proof));
            if q.len() > crate::world::KEEP_PROOFS {
                q.pop_front();
            }
        }
        true
    }

    fn before_send(&self, buf: &[u8], to: SocketAddr) -> bool {
        let Some(dst) = self.world.lock().by_ip.get(&to.ip()).copied() else {
            return true;
        };
        if self.dropped(self.me, dst) {
            return false;
        }
        let t = now();
        let mut w = self.world.lock();
        if let Some(Body::Pulse { net, seq, .. }) = Self::body(buf) {
            w.pulses_sent.entry((self.me, net, seq)).or_insert(t);
            if w.pulses_sent.len() > 20_000 {
                w.pulses_sent.retain(|_, sent| *sent + IN_FLIGHT_KEEP > t);
            }
        }
        let heard = (0..w.machines.len()).map(|from| w.last_heard(self.me, from)).collect();
        let key = (self.me, dst, <[u8; 32]>::from(Sha256::digest(buf)));
        w.in_flight.insert(key, SummaryProof { sent: t, heard });
        if w.in_flight.len() > 20_000 {
            w.in_flight.retain(|_, p| p.sent + IN_FLIGHT_KEEP > t);
        }
        true
    }
}

impl DatagramSocket for SimSocket {
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(async move {
            if !self.before_send(buf, to) {
                return Ok(buf.len());
            }
            self.sock.send_to(buf, to).await
        })
    }

    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(async move {
            loop {
                let (n, from) = self.sock.recv_from(buf).await?;
                if self.deliver(&buf[..n], from) {
                    return Ok((n, from));
                }
            }
        })
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.sock.try_recv_from(buf)?;
            if self.deliver(&buf[..n], from) {
                return Ok((n, from));
            }
        }
    }
}
