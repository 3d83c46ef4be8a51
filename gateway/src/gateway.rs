//! A running gateway: the tunnel endpoint plus its forward listeners, started from a [`Config`].

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinSet;

use crate::config::Config;
use crate::forward::Forward;
use crate::tunnel::{FlowLog, StatsSnapshot, Tunnel};

/// A gateway running on the current tokio runtime; dropping it shuts it down.
pub struct Gateway {
    tunnel: Arc<Tunnel>,
    forward_addrs: Vec<SocketAddr>,
    api_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
}

impl Gateway {
    /// Binds everything the config names and starts serving. Errors name the config key.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let tunnel = Tunnel::start(&config)?;
        let mut tasks = JoinSet::new();
        let mut forward_addrs = Vec::new();
        for (i, fwd) in config.forwards.iter().enumerate() {
            let forward = Forward::bind(i as u32, fwd.clone())
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
        Ok(Self { tunnel, forward_addrs, api_addr, tasks })
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

    /// Stops listening and closes the tunnel.
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
