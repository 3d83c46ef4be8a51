//! Messages of the gateway's local API (JSON lines, see [`crate::framing`]).
//!
//! A host-plugin connects, asks for a forward to a host at a peer site, and polls that forward's
//! statistics while a migration runs. Forwards belong to the API session that opened them: when
//! the session's connection closes, its forwards stop accepting and every connection they carry
//! is reset at both ends (the host-plugin that ran the migration is gone). A host-plugin that
//! exits normally therefore waits until its forwards carry nothing (`ForwardStats::open` = 0)
//! before it closes the session.
//!
//! # Authentication
//! The gateway serves the API on a UNIX socket (`[api] socket`), whose file mode and group say
//! who may connect: a session there is authenticated by the kernel and needs no more. On a TCP
//! API (`[api] listen`) the first request of every session must be [`Request::Auth`] with the
//! token of the gateway's `[api] token_file`, answered with [`Response::Authenticated`]:
//!
//! ```text
//! -> {"op":"auth","token":"<the token file's text, surrounding white space trimmed>"}
//! <- "authenticated"
//! ```
//!
//! Any other first request, or a wrong token, is answered with [`Response::Error`], logged, and
//! the gateway closes the session. `Auth` on a UNIX socket is answered `Authenticated` as well,
//! so a client may always send it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Page codec use on a forward: the `codec` key of a configured `[[forward]]` and the `codec`
/// of [`Request::OpenForward`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecMode {
    /// Detect QEMU migration streams and encode their pages; compress anything else.
    #[default]
    Auto,
    /// Forward bytes unchanged.
    Off,
}

/// A request from a host-plugin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Authenticates a TCP session (see the module's documentation): its first request.
    /// Answered with [`Response::Authenticated`]. Its `Debug` form does not show the token.
    Auth {
        /// The token, as the gateway's `[api] token_file` holds it (white space trimmed).
        token: Token,
    },
    /// Who are you, which peers, what link. Answered with [`Response::Hello`].
    Hello,
    /// Open a TCP listener whose connections come out at `peer`, which dials `connect`.
    /// Answered with [`Response::Forward`].
    OpenForward {
        /// Peer site name.
        peer: String,
        /// Address the peer gateway dials (resolved at the peer site's side of the WAN).
        connect: SocketAddr,
        /// Whether the page codec encodes the connections.
        codec: CodecMode,
        /// The only address the forward accepts connections from: the host of the QEMU (or
        /// host-plugin) that will connect. Others are refused and logged.
        client: IpAddr,
        /// How many connections the forward accepts (a migration's main channel plus its
        /// multifd channels; 1 for a control channel). Further ones are refused and logged.
        connections: u32,
    },
    /// Counters of a forward opened in this session. Answered with [`Response::ForwardStats`].
    ForwardStats {
        /// The forward's id.
        forward: u32,
    },
    /// Stop a forward's listener; the connections it carries go on (and are reset if the session
    /// ends first). Answered with [`Response::Closed`].
    CloseForward {
        /// The forward's id.
        forward: u32,
    },
}

/// The gateway's answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// See [`Request::Auth`].
    Authenticated,
    /// See [`Request::Hello`].
    Hello(GatewayInfo),
    /// See [`Request::OpenForward`].
    Forward(ForwardInfo),
    /// See [`Request::ForwardStats`].
    ForwardStats(ForwardStats),
    /// See [`Request::CloseForward`].
    Closed,
    /// The request failed; the message says why.
    Error(String),
}

/// What a gateway is and what it is connected to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatewayInfo {
    /// This gateway's site.
    pub site: String,
    /// Gateway version.
    pub version: String,
    /// `link.bandwidth`, bits per second.
    pub link_bandwidth_bps: u64,
    /// `link.rtt`, milliseconds.
    pub link_rtt_ms: f64,
    /// Encoded bytes one forwarded connection can hold between this gateway reading it and the
    /// peer delivering it (the tunnel's per-flow credit: the peer's reorder budget): the bound
    /// on `wire_sent - wire_acked` of each open connection, so a host-plugin knows how far its
    /// source can run ahead of the WAN. 0 from a gateway that does not report it.
    #[serde(default)]
    pub flow_window_bytes: u64,
    /// Configured peers.
    pub peers: Vec<PeerInfo>,
    /// The IP forwards opened in this session listen on: a client finds the address it will
    /// connect from (the `client` of [`Request::OpenForward`]) by routing towards it.
    pub forward_ip: IpAddr,
}

/// One configured peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Site name.
    pub site: String,
    /// The live tunnel connection's path, if connected.
    pub path: Option<PathInfo>,
}

/// The QUIC path to a peer as quinn sees it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathInfo {
    /// Smoothed round-trip time, milliseconds.
    pub rtt_ms: f64,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// Packets sent on the connection so far.
    pub sent_packets: u64,
    /// Packets declared lost so far.
    pub lost_packets: u64,
}

/// A forward opened for the session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForwardInfo {
    /// Id for later requests.
    pub id: u32,
    /// Where the local side connects (the API connection's local address, ephemeral port).
    pub listen: SocketAddr,
}

/// A forward's counters, summed over every connection it carried (open and finished).
///
/// Units: `tcp_*` are bytes of the local connections; `wire_*` are bytes of the encoded
/// stream towards the peer (equal to `tcp_in` without the codec). So `tcp_in / wire_sent` is
/// the codec's reduction, `wire_acked` the part the peer delivered to its target, and
/// `wire_sent - wire_acked` the part still crossing the WAN.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ForwardStats {
    /// Connections being carried now.
    pub open: u32,
    /// Connections that completed.
    pub completed: u32,
    /// Connections that failed.
    pub failed: u32,
    /// Connections refused before they were carried: from an address other than the forward's
    /// `client` (or outside a configured forward's `allow_from`), or beyond its `connections`.
    pub refused: u32,
    /// The latest failure's reason.
    pub last_error: Option<String>,
    /// Bytes read from local connections (towards the peer).
    pub tcp_in: u64,
    /// Bytes written to local connections (from the peer).
    pub tcp_out: u64,
    /// Encoded bytes handed to QUIC towards the peer.
    pub wire_sent: u64,
    /// Encoded bytes the peer acknowledged as delivered to its target.
    pub wire_acked: u64,
    /// Bytes sent on the WAN for these connections, framing included.
    pub wan_out: u64,
    /// Bytes received from the WAN for these connections, framing included.
    pub wan_in: u64,
    /// The tunnel path to the forward's peer, if connected.
    pub path: Option<PathInfo>,
}

/// An API token: a secret whose `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(pub String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Where a gateway serves its API: a UNIX socket (the default) or a TCP address (which needs the
/// token). Written as a path or as `ip:port`, e.g. for `ferry-host --gateway`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiAddress {
    /// `[api] socket`.
    Unix(PathBuf),
    /// `[api] listen`.
    Tcp(SocketAddr),
}

impl FromStr for ApiAddress {
    type Err = std::convert::Infallible;

    /// `ip:port` (IPv6 in brackets) is TCP; anything else is a socket path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse() {
            Ok(addr) => Self::Tcp(addr),
            Err(_) => Self::Unix(PathBuf::from(s)),
        })
    }
}

impl fmt::Display for ApiAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "{}", path.display()),
            Self::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let r: Request = serde_json::from_str(
            r#"{"op":"open_forward","peer":"site-b","connect":"10.0.0.2:7800","codec":"off","client":"10.0.0.1","connections":5}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::OpenForward {
                peer: "site-b".into(),
                connect: "10.0.0.2:7800".parse().unwrap(),
                codec: CodecMode::Off,
                client: "10.0.0.1".parse().unwrap(),
                connections: 5,
            }
        );
        // A forward is always bound to its client.
        let err = serde_json::from_str::<Request>(r#"{"op":"open_forward","peer":"b","connect":"1.2.3.4:5","codec":"off"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("client"), "{err}");
        assert_eq!(serde_json::from_str::<Request>(r#"{"op":"hello"}"#).unwrap(), Request::Hello);
        let err = serde_json::from_str::<Request>(r#"{"op":"open_forward","peer":"b","conect":"1.2.3.4:5"}"#).unwrap_err();
        assert!(err.to_string().contains("conect"), "{err}");
        let resp = Response::Error("no".into());
        assert_eq!(serde_json::to_string(&resp).unwrap(), r#"{"error":"no"}"#);
    }

    #[test]
    fn auth_reads_as_documented_and_hides_the_token() {
        let r: Request = serde_json::from_str(r#"{"op":"auth","token":"s3cret"}"#).unwrap();
        assert_eq!(r, Request::Auth { token: Token("s3cret".into()) });
        assert!(!format!("{r:?}").contains("s3cret"));
        assert_eq!(serde_json::to_string(&Response::Authenticated).unwrap(), r#""authenticated""#);
    }

    #[test]
    fn api_addresses_are_paths_or_ip_ports() {
        assert_eq!("10.0.0.1:7070".parse(), Ok(ApiAddress::Tcp("10.0.0.1:7070".parse().unwrap())));
        assert_eq!("[fd00::1]:7070".parse(), Ok(ApiAddress::Tcp("[fd00::1]:7070".parse().unwrap())));
        assert_eq!("/run/ferry/gateway.sock".parse(), Ok(ApiAddress::Unix("/run/ferry/gateway.sock".into())));
        assert_eq!(ApiAddress::Unix("gw.sock".into()).to_string(), "gw.sock");
    }
}
