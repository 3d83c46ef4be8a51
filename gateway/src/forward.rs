//! Ingress: local TCP listeners whose connections are carried to a peer site.
//!
//! Connections are numbered in accept order per forward, so the peer gateway can dial its target
//! in the same order (QEMU's destination takes the first connection as the main channel).
//!
//! A forward uses the tunnel's public interface only: it takes a connection permit, waits for
//! the peer's link, hands the connection over, and learns how its flows go through the
//! [`FlowObserver`] it passes along ([`ForwardTally`], summed into [`ForwardTotals`]).
//!
//! A forward admits only the connections it expects: from its `allow_from` networks (an API
//! forward: its one client address) and, for an API forward, only as many as it was opened for.
//! Others are refused (closed at once, before anything is carried), logged and counted.
//!
//! A forward stops accepting when the tunnel drains (the gateway stops; its flows go on), and
//! resets every connection it carries when its owner's token is cancelled (an API session's
//! forwards do not outlive the session).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use ferry_api::protocol::CodecMode;

use crate::config::ForwardConfig;
use crate::tunnel::{ConnectionPermit, FlowCounters, FlowError, FlowObserver, Tunnel};

/// How long an accepted connection waits for the tunnel to its peer before it is dropped.
const PEER_WAIT: Duration = Duration::from_secs(15);

/// A bound forward listener.
pub struct Forward {
    /// Index in the config's `[[forward]]` list; the order key for dialing.
    pub index: u32,
    /// The forward's configuration.
    pub config: ForwardConfig,
    listener: TcpListener,
    tally: Arc<ForwardTally>,
    owner: CancellationToken,
    /// Connections still to admit; `None`: no bound.
    remaining: Option<u32>,
}

impl Forward {
    /// Binds the forward's listener; it admits at most `connections` (`None`: any number).
    /// Cancelling `owner` resets every connection the forward carries, at both ends.
    pub async fn bind(index: u32, config: ForwardConfig, connections: Option<u32>, owner: CancellationToken) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        Ok(Self { index, config, listener, tally: Arc::default(), owner, remaining: connections })
    }

    /// Live counters of the connections this forward carries.
    pub fn tally(&self) -> Arc<ForwardTally> {
        self.tally.clone()
    }

    /// The bound address (useful when the config asks for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections, handing each to the tunnel, until the tunnel drains; then the
    /// listener closes (new connections are refused) and the connections carried go on.
    pub async fn run(mut self, tunnel: Arc<Tunnel>) {
        let peer = self.config.peer.clone();
        loop {
            let accepted = tokio::select! {
                biased;
                () = tunnel.draining() => {
                    let listen = self.listener.local_addr().unwrap_or(self.config.listen);
                    tracing::info!(%listen, "forward stops accepting: the gateway is stopping");
                    return;
                }
                accepted = self.accept(&tunnel) => accepted,
            };
            let Some((tcp, remote, permit)) = accepted else { return };
            if let Err(reason) = self.admit(remote.ip()) {
                let listen = self.listener.local_addr().unwrap_or(self.config.listen);
                tracing::warn!(%listen, %remote, %reason, "forward refuses a connection");
                self.tally.refused.fetch_add(1, Ordering::Relaxed);
                drop((tcp, permit));
                continue;
            }
            // Waiting here (not in a spawned task) keeps accept order = flow order.
            let Some(link) = tunnel.peers.wait(&peer, PEER_WAIT).await else {
                tracing::warn!(%remote, %peer, "no tunnel to peer; dropping connection");
                continue;
            };
            let (flow, seq) = link.reserve_flow(self.index);
            tracing::debug!(%remote, %peer, flow, seq, "carrying connection");
            let codec = self.config.codec == CodecMode::Auto;
            let observer: Arc<dyn FlowObserver> = self.tally.clone();
            let carry = link.carry(tcp, flow, self.index, seq, self.config.connect, codec, permit, observer, self.owner.clone());
            tokio::spawn(carry);
        }
    }

    /// Whether a connection from `client` is one this forward expects; counts it if so.
    fn admit(&mut self, client: IpAddr) -> Result<(), String> {
        if let Some(nets) = &self.config.allow_from {
            if !nets.iter().any(|n| n.contains(&client)) {
                return Err(format!("{client} is not in the forward's allow_from list"));
            }
        }
        match &mut self.remaining {
            Some(0) => Err("the forward already took every connection it was opened for".into()),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The next connection with its permit; `None` once the tunnel is shut down.
    async fn accept(&self, tunnel: &Tunnel) -> Option<(TcpStream, SocketAddr, ConnectionPermit)> {
        loop {
            // Take a connection permit before accepting: at the limit, new connections wait in
            // the kernel's backlog instead of piling up here.
            let permit = tunnel.connection_permit().await?;
            match self.listener.accept().await {
                Ok((tcp, remote)) => return Some((tcp, remote, permit)),
                Err(e) => {
                    tracing::warn!(listen = %self.config.listen, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Counters of one forward's connections, summed over the open ones (live) and the finished
/// ones, so a host-plugin can watch a migration's progress through the local API.
#[derive(Debug, Default)]
pub struct ForwardTally {
    inner: Mutex<TallyState>,
    /// Connections refused before they were carried.
    refused: AtomicU32,
}

/// A forward's counters: its connections, and the bytes of the open and the finished ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardTotals {
    /// Connections being carried now.
    pub open: u32,
    /// Connections that completed.
    pub completed: u32,
    /// Connections that failed.
    pub failed: u32,
    /// Connections refused before they were carried (not expected by the forward).
    pub refused: u32,
    /// The latest failure's reason.
    pub last_error: Option<String>,
    /// Bytes read from local connections (towards the peer).
    pub tcp_in: u64,
    /// Bytes written to local connections (from the peer).
    pub tcp_out: u64,
    /// Wire bytes handed to QUIC towards the peer.
    pub wire_sent: u64,
    /// Wire bytes the peer acknowledged as delivered to its target.
    pub wire_acked: u64,
    /// Bytes sent on the WAN for these connections, framing included.
    pub wan_out: u64,
    /// Bytes received from the WAN for these connections, framing included.
    pub wan_in: u64,
}

impl ForwardTotals {
    fn add(&mut self, c: &FlowCounters) {
        let t = c.totals();
        self.tcp_in += t.tcp_in;
        self.tcp_out += t.tcp_out;
        self.wire_sent += t.wire_sent.get();
        self.wire_acked += t.acked.get();
        self.wan_out += t.wan_out;
        self.wan_in += t.wan_in;
    }
}

#[derive(Debug, Default)]
struct TallyState {
    open: Vec<Arc<FlowCounters>>,
    finished: ForwardTotals,
}

impl FlowObserver for ForwardTally {
    fn flow_started(&self, counters: &Arc<FlowCounters>) {
        self.lock().open.push(counters.clone());
    }

    fn flow_finished(&self, counters: &Arc<FlowCounters>, result: &Result<(), FlowError>) {
        let mut state = self.lock();
        state.open.retain(|c| !Arc::ptr_eq(c, counters));
        let totals = &mut state.finished;
        totals.add(counters);
        match result {
            Ok(()) => totals.completed += 1,
            Err(e) => {
                totals.failed += 1;
                totals.last_error = Some(e.to_string());
            }
        }
    }
}

impl ForwardTally {
    /// The sums as they stand.
    pub fn snapshot(&self) -> ForwardTotals {
        let state = self.lock();
        let mut totals = state.finished.clone();
        totals.open = state.open.len() as u32;
        totals.refused = self.refused.load(Ordering::Relaxed);
        for counters in &state.open {
            totals.add(counters);
        }
        totals
    }

    fn lock(&self) -> MutexGuard<'_, TallyState> {
        self.inner.lock()
    }
}
