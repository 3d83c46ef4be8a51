//! A running gateway: the tunnel endpoint plus its forward listeners, started from a [`Config`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use ferry_api::protocol::ApiAddress;

use crate::api::{ApiListener, SocketFile};
use crate::config::{ApiEndpoint, Config};
use crate::forward::Forward;
use crate::tunnel::{FlowLog, StatsSnapshot, Tunnel};

/// A gateway running on the current tokio runtime; dropping it shuts it down.
pub struct Gateway {
    tunnel: Arc<Tunnel>,
    forward_addrs: Vec<SocketAddr>,
    api_address: Option<ApiAddress>,
    /// The API's UNIX socket file: removed when the gateway is dropped.
    _api_socket: Option<SocketFile>,
    tasks: JoinSet<()>,
    /// `[shutdown] grace`.
    grace: Duration,
}

impl Gateway {
    /// Binds everything the config names and starts serving. Errors name the config key.
    pub async fn start(mut config: Config) -> anyhow::Result<Self> {
        // The API first: the tunnel's egress policy refuses its bound TCP address.
        let mut api_socket = None;
        let api = match &mut config.api {
            None => None,
            Some(api) => {
                let mut listener = ApiListener::bind(api).await?;
                api_socket = listener.take_socket_file();
                if let (ApiEndpoint::Tcp { listen, .. }, ApiAddress::Tcp(bound)) = (&mut api.endpoint, listener.address()) {
                    *listen = *bound;
                }
                let auth = match api.endpoint {
                    ApiEndpoint::Unix { mode, .. } => format!("unix socket, mode {mode:o}"),
                    ApiEndpoint::Tcp { .. } => "tcp, token".to_owned(),
                };
                tracing::info!(address = %listener.address(), %auth, max_sessions = api.max_sessions, "host-plugin api");
                Some(listener)
            }
        };
        let tunnel = Tunnel::start(&config)?;
        let grace = config.shutdown.grace;
        tracing::info!(shutdown_grace_s = grace.as_secs_f64(), "limits: on SIGTERM/SIGINT, flows get this long to finish");
        let mut tasks = JoinSet::new();
        let mut forward_addrs = Vec::new();
        for (i, fwd) in config.forwards.iter().enumerate() {
            // Nothing owns a configured forward's connections but the gateway.
            let forward = Forward::bind(i as u32, fwd.clone(), None, CancellationToken::new())
                .await
                .map_err(|e| anyhow::anyhow!("key `forward[{i}].listen`: cannot listen on {}: {e}", fwd.listen))?;
            let addr = forward.local_addr()?;
            let allow_from = fwd.allow_from.as_ref().map_or("any".to_owned(), |nets| format!("{nets:?}"));
            tracing::info!(listen = %addr, peer = %fwd.peer, connect = %fwd.connect, %allow_from, "forwarding");
            forward_addrs.push(addr);
            tasks.spawn(forward.run(tunnel.clone()));
        }
        let api_address = api.as_ref().map(|l| l.address().clone());
        if let Some(listener) = api {
            tasks.spawn(crate::api::serve(listener, tunnel.clone(), Arc::new(config.clone())));
        }
        Ok(Self { tunnel, forward_addrs, api_address, _api_socket: api_socket, tasks, grace })
    }

    /// The local API's address (a TCP port 0 resolved), if `[api]` is configured.
    pub fn api_address(&self) -> Option<&ApiAddress> {
        self.api_address.as_ref()
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
