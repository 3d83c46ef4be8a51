//! Two real Ferry gateways, one in each site of a [`Wan`], for end-to-end tests and benchmarks.
//!
//! Each gateway runs on its own OS thread inside its site's namespace, with its own tokio
//! runtime, configured through the real TOML parser with certificates from the real
//! `ferry-gateway certs` code (both through the test kit's `pki` and `gateway_config`). Site A
//! forwards `127.0.0.1:<port>` (in A's namespace) to `connect` in site B. Both serve the
//! host-plugin API on a UNIX socket in the pair's folder (path sockets are not bound to a network
//! namespace, so a host-plugin in the site's namespace reaches it); API forwards listen on
//! 127.0.0.1 in the gateway's namespace. Dropping the pair stops both gateways and joins their threads.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_api::protocol::ApiAddress;
use ferry_gateway::tunnel::FlowLog;
use ferry_gateway::Gateway;
use ferry_testkit::gateway_config::GatewayConfig;
use ferry_testkit::pki::Pki;

use crate::wan::{Site, Wan};

/// Errors starting the pair.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// Certificates or config could not be created.
    #[error("gateway setup failed: {0}")]
    Setup(String),
    /// A gateway failed to start or connect.
    #[error("gateway at {site} failed: {message}")]
    Gateway {
        /// Which site.
        site: &'static str,
        /// Why.
        message: String,
    },
}

/// Link description handed to both gateways' `[link]`.
#[derive(Clone, Debug)]
pub struct PairLink {
    /// `link.bandwidth`, e.g. `"1gbit"`.
    pub bandwidth: String,
    /// `link.rtt`, e.g. `"150ms"`.
    pub rtt: String,
    /// Whether site A's forward runs the page codec (`codec = "auto"`) or forwards raw bytes.
    pub codec: bool,
}

/// What a started gateway reports back.
struct Started {
    forwards: Vec<SocketAddr>,
    flows: FlowLog,
    api: ApiAddress,
}

/// A running gateway pair.
pub struct GatewayPair {
    /// Site A's forward listener (an address inside site A's namespace).
    pub forward_addr: SocketAddr,
    /// Finished flows at site A's gateway (live handle).
    pub flows_a: FlowLog,
    /// Finished flows at site B's gateway (live handle).
    pub flows_b: FlowLog,
    /// Site A's host-plugin API (a UNIX socket).
    pub api_a: ApiAddress,
    /// Site B's host-plugin API (a UNIX socket).
    pub api_b: ApiAddress,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    pki: Pki,
}

const QUIC_PORT: u16 = 4433;

/// The config of `name`'s gateway in `me`, peered with `peer`; with `forward`, a forward to that
/// address behind the peer.
fn site_config(name: &str, me: &Site, peer: (&str, &Site), link: &PairLink, forward: Option<SocketAddr>, dir: &Path) -> GatewayConfig {
    let config = GatewayConfig::new(name, SocketAddr::from((me.addr(), QUIC_PORT)))
        .link(&link.bandwidth, &link.rtt)
        .peer(peer.0, SocketAddr::from((peer.1.addr(), QUIC_PORT)))
        .api_socket(&dir.join(format!("{name}-api.sock")));
    match forward {
        Some(connect) => config.forward_with_codec(peer.0, connect, if link.codec { "auto" } else { "off" }),
        None => config,
    }
}

impl GatewayPair {
    /// Starts gateways in both sites of `wan`; A forwards to `connect` (an address in site B).
    /// Returns once both report a live tunnel connection.
    pub fn start(wan: &Wan, link: PairLink, connect: SocketAddr) -> Result<Self, PairError> {
        Self::start_with(wan, link, connect, "")
    }

    /// [`GatewayPair::start`] with more TOML in site B's config (e.g. a small `[cache]`).
    pub fn start_with(wan: &Wan, link: PairLink, connect: SocketAddr, b_extra: &str) -> Result<Self, PairError> {
        let pki = Pki::generate(&["site-a", "site-b"]).map_err(|e| PairError::Setup(e.to_string()))?;
        let a_config = site_config("site-a", wan.site_a(), ("site-b", wan.site_b()), &link, Some(connect), pki.path());
        let b_config = site_config("site-b", wan.site_b(), ("site-a", wan.site_a()), &link, None, pki.path()).extra(b_extra);
        let mut pair = Self {
            forward_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            flows_a: FlowLog::default(),
            flows_b: FlowLog::default(),
            api_a: ApiAddress::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
            api_b: ApiAddress::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
            stops: Vec::new(),
            threads: Vec::new(),
            pki,
        };
        let b = pair.spawn("site-b", wan.site_b(), &b_config, None)?;
        let a = pair.spawn("site-a", wan.site_a(), &a_config, Some("site-b"))?;
        let a_forwards = a.forwards;
        pair.flows_a = a.flows;
        pair.flows_b = b.flows;
        pair.api_a = a.api;
        pair.api_b = b.api;
        pair.forward_addr = *a_forwards.first().ok_or_else(|| PairError::Setup("no forward at site A".into()))?;
        Ok(pair)
    }

    /// Starts one gateway in `site_ns`; with `wait_for`, ready means connected to that peer.
    fn spawn(&mut self, site: &'static str, site_ns: &Site, config: &GatewayConfig, wait_for: Option<&'static str>) -> Result<Started, PairError> {
        let config = config.load(self.pki.path(), &format!("{site}.toml")).map_err(|e| PairError::Setup(e.to_string()))?;
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Started, String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = site_ns
            .spawn_thread(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let gateway = match Gateway::start(config).await {
                        Ok(g) => g,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("{e:#}")));
                            return;
                        }
                    };
                    if let Some(peer) = wait_for {
                        if !gateway.wait_connected(peer, Duration::from_secs(30)).await {
                            let _ = ready_tx.send(Err(format!("no tunnel to {peer} within 30 s")));
                            return;
                        }
                    }
                    let Some(api) = gateway.api_address().cloned() else {
                        let _ = ready_tx.send(Err("no api address".into()));
                        return;
                    };
                    let _ = ready_tx.send(Ok(Started { forwards: gateway.forward_addrs().to_vec(), flows: gateway.flow_log(), api }));
                    let _ = stop_rx.await;
                    drop(gateway);
                });
            })
            .map_err(|e| PairError::Gateway { site, message: e.to_string() })?;
        self.threads.push(thread);
        self.stops.push(stop_tx);
        let forwards = ready_rx
            .recv_timeout(Duration::from_secs(40))
            .map_err(|_| PairError::Gateway { site, message: "did not start".into() })?
            .map_err(|message| PairError::Gateway { site, message })?;
        Ok(forwards)
    }
}

impl Drop for GatewayPair {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
