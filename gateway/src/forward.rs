//! Ingress: local TCP listeners whose connections are carried to a peer site.
//!
//! Connections are numbered in accept order per forward, so the peer gateway can dial its target
//! in the same order (QEMU's destination takes the first connection as the main channel).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use ferry_api::protocol::{CodecMode, ForwardStats};

use crate::config::ForwardConfig;
use crate::tunnel::flow::FlowCounters;
use crate::tunnel::{FlowError, Tunnel};

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
}

impl Forward {
    /// Binds the forward's listener.
    pub async fn bind(index: u32, config: ForwardConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        Ok(Self { index, config, listener, tally: Arc::default() })
    }

    /// Live counters of the connections this forward carries.
    pub fn tally(&self) -> Arc<ForwardTally> {
        self.tally.clone()
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
            let tally = self.tally.clone();
            tokio::spawn(link.carry(tcp, flow, self.index, seq, self.config.connect, codec, permit, tally));
        }
    }
}

/// Counters of one forward's connections, summed over the open ones (live) and the finished
/// ones, so a host-plugin can watch a migration's progress through the local API.
#[derive(Debug, Default)]
pub struct ForwardTally {
    inner: Mutex<TallyState>,
}

#[derive(Debug, Default)]
struct TallyState {
    open: Vec<Arc<FlowCounters>>,
    finished: ForwardStats,
}

impl ForwardTally {
    pub(crate) fn started(&self, counters: Arc<FlowCounters>) {
        self.lock().open.push(counters);
    }

    pub(crate) fn finished(&self, counters: &Arc<FlowCounters>, result: &Result<(), FlowError>) {
        let mut state = self.lock();
        state.open.retain(|c| !Arc::ptr_eq(c, counters));
        let totals = &mut state.finished;
        add_counters(totals, counters);
        match result {
            Ok(()) => totals.completed += 1,
            Err(e) => {
                totals.failed += 1;
                totals.last_error = Some(e.to_string());
            }
        }
    }

    /// The sums as they stand (without `path`, which belongs to the tunnel).
    pub fn snapshot(&self) -> ForwardStats {
        let state = self.lock();
        let mut stats = state.finished.clone();
        stats.open = state.open.len() as u32;
        for counters in &state.open {
            add_counters(&mut stats, counters);
        }
        stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TallyState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn add_counters(stats: &mut ForwardStats, c: &FlowCounters) {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    stats.tcp_in += get(&c.tcp_in);
    stats.tcp_out += get(&c.tcp_out);
    stats.wire_sent += get(&c.wire_sent);
    stats.wire_acked += get(&c.acked);
    stats.wan_out += get(&c.wan_out);
    stats.wan_in += get(&c.wan_in);
}
