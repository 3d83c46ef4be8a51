//! QUIC transport tuning derived from the `[link]` section, and the UDP socket under the endpoint.
//!
//! quinn's defaults suit 100 Mbit/s × 100 ms. A long fat link needs connection windows of a few
//! bandwidth-delay products and socket buffers that absorb bursts; per-stream windows stay small
//! on purpose (see [`LANE_WINDOW`]) and a flow is striped over enough lanes to fill the path.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::{TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::LinkConfig;
use crate::tunnel::congestion::RateModelConfig;
use crate::tunnel::protocol::MAX_CHUNK;

/// Receive window of one lane (QUIC stream). quinn-proto 0.11.17+ closes a connection when one
/// stream's receive buffer holds more than 1024 unmerged gaps; at a minimum datagram payload of
/// 1200 bytes a 1 MiB window can never hold that many, whatever the loss pattern.
pub const LANE_WINDOW: u64 = 1 << 20;
/// Most lanes one flow direction uses.
pub const MAX_LANES: usize = 48;
/// Keep-alive period: well below the idle timeout so a quiet tunnel stays up.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A peer silent this long is considered gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Floor for connection-level windows and socket buffers, so short or slow links still get room
/// for bursts from a LAN-speed local side.
const MIN_WINDOW: u64 = 16 << 20;

/// Sizes derived from the link description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSizing {
    /// Lanes per flow direction.
    pub lanes: usize,
    /// Connection-level receive and send windows.
    pub connection_window: u64,
    /// UDP socket buffer size requested.
    pub socket_buffer: usize,
    /// Out-of-order bytes one flow direction may buffer.
    pub reorder_budget: u64,
}

impl LinkSizing {
    /// Derives window, lane and buffer sizes from the link (bandwidth × rtt with headroom).
    pub fn for_link(link: &LinkConfig) -> Self {
        let bdp = link.bdp_bytes();
        // 1.5 × BDP of lane windows keeps one flow able to fill the path while some lanes wait
        // for retransmissions.
        let lanes = (bdp * 3 / 2).div_ceil(LANE_WINDOW).clamp(2, MAX_LANES as u64) as usize;
        let connection_window = (bdp * 2).max(MIN_WINDOW);
        let socket_buffer = bdp.clamp(8 << 20, 256 << 20) as usize;
        // The reorder budget is also the credit a receiver grants a flow direction (see the
        // protocol's flow control): twice the lanes' windows keeps a flow's window where it was
        // when unread data could also wait in QUIC's stream buffers (about 3 × BDP), which it
        // needs on a lossy path, where the delivered prefix waits a round trip per lost packet.
        let reorder_budget = 2 * lanes as u64 * LANE_WINDOW + MAX_CHUNK as u64;
        Self { lanes, connection_window, socket_buffer, reorder_budget }
    }

    /// quinn transport parameters for this link.
    pub fn transport_config(&self, link: &LinkConfig) -> Arc<TransportConfig> {
        let mut t = TransportConfig::default();
        let window = VarInt::from_u64(self.connection_window).unwrap_or(VarInt::MAX);
        t.stream_receive_window(VarInt::from_u64(LANE_WINDOW).unwrap_or(VarInt::MAX))
            .receive_window(window)
            .send_window(self.connection_window)
            .max_concurrent_uni_streams(VarInt::from_u32(8192))
            .max_concurrent_bidi_streams(VarInt::from_u32(2048))
            .initial_rtt(link.rtt)
            .congestion_controller_factory(Arc::new(RateModelConfig { max_rate: link.bandwidth.bytes_per_second() }))
            .keep_alive_interval(Some(KEEP_ALIVE))
            .max_idle_timeout(Some(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).unwrap_or(VarInt::from_u32(20_000).into())));
        Arc::new(t)
    }
}

/// What the kernel granted for the UDP socket buffers.
#[derive(Clone, Copy, Debug)]
pub struct SocketBuffers {
    /// Receive buffer in bytes as reported by the kernel.
    pub recv: usize,
    /// Send buffer in bytes as reported by the kernel.
    pub send: usize,
}

/// Binds the endpoint's UDP socket with large buffers. As root, SO_RCVBUFFORCE/SO_SNDBUFFORCE
/// go past `net.core.rmem_max`/`wmem_max`; otherwise the kernel clamps silently, so the caller
/// logs what was obtained.
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<(UdpSocket, SocketBuffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if set_buffer_force(&socket, libc::SO_RCVBUFFORCE, buffer).is_err() {
        socket.set_recv_buffer_size(buffer)?;
    }
    if set_buffer_force(&socket, libc::SO_SNDBUFFORCE, buffer).is_err() {
        socket.set_send_buffer_size(buffer)?;
    }
    socket.bind(&addr.into())?;
    let granted = SocketBuffers { recv: socket.recv_buffer_size()?, send: socket.send_buffer_size()? };
    Ok((socket.into(), granted))
}

/// SO_RCVBUFFORCE/SO_SNDBUFFORCE (CAP_NET_ADMIN); socket2 does not wrap them.
fn set_buffer_force(socket: &Socket, option: libc::c_int, size: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is a live socket owned by `socket`; the option value points to a c_int that
    // outlives the call and its size is passed correctly.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(bw: &str, rtt_ms: u64) -> LinkConfig {
        LinkConfig { bandwidth: bw.parse().unwrap(), rtt: Duration::from_millis(rtt_ms) }
    }

    #[test]
    fn sizing_follows_bdp() {
        let s = LinkSizing::for_link(&link("1gbit", 150));
        // 18.75 MB BDP × 1.5 in 1 MiB lanes.
        assert_eq!(s.lanes, 27);
        assert_eq!(s.connection_window, 37_500_000);
        let s = LinkSizing::for_link(&link("100mbit", 1));
        assert_eq!(s.lanes, 2);
        assert_eq!(s.connection_window, MIN_WINDOW);
        let s = LinkSizing::for_link(&link("10gbit", 150));
        assert_eq!(s.lanes, MAX_LANES);
    }
}
