//! The harness's public face: [`Wan::builder`] configures an emulated WAN
//! link, [`WanBuilder::up`] creates two site namespaces joined by it (with the
//! netem or the userspace backend), and dropping the [`Wan`] removes it all.

use std::ffi::OsStr;
use std::fmt;
use std::net::Ipv4Addr;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::link_params::LinkParams;
use crate::naming::{self, SubnetLease};
use crate::netem_backend::{self, NetemSide, OutageScheduler};
use crate::netns;
use crate::tun::Tun;
use crate::link_params::human_rate;
use crate::userspace_link::{LinkCounters, UserspaceLink};

/// Name of the WAN-facing device inside each site namespace.
pub const WAN_DEVICE: &str = "wan0";
/// Prefix length of the site addresses (`10.77.<n>.0/24`).
pub const PREFIX_LEN: u8 = 24;

/// Which emulator implements the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Netem when the kernel has it, else userspace.
    Auto,
    /// veth + `tc qdisc netem` + `tbf` (needs `sch_netem`).
    Netem,
    /// TUN devices + the in-process emulator threads.
    Userspace,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Netem => "netem",
            Backend::Userspace => "userspace",
        })
    }
}

impl Backend {
    /// Resolves `Auto` by probing for netem; other values are returned as is.
    pub fn resolve(self) -> Backend {
        match self {
            Backend::Auto => match netem_backend::probe() {
                Ok(()) => Backend::Netem,
                Err(reason) => {
                    tracing::info!(%reason, "tc netem unavailable; using the userspace emulator");
                    Backend::Userspace
                }
            },
            other => other,
        }
    }
}

/// Everything that describes an emulated WAN. Rates count IP bytes; loss,
/// delay (RTT/2), jitter, rate and queue apply to each direction.
#[derive(Debug, Clone, PartialEq)]
pub struct WanConfig {
    /// Round-trip time; each direction gets half.
    pub rtt: Duration,
    /// Per-packet delay variation (± this, uniform) on each direction.
    pub jitter: Duration,
    /// Bottleneck rate in bit/s per direction; 0 = unlimited.
    pub rate_bps: u64,
    /// Drop-tail queue at the bottleneck, as the longest queueing delay it admits.
    pub queue: Duration,
    /// Random loss probability per packet and direction (0.001 = 0.1 %).
    pub loss: f64,
    /// Window after `up` during which the link drops everything.
    pub outage: Option<(Duration, Duration)>,
    /// Requested backend.
    pub backend: Backend,
    /// WAN name; namespaces are `<name>-a` and `<name>-b`. `None` = `fnetem-<pid>-<n>`.
    pub name: Option<String>,
    /// Seed for loss and jitter (userspace backend).
    pub seed: u64,
}

impl Default for WanConfig {
    fn default() -> Self {
        WanConfig {
            rtt: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bps: 0,
            queue: Duration::from_millis(50),
            loss: 0.0,
            outage: None,
            backend: Backend::Auto,
            name: None,
            seed: 0x5eed_f311,
        }
    }
}

impl WanConfig {
    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.loss) || !self.loss.is_finite() {
            return Err(Error::InvalidConfig(format!(
                "loss {} is not within 0..=1",
                self.loss
            )));
        }
        if let Some((start, end)) = self.outage {
            if end <= start {
                return Err(Error::InvalidConfig(format!(
                    "outage end {end:?} is not after start {start:?}"
                )));
            }
        }
        if self.rtt > Duration::from_secs(60) || self.jitter > Duration::from_secs(30) {
            return Err(Error::InvalidConfig(
                "rtt above 60s or jitter above 30s".into(),
            ));
        }
        if self.rate_bps != 0 && self.rate_bps < 1000 {
            return Err(Error::InvalidConfig(format!(
                "rate {} bit/s is below 1 kbit/s",
                self.rate_bps
            )));
        }
        if let Some(name) = &self.name {
            netns::validate_name(&format!("{name}-a"))?;
        }
        Ok(())
    }

    /// The parameters of one direction (`a_to_b` selects which; they differ only in seed).
    pub fn link_params(&self, a_to_b: bool) -> LinkParams {
        LinkParams {
            delay: self.rtt / 2,
            jitter: self.jitter,
            rate_bps: self.rate_bps,
            queue: self.queue,
            loss: self.loss,
            outage: self.outage,
            seed: if a_to_b {
                self.seed
            } else {
                self.seed ^ 0xB70A_B70A_B70A_B70A
            },
        }
    }
}

/// Builder for [`Wan`]; see [`Wan::builder`].
#[derive(Debug, Clone, Default)]
pub struct WanBuilder {
    config: WanConfig,
}

impl WanBuilder {
    /// Round-trip time (each direction delays by half).
    pub fn rtt(mut self, rtt: Duration) -> Self {
        self.config.rtt = rtt;
        self
    }
    /// Jitter (± uniform) per direction.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.config.jitter = jitter;
        self
    }
    /// Bottleneck rate in bit/s per direction (0 = unlimited).
    pub fn rate_bps(mut self, bps: u64) -> Self {
        self.config.rate_bps = bps;
        self
    }
    /// Drop-tail queue length in time at the bottleneck rate (default 50 ms).
    pub fn queue(mut self, queue: Duration) -> Self {
        self.config.queue = queue;
        self
    }
    /// Random loss probability per packet and direction (0.001 = 0.1 %).
    pub fn loss(mut self, p: f64) -> Self {
        self.config.loss = p;
        self
    }
    /// Drop everything from `start` to `end` after the WAN comes up.
    pub fn outage(mut self, start: Duration, end: Duration) -> Self {
        self.config.outage = Some((start, end));
        self
    }
    /// Which backend to use (default [`Backend::Auto`]).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.config.backend = backend;
        self
    }
    /// Fixed WAN name (namespaces `<name>-a`, `<name>-b`); fails if they exist.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }
    /// Seed for the userspace emulator's loss and jitter draws.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = seed;
        self
    }
    /// Replaces the whole configuration.
    pub fn config(mut self, config: WanConfig) -> Self {
        self.config = config;
        self
    }

    /// Creates the namespaces and the link. Everything created so far is
    /// removed again if a step fails.
    pub fn up(self) -> Result<Wan> {
        Wan::up(self.config)
    }
}

/// One end of the WAN: a network namespace with address `addr` on device `wan0`
/// (which is also its default route).  Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    netns: String,
    addr: Ipv4Addr,
    peer: Ipv4Addr,
}

impl Site {
    /// The namespace name (as in `ip netns exec NAME`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// This site's address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The other site's address.
    pub fn peer_addr(&self) -> Ipv4Addr {
        self.peer
    }

    /// The WAN-facing device inside the namespace.
    pub fn device(&self) -> &str {
        WAN_DEVICE
    }

    /// A command running `program` in this site (`ip netns exec NS program`); add arguments as usual.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        netns::command(&self.netns, program)
    }

    /// Runs `f` on a new OS thread that first enters this site's namespace.
    /// Sockets (and tokio runtimes) created there live in the site.
    pub fn spawn_thread<F, T>(&self, f: F) -> Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        netns::spawn_in(&self.netns, format!("in-{}", self.netns), f)
    }

    /// Runs `f` inside this site and waits for it; a panic in `f` is resumed here.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.spawn_thread(f)?.join() {
            Ok(v) => Ok(v),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Packet counters of both directions (userspace backend only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    /// Site A to site B.
    pub a_to_b: LinkCounters,
    /// Site B to site A.
    pub b_to_a: LinkCounters,
}

/// A running emulated WAN; dropping it removes everything it created.
#[derive(Debug)]
pub struct Wan {
    name: String,
    config: WanConfig,
    backend: Backend,
    site_a: Site,
    site_b: Site,
    started: Instant,
    /// Namespaces created so far (deleted on teardown).
    created: Vec<String>,
    link: Option<UserspaceLink>,
    outage: Option<OutageScheduler>,
    lease: Option<SubnetLease>,
    torn_down: bool,
}

impl Wan {
    /// Starts configuring a WAN.
    pub fn builder() -> WanBuilder {
        WanBuilder::default()
    }

    fn up(config: WanConfig) -> Result<Wan> {
        config.validate()?;
        if !ferry_testkit::sys::is_root() {
            return Err(Error::NotRoot);
        }
        match naming::sweep_stale() {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "swept leftover namespaces")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not sweep leftover namespaces"),
        }
        let (name, explicit) = match &config.name {
            Some(n) => (n.clone(), true),
            None => (naming::auto_name(), false),
        };
        let (ns_a, ns_b) = naming::site_names(&name);
        for ns in [&ns_a, &ns_b] {
            if netns::exists(ns) {
                if explicit {
                    return Err(Error::AlreadyExists(format!("namespace {ns}")));
                }
                // Our own pid is in the name: whoever made it is gone.
                tracing::warn!(netns = %ns, "removing leftover namespace");
                netns::delete(ns)?;
            }
        }
        let lease = naming::lease_subnet()?;
        let backend = config.backend.resolve();
        let mut wan = Wan {
            name,
            backend,
            site_a: Site {
                netns: ns_a.clone(),
                addr: lease.addr_a(),
                peer: lease.addr_b(),
            },
            site_b: Site {
                netns: ns_b.clone(),
                addr: lease.addr_b(),
                peer: lease.addr_a(),
            },
            config,
            started: Instant::now(),
            created: Vec::new(),
            link: None,
            outage: None,
            lease: Some(lease),
            torn_down: false,
        };
        // From here on, an early return drops `wan`, which removes what exists.
        for ns in [&ns_a, &ns_b] {
            netns::create(ns)?;
            wan.created.push(ns.clone());
        }
        match backend {
            Backend::Userspace | Backend::Auto => wan.start_userspace()?,
            Backend::Netem => wan.start_netem()?,
        }
        tracing::info!(
            name = %wan.name,
            backend = %wan.backend,
            site_a = %format!("{}={}", wan.site_a.netns, wan.site_a.addr),
            site_b = %format!("{}={}", wan.site_b.netns, wan.site_b.addr),
            rtt = ?wan.config.rtt,
            rate = %human_rate(wan.config.rate_bps),
            loss = wan.config.loss,
            "WAN up"
        );
        Ok(wan)
    }

    fn configure_addresses(&self, via_peer: bool) -> Result<()> {
        for site in [&self.site_a, &self.site_b] {
            let ns = site.netns.as_str();
            let addr = format!("{}/{}", site.addr, PREFIX_LEN);
            crate::command::run_args("ip", &["-n", ns, "addr", "add", &addr, "dev", WAN_DEVICE])?;
            // No IPv6 link-local address: keeps router solicitations and MLD
            // reports off the link, so only the traffic under test crosses it.
            crate::command::run_args(
                "ip",
                &["-n", ns, "link", "set", WAN_DEVICE, "addrgenmode", "none"],
            )?;
            crate::command::run_args(
                "ip",
                &[
                    "-n",
                    ns,
                    "link",
                    "set",
                    WAN_DEVICE,
                    "mtu",
                    "1500",
                    "txqueuelen",
                    "4096",
                    "up",
                ],
            )?;
            let peer = site.peer.to_string();
            let route: Vec<&str> = if via_peer {
                vec![
                    "-n", ns, "route", "add", "default", "via", &peer, "dev", WAN_DEVICE,
                ]
            } else {
                vec!["-n", ns, "route", "add", "default", "dev", WAN_DEVICE]
            };
            crate::command::run_args("ip", &route)?;
        }
        Ok(())
    }

    fn start_userspace(&mut self) -> Result<()> {
        let mut tuns = Vec::with_capacity(2);
        for site in [&self.site_a, &self.site_b] {
            let handle = site.spawn_thread(|| Tun::create(WAN_DEVICE))?;
            let tun = handle.join().map_err(|_| {
                Error::io("creating TUN", std::io::Error::other("thread panicked"))
            })??;
            tuns.push(tun);
        }
        self.configure_addresses(false)?;
        let (Some(tun_b), Some(tun_a)) = (tuns.pop(), tuns.pop()) else {
            return Err(Error::io(
                "creating TUN",
                std::io::Error::other("missing device"),
            ));
        };
        let epoch = Instant::now();
        self.link = Some(UserspaceLink::start(
            tun_a,
            tun_b,
            self.config.link_params(true),
            self.config.link_params(false),
            epoch,
        )?);
        self.started = epoch;
        Ok(())
    }

    fn netem_sides(&self) -> (NetemSide, NetemSide) {
        let side = |site: &Site, a_to_b: bool| NetemSide {
            ns: site.netns.clone(),
            dev: WAN_DEVICE.to_string(),
            params: self.config.link_params(a_to_b),
        };
        (side(&self.site_a, true), side(&self.site_b, false))
    }

    fn start_netem(&mut self) -> Result<()> {
        let (a, b) = self.netem_sides();
        if let Err(reason) = netem_backend::probe() {
            return Err(Error::NetemUnavailable(reason));
        }
        crate::command::run_args("ip", &netem_backend::veth_args(&a.ns, &b.ns, WAN_DEVICE))?;
        self.configure_addresses(true)?;
        netem_backend::install(&a)?;
        netem_backend::install(&b)?;
        let epoch = Instant::now();
        if let Some(window) = self.config.outage {
            self.outage = Some(OutageScheduler::start(vec![a, b], epoch, window)?);
        }
        self.started = epoch;
        Ok(())
    }

    /// Starts (`true`) or ends an outage of the link now, both directions (the scheduled
    /// `outage` window is independent of this).
    pub fn set_link_down(&self, down: bool) {
        tracing::info!(down, "WAN outage switch");
        match &self.link {
            Some(link) => link.set_down(down),
            None => {
                let (a, b) = self.netem_sides();
                netem_backend::switch(&[a, b], down);
            }
        }
    }

    /// The WAN's name (namespaces are `<name>-a` and `<name>-b`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Site A (`10.77.<n>.1`).
    pub fn site_a(&self) -> &Site {
        &self.site_a
    }

    /// Site B (`10.77.<n>.2`).
    pub fn site_b(&self) -> &Site {
        &self.site_b
    }

    /// The backend that runs the link (never `Auto`).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The configuration the WAN was built with.
    pub fn config(&self) -> &WanConfig {
        &self.config
    }

    /// When the link started; outage windows count from here.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// Packet counters (userspace backend; `None` for netem or after teardown).
    pub fn stats(&self) -> Option<LinkStats> {
        self.link.as_ref().map(|l| {
            let (a_to_b, b_to_a) = l.counters();
            LinkStats { a_to_b, b_to_a }
        })
    }

    /// Stops the emulator and removes the namespaces (and with them the
    /// devices). Idempotent; also done by `Drop`.
    pub fn down(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        if let Some(mut link) = self.link.take() {
            link.stop();
        }
        if let Some(mut outage) = self.outage.take() {
            outage.stop();
        }
        let mut first_err = None;
        for ns in self.created.drain(..) {
            if let Err(e) = netns::delete(&ns) {
                tracing::warn!(netns = %ns, error = %e, "could not delete namespace");
                first_err.get_or_insert(e);
            }
        }
        self.lease.take();
        tracing::debug!(name = %self.name, "WAN down");
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            tracing::error!(name = %self.name, error = %e, "WAN teardown incomplete");
        }
    }
}

impl fmt::Display for Wan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(f, "WAN {} (backend: {})", self.name, self.backend)?;
        writeln!(
            f,
            "  site A: netns {}  addr {}  dev {}",
            self.site_a.netns, self.site_a.addr, WAN_DEVICE
        )?;
        writeln!(
            f,
            "  site B: netns {}  addr {}  dev {}",
            self.site_b.netns, self.site_b.addr, WAN_DEVICE
        )?;
        write!(
            f,
            "  rtt {:?}  jitter ±{:?}  rate {}  queue {:?}  loss {}%",
            c.rtt,
            c.jitter,
            human_rate(c.rate_bps),
            c.queue,
            c.loss * 100.0
        )?;
        if let Some((a, b)) = c.outage {
            write!(f, "  outage {a:?}..{b:?}")?;
        }
        Ok(())
    }
}

/// Removes the namespaces of WAN `name` (`<name>-a`, `<name>-b`), e.g. left
/// behind by a killed `ferry-netem up`. Returns what was removed.
pub fn down_named(name: &str) -> Result<Vec<String>> {
    netns::validate_name(name)?;
    let (a, b) = naming::site_names(name);
    let mut removed = Vec::new();
    for ns in [a, b] {
        if netns::exists(&ns) {
            netns::delete(&ns)?;
            removed.push(ns);
        }
    }
    Ok(removed)
}

/// Removes every namespace whose name starts with `prefix` (default users
/// pass [`naming::DEFAULT_PREFIX`]), including those of running WANs.
pub fn down_prefix(prefix: &str) -> Result<Vec<String>> {
    if prefix.is_empty() {
        return Err(Error::InvalidConfig(
            "refusing to remove namespaces with an empty prefix".into(),
        ));
    }
    naming::remove_prefixed(prefix)
}
