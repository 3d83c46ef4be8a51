//! The gateway's local API for host-plugins: JSON lines over TCP on `[api] listen`.
//!
//! A host-plugin opens forwards on demand (one per migration: its control channel, its
//! migration stream) instead of the operator configuring one per VM, and polls their counters
//! to learn how fast the WAN really drains (QEMU only sees the local hop). Forwards live as long
//! as the API connection that opened them: when it ends (the host-plugin exited, crashed or was
//! killed), its forwards stop listening and every connection they carry is reset at both ends,
//! so a migration whose host-plugin is gone fails at once instead of running unattended.
//!
//! The messages and their framing are in [`ferry_api`] ([`ferry_api::protocol`],
//! [`ferry_api::framing`]), which host-plugins use without linking the gateway.
//!
//! The API has no authentication of its own: bind it to loopback or a management network only
//! the hypervisor hosts reach.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ferry_api::framing::{FramingError, JsonLines};
use ferry_api::protocol::{ForwardInfo, ForwardStats, GatewayInfo, PathInfo, PeerInfo, Request, Response};

use crate::config::{Config, ForwardConfig};
use crate::forward::{Forward, ForwardTally, ForwardTotals};
use crate::tunnel::{PathStats, Tunnel};

/// Forward ids (which double as dial-order keys) of API forwards start here, clear of the
/// configured forwards' indices.
const FIRST_API_FORWARD: u32 = 1 << 20;

/// Most forwards one API session may hold open.
const MAX_FORWARDS_PER_SESSION: usize = 64;

/// Serves the local API on `listener` until the tunnel drains (the gateway stops; sessions
/// already open go on) or the task is dropped.
pub async fn serve(listener: TcpListener, tunnel: Arc<Tunnel>, config: Arc<Config>) {
    let next_id = Arc::new(AtomicU32::new(FIRST_API_FORWARD));
    loop {
        let accepted = tokio::select! {
            biased;
            () = tunnel.draining() => {
                tracing::info!("api stops accepting sessions: the gateway is stopping");
                return;
            }
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "api accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let session = Session {
            remote,
            tunnel: tunnel.clone(),
            config: config.clone(),
            next_id: next_id.clone(),
            forwards: HashMap::new(),
            flows: CancellationToken::new(),
        };
        tokio::spawn(async move {
            tracing::debug!(session = %remote, "api session opened");
            let outcome = session.run(tcp).await;
            match outcome {
                Ok(()) => tracing::debug!(session = %remote, "api session closed"),
                Err(e) => tracing::info!(session = %remote, error = %e, "api session ended"),
            }
        });
    }
}

/// One host-plugin connection and the forwards it opened.
struct Session {
    /// The host-plugin's address: names the session in logs.
    remote: SocketAddr,
    tunnel: Arc<Tunnel>,
    config: Arc<Config>,
    next_id: Arc<AtomicU32>,
    forwards: HashMap<u32, SessionForward>,
    /// Owner of every connection the session's forwards carry (also of forwards it closed):
    /// cancelled when the session ends, which resets them.
    flows: CancellationToken,
}

struct SessionForward {
    peer: String,
    listen: SocketAddr,
    tally: Arc<ForwardTally>,
    task: JoinHandle<()>,
}

impl Drop for Session {
    /// The session ended: its forwards stop listening and the connections they carry are reset.
    fn drop(&mut self) {
        for (id, forward) in &self.forwards {
            forward.task.abort();
            let open = forward.tally.snapshot().open;
            let (session, listen) = (self.remote, forward.listen);
            if open > 0 {
                tracing::warn!(%session, forward = id, %listen, open, "api session ended: forward closed, resetting its connections");
            } else {
                tracing::info!(%session, forward = id, %listen, "api session ended: forward closed");
            }
        }
        self.flows.cancel();
    }
}

impl Session {
    async fn run(mut self, tcp: TcpStream) -> Result<(), FramingError> {
        let local = tcp.local_addr()?;
        let (r, w) = tcp.into_split();
        let mut lines = JsonLines::new(r, w);
        loop {
            let request: Request = match lines.recv().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e @ FramingError::Json(_)) => {
                    // A malformed request gets an answer; the session goes on.
                    lines.send(&Response::Error(e.to_string())).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let response = self.handle(request, local).await;
            lines.send(&response).await?;
        }
    }

    async fn handle(&mut self, request: Request, local: SocketAddr) -> Response {
        match request {
            Request::Hello => Response::Hello(self.info()),
            Request::OpenForward { peer, connect, codec } => {
                if self.tunnel.is_draining() {
                    return Response::Error("the gateway is stopping: no new forwards".into());
                }
                if !self.tunnel.peers.knows(&peer) {
                    let known: Vec<&str> = self.config.peers.iter().map(|p| p.site.as_str()).collect();
                    return Response::Error(format!("unknown peer site `{peer}` (configured peers: {known:?})"));
                }
                if self.forwards.len() >= MAX_FORWARDS_PER_SESSION {
                    return Response::Error(format!("at most {MAX_FORWARDS_PER_SESSION} forwards per session"));
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let config = ForwardConfig { listen: SocketAddr::new(local.ip(), 0), peer: peer.clone(), connect, codec };
                let forward = match Forward::bind(id, config, self.flows.clone()).await {
                    Ok(f) => f,
                    Err(e) => return Response::Error(format!("cannot listen on {}: {e}", local.ip())),
                };
                let listen = match forward.local_addr() {
                    Ok(a) => a,
                    Err(e) => return Response::Error(format!("cannot read the listener's address: {e}")),
                };
                tracing::info!(session = %self.remote, id, %listen, %peer, %connect, ?codec, "api: forwarding");
                let tally = forward.tally();
                let task = tokio::spawn(forward.run(self.tunnel.clone()));
                self.forwards.insert(id, SessionForward { peer, listen, tally, task });
                Response::Forward(ForwardInfo { id, listen })
            }
            Request::ForwardStats { forward } => match self.forwards.get(&forward) {
                None => Response::Error(format!("no forward {forward} in this session")),
                Some(f) => {
                    let path = self.tunnel.path_stats(&f.peer).map(path_info);
                    Response::ForwardStats(forward_stats(f.tally.snapshot(), path))
                }
            },
            Request::CloseForward { forward } => match self.forwards.remove(&forward) {
                None => Response::Error(format!("no forward {forward} in this session")),
                Some(f) => {
                    f.task.abort();
                    Response::Closed
                }
            },
        }
    }

    fn info(&self) -> GatewayInfo {
        GatewayInfo {
            site: self.config.site.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            link_bandwidth_bps: self.config.link.bandwidth.bits_per_second(),
            link_rtt_ms: self.config.link.rtt.as_secs_f64() * 1e3,
            flow_window_bytes: self.tunnel.flow_window(),
            peers: self
                .config
                .peers
                .iter()
                .map(|p| PeerInfo { site: p.site.clone(), path: self.tunnel.path_stats(&p.site).map(path_info) })
                .collect(),
        }
    }
}

fn path_info(path: PathStats) -> PathInfo {
    PathInfo {
        rtt_ms: path.rtt.as_secs_f64() * 1e3,
        cwnd: path.cwnd,
        sent_packets: path.sent_packets,
        lost_packets: path.lost_packets,
    }
}

fn forward_stats(totals: ForwardTotals, path: Option<PathInfo>) -> ForwardStats {
    let ForwardTotals { open, completed, failed, last_error, tcp_in, tcp_out, wire_sent, wire_acked, wan_out, wan_in } = totals;
    ForwardStats { open, completed, failed, last_error, tcp_in, tcp_out, wire_sent, wire_acked, wan_out, wan_in, path }
}
