//! The byte-stream seam under the cluster protocol.
//!
//! Raft code sees only [`Connector`] and [`Listener`]: plain TCP, mutual TLS over it
//! (`tls/`) and turmoil's simulated TCP plug in here without touching the protocol or Raft code.

use std::io;
use std::net::SocketAddr;

use futures::future::BoxFuture;
use herd_storage::model::NodeId;
use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> Stream for T {}

pub type BoxStream = Box<dyn Stream>;

/// Who is at the other end of an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// No authentication on this transport (the simulation's).
    Plain,
    /// TLS without a client certificate: a node that has not joined yet.
    Anonymous,
    /// TLS with a certificate the cluster CA signed for this node id.
    Node(NodeId),
}

/// Opens streams to peers.
pub trait Connector: Send + Sync + 'static {
    /// `target` is the node the caller means to reach, when it knows its id (TLS checks that
    /// the peer's certificate names it).
    fn connect<'a>(&'a self, addr: &'a str, target: Option<NodeId>) -> BoxFuture<'a, io::Result<BoxStream>>;
}

/// Accepts streams from peers.
pub trait Listener: Send + Sync + 'static {
    /// The next connection and the peer's address.
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxStream, String)>>;
    fn local_addr(&self) -> io::Result<String>;
    /// Authenticates an accepted connection (run in the connection's own task, under a
    /// deadline). Plain transports authenticate nobody.
    fn handshake(&self, stream: BoxStream) -> BoxFuture<'_, io::Result<(BoxStream, Peer)>> {
        Box::pin(async move { Ok((stream, Peer::Plain)) })
    }
}

/// Plain TCP.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect<'a>(&'a self, addr: &'a str, _target: Option<NodeId>) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as BoxStream)
        })
    }
}

/// Plain TCP from a chosen source address: a node that listens on one address of a
/// multi-homed host connects from it too, so its peers see the address the membership names
/// (their cluster port admits members by it).
#[derive(Clone, Copy, Debug)]
pub struct TcpFromConnector(pub std::net::IpAddr);

impl Connector for TcpFromConnector {
    fn connect<'a>(&'a self, addr: &'a str, _target: Option<NodeId>) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            let to = tokio::net::lookup_host(addr)
                .await?
                .find(|a| a.is_ipv4() == self.0.is_ipv4())
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address of this family")))?;
            let socket =
                if self.0.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(self.0, 0))?;
            let s = socket.connect(to).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as BoxStream)
        })
    }
}

pub struct TcpListener(tokio::net::TcpListener);

impl TcpListener {
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(TcpListener(tokio::net::TcpListener::bind(addr).await?))
    }
}

impl Listener for TcpListener {
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxStream, String)>> {
        Box::pin(async move {
            let (s, peer) = self.0.accept().await?;
            s.set_nodelay(true)?;
            Ok((Box::new(s) as BoxStream, peer.to_string()))
        })
    }

    fn local_addr(&self) -> io::Result<String> {
        Ok(self.0.local_addr()?.to_string())
    }
}
