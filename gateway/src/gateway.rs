//! A running gateway: the tunnel endpoint plus its forward listeners, started from a [`Config`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::forward::Forward;
use crate::tunnel::{FlowLog, StatsSnapshot, Tunnel};

/// A gateway running on the current tokio runtime; dropping it shuts it down.
pub struct Gateway {
    tunnel: Arc<Tunnel>,
    forward_addrs: Vec<SocketAddr>,
    api_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
    /// `[shutdown] grace`.
    grace: Duration,
}

impl Gateway {
    /// Binds everything the config names and starts serving. Errors name the config key.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let tunnel = Tunnel::start(&config)?;
        let grace = config.shutdown.grace;
        tracing::info!(shutdown_grace_s = grace.as_secs_f64(), "limits: on SIGTERM/SIGINT, flows get this long to finish");
        let mut tasks = JoinSet::new();
        let mut forward_addrs = Vec::new();
        for (i, fwd) in config.forwards.iter().enumerate() {
            // Nothing owns a configured forward's connections but the gateway.
            let forward = Forward::bind(i as u32, fwd.clone(), CancellationToken::new())
                .await
                .map_err(|e| anyhow::anyhow!("key `forward[{i}].listen`: cannot listen on {}: {e}", fwd.listen))?;
            let addr = forward.local_addr()?;
            tracing::info!(listen = %addr, peer = %fwd.peer, connect = %fwd.connect, "forwarding");
            forward_addrs.push(addr);
            tasks.spawn(forward.run(tunnel.clone()));
        }
        let mut api_addr = None;
        if let Some(api) = &config.api {
            let listener = tokio::net::TcpListener::bind(api.listen)
                .await
                .map_err(|e| anyhow::anyhow!("key `api.listen`: cannot listen on {}: {e}", api.listen))?;
            let addr = listener.local_addr()?;
            tracing::info!(listen = %addr, "host-plugin api");
            api_addr = Some(addr);
            tasks.spawn(crate::api::serve(listener, tunnel.clone(), Arc::new(config.clone())));
        }
        Ok(Self { tunnel, forward_addrs, api_addr, tasks, grace })
    }

    /// The local API's address, if `[api]` is configured.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// The tunnel endpoint's UDP address.
    pub fn quic_addr(&self) -> std::io::Result<SocketAddr> {
        self.tunnel.local_addr()
    }

    /// Bound forward listener addresses, in config order.
    pub fn forward_addrs(&self) -> &[SocketAddr] {
        &self.forward_addrs
    }

    /// Whether a live tunnel connection to `site` exists.
    pub fn is_connected(&self, site: &str) -> bool {
        self.tunnel.peers.current(site).is_some()
    }

    /// Waits up to `timeout` for a live connection to `site`.
    pub async fn wait_connected(&self, site: &str, timeout: std::time::Duration) -> bool {
        self.tunnel.peers.wait(site, timeout).await.is_some()
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.tunnel.stats().snapshot()
    }

    /// The most recent finished flows (a live handle: it keeps filling).
    pub fn flow_log(&self) -> FlowLog {
        self.tunnel.flow_log()
    }

    /// Stops gracefully: stops accepting (forward listeners, API sessions, the peers' new flows:
    /// they are refused), gives the flows that are running up to `[shutdown] grace` to finish,
    /// or until `cut_short` resolves (a second signal), then closes every tunnel connection with
    /// [`SHUTDOWN_CLOSE_CODE`](crate::tunnel::SHUTDOWN_CLOSE_CODE) and its reason: the peers
    /// reset their side of what still runs at once, and so does this gateway.
    pub async fn stop(mut self, cut_short: impl Future<Output = ()>) {
        self.tunnel.drain();
        let open = self.tunnel.open_flows();
        tracing::info!(open_flows = open, grace_s = self.grace.as_secs_f64(), "stopping: accepting nothing new; running flows may finish");
        tokio::select! {
            () = self.tunnel.flows_finished() => tracing::info!("every flow finished"),
            () = tokio::time::sleep(self.grace) => {
                tracing::warn!(open_flows = self.tunnel.open_flows(), "grace period over: resetting the flows still open");
            }
            () = cut_short => {
                tracing::warn!(open_flows = self.tunnel.open_flows(), "stop requested again: resetting the flows still open");
            }
        }
        self.tunnel.close().await;
        self.shutdown();
        tracing::info!("stopped");
    }

    /// Stops listening and closes the tunnel at once.
    pub fn shutdown(&mut self) {
        self.tasks.abort_all();
        self.tunnel.shutdown();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}
