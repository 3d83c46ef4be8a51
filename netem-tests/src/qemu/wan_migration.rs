//! Live migration between the two sites of an emulated [`Wan`], either through a
//! [`GatewayPair`] or directly, with a report of what it cost.
//!
//! The source VM runs in site A, the destination (started with
//! [`super::QemuConfig::incoming_defer`]) in site B. See [`migrate_over_wan`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_gateway::tunnel::FlowRecord;
use ferry_qmp::migration::{MigrationMode, MigrationPair, MigrationSetup};
use ferry_qmp::{MigrationInfo, RamStats, UNLIMITED_BANDWIDTH};

use super::{check_ram_then_resume, Qemu, QemuError, RamComparison, Result};
use crate::gateway_pair::GatewayPair;
use crate::wan::{LinkStats, Wan};

/// How long to wait, after the migration completed, for the gateways to log
/// the migration's flows as finished.
const FLOW_LOG_WAIT: Duration = Duration::from_secs(30);

/// Which way the migration streams cross the WAN.
#[derive(Clone, Copy)]
pub enum WanRoute<'a> {
    /// Through the gateways: the destination listens on `connect` (the
    /// site-B address `pair` forwards to, as given to
    /// [`GatewayPair::start`]); the source dials `pair.forward_addr` (the
    /// forward listener inside site A).
    Gateways {
        /// The running pair.
        pair: &'a GatewayPair,
        /// The pair's `connect` address in site B.
        connect: SocketAddr,
    },
    /// Straight across the WAN: the destination listens on `listen` (an
    /// address of site B) and the source dials it.
    Direct {
        /// Where the destination listens (site B's address and a port).
        listen: SocketAddr,
    },
}

impl std::fmt::Debug for WanRoute<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WanRoute::Gateways { pair, connect } => write!(
                f,
                "Gateways {{ forward: {}, connect: {connect} }}",
                pair.forward_addr
            ),
            WanRoute::Direct { listen } => write!(f, "Direct {{ listen: {listen} }}"),
        }
    }
}

/// What one migration across the WAN did.
#[derive(Debug, Clone)]
pub struct WanMigrationReport {
    /// The source's final `query-migrate` (status `completed`).
    pub info: MigrationInfo,
    /// QEMU's `total-time`, ms.
    pub total_time_ms: Option<u64>,
    /// QEMU's `downtime`, ms.
    pub downtime_ms: Option<u64>,
    /// QEMU's RAM statistics (source side).
    pub ram: RamStats,
    /// Wall time from `migrate` until the source reported `completed` and the
    /// destination had loaded the state (before the RAM check).
    pub wall_time: Duration,
    /// The RAM equality check at cutover (always equal in a returned report: a difference is
    /// [`QemuError::RamMismatch`]).
    pub ram_check: RamComparison,
    /// The last `tick N` the source printed (it stops ticking once paused).
    pub src_last_tick: Option<u64>,
    /// The first `tick N` the destination printed after taking over.
    pub dst_first_tick: u64,
    /// Gateway A's records of this migration's flows (empty for
    /// [`WanRoute::Direct`]), in the order they finished.
    pub flows_a: Vec<FlowRecord>,
    /// Gateway B's records of this migration's flows (empty for
    /// [`WanRoute::Direct`]).
    pub flows_b: Vec<FlowRecord>,
    /// Link counters accumulated during the migration (userspace WAN backend
    /// only; includes anything else crossing the link meanwhile, e.g. the
    /// tunnel's keep-alives).
    pub link: Option<LinkStats>,
}

impl WanMigrationReport {
    /// Sum of `wan_out` at gateway A over this migration's flows (bytes the
    /// ingress gateway sent towards B, framing included).
    pub fn wan_out_a(&self) -> u64 {
        self.flows_a.iter().map(|r| r.wan_out).sum()
    }

    /// Sum of `wan_in` at gateway A (return path bytes received from B).
    pub fn wan_in_a(&self) -> u64 {
        self.flows_a.iter().map(|r| r.wan_in).sum()
    }

    /// Sum of `tcp_in` at gateway A: the bytes the source QEMU sent.
    pub fn tcp_in_a(&self) -> u64 {
        self.flows_a.iter().map(|r| r.tcp_in).sum()
    }

    /// IP bytes the emulated link delivered in both directions during the
    /// migration (userspace backend), else `None`.
    pub fn link_bytes(&self) -> Option<u64> {
        self.link
            .map(|s| s.a_to_b.delivered_bytes + s.b_to_a.delivered_bytes)
    }

    /// Checks the gateways' records of this migration: `expected` flows at
    /// each side, none failed, A's (ingress, `opened_locally`) matched with
    /// B's (egress) by flow number, and the bytes read from the TCP socket on
    /// one side equal (blake3 and length) the bytes written on the other, in
    /// both directions.
    pub fn check_flows(&self, expected: usize) -> std::result::Result<(), String> {
        if self.flows_a.len() != expected || self.flows_b.len() != expected {
            return Err(format!(
                "expected {expected} flows at each gateway, got {} at A and {} at B",
                self.flows_a.len(),
                self.flows_b.len()
            ));
        }
        for a in &self.flows_a {
            if !a.opened_locally {
                return Err(format!("flow {} at A was not opened at A", a.flow));
            }
            if let Some(e) = &a.error {
                return Err(format!("flow {} failed at A: {e}", a.flow));
            }
            let matches: Vec<&FlowRecord> = self
                .flows_b
                .iter()
                .filter(|b| b.flow == a.flow && !b.opened_locally)
                .collect();
            let [b] = matches.as_slice() else {
                return Err(format!(
                    "flow {} at A has {} egress records at B",
                    a.flow,
                    matches.len()
                ));
            };
            if let Some(e) = &b.error {
                return Err(format!("flow {} failed at B: {e}", b.flow));
            }
            if a.tcp_in != b.tcp_out || a.tcp_in_digest != b.tcp_out_digest {
                return Err(format!(
                    "flow {}: source->destination bytes differ: A read {} bytes ({}), B wrote {} ({})",
                    a.flow,
                    a.tcp_in,
                    hex8(&a.tcp_in_digest),
                    b.tcp_out,
                    hex8(&b.tcp_out_digest)
                ));
            }
            if b.tcp_in != a.tcp_out || b.tcp_in_digest != a.tcp_out_digest {
                return Err(format!(
                    "flow {}: return path bytes differ: B read {} bytes ({}), A wrote {} ({})",
                    a.flow,
                    b.tcp_in,
                    hex8(&b.tcp_in_digest),
                    a.tcp_out,
                    hex8(&a.tcp_out_digest)
                ));
            }
        }
        Ok(())
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "QEMU total {:?} ms, downtime {:?} ms, wall {:.2} s, transferred {} B ({} multifd), {} dirty syncs, ticks {:?} -> {}, {} RAM pages equal at cutover",
            self.total_time_ms,
            self.downtime_ms,
            self.wall_time.as_secs_f64(),
            self.ram.transferred,
            self.ram.multifd_bytes.unwrap_or(0),
            self.ram.dirty_sync_count,
            self.src_last_tick,
            self.dst_first_tick,
            self.ram_check.pages
        );
        if !self.flows_a.is_empty() {
            s += &format!(
                "; {} flows, tcp_in(A) {} B, wan_out(A) {} B, wan_in(A) {} B",
                self.flows_a.len(),
                self.tcp_in_a(),
                self.wan_out_a(),
                self.wan_in_a()
            );
        }
        if let Some(b) = self.link_bytes() {
            s += &format!("; link {b} B");
        }
        s
    }
}

fn hex8(d: &[u8; 32]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Source-side settings of [`migrate_over_wan_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WanMigrationOptions {
    /// `max-bandwidth` of the source, bytes/s ([`UNLIMITED_BANDWIDTH`] by
    /// default). A low limit stretches the first pass over RAM so that QEMU
    /// measures a low bandwidth and iterates (with a small `downtime-limit`)
    /// instead of completing right after the first pass.
    pub max_bandwidth: u64,
}

impl Default for WanMigrationOptions {
    fn default() -> Self {
        WanMigrationOptions {
            max_bandwidth: UNLIMITED_BANDWIDTH,
        }
    }
}

fn sub(after: LinkStats, before: LinkStats) -> LinkStats {
    let d = |a: crate::LinkCounters, b: crate::LinkCounters| crate::LinkCounters {
        received: a.received - b.received,
        delivered: a.delivered - b.delivered,
        delivered_bytes: a.delivered_bytes - b.delivered_bytes,
        lost: a.lost - b.lost,
        queue_drops: a.queue_drops - b.queue_drops,
        outage_drops: a.outage_drops - b.outage_drops,
        overflow_drops: a.overflow_drops - b.overflow_drops,
        write_errors: a.write_errors - b.write_errors,
    };
    LinkStats {
        a_to_b: d(after.a_to_b, before.a_to_b),
        b_to_a: d(after.b_to_a, before.b_to_a),
    }
}

/// Live-migrates `src` (running in `wan`'s site A) into `dst` (started in
/// site B with [`super::QemuConfig::incoming_defer`]) along `route`.
///
/// Sets the same capabilities and parameters on both ends: `mode` (main
/// channel, or multifd with its channels and compression), `return-path` on
/// and `max-bandwidth` = [`UNLIMITED_BANDWIDTH`]. The destination runs
/// `migrate-incoming tcp:<listen>`; the source `migrate
/// tcp:127.0.0.1:<forward port>` through the gateways, or `tcp:<listen>`
/// directly. Waits (each step bounded by `timeout`) until the source is
/// `completed` and the destination (started
/// [`held_at_cutover`](super::QemuConfig::held_at_cutover)) loaded and paused, compares
/// both guests' RAM ([`super::check_ram_then_resume`]) and resumes the destination, then
/// until it printed its first tick, and, through the gateways, both gateways logged the
/// migration's `mode.connections()` flows as finished.
///
/// A failed migration is [`QemuError::Migration`] with QEMU's `error-desc`; RAM that
/// differs at cutover is [`QemuError::RamMismatch`] (the destination stays paused).
/// Other migration settings made beforehand (capabilities such as `xbzrle`,
/// `downtime-limit`) are left as they are.
pub fn migrate_over_wan(
    src: &mut Qemu,
    dst: &mut Qemu,
    wan: &Wan,
    route: WanRoute<'_>,
    mode: &MigrationMode,
    timeout: Duration,
) -> Result<WanMigrationReport> {
    migrate_over_wan_with(
        src,
        dst,
        wan,
        route,
        mode,
        timeout,
        &WanMigrationOptions::default(),
    )
}

/// [`migrate_over_wan`] with other source settings (`max-bandwidth`).
pub fn migrate_over_wan_with(
    src: &mut Qemu,
    dst: &mut Qemu,
    wan: &Wan,
    route: WanRoute<'_>,
    mode: &MigrationMode,
    timeout: Duration,
    options: &WanMigrationOptions,
) -> Result<WanMigrationReport> {
    let (listen, uri) = match route {
        WanRoute::Gateways { pair, connect } => (
            connect,
            format!("tcp:127.0.0.1:{}", pair.forward_addr.port()),
        ),
        WanRoute::Direct { listen } => (listen, format!("tcp:{listen}")),
    };
    let (flows_a0, flows_b0) = match route {
        WanRoute::Gateways { pair, .. } => {
            (pair.flows_a.records().len(), pair.flows_b.records().len())
        }
        WanRoute::Direct { .. } => (0, 0),
    };
    if flows_a0 >= ferry_gateway::tunnel::FlowLog::CAPACITY - 64 {
        return Err(QemuError::Protocol(
            "the gateways' flow logs are nearly full: use a fresh GatewayPair".into(),
        ));
    }

    // Same settings on both ends; the destination never limits its bandwidth.
    let setup = MigrationSetup {
        mode: mode.clone(),
        return_path: Some(true),
        source_max_bandwidth: Some(options.max_bandwidth),
        destination_max_bandwidth: Some(UNLIMITED_BANDWIDTH),
    };
    let (source, destination) = (src.qmp(), dst.qmp());
    let pair = MigrationPair::new(source.client(), destination.client());
    source.block_on(async {
        pair.configure(&setup).await?;
        pair.listen_tcp(listen).await
    })?;

    let link0 = wan.stats();
    tracing::info!(src = src.name(), dst = dst.name(), %uri, ?route, ?mode, "migrating across the WAN");
    let completed = source.block_on(pair.migrate(&uri, timeout))?;
    let (info, wall_time) = (completed.info, completed.wall_time);
    let ram_check = check_ram_then_resume(src, dst, timeout)?;
    let src_last_tick = src.serial().last_tick();
    let dst_first_tick = dst.serial().wait_next_tick_from(0, timeout)?;

    let (flows_a, flows_b) = match route {
        WanRoute::Gateways { pair, .. } => {
            let want = mode.connections();
            let deadline = Instant::now() + FLOW_LOG_WAIT;
            loop {
                let a: Vec<FlowRecord> = pair.flows_a.records().split_off(flows_a0);
                let b: Vec<FlowRecord> = pair.flows_b.records().split_off(flows_b0);
                if a.len() >= want && b.len() >= want {
                    break (a, b);
                }
                if Instant::now() >= deadline {
                    return Err(QemuError::timeout(
                        format!(
                            "the gateways to log {want} finished flows (A has {}, B has {})",
                            a.len(),
                            b.len()
                        ),
                        FLOW_LOG_WAIT,
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        WanRoute::Direct { .. } => (Vec::new(), Vec::new()),
    };
    let link = match (link0, wan.stats()) {
        (Some(before), Some(after)) => Some(sub(after, before)),
        _ => None,
    };

    let report = WanMigrationReport {
        total_time_ms: info.total_time,
        downtime_ms: info.downtime,
        ram: info.ram.clone().unwrap_or_default(),
        info,
        wall_time,
        ram_check,
        src_last_tick,
        dst_first_tick,
        flows_a,
        flows_b,
        link,
    };
    tracing::info!("migration across the WAN completed: {}", report.summary());
    Ok(report)
}
