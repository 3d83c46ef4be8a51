//! Client of the local gateway's API (messages in [`ferry_api::protocol`]): opening forwards to
//! the peer site and reading their counters.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_api::framing::{FramingError, JsonLines};
use anyhow::{bail, Context};
use ferry_api::protocol::{CodecMode, ForwardInfo, ForwardStats, GatewayInfo, PathInfo, Request, Response};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayApiError {
    /// Connecting failed.
    #[error("cannot reach the gateway api at {addr}: {source}")]
    Connect {
        /// The API address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed or carried garbage.
    #[error("gateway api: {0}")]
    Framing(#[from] FramingError),
    /// The gateway closed the connection.
    #[error("gateway api: the gateway closed the connection")]
    Closed,
    /// The gateway did not answer in time.
    #[error("gateway api: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout,
    /// The gateway refused the request.
    #[error("gateway refused: {0}")]
    Refused(String),
    /// An answer of the wrong kind.
    #[error("gateway api: unexpected answer {0:?}")]
    Unexpected(Box<Response>),
}

/// A session with the local gateway. Forwards opened through it close when it is dropped.
pub struct GatewayApi {
    lines: JsonLines<OwnedReadHalf, OwnedWriteHalf>,
}

impl GatewayApi {
    /// Connects to the API at `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<Self, GatewayApiError> {
        let tcp = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| GatewayApiError::Connect { addr, source: std::io::ErrorKind::TimedOut.into() })?
            .map_err(|source| GatewayApiError::Connect { addr, source })?;
        let (r, w) = tcp.into_split();
        Ok(Self { lines: JsonLines::new(r, w) })
    }

    async fn call(&mut self, request: Request) -> Result<Response, GatewayApiError> {
        let exchange = async {
            self.lines.send(&request).await?;
            self.lines.recv::<Response>().await?.ok_or(GatewayApiError::Closed)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Err(_) => Err(GatewayApiError::Timeout),
            Ok(Ok(Response::Error(message))) => Err(GatewayApiError::Refused(message)),
            Ok(other) => other,
        }
    }

    /// The gateway's site, link and peers.
    pub async fn hello(&mut self) -> Result<GatewayInfo, GatewayApiError> {
        match self.call(Request::Hello).await? {
            Response::Hello(info) => Ok(info),
            other => Err(GatewayApiError::Unexpected(Box::new(other))),
        }
    }

    /// Opens a forward whose connections come out at `peer`, which dials `connect`.
    pub async fn open_forward(&mut self, peer: &str, connect: SocketAddr, codec: CodecMode) -> Result<ForwardInfo, GatewayApiError> {
        match self.call(Request::OpenForward { peer: peer.to_owned(), connect, codec }).await? {
            Response::Forward(info) => Ok(info),
            other => Err(GatewayApiError::Unexpected(Box::new(other))),
        }
    }

    /// A forward's counters.
    pub async fn forward_stats(&mut self, forward: u32) -> Result<ForwardStats, GatewayApiError> {
        match self.call(Request::ForwardStats { forward }).await? {
            Response::ForwardStats(stats) => Ok(stats),
            other => Err(GatewayApiError::Unexpected(Box::new(other))),
        }
    }

    /// Stops a forward's listener.
    pub async fn close_forward(&mut self, forward: u32) -> Result<(), GatewayApiError> {
        match self.call(Request::CloseForward { forward }).await? {
            Response::Closed => Ok(()),
            other => Err(GatewayApiError::Unexpected(Box::new(other))),
        }
    }
}

/// A control channel's way to the destination host-plugin, through the local gateway.
#[derive(Debug)]
pub struct ControlRoute {
    /// The local gateway.
    pub gateway: GatewayInfo,
    /// The tunnel path to the destination site.
    pub path: PathInfo,
    /// The control forward.
    pub forward: ForwardInfo,
    /// Connected to the control forward: the destination host-plugin is at its other end.
    pub tcp: TcpStream,
}

/// Checks the gateway has a live tunnel to site `to`, opens a control forward (codec off) to the
/// destination host-plugin `dest` (as that site reaches it) and connects to it.
pub async fn open_control(api: &mut GatewayApi, to: &str, dest: SocketAddr) -> anyhow::Result<ControlRoute> {
    let gateway = api.hello().await?;
    let Some(peer) = gateway.peers.iter().find(|p| p.site == to) else {
        let known: Vec<&str> = gateway.peers.iter().map(|p| p.site.as_str()).collect();
        bail!("the gateway at site {} has no peer site `{to}` (its peers: {known:?})", gateway.site);
    };
    let Some(path) = peer.path else { bail!("the gateway at site {} has no live tunnel to {to}", gateway.site) };
    let forward = api.open_forward(to, dest, CodecMode::Off).await?;
    let tcp = TcpStream::connect(forward.listen)
        .await
        .with_context(|| format!("cannot connect to the control forward {}", forward.listen))?;
    Ok(ControlRoute { gateway, path, forward, tcp })
}
