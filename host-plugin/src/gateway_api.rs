//! Client of the local gateway's API (messages in [`ferry_api::protocol`]): opening forwards to
//! the peer site and reading their counters. It reaches the gateway on its UNIX socket, or over
//! TCP with the token (`ferry_api::protocol`'s authentication).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_api::framing::{BoxedJsonLines, ByteStream, FramingError};
use anyhow::{bail, Context};
use ferry_api::protocol::{ApiAddress, CodecMode, ForwardInfo, ForwardStats, GatewayInfo, PathInfo, Request, Response, Token};
use tokio::net::{TcpStream, UnixStream};

/// Where `ferry-host` looks for the gateway's API by default (the gateway's default
/// `[api] socket`).
pub const DEFAULT_GATEWAY_SOCKET: &str = "/run/ferry/gateway.sock";

/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayApiError {
    /// Connecting failed.
    #[error("cannot reach the gateway api at {addr}: {source}")]
    Connect {
        /// The API address.
        addr: ApiAddress,
        /// Why.
        source: std::io::Error,
    },
    /// A TCP API needs a token, and none was given.
    #[error("the gateway api at {0} is TCP: it needs its token (--gateway-token-file)")]
    NoToken(SocketAddr),
    /// The token file could not be read.
    #[error("cannot read the gateway api token {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
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

/// Where the local gateway's API is and how to authenticate to it.
#[derive(Clone, Debug)]
pub struct GatewayEndpoint {
    /// Its UNIX socket or TCP address.
    pub address: ApiAddress,
    /// The token a TCP API needs.
    pub token: Option<Token>,
}

impl GatewayEndpoint {
    /// The gateway at `address`, with the token read from `token_file` (white space around it
    /// trimmed, as the gateway reads its own).
    pub fn new(address: ApiAddress, token_file: Option<&Path>) -> Result<Self, GatewayApiError> {
        let token = match token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| GatewayApiError::TokenFile { path: path.to_owned(), source })?;
                Some(Token(text.trim().to_owned()))
            }
        };
        Ok(Self { address, token })
    }
}

/// A session with the local gateway. Forwards opened through it close when it is dropped.
pub struct GatewayApi {
    lines: BoxedJsonLines,
}

impl GatewayApi {
    /// Connects to the API (and authenticates on TCP).
    pub async fn connect(endpoint: &GatewayEndpoint) -> Result<Self, GatewayApiError> {
        let addr = endpoint.address.clone();
        if let (ApiAddress::Tcp(tcp), None) = (&addr, &endpoint.token) {
            return Err(GatewayApiError::NoToken(*tcp));
        }
        let connect = async {
            Ok::<Box<dyn ByteStream>, std::io::Error>(match &addr {
                ApiAddress::Unix(path) => Box::new(UnixStream::connect(path).await?),
                ApiAddress::Tcp(tcp) => Box::new(TcpStream::connect(tcp).await?),
            })
        };
        let stream = tokio::time::timeout(REQUEST_TIMEOUT, connect)
            .await
            .map_err(|_| GatewayApiError::Connect { addr: addr.clone(), source: std::io::ErrorKind::TimedOut.into() })?
            .map_err(|source| GatewayApiError::Connect { addr: addr.clone(), source })?;
        let mut api = Self { lines: BoxedJsonLines::boxed(stream) };
        if let Some(token) = &endpoint.token {
            match api.call(Request::Auth { token: token.clone() }).await? {
                Response::Authenticated => {}
                other => return Err(GatewayApiError::Unexpected(Box::new(other))),
            }
        }
        Ok(api)
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

    /// Opens a forward whose connections come out at `peer`, which dials `connect`; it accepts
    /// `connections` connections, from `client` only.
    pub async fn open_forward(
        &mut self,
        peer: &str,
        connect: SocketAddr,
        codec: CodecMode,
        client: IpAddr,
        connections: u32,
    ) -> Result<ForwardInfo, GatewayApiError> {
        match self.call(Request::OpenForward { peer: peer.to_owned(), connect, codec, client, connections }).await? {
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

/// The address this host connects from towards `ip` (the kernel's route choice; a UDP
/// `connect` sends nothing). A forward is opened for this client: this host-plugin, or a QEMU on
/// the same host.
pub fn local_ip_towards(ip: IpAddr) -> std::io::Result<IpAddr> {
    let any: SocketAddr = if ip.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(any)?;
    // Any port: nothing is sent.
    socket.connect((ip, 9))?;
    Ok(socket.local_addr()?.ip())
}

/// Checks the gateway has a live tunnel to site `to`, opens a control forward (codec off, one
/// connection from this host) to the destination host-plugin `dest` (as that site reaches it)
/// and connects to it.
pub async fn open_control(api: &mut GatewayApi, to: &str, dest: SocketAddr) -> anyhow::Result<ControlRoute> {
    let gateway = api.hello().await?;
    let Some(peer) = gateway.peers.iter().find(|p| p.site == to) else {
        let known: Vec<&str> = gateway.peers.iter().map(|p| p.site.as_str()).collect();
        bail!("the gateway at site {} has no peer site `{to}` (its peers: {known:?})", gateway.site);
    };
    let Some(path) = peer.path else { bail!("the gateway at site {} has no live tunnel to {to}", gateway.site) };
    let client = local_ip_towards(gateway.forward_ip)
        .with_context(|| format!("no route to the gateway's forward address {}", gateway.forward_ip))?;
    let forward = api.open_forward(to, dest, CodecMode::Off, client, 1).await?;
    let tcp = TcpStream::connect(forward.listen)
        .await
        .with_context(|| format!("cannot connect to the control forward {}", forward.listen))?;
    Ok(ControlRoute { gateway, path, forward, tcp })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tcp_api_needs_a_token() {
        let endpoint = GatewayEndpoint::new("127.0.0.1:9".parse().unwrap(), None).unwrap();
        let err = GatewayApi::connect(&endpoint).await.err().expect("refused before connecting");
        assert!(matches!(err, GatewayApiError::NoToken(_)), "{err}");
        assert!(err.to_string().contains("--gateway-token-file"), "{err}");
        let missing = GatewayEndpoint::new("127.0.0.1:9".parse().unwrap(), Some(Path::new("/nonexistent/token")));
        assert!(matches!(missing, Err(GatewayApiError::TokenFile { .. })));
    }

    #[test]
    fn the_client_address_is_the_route_towards_the_gateway() {
        assert_eq!(local_ip_towards("127.0.0.1".parse().unwrap()).unwrap(), "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
