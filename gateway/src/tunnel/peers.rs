//! The tunnel endpoint and its peers: accepting and dialing, checking who the peer is, and
//! keeping exactly one live connection per peer site.
//!
//! Either gateway may dial. When both connections come up, both gateways keep the one dialed by
//! the site whose name sorts first and close the other, so they agree without talking. The other
//! site waits a short grace period before dialing to make that race rare.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, PeerConfig};
use crate::store::PageCache;
use crate::tls::{self, TunnelTls};
use crate::tunnel::link::PeerLink;
use crate::tunnel::transport::{self, LinkSizing};
use crate::tunnel::{ConnectionPermit, FlowLog, PathStats, TunnelShared, TunnelStats};

/// Close code: this connection duplicates a preferred one.
const CLOSE_DUPLICATE: u32 = 1;
/// Close code: the peer is not allowed.
const CLOSE_REFUSED: u32 = 2;
/// Application close code of every tunnel connection a gateway closes because it stops; the
/// peer resets the flows it carried at once (their local TCP connections see a reset).
pub const SHUTDOWN_CLOSE_CODE: u32 = 3;
/// The reason sent with [`SHUTDOWN_CLOSE_CODE`]; the peer logs it, and its flows fail with
/// "tunnel connection lost: closed by peer: gateway shutting down (code 3)".
pub const SHUTDOWN_REASON: &str = "gateway shutting down";
/// How long a closing tunnel waits for its flows to reset their local sockets, and then for the
/// close to reach the peers.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How long the endpoint stays up after closing its connections: one keep-alive interval and
/// a round trip's margin (see [`Tunnel::close`]).
const CLOSE_LINGER: Duration = Duration::from_millis(super::transport::KEEP_ALIVE.as_millis() as u64 + 1000);
/// First reconnect delay, doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Delay before the non-preferred side dials, so the preferred side usually wins.
const GRACE: Duration = Duration::from_millis(1500);

/// The current connection per configured peer site.
pub struct PeerTable {
    slots: HashMap<String, watch::Sender<Option<Arc<PeerLink>>>>,
}

impl PeerTable {
    fn new(peers: &[PeerConfig]) -> Self {
        Self { slots: peers.iter().map(|p| (p.site.clone(), watch::channel(None).0)).collect() }
    }

    /// Whether `site` is a configured peer.
    pub fn knows(&self, site: &str) -> bool {
        self.slots.contains_key(site)
    }

    /// The live connection to `site`, if any.
    pub fn current(&self, site: &str) -> Option<Arc<PeerLink>> {
        self.slots.get(site)?.borrow().clone().filter(|l| l.is_alive())
    }

    /// Waits up to `timeout` for a live connection to `site`.
    pub async fn wait(&self, site: &str, timeout: Duration) -> Option<Arc<PeerLink>> {
        let mut rx = self.slots.get(site)?.subscribe();
        let wait = async { rx.wait_for(|l| l.as_ref().is_some_and(|l| l.is_alive())).await.ok().and_then(|l| l.clone()) };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }
}

/// The QUIC endpoint of a gateway and the connections to its peers.
pub struct Tunnel {
    /// This gateway's site.
    pub local_site: String,
    endpoint: quinn::Endpoint,
    /// Connections per peer.
    pub peers: PeerTable,
    /// State shared with every connection.
    shared: Arc<TunnelShared>,
    client_config: quinn::ClientConfig,
    tasks: parking_lot::Mutex<JoinSet<()>>,
}

/// Failure to start the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// TLS material unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The page cache directory is unusable.
    #[error("key `cache.dir`: {0}")]
    CacheDir(#[from] crate::store::PageDirError),
    /// The UDP socket could not be bound.
    #[error("key `listen`: cannot bind UDP {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl Tunnel {
    /// Binds the endpoint, then starts accepting peers and dialing every configured peer.
    pub fn start(config: &Config) -> Result<Arc<Self>, TunnelError> {
        let tls = TunnelTls::load(&config.tls)?;
        let mut sizing = LinkSizing::for_link(&config.link);
        if let Some(budget) = config.limits.reorder_buffer {
            // Below one chunk the buffer could not hold a single out-of-order record.
            sizing.reorder_budget = budget.0.max(crate::tunnel::protocol::MAX_CHUNK as u64);
        }
        let transport = sizing.transport_config(&config.link);
        let (socket, buffers) = transport::bind_udp(config.listen, sizing.socket_buffer)
            .map_err(|source| TunnelError::Bind { addr: config.listen, source })?;
        if buffers.recv < sizing.socket_buffer {
            tracing::warn!(
                requested = sizing.socket_buffer, granted = buffers.recv,
                "UDP receive buffer smaller than requested (not root? raise net.core.rmem_max); bursts may be dropped"
            );
        }
        let mut server_config = quinn::ServerConfig::with_crypto(tls.server);
        server_config.transport_config(transport.clone());
        let mut client_config = quinn::ClientConfig::new(tls.client);
        client_config.transport_config(transport);
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| TunnelError::Bind { addr: config.listen, source })?;
        let local_addr = endpoint.local_addr().unwrap_or(config.listen);
        tracing::info!(
            site = %config.site, %local_addr, lanes = sizing.lanes,
            connection_window = sizing.connection_window, udp_recv_buffer = buffers.recv,
            udp_send_buffer = buffers.send, reorder_budget = sizing.reorder_budget,
            "tunnel endpoint up"
        );
        tracing::info!(
            max_connections = config.limits.max_connections,
            reorder_memory_bound_mib = (config.limits.max_connections as u64 * 2 * sizing.reorder_budget) >> 20,
            page_cache_mib = config.cache.size.0 >> 20,
            session_window_mib_per_codec_connection = (config.cache.session_window_pages * 4096) >> 20,
            decoder_output_per_call = config.limits.decoder_output.0,
            idle_timeout_s = config.limits.idle_timeout.as_secs_f64(),
            "memory bounds: flow reorder buffers, page cache, decoder output"
        );
        for (i, peer) in config.peers.iter().enumerate() {
            match peer.allow_connect.as_slice() {
                [] => tracing::warn!(peer = %peer.site, "key `peer[{i}].allow_connect` is absent or empty: this peer's flows may dial nothing"),
                rules => {
                    let rules: Vec<String> = rules.iter().map(ToString::to_string).collect();
                    tracing::info!(peer = %peer.site, ?rules, "egress: this peer's flows may dial these (never this gateway's own ports)");
                }
            }
        }
        let cache_bytes = usize::try_from(config.cache.size.0).unwrap_or(usize::MAX);
        let page_cache = Arc::new(match &config.cache.dir {
            Some(dir) => PageCache::with_dir(cache_bytes, dir).map_err(TunnelError::CacheDir)?,
            None => PageCache::new(cache_bytes),
        });
        let shared = Arc::new(TunnelShared {
            sizing,
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            max_connections: config.limits.max_connections,
            stats: TunnelStats::default(),
            flow_log: FlowLog::default(),
            page_cache,
            advertise_max_pages: config.cache.advertise_max_pages,
            session_window_pages: config.cache.session_window_pages,
            decoder_output: usize::try_from(config.limits.decoder_output.0).unwrap_or(usize::MAX),
            resupply_budget: usize::try_from(config.cache.resupply_budget.0).unwrap_or(usize::MAX),
            egress: config.egress_policy(local_addr),
            idle_timeout: config.limits.idle_timeout,
            draining: CancellationToken::new(),
            open_flows: TaskTracker::new(),
        });
        let tunnel = Arc::new(Self {
            local_site: config.site.clone(),
            endpoint,
            peers: PeerTable::new(&config.peers),
            shared,
            client_config,
            tasks: parking_lot::Mutex::new(JoinSet::new()),
        });
        {
            let mut tasks = tunnel.tasks.lock();
            tasks.spawn(tunnel.clone().accept_loop());
            for peer in &config.peers {
                tasks.spawn(tunnel.clone().dial_loop(peer.clone()));
            }
        }
        Ok(tunnel)
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Counters.
    pub fn stats(&self) -> &TunnelStats {
        &self.shared.stats
    }

    /// The most recent finished flows (a live handle: it keeps filling).
    pub fn flow_log(&self) -> FlowLog {
        self.shared.flow_log.clone()
    }

    /// Waits for the right to carry one more forwarded connection (`[limits]
    /// max_connections`, shared with the connections the peers have us dial). `None` once the
    /// tunnel is shut down.
    pub async fn connection_permit(&self) -> Option<ConnectionPermit> {
        self.shared.connections.clone().acquire_owned().await.ok().map(ConnectionPermit)
    }

    /// Encoded bytes one flow direction can hold between the ingress handing them to its lanes
    /// and the egress delivering them: the per-flow credit, which is the egress's reorder
    /// budget (an ingress never sends past the delivered offset the egress acked plus that
    /// budget, whatever the lanes' stream windows would allow).
    pub fn flow_window(&self) -> u64 {
        self.shared.sizing.reorder_budget
    }

    /// The QUIC path to `site` as it stands, if connected.
    pub fn path_stats(&self, site: &str) -> Option<PathStats> {
        self.peers.current(site).map(|link| link.path_stats())
    }

    /// Stops taking new flows: the peers' new flows are refused (the peer resets their local
    /// connections) and [`draining`](Self::draining) resolves, so forwards stop accepting. Flows
    /// already open go on, and the connections stay up.
    pub fn drain(&self) {
        self.shared.draining.cancel();
        self.shared.open_flows.close();
    }

    /// Resolves once [`drain`](Self::drain) was called.
    pub async fn draining(&self) {
        self.shared.draining.cancelled().await
    }

    /// Whether [`drain`](Self::drain) was called.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.is_cancelled()
    }

    /// Flows open now, both directions.
    pub fn open_flows(&self) -> usize {
        self.shared.open_flows.len()
    }

    /// Resolves when no flow is open any more, once [`drain`](Self::drain) was called.
    pub async fn flows_finished(&self) {
        self.shared.open_flows.wait().await
    }

    /// Closes every connection with [`SHUTDOWN_CLOSE_CODE`] and [`SHUTDOWN_REASON`] (the peers
    /// reset their side of every flow at once) and refuses new ones; waits, up to
    /// [`CLOSE_WAIT`] each, for the flows still open here to reset their local connections and
    /// for the close to reach the peers; then stops dialing.
    pub async fn close(&self) {
        self.drain();
        let closed_at = tokio::time::Instant::now();
        self.endpoint.close(SHUTDOWN_CLOSE_CODE.into(), SHUTDOWN_REASON.as_bytes());
        if tokio::time::timeout(CLOSE_WAIT, self.flows_finished()).await.is_err() {
            tracing::warn!(open = self.open_flows(), "flows still open {CLOSE_WAIT:?} after the tunnel closed");
        }
        if tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await.is_err() {
            tracing::warn!("peers did not confirm the close within {CLOSE_WAIT:?}");
        }
        // The close is one packet, sent behind whatever the link still queues: on a congested
        // path it can be dropped, and quinn forgets a connection 3 PTO after closing it. Keep
        // the socket up until the peer's next keep-alive has come in, so that it is answered
        // (CONNECTION_CLOSE, or a stateless reset) instead of the peer waiting out its idle
        // timeout.
        tokio::time::sleep_until(closed_at + CLOSE_LINGER).await;
        self.tasks.lock().abort_all();
    }

    /// Closes every connection and stops dialing at once (the close may not reach the peers).
    pub fn shutdown(&self) {
        self.tasks.lock().abort_all();
        self.endpoint.close(SHUTDOWN_CLOSE_CODE.into(), SHUTDOWN_REASON.as_bytes());
    }

    /// Whether connections dialed by us are the ones both sides keep.
    fn we_are_preferred_dialer(&self, peer: &str) -> bool {
        self.local_site.as_str() < peer
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let tunnel = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(e) => {
                        tunnel.shared.stats.peers_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%remote, error = %e, "refused incoming tunnel connection: handshake failed");
                        return;
                    }
                };
                let names = tls::peer_site_names(&conn);
                let Some(site) = names.iter().find(|n| tunnel.peers.knows(n)).cloned() else {
                    tunnel.shared.stats.peers_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%remote, sites = ?names, "refused incoming tunnel connection: certificate names no configured peer site");
                    conn.close(CLOSE_REFUSED.into(), b"site is not a configured peer");
                    return;
                };
                tracing::info!(%remote, peer = %site, "accepted tunnel connection");
                tunnel.install(PeerLink::new(site, conn, false, tunnel.shared.clone()));
            });
        }
    }

    async fn dial_loop(self: Arc<Self>, peer: PeerConfig) {
        let Some(slot) = self.peers.slots.get(&peer.site) else { return };
        let mut rx = slot.subscribe();
        let mut backoff = MIN_BACKOFF;
        loop {
            if rx.wait_for(|l| !l.as_ref().is_some_and(|l| l.is_alive())).await.is_err() {
                return;
            }
            if self.is_draining() {
                // A stopping gateway takes no new flows: a new connection would carry nothing.
                return;
            }
            if !self.we_are_preferred_dialer(&peer.site) {
                tokio::time::sleep(GRACE).await;
                if self.peers.current(&peer.site).is_some() {
                    continue;
                }
            }
            let connecting = match self.endpoint.connect_with(self.client_config.clone(), peer.addr, &peer.site) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(peer = %peer.site, addr = %peer.addr, error = %e, "cannot dial peer");
                    tokio::time::sleep(MAX_BACKOFF).await;
                    continue;
                }
            };
            match connecting.await {
                Ok(conn) => {
                    backoff = MIN_BACKOFF;
                    tracing::info!(peer = %peer.site, addr = %peer.addr, "dialed tunnel connection");
                    self.install(PeerLink::new(peer.site.clone(), conn, true, self.shared.clone()));
                    // Give the connection a moment to settle before checking again.
                    tokio::time::sleep(MIN_BACKOFF).await;
                }
                Err(e) => {
                    tracing::debug!(peer = %peer.site, addr = %peer.addr, error = %e, retry_in = ?backoff, "dial failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Makes `link` the peer's connection unless a preferred live one exists.
    fn install(self: &Arc<Self>, link: Arc<PeerLink>) {
        self.shared.stats.connections_established.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = self.peers.slots.get(&link.site) else { return };
        let preferred = self.we_are_preferred_dialer(&link.site);
        let is_preferred = |l: &PeerLink| l.dialed == preferred;
        let mut installed = false;
        slot.send_if_modified(|current| {
            match current {
                Some(old) if old.is_alive() && (is_preferred(old) || !is_preferred(&link)) => {
                    link.conn.close(CLOSE_DUPLICATE.into(), b"duplicate connection");
                    false
                }
                _ => {
                    if let Some(old) = current.replace(link.clone()) {
                        old.conn.close(CLOSE_DUPLICATE.into(), b"replaced by preferred connection");
                    }
                    installed = true;
                    true
                }
            }
        });
        if !installed {
            tracing::debug!(peer = %link.site, "closed duplicate tunnel connection");
            return;
        }
        let tunnel = self.clone();
        let mut tasks = self.tasks.lock();
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            link.clone().serve().await;
            if let Some(slot) = tunnel.peers.slots.get(&link.site) {
                slot.send_if_modified(|current| {
                    if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &link)) {
                        *current = None;
                        true
                    } else {
                        false
                    }
                });
            }
        });
    }
}
