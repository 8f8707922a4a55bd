//! The heartbeat's datagram seam: [`DatagramSocket`] (tokio's UDP in production, turmoil's
//! in the simulation), batched sends, and the production socket with large buffers.

use std::io;
use std::net::SocketAddr;

use futures::future::BoxFuture;

/// A datagram socket (tokio's UDP in production, turmoil's in the simulation).
pub trait DatagramSocket: Send + Sync + 'static {
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<usize>>;
    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>>;
    /// A datagram if one is waiting, else `WouldBlock` (lets a receive loop drain a burst
    /// without a wake-up per datagram).
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
    /// Sends the same datagram to every address; returns how many were sent. The default sends
    /// one by one; the production socket batches them (one `sendmmsg` per up to 256 targets).
    fn send_many<'a>(&'a self, buf: &'a [u8], to: &'a [SocketAddr]) -> BoxFuture<'a, usize> {
        Box::pin(async move {
            let mut sent = 0;
            for addr in to {
                if self.send_to(buf, *addr).await.is_ok() {
                    sent += 1;
                }
            }
            sent
        })
    }
}

impl DatagramSocket for tokio::net::UdpSocket {
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(tokio::net::UdpSocket::send_to(self, buf, to))
    }

    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(tokio::net::UdpSocket::recv_from(self, buf))
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        tokio::net::UdpSocket::try_recv_from(self, buf)
    }

    fn send_many<'a>(&'a self, buf: &'a [u8], to: &'a [SocketAddr]) -> BoxFuture<'a, usize> {
        Box::pin(async move {
            let mut sent = 0;
            for chunk in to.chunks(256) {
                let mut done = 0;
                while done < chunk.len() {
                    let rest = &chunk[done..];
                    match self.try_io(tokio::io::Interest::WRITABLE, || sendmmsg_once(self, buf, rest)) {
                        Ok(n) if n > 0 => done += n,
                        Ok(_) => break,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if self.writable().await.is_err() {
                                return sent;
                            }
                        }
                        // One bad address (unreachable, say) must not stop the others.
                        Err(_) => done += 1,
                    }
                }
                sent += done;
            }
            sent
        })
    }
}

/// One `sendmmsg(2)` of `buf` to `to`; how many went out.
fn sendmmsg_once(socket: &tokio::net::UdpSocket, buf: &[u8], to: &[SocketAddr]) -> io::Result<usize> {
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
    let iovs: Vec<[IoSlice<'_>; 1]> = to.iter().map(|_| [IoSlice::new(buf)]).collect();
    let addrs: Vec<Option<SockaddrStorage>> = to.iter().map(|a| Some(SockaddrStorage::from(*a))).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(to.len(), None);
    let results =
        sendmmsg(socket.as_raw_fd(), &mut headers, &iovs, &addrs, [], MsgFlags::empty()).map_err(io::Error::from)?;
    Ok(results.count())
}

/// Socket buffers sized for a burst of answers from every host at once (1000 hosts answer
/// within a few milliseconds of a pulse; the default buffer drops most of them).
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A non-blocking UDP socket with large buffers (the kernel may cap them at its rmem_max).
pub fn bind_udp(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: a smaller buffer still works, it only drops more under a burst.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(s.into())
}
