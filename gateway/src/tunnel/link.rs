//! One live QUIC connection to a peer gateway: opening flows, accepting the peer's flows and
//! lanes, and keeping per-connection ordering state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_codec::{Decoder, DecoderConfig, Encoder, EncoderConfig};
use parking_lot::Mutex;
use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::MIN_SESSION_WINDOW_PAGES;
use crate::store::{AdvertisedIndex, RetainedPages};
use crate::tunnel::flow::{self, FlowCounters, FlowParts, Inbound};
use crate::tunnel::protocol::{self, FlowKey, LaneHeader, LaneKind, Message, CONTROL_MAGIC};
use crate::tunnel::{ConnectionPermit, FlowError, FlowObserver, PathStats, TunnelShared, SHUTDOWN_REASON};

/// How long a flow waits for its predecessor in dial order before going ahead anyway.
const ORDER_WAIT: Duration = Duration::from_secs(10);
/// How long the egress gateway tries to connect to the target.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lane that arrived before its flow's Open waits for it.
const LANE_ORPHAN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the QUIC path's state is logged (debug level).
const PATH_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest pause between two cache advertisements.
const ADVERT_MIN_INTERVAL: Duration = Duration::from_millis(500);
/// Without news from local flows, the cache is re-checked this often (concurrent migrations).
const ADVERT_IDLE_INTERVAL: Duration = Duration::from_secs(2);
/// Average WAN bytes per second cache advertisements may use.
const ADVERT_MAX_RATE: f64 = 512.0 * 1024.0;
/// Remembered ended flows (so late lanes are stopped at once); older entries are forgotten.
const MAX_CLOSED_FLOWS: usize = 4096;

/// The flows of one connection, by key, so lanes find their flow.
#[derive(Default)]
struct FlowRegistry {
    slots: HashMap<FlowKey, Slot>,
    closed_order: std::collections::VecDeque<FlowKey>,
}

enum Slot {
    /// Lanes arrived before the flow registered.
    Waiting(Vec<oneshot::Sender<Arc<Inbound>>>),
    Open(Arc<Inbound>),
    Closed,
}

/// Dial ordering per order key (see `Message::Open::order`).
#[derive(Default)]
struct DialOrder {
    next: u64,
    waiters: HashMap<u64, oneshot::Sender<()>>,
}

/// A connection to a peer gateway.
pub struct PeerLink {
    /// Peer site name (from its certificate).
    pub site: String,
    /// The QUIC connection.
    pub(super) conn: quinn::Connection,
    /// Whether this gateway dialed the connection.
    pub dialed: bool,
    next_flow: AtomicU64,
    order_seq: Mutex<HashMap<u32, u64>>,
    dial_order: Mutex<HashMap<u32, DialOrder>>,
    registry: Mutex<FlowRegistry>,
    shared: Arc<TunnelShared>,
    /// What the peer's page cache holds, per its latest advertisement; used by our encoders.
    advertised: Arc<AdvertisedIndex>,
    /// Poked when our page cache learned pages, so the advertiser sends an update.
    cache_changed: tokio::sync::Notify,
}

impl PeerLink {
    pub(crate) fn new(site: String, conn: quinn::Connection, dialed: bool, shared: Arc<TunnelShared>) -> Arc<Self> {
        Arc::new(Self {
            site,
            conn,
            dialed,
            next_flow: AtomicU64::new(0),
            order_seq: Mutex::new(HashMap::new()),
            dial_order: Mutex::new(HashMap::new()),
            registry: Mutex::new(FlowRegistry::default()),
            shared,
            advertised: Arc::new(AdvertisedIndex::default()),
            cache_changed: tokio::sync::Notify::new(),
        })
    }

    /// Whether the connection is still usable.
    pub fn is_alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// The QUIC path's state as it stands.
    pub fn path_stats(&self) -> PathStats {
        let path = self.conn.stats().path;
        PathStats { rtt: path.rtt, cwnd: path.cwnd, sent_packets: path.sent_packets, lost_packets: path.lost_packets }
    }

    /// Reserves the next flow number and dial position for `order`; call in accept order.
    pub(crate) fn reserve_flow(&self, order: u32) -> (u64, u64) {
        let flow = self.next_flow.fetch_add(1, Ordering::Relaxed);
        let mut seqs = self.order_seq.lock();
        let seq = seqs.entry(order).or_insert(0);
        let mine = *seq;
        *seq += 1;
        (flow, mine)
    }

    /// Carries an accepted local TCP connection to the peer, which dials `connect`. Cancelling
    /// `reset` resets the flow at both ends (its carrier is gone).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn carry(
        self: Arc<Self>,
        tcp: TcpStream,
        flow: u64,
        order: u32,
        seq: u64,
        connect: SocketAddr,
        codec: bool,
        _permit: ConnectionPermit,
        observer: Arc<dyn FlowObserver>,
        reset: CancellationToken,
    ) {
        let _open = self.shared.open_flows.token();
        let started = Instant::now();
        let key = FlowKey { opened_locally: true, id: flow };
        let encoder = codec.then(|| {
            // Until the peer advertised what its decoders accept, stay within what every
            // configuration must accept.
            let window = self.advertised.session_window_pages().unwrap_or(MIN_SESSION_WINDOW_PAGES);
            let defaults = EncoderConfig::default();
            let cfg = EncoderConfig { session_window_pages: window.min(defaults.session_window_pages), ..defaults };
            let retained = Arc::new(RetainedPages::new(self.shared.resupply_budget));
            (Encoder::new(cfg, self.advertised.clone(), retained.clone()), retained)
        });
        let (counters, inbound) = self.begin_flow(key, reset.child_token());
        observer.flow_started(&counters);
        let result = async {
            let (mut send, recv) = self.conn.open_bi().await?;
            let mut hello = protocol::control_preamble().to_vec();
            Message::Open { flow, order, seq, codec, connect }.encode(&mut hello);
            send.write_all(&hello).await?;
            counters.wan_out.fetch_add(hello.len() as u64, Ordering::Relaxed);
            let _ = tcp.set_nodelay(true);
            let parts = self.flow_parts(key, (send, recv), &inbound, &counters, encoder, None);
            flow::run_flow(parts, tcp).await
        }
        .await;
        observer.flow_finished(&counters, &result);
        self.end_flow(key, &inbound, &counters, started, &result);
    }

    /// Serves the peer's flows and lanes until the connection closes.
    pub(crate) async fn serve(self: Arc<Self>) {
        let flows = {
            let link = self.clone();
            async move {
                loop {
                    let (send, recv) = match link.conn.accept_bi().await {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    tokio::spawn(link.clone().accept_flow(send, recv));
                }
            }
        };
        let lanes = {
            let link = self.clone();
            async move {
                loop {
                    let recv = match link.conn.accept_uni().await {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    tokio::spawn(link.clone().accept_lane(recv));
                }
            }
        };
        let advertiser = {
            let link = self.clone();
            async move { link.advertise_cache().await }
        };
        let path_log = {
            let link = self.clone();
            async move {
                loop {
                    tokio::time::sleep(PATH_LOG_INTERVAL).await;
                    link.log_path("tunnel path");
                }
            }
        };
        tokio::select! {
            _ = async { tokio::join!(flows, lanes) } => {}
            _ = advertiser => {}
            _ = path_log => {}
        }
        self.log_path("tunnel path at close");
        // Fail every flow still on this connection: each resets its local connection.
        let slots = std::mem::take(&mut self.registry.lock().slots);
        let mut reset = 0;
        for slot in slots.into_values() {
            if let Slot::Open(inbound) = slot {
                inbound.cancel.cancel();
                reset += 1;
            }
        }
        // E.g. "closed by peer: gateway shutting down (code 3)" when the peer stopped.
        let reason = self.conn.close_reason().map(|r| r.to_string()).unwrap_or_default();
        if reset > 0 {
            tracing::warn!(peer = %self.site, %reason, flows_reset = reset, "tunnel connection closed; its flows are reset");
        } else {
            tracing::info!(peer = %self.site, %reason, "tunnel connection closed");
        }
    }

    async fn accept_flow(self: Arc<Self>, mut send: SendStream, mut recv: RecvStream) {
        let _open = self.shared.open_flows.token();
        let started = Instant::now();
        let open = async {
            let mut preamble = [0u8; 5];
            recv.read_exact(&mut preamble).await.map_err(|_| FlowError::Truncated)?;
            protocol::check_preamble(preamble, CONTROL_MAGIC)?;
            match flow::read_message(&mut recv).await? {
                Some(Message::Open { flow, order, seq, codec, connect }) => Ok((flow, order, seq, codec, connect)),
                other => Err(FlowError::Unexpected(format!("expected Open, got {other:?}"))),
            }
        }
        .await;
        let (flow, order, seq, codec, connect) = match open {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(peer = %self.site, error = %e, "bad flow open from peer");
                let _ = send.reset(flow::FLOW_ABORTED.into());
                return;
            }
        };
        let key = FlowKey { opened_locally: false, id: flow };
        // Register before dialing so the ingress's early data buffers (within the budget).
        let (counters, inbound) = self.begin_flow(key, CancellationToken::new());

        let permit = self.shared.connections.clone().try_acquire_owned();
        self.wait_turn(order, seq).await;
        let dialed = match (permit, self.shared.egress.check(&self.site, &connect)) {
            _ if self.shared.draining.is_cancelled() => Err(SHUTDOWN_REASON.to_owned()),
            (_, Err(refused)) => Err(refused),
            (Err(_), Ok(())) => Err(format!("too many forwarded connections (limits.max_connections = {})", self.shared.max_connections)),
            (Ok(permit), Ok(())) => match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(connect)).await {
                Ok(Ok(tcp)) => Ok((tcp, permit)),
                Ok(Err(e)) => Err(format!("cannot connect to {connect}: {e}")),
                Err(_) => Err(format!("cannot connect to {connect}: timed out after {DIAL_TIMEOUT:?}")),
            },
        };
        self.turn_done(order, seq);
        let result = match dialed {
            Err(reason) => {
                tracing::warn!(peer = %self.site, flow, %connect, %reason, "refusing flow");
                let _ = flow::write_message(&mut send, &Message::Refused(reason.clone())).await;
                let _ = send.finish();
                Err(FlowError::Refused(reason))
            }
            Ok((tcp, _permit)) => {
                let _ = tcp.set_nodelay(true);
                match flow::write_message(&mut send, &Message::Opened).await {
                    Err(e) => Err(e),
                    Ok(()) => {
                        let decoder = codec.then(|| {
                            let cfg = DecoderConfig {
                                max_session_window_pages: self.shared.session_window_pages,
                                max_output_per_push: self.shared.decoder_output,
                                ..DecoderConfig::default()
                            };
                            Decoder::with_config(cfg, self.shared.page_cache.clone())
                        });
                        let parts = self.flow_parts(key, (send, recv), &inbound, &counters, None, decoder);
                        tracing::debug!(peer = %self.site, flow, %connect, "flow connected");
                        flow::run_flow(parts, tcp).await
                    }
                }
            }
        };
        self.end_flow(key, &inbound, &counters, started, &result);
        if codec {
            // The cache just learned this flow's pages; tell the peer soon.
            self.cache_changed.notify_one();
        }
    }

    async fn accept_lane(self: Arc<Self>, mut recv: RecvStream) {
        let mut header = [0u8; LaneHeader::LEN];
        let (key, kind) = match recv.read_exact(&mut header).await {
            Ok(()) => match LaneHeader::decode(header) {
                Ok(h) => (h.flow_key_at_receiver(), h.kind),
                Err(e) => {
                    tracing::warn!(peer = %self.site, error = %e, "bad lane from peer");
                    let _ = recv.stop(flow::FLOW_ABORTED.into());
                    return;
                }
            },
            Err(_) => return,
        };
        if kind == LaneKind::Advert {
            if key.id != protocol::CONNECTION_FLOW {
                let _ = recv.stop(flow::FLOW_ABORTED.into());
                return;
            }
            match flow::read_advert(recv).await {
                Ok(ad) => {
                    tracing::debug!(peer = %self.site, pages = ad.digests.len(), "peer advertised its page cache");
                    self.advertised.install(ad);
                }
                Err(e) => tracing::warn!(peer = %self.site, error = %e, "bad cache advertisement from peer"),
            }
            return;
        }
        let Some(inbound) = self.lane_target(key).await else {
            let _ = recv.stop(flow::FLOW_ABORTED.into());
            return;
        };
        let cancel = inbound.cancel.clone();
        if let Err(e) = inbound.read_lane(recv).await {
            if !cancel.is_cancelled() {
                tracing::warn!(peer = %self.site, flow = key.id, error = %e, "lane failed; aborting flow");
                cancel.cancel();
            }
        }
    }

    /// Logs the QUIC path's state (debug level), the numbers to look at when a link under-delivers.
    fn log_path(&self, what: &str) {
        let stats = self.conn.stats();
        let p = &stats.path;
        tracing::debug!(
            peer = %self.site, rtt_ms = p.rtt.as_secs_f64() * 1e3, cwnd = p.cwnd, mtu = p.current_mtu,
            sent_packets = p.sent_packets, lost_packets = p.lost_packets, congestion_events = p.congestion_events,
            black_holes = p.black_holes_detected, udp_tx_bytes = stats.udp_tx.bytes, udp_rx_bytes = stats.udp_rx.bytes,
            "{what}"
        );
    }

    /// Keeps the peer informed of what our page cache holds: on connect, after codec flows end,
    /// and while the cache changes, at most once per [`ADVERT_MIN_INTERVAL`] and never more than
    /// [`ADVERT_MAX_RATE`] bytes per second on average (a full advertisement each time; the
    /// cache's most recently inserted pages first).
    async fn advertise_cache(&self) {
        let cache = &self.shared.page_cache;
        let mut last_version = None;
        loop {
            let stats = cache.stats();
            let version = (stats.inserts, stats.evictions);
            let mut pause = ADVERT_MIN_INTERVAL;
            if last_version != Some(version) {
                let ad = cache.advertise(self.shared.advertise_max_pages, self.shared.session_window_pages);
                match flow::send_advert(&self.conn, &ad).await {
                    Ok(bytes) => {
                        tracing::debug!(peer = %self.site, pages = ad.digests.len(), bytes, "advertised page cache");
                        last_version = Some(version);
                        pause = pause.max(Duration::from_secs_f64(bytes as f64 / ADVERT_MAX_RATE));
                    }
                    Err(e) => {
                        tracing::debug!(peer = %self.site, error = %e, "could not advertise page cache");
                        return;
                    }
                }
            }
            tokio::time::sleep(pause).await;
            let _ = tokio::time::timeout(ADVERT_IDLE_INTERVAL, self.cache_changed.notified()).await;
        }
    }

    /// Counters and the registered receiving half of a new flow, which `cancel` fails.
    fn begin_flow(&self, key: FlowKey, cancel: CancellationToken) -> (Arc<FlowCounters>, Arc<Inbound>) {
        let counters = Arc::new(FlowCounters::default());
        let inbound = Inbound::new(self.shared.sizing.reorder_budget, counters.clone(), cancel);
        self.register(key, inbound.clone());
        (counters, inbound)
    }

    fn flow_parts(
        &self,
        key: FlowKey,
        (control_send, control_recv): (SendStream, RecvStream),
        inbound: &Arc<Inbound>,
        counters: &Arc<FlowCounters>,
        encoder: Option<(Encoder, Arc<RetainedPages>)>,
        decoder: Option<Decoder>,
    ) -> FlowParts {
        let (encoder, retained) = encoder.unzip();
        FlowParts {
            key,
            conn: self.conn.clone(),
            control_send,
            control_recv,
            inbound: inbound.clone(),
            lanes: self.shared.sizing.lanes,
            counters: counters.clone(),
            encoder,
            retained,
            decoder,
            idle_timeout: self.shared.idle_timeout,
        }
    }

    /// Stops the flow's lane readers, forgets it, and records how it went.
    fn end_flow(&self, key: FlowKey, inbound: &Inbound, counters: &FlowCounters, started: Instant, result: &Result<(), FlowError>) {
        inbound.cancel.cancel();
        self.close(key);
        self.shared.record_flow(counters.record(&self.site, key, started, result), result);
    }

    fn register(&self, key: FlowKey, inbound: Arc<Inbound>) {
        let mut reg = self.registry.lock();
        if let Some(Slot::Waiting(waiters)) = reg.slots.insert(key, Slot::Open(inbound.clone())) {
            for w in waiters {
                let _ = w.send(inbound.clone());
            }
        }
    }

    fn close(&self, key: FlowKey) {
        let mut reg = self.registry.lock();
        reg.slots.insert(key, Slot::Closed);
        reg.closed_order.push_back(key);
        while reg.closed_order.len() > MAX_CLOSED_FLOWS {
            if let Some(old) = reg.closed_order.pop_front() {
                if matches!(reg.slots.get(&old), Some(Slot::Closed)) {
                    reg.slots.remove(&old);
                }
            }
        }
    }

    /// The flow a lane belongs to, waiting briefly if its Open has not been read yet.
    async fn lane_target(&self, key: FlowKey) -> Option<Arc<Inbound>> {
        let rx = {
            let mut reg = self.registry.lock();
            match reg.slots.get_mut(&key) {
                Some(Slot::Open(inbound)) => return Some(inbound.clone()),
                Some(Slot::Closed) => return None,
                Some(Slot::Waiting(waiters)) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    rx
                }
                None => {
                    // Only the peer opens flows we have not seen; our own flows register
                    // before any lane of theirs can exist.
                    if key.opened_locally {
                        return None;
                    }
                    let (tx, rx) = oneshot::channel();
                    reg.slots.insert(key, Slot::Waiting(vec![tx]));
                    rx
                }
            }
        };
        match tokio::time::timeout(LANE_ORPHAN_TIMEOUT, rx).await {
            Ok(Ok(inbound)) => Some(inbound),
            _ => {
                let mut reg = self.registry.lock();
                if matches!(reg.slots.get(&key), Some(Slot::Waiting(_))) {
                    reg.slots.remove(&key);
                }
                None
            }
        }
    }

    /// Waits until the flows before `seq` in `order` have been dialed (or the wait timed out).
    async fn wait_turn(&self, order: u32, seq: u64) {
        let rx = {
            let mut orders = self.dial_order.lock();
            let state = orders.entry(order).or_default();
            if state.next >= seq {
                return;
            }
            let (tx, rx) = oneshot::channel();
            state.waiters.insert(seq, tx);
            rx
        };
        if tokio::time::timeout(ORDER_WAIT, rx).await.is_err() {
            tracing::warn!(peer = %self.site, order, seq, "earlier connection never arrived; dialing out of order");
        }
    }

    fn turn_done(&self, order: u32, seq: u64) {
        let mut orders = self.dial_order.lock();
        let state = orders.entry(order).or_default();
        state.next = state.next.max(seq + 1);
        if let Some(next) = state.waiters.remove(&state.next) {
            let _ = next.send(());
        }
    }
}
