//! Ingress: local TCP listeners whose connections are carried to a peer site.
//!
//! Connections are numbered in accept order per forward, so the peer gateway can dial its target
//! in the same order (QEMU's destination takes the first connection as the main channel).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{CodecMode, ForwardConfig};
use crate::tunnel::Tunnel;

/// How long an accepted connection waits for the tunnel to its peer before it is dropped.
const PEER_WAIT: Duration = Duration::from_secs(15);

/// A bound forward listener.
pub struct Forward {
    /// Index in the config's `[[forward]]` list; the order key for dialing.
    pub index: u32,
    /// The forward's configuration.
    pub config: ForwardConfig,
    listener: TcpListener,
}

impl Forward {
    /// Binds the forward's listener.
    pub async fn bind(index: u32, config: ForwardConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        Ok(Self { index, config, listener })
    }

    /// The bound address (useful when the config asks for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections forever, handing each to the tunnel.
    pub async fn run(self, tunnel: Arc<Tunnel>) {
        let peer = self.config.peer.clone();
        loop {
            // Take a connection permit before accepting: at the limit, new connections wait in
            // the kernel's backlog instead of piling up here.
            let Ok(permit) = tunnel.shared.connections.clone().acquire_owned().await else { return };
            let (tcp, remote) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(listen = %self.config.listen, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Waiting here (not in a spawned task) keeps accept order = flow order.
            let Some(link) = tunnel.peers.wait(&peer, PEER_WAIT).await else {
                tracing::warn!(%remote, %peer, "no tunnel to peer; dropping connection");
                continue;
            };
            let (flow, seq) = link.reserve_flow(self.index);
            tracing::debug!(%remote, %peer, flow, seq, "carrying connection");
            let codec = self.config.codec == CodecMode::Auto;
            tokio::spawn(link.carry(tcp, flow, self.index, seq, self.config.connect, codec, permit));
        }
    }
}
