//! The gateway's local API for host-plugins: JSON lines on a UNIX socket (`[api] socket`, the
//! default) or over TCP (`[api] listen`).
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
//! Who may use it: on the UNIX socket, whoever the file's mode and group let connect (the kernel
//! checks); on TCP, a session whose first request is `auth` with the token of `[api]
//! token_file` (compared in constant time). Anything else is refused, logged, and the session
//! closed. At most `[api] max_sessions` sessions are open at once; more are refused.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ferry_api::framing::{BoxedJsonLines, ByteStream, FramingError};
use ferry_api::protocol::{
    ApiAddress, ForwardInfo, ForwardStats, GatewayInfo, PathInfo, PeerInfo, Request, Response, Token,
};

use crate::config::{ApiConfig, ApiEndpoint, Config, ForwardConfig};
use crate::forward::{Forward, ForwardTally, ForwardTotals};
use crate::tunnel::{PathStats, Tunnel};

/// Forward ids (which double as dial-order keys) of API forwards start here, clear of the
/// configured forwards' indices.
const FIRST_API_FORWARD: u32 = 1 << 20;

/// Most forwards one API session may hold open.
const MAX_FORWARDS_PER_SESSION: usize = 64;

/// Most connections one API forward may be opened for (QEMU's main channel and up to 255
/// multifd channels).
pub const MAX_FORWARD_CONNECTIONS: u32 = 256;

/// How long a TCP session may take to authenticate.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound API listener (see [`ApiListener::bind`]).
pub struct ApiListener {
    kind: ListenerKind,
    address: ApiAddress,
    /// A UNIX socket's file, removed when dropped (see [`ApiListener::take_socket_file`]).
    socket_file: Option<SocketFile>,
}

enum ListenerKind {
    Unix(UnixListener),
    Tcp(TcpListener, Token),
}

/// Removes a UNIX socket's file when dropped.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl ApiListener {
    /// Binds the endpoint `[api]` names: a UNIX socket gets its mode and group before any
    /// client can use it (a stale socket file of a gateway that is gone is replaced); errors name
    /// the key.
    pub async fn bind(config: &ApiConfig) -> anyhow::Result<Self> {
        match &config.endpoint {
            ApiEndpoint::Tcp { listen, token } => {
                let listener = TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("key `api.listen`: cannot listen on {listen}"))?;
                let address = ApiAddress::Tcp(listener.local_addr()?);
                Ok(Self { kind: ListenerKind::Tcp(listener, token.clone()), address, socket_file: None })
            }
            ApiEndpoint::Unix { path, mode, group } => {
                let listener = bind_unix(path).with_context(|| format!("key `api.socket`: cannot listen on {}", path.display()))?;
                let file = SocketFile(path.clone());
                // The socket is created with the process umask's mode (0755 by the default umask
                // 022, which lets nobody else connect: connecting needs write permission) and
                // accepts nothing before `serve` runs, after these.
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
                    .with_context(|| format!("key `api.mode`: cannot chmod {}", path.display()))?;
                if let Some(gid) = group {
                    std::os::unix::fs::chown(path, None, Some(*gid))
                        .with_context(|| format!("key `api.group`: cannot chown {} to group {gid}", path.display()))?;
                }
                Ok(Self { kind: ListenerKind::Unix(listener), address: ApiAddress::Unix(path.clone()), socket_file: Some(file) })
            }
        }
    }

    /// The UNIX socket's file, for an owner that outlives the listener to remove when dropped
    /// (a task's end, and with it the listener's, comes later than its abort).
    pub fn take_socket_file(&mut self) -> Option<SocketFile> {
        self.socket_file.take()
    }

    /// Where it listens (a TCP port 0 resolved).
    pub fn address(&self) -> &ApiAddress {
        &self.address
    }
}

/// Binds a UNIX socket at `path`, creating its folder; a socket file nobody serves any more is
/// replaced, a live one or anything else there is an error.
fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another process serves {} (a gateway already running?)", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    Ok(UnixListener::bind(path)?)
}

/// Serves the local API on `listener` until the tunnel drains (the gateway stops; sessions
/// already open go on) or the task is dropped.
pub async fn serve(listener: ApiListener, tunnel: Arc<Tunnel>, config: Arc<Config>) {
    let Some(api) = config.api.clone() else { return };
    let next_id = Arc::new(AtomicU32::new(FIRST_API_FORWARD));
    let sessions = Arc::new(Semaphore::new(api.max_sessions));
    loop {
        let accepted = tokio::select! {
            biased;
            () = tunnel.draining() => {
                tracing::info!("api stops accepting sessions: the gateway is stopping");
                return;
            }
            accepted = accept(&listener.kind) => accepted,
        };
        let (stream, who) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "api accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = sessions.clone().try_acquire_owned() else {
            tracing::warn!(session = %who.label, max_sessions = api.max_sessions, "api session refused: too many sessions");
            let message = format!("too many api sessions (api.max_sessions = {})", api.max_sessions);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(AUTH_TIMEOUT, BoxedJsonLines::boxed(stream).send(&Response::Error(message))).await;
            });
            continue;
        };
        let forward_ip = api.forward_ip.or(who.local_ip).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let session = Session {
            remote: who.label,
            token: who.token,
            forward_ip,
            tunnel: tunnel.clone(),
            config: config.clone(),
            next_id: next_id.clone(),
            forwards: HashMap::new(),
            flows: CancellationToken::new(),
        };
        tokio::spawn(async move {
            let remote = session.remote.clone();
            tracing::debug!(session = %remote, "api session opened");
            match session.run(stream).await {
                Ok(()) => tracing::debug!(session = %remote, "api session closed"),
                Err(e) => tracing::info!(session = %remote, error = %e, "api session ended"),
            }
            drop(slot);
        });
    }
}

/// Who connected.
struct Client {
    /// Names the session in logs: the TCP address, or the UNIX peer's pid and uid.
    label: String,
    /// The TCP session's local IP (`None` on the UNIX socket).
    local_ip: Option<IpAddr>,
    /// The token the session must present (TCP), `None`: the kernel authenticated it.
    token: Option<Token>,
}

async fn accept(kind: &ListenerKind) -> std::io::Result<(Box<dyn ByteStream>, Client)> {
    match kind {
        ListenerKind::Tcp(listener, token) => {
            let (tcp, remote) = listener.accept().await?;
            let local_ip = Some(tcp.local_addr()?.ip());
            Ok((Box::new(tcp), Client { label: remote.to_string(), local_ip, token: Some(token.clone()) }))
        }
        ListenerKind::Unix(listener) => {
            let (unix, _) = listener.accept().await?;
            let label = match unix.peer_cred() {
                Ok(c) => format!("unix pid={} uid={}", c.pid().map_or("?".into(), |p| p.to_string()), c.uid()),
                Err(_) => "unix".into(),
            };
            Ok((Box::new(unix), Client { label, local_ip: None, token: None }))
        }
    }
}

/// Whether `given` is `expected`, in time independent of where they differ: both are hashed
/// and the digests compared with blake3's constant-time equality (which also hides the length).
fn token_matches(given: &Token, expected: &Token) -> bool {
    blake3::hash(given.0.as_bytes()) == blake3::hash(expected.0.as_bytes())
}

/// One host-plugin connection and the forwards it opened.
struct Session {
    /// Names the session in logs (the host-plugin's address or pid).
    remote: String,
    /// The token still to be presented (TCP, until `auth`); `None`: authenticated.
    token: Option<Token>,
    /// The IP this session's forwards listen on.
    forward_ip: IpAddr,
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
            let (session, listen) = (&self.remote, forward.listen);
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
    async fn run(mut self, stream: Box<dyn ByteStream>) -> Result<(), FramingError> {
        let mut lines = BoxedJsonLines::boxed(stream);
        if let Some(expected) = self.token.take() {
            let first = tokio::time::timeout(AUTH_TIMEOUT, lines.recv::<Request>()).await;
            let refusal = match first {
                Ok(Ok(Some(Request::Auth { token }))) if token_matches(&token, &expected) => None,
                Ok(Ok(Some(Request::Auth { .. }))) => Some("authentication failed: wrong token".to_owned()),
                Ok(Ok(None)) => return Ok(()),
                Err(_) => Some(format!("authentication required within {AUTH_TIMEOUT:?}")),
                Ok(Ok(Some(_)) | Err(FramingError::Json(_))) => Some(
                    "authentication required: the first request of a TCP api session is {\"op\":\"auth\",\"token\":\"...\"}".to_owned(),
                ),
                Ok(Err(e)) => return Err(e),
            };
            if let Some(reason) = refusal {
                tracing::warn!(session = %self.remote, %reason, "api: unauthenticated session refused and closed");
                lines.send(&Response::Error(reason)).await?;
                return Ok(());
            }
            tracing::debug!(session = %self.remote, "api session authenticated");
            lines.send(&Response::Authenticated).await?;
        }
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
            let response = self.handle(request).await;
            lines.send(&response).await?;
        }
    }

    async fn handle(&mut self, request: Request) -> Response {
        match request {
            // Authenticated already (the UNIX socket, or a TCP session past its first request).
            Request::Auth { .. } => Response::Authenticated,
            Request::Hello => Response::Hello(self.info()),
            Request::OpenForward { peer, connect, codec, client, connections } => {
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
                if !(1..=MAX_FORWARD_CONNECTIONS).contains(&connections) {
                    return Response::Error(format!("connections must be 1 to {MAX_FORWARD_CONNECTIONS}, not {connections}"));
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let config = ForwardConfig {
                    listen: SocketAddr::new(self.forward_ip, 0),
                    peer: peer.clone(),
                    connect,
                    codec,
                    allow_from: Some(vec![client.into()]),
                };
                let forward = match Forward::bind(id, config, Some(connections), self.flows.clone()).await {
                    Ok(f) => f,
                    Err(e) => return Response::Error(format!("cannot listen on {}: {e}", self.forward_ip)),
                };
                let listen = match forward.local_addr() {
                    Ok(a) => a,
                    Err(e) => return Response::Error(format!("cannot read the listener's address: {e}")),
                };
                tracing::info!(session = %self.remote, id, %listen, %peer, %connect, ?codec, %client, connections, "api: forwarding");
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
            forward_ip: self.forward_ip,
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
    let ForwardTotals { open, completed, failed, refused, last_error, tcp_in, tcp_out, wire_sent, wire_acked, wan_out, wan_in } = totals;
    ForwardStats { open, completed, failed, refused, last_error, tcp_in, tcp_out, wire_sent, wire_acked, wan_out, wan_in, path }
}
