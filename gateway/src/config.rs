//! The gateway's TOML configuration: parsing, validation and path resolution.
//!
//! Every key is documented in `config/README.md`. Parsing is strict (unknown keys are errors) and
//! all validation happens at start-up, so a gateway that starts has a usable configuration; each
//! error names the offending key.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_api::protocol::{ApiAddress, CodecMode, Token};
use ferry_units::{duration_text, Bandwidth, ByteSize};
use serde::Deserialize;

use crate::egress::{ConnectRule, EgressPolicy};

/// A configuration that could not be loaded; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown or missing key, or a value of the wrong form.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message, which names the key and shows the line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("invalid config file {path}: key `{key}`: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Dotted path of the key, e.g. `forward[0].peer`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A validated gateway configuration with absolute paths.
#[derive(Clone, Debug)]
pub struct Config {
    /// This gateway's site name; must match the site name in its certificate.
    pub site: String,
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// Certificates and keys.
    pub tls: TlsFiles,
    /// What the WAN between the sites looks like.
    pub link: LinkConfig,
    /// Peer gateways.
    pub peers: Vec<PeerConfig>,
    /// Local TCP ingresses whose connections come out at a peer site.
    pub forwards: Vec<ForwardConfig>,
    /// Resource bounds.
    pub limits: LimitsConfig,
    /// Destination page cache.
    pub cache: CacheConfig,
    /// The local API for host-plugins; `None`: no API.
    pub api: Option<ApiConfig>,
    /// How the gateway stops.
    pub shutdown: ShutdownConfig,
}

/// How the gateway stops on SIGTERM or SIGINT (see [`Gateway::stop`](crate::Gateway::stop)).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long flows that are running may take to finish once the gateway stops accepting;
    /// then the tunnel connections close and what still runs is reset. At most
    /// [`MAX_SHUTDOWN_GRACE`].
    #[serde(with = "duration_text")]
    pub grace: Duration,
}

/// Longest `[shutdown] grace` accepted: a stop that takes longer is one an init system (systemd's
/// `TimeoutStopSec`) would cut with SIGKILL, which resets nothing cleanly.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace: Duration::from_secs(10) }
    }
}

/// The local API host-plugins use (see `gateway::api`).
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Where it is served and how clients are authenticated.
    pub endpoint: ApiEndpoint,
    /// The IP forwards opened through the API listen on; `None`: the TCP session's local IP, or
    /// 127.0.0.1 on the UNIX socket.
    pub forward_ip: Option<IpAddr>,
    /// Most API sessions open at once; further ones are refused.
    pub max_sessions: usize,
}

/// Where the API is served, and what authenticates its clients.
#[derive(Clone, Debug)]
pub enum ApiEndpoint {
    /// A UNIX socket (`[api] socket`): the file's mode and group say who may connect.
    Unix {
        /// The socket's path.
        path: PathBuf,
        /// Its file mode (`[api] mode`, no bits for others).
        mode: u32,
        /// Its group (`[api] group`, resolved), if not the gateway's.
        group: Option<u32>,
    },
    /// TCP (`[api] listen`): each session first presents the token.
    Tcp {
        /// The address to serve on.
        listen: SocketAddr,
        /// The token read from `[api] token_file`.
        token: Token,
    },
}

impl ApiEndpoint {
    /// The configured address (a TCP port may still be 0).
    pub fn address(&self) -> ApiAddress {
        match self {
            Self::Unix { path, .. } => ApiAddress::Unix(path.clone()),
            Self::Tcp { listen, .. } => ApiAddress::Tcp(*listen),
        }
    }
}

/// `[api] socket` when neither it nor `listen` is given.
pub const DEFAULT_API_SOCKET: &str = "/run/ferry/gateway.sock";
/// `[api] mode` by default: owner and group may connect.
pub const DEFAULT_API_SOCKET_MODE: u32 = 0o660;
/// `[api] max_sessions` by default.
pub const DEFAULT_API_MAX_SESSIONS: usize = 32;
/// Shortest token accepted in `[api] token_file` (bytes).
pub const MIN_TOKEN_LEN: usize = 16;

/// `[api]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<PathBuf>,
    mode: Option<u32>,
    group: Option<String>,
    listen: Option<SocketAddr>,
    token_file: Option<PathBuf>,
    forward_ip: Option<IpAddr>,
    max_sessions: Option<usize>,
}

/// PEM files for mutual TLS.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Site CA certificate that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This site's certificate.
    pub cert: PathBuf,
    /// This site's private key.
    pub key: PathBuf,
}

/// The WAN path: used to size flow-control windows, socket buffers and the sender's rate cap.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Bottleneck rate of the inter-site link; the tunnel never sends faster.
    pub bandwidth: Bandwidth,
    /// Round-trip time between the sites.
    #[serde(with = "duration_text")]
    pub rtt: Duration,
}

impl LinkConfig {
    /// Bandwidth-delay product of the link in bytes.
    pub fn bdp_bytes(&self) -> u64 {
        self.bandwidth.bdp_bytes(self.rtt)
    }
}

/// A peer gateway at another site.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's site name, as in its certificate.
    pub site: String,
    /// The peer's QUIC endpoint.
    pub addr: SocketAddr,
    /// Networks and ports this peer may make us dial (its flows' `connect`); empty or absent:
    /// nothing.
    #[serde(default)]
    pub allow_connect: Vec<ConnectRule>,
}

/// A TCP ingress forwarded to a peer site.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Local TCP address to accept connections on.
    pub listen: SocketAddr,
    /// Site whose gateway carries the connections on.
    pub peer: String,
    /// TCP address the peer gateway dials for each connection.
    pub connect: SocketAddr,
    /// Whether the page codec encodes this forward's connections (towards the peer).
    #[serde(default)]
    pub codec: CodecMode,
    /// Networks the forward accepts connections from; `None`: any.
    #[serde(default)]
    pub allow_from: Option<Vec<ipnet::IpNet>>,
}

/// The destination page cache.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Memory for cached pages, shared by every migration arriving through this gateway.
    pub size: ByteSize,
    /// Most page digests advertised to a peer (16 bytes each on the WAN); the most recently
    /// cached pages are advertised first.
    pub advertise_max_pages: usize,
    /// Directory the cache is persisted in (relative to the config file); `None`: memory only.
    pub dir: Option<PathBuf>,
    /// Pages each incoming codec connection keeps of its own session (4 KiB each, besides the
    /// shared cache), so in-session references can never miss. Advertised to peers.
    pub session_window_pages: u64,
    /// Memory each outgoing codec connection may use to keep copies of the peer's advertised
    /// pages it referred to, until the peer acknowledged them, so the peer can ask for a page it
    /// evicted meanwhile. Past it, advertised pages are sent literally. 0: never refer to
    /// advertised pages.
    pub resupply_budget: ByteSize,
}

/// Largest `cache.resupply_budget` accepted (per connection).
pub const MAX_RESUPPLY_BUDGET: u64 = 16 << 30;

/// Smallest `cache.session_window_pages` accepted. A source uses at most this window until it
/// has the destination's advertisement, so every destination must accept it.
pub const MIN_SESSION_WINDOW_PAGES: u64 = 4096;

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            size: ByteSize(1 << 30),
            advertise_max_pages: 1 << 20,
            dir: None,
            session_window_pages: 65536,
            resupply_budget: ByteSize(crate::store::retained::DEFAULT_RETAIN_BUDGET as u64),
        }
    }
}

/// Bounds on what a gateway may hold in memory.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most forwarded connections open at once; further connections are refused.
    pub max_connections: usize,
    /// Bytes a forwarded connection may buffer per direction while it reorders data arriving on
    /// several QUIC streams. `None` sizes it from the link (about 1.5 × bandwidth × rtt).
    pub reorder_buffer: Option<ByteSize>,
    /// Most bytes a codec decoder hands to the local socket per call (zero pages expand about
    /// 4000× from wire to bytes; this bounds what a call may turn them into). At least
    /// [`MIN_DECODER_OUTPUT`].
    pub decoder_output: ByteSize,
    /// A forwarded connection that carried no byte either way for this long is reset, which
    /// frees its connection permit. At least [`MIN_IDLE_TIMEOUT`].
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,
}

/// Shortest `[limits] idle_timeout`.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Smallest `[limits] decoder_output`: one page (smaller bounds are correct but only slow).
pub const MIN_DECODER_OUTPUT: u64 = ferry_codec::PAGE_SIZE as u64;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { max_connections: 64, reorder_buffer: None, decoder_output: ByteSize(4 << 20), idle_timeout: Duration::from_secs(3600) }
    }
}

/// The file as written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: String,
    listen: SocketAddr,
    tls: TlsFiles,
    link: LinkConfig,
    #[serde(default, rename = "peer")]
    peers: Vec<PeerConfig>,
    #[serde(default, rename = "forward")]
    forwards: Vec<ForwardConfig>,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    cache: CacheConfig,
    api: Option<RawApi>,
    #[serde(default)]
    shutdown: ShutdownConfig,
}

impl Config {
    /// Reads, parses and validates a config file. Relative paths resolve against its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }

    /// Parses and validates config text; `path` is only used in messages, `base` resolves
    /// relative file paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };

        if raw.site.is_empty() {
            return Err(invalid("site".into(), "must not be empty".into()));
        }
        let tls = TlsFiles {
            ca: base.join(&raw.tls.ca),
            cert: base.join(&raw.tls.cert),
            key: base.join(&raw.tls.key),
        };
        for (key, file) in [("tls.ca", &tls.ca), ("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
            let meta = std::fs::metadata(file).map_err(|e| invalid(key.into(), format!("cannot read {}: {e}", file.display())))?;
            let mode = meta.permissions().mode() & 0o777;
            if key == "tls.key" && mode & 0o007 != 0 {
                return Err(invalid(
                    key.into(),
                    format!("{} has mode {mode:o}: a private key must not be accessible to others (chmod 600)", file.display()),
                ));
            }
        }
        if raw.link.rtt.is_zero() {
            return Err(invalid("link.rtt".into(), "must be greater than zero".into()));
        }

        let mut seen = HashSet::new();
        for (i, peer) in raw.peers.iter().enumerate() {
            if peer.site == raw.site {
                return Err(invalid(format!("peer[{i}].site"), "a gateway cannot peer with its own site".into()));
            }
            if !seen.insert(peer.site.as_str()) {
                return Err(invalid(format!("peer[{i}].site"), format!("site `{}` is listed twice", peer.site)));
            }
        }
        for (i, fwd) in raw.forwards.iter().enumerate() {
            if !seen.contains(fwd.peer.as_str()) {
                let known: Vec<_> = raw.peers.iter().map(|p| p.site.as_str()).collect();
                return Err(invalid(
                    format!("forward[{i}].peer"),
                    format!("unknown peer site `{}` (configured peers: {known:?})", fwd.peer),
                ));
            }
        }
        if !(MIN_SESSION_WINDOW_PAGES..=ferry_codec::frame::MAX_SESSION_WINDOW).contains(&raw.cache.session_window_pages) {
            return Err(invalid(
                "cache.session_window_pages".into(),
                format!("must be between {MIN_SESSION_WINDOW_PAGES} and {}", ferry_codec::frame::MAX_SESSION_WINDOW),
            ));
        }
        if raw.cache.resupply_budget.0 > MAX_RESUPPLY_BUDGET {
            return Err(invalid(
                "cache.resupply_budget".into(),
                format!("must be at most {}GiB (it is per connection)", MAX_RESUPPLY_BUDGET >> 30),
            ));
        }
        if raw.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections".into(), "must be at least 1".into()));
        }
        if raw.limits.decoder_output.0 < MIN_DECODER_OUTPUT {
            return Err(invalid(
                "limits.decoder_output".into(),
                format!("must be at least {MIN_DECODER_OUTPUT} bytes (one page), e.g. \"4MiB\""),
            ));
        }
        if raw.shutdown.grace > MAX_SHUTDOWN_GRACE {
            return Err(invalid(
                "shutdown.grace".into(),
                format!("must be at most {}s (an init system would kill a stop that long)", MAX_SHUTDOWN_GRACE.as_secs()),
            ));
        }

        if raw.limits.idle_timeout < MIN_IDLE_TIMEOUT {
            return Err(invalid("limits.idle_timeout".into(), format!("must be at least {}s", MIN_IDLE_TIMEOUT.as_secs())));
        }
        let api = match raw.api {
            None => None,
            Some(api) => Some(api_config(api, base).map_err(|(key, message)| invalid(format!("api.{key}"), message))?),
        };

        Ok(Self {
            site: raw.site,
            listen: raw.listen,
            tls,
            link: raw.link,
            peers: raw.peers,
            forwards: raw.forwards,
            limits: raw.limits,
            cache: CacheConfig { dir: raw.cache.dir.as_ref().map(|d| base.join(d)), ..raw.cache },
            api,
            shutdown: raw.shutdown,
        })
    }

    /// What each peer may have this gateway dial: its `allow_connect`, never this gateway's own
    /// QUIC endpoint (bound to `quic`) or TCP API (`api.listen`, bound before the tunnel starts).
    pub fn egress_policy(&self, quic: SocketAddr) -> EgressPolicy {
        let mut own = vec![quic];
        if let Some(ApiConfig { endpoint: ApiEndpoint::Tcp { listen, .. }, .. }) = &self.api {
            own.push(*listen);
        }
        EgressPolicy::new(self.peers.iter().map(|p| (p.site.clone(), p.allow_connect.clone())), own)
    }
}

/// Validates `[api]`; an error names the key (without `api.`).
fn api_config(raw: RawApi, base: &Path) -> Result<ApiConfig, (&'static str, String)> {
    let max_sessions = raw.max_sessions.unwrap_or(DEFAULT_API_MAX_SESSIONS);
    if max_sessions == 0 {
        return Err(("max_sessions", "must be at least 1".into()));
    }
    if raw.forward_ip.is_some_and(|ip| ip.is_unspecified()) {
        return Err(("forward_ip", "must be an address clients connect to, not 0.0.0.0 or ::".into()));
    }
    let endpoint = match (raw.socket, raw.listen) {
        (Some(_), Some(_)) => return Err(("listen", "give either `api.socket` or `api.listen`, not both".into())),
        (None, Some(listen)) => {
            for (key, given) in [("mode", raw.mode.is_some()), ("group", raw.group.is_some())] {
                if given {
                    return Err((key, "is for `api.socket` only".into()));
                }
            }
            let Some(file) = raw.token_file else {
                return Err(("token_file", "required with `api.listen`: a TCP API authenticates its clients by token".into()));
            };
            ApiEndpoint::Tcp { listen, token: read_token(&base.join(file)).map_err(|m| ("token_file", m))? }
        }
        (socket, None) => {
            if raw.token_file.is_some() {
                return Err(("token_file", "is for `api.listen` only (the socket's mode and group authenticate)".into()));
            }
            let mode = raw.mode.unwrap_or(DEFAULT_API_SOCKET_MODE);
            if mode > 0o777 || mode & 0o007 != 0 {
                return Err(("mode", format!("{mode:#o}: must give others no access (e.g. 0o660 or 0o600)")));
            }
            let group = raw.group.map(|g| group_id(&g)).transpose().map_err(|m| ("group", m))?;
            let path = base.join(socket.unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET)));
            ApiEndpoint::Unix { path, mode, group }
        }
    };
    Ok(ApiConfig { endpoint, forward_ip: raw.forward_ip, max_sessions })
}

/// Reads an API token file: private to its owner (mode 0600 or stricter), at least
/// [`MIN_TOKEN_LEN`] bytes once white space around it is trimmed.
fn read_token(file: &Path) -> Result<Token, String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!("{} has mode {mode:o}: a token file must be readable by its owner only (chmod 600)", file.display()));
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!("{}: the token must be at least {MIN_TOKEN_LEN} bytes", file.display()));
    }
    Ok(Token(token.to_owned()))
}

/// A group's id from its name or number.
fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group).map_err(|_| format!("`{group}` is not a group name"))?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: an all-zero `group` is a valid value of the plain C struct getgrnam_r fills.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives it and its length is passed.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return Err(format!("no group `{group}`"));
    }
    Ok(entry.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(extra: &str) -> String {
        format!(
            r#"
site = "site-a"
listen = "127.0.0.1:4433"
[tls]
ca = "ca.pem"
cert = "site-a.pem"
key = "site-a.key"
[link]
bandwidth = "1gbit"
rtt = "150ms"
[[peer]]
site = "site-b"
addr = "127.0.0.2:4433"
[[forward]]
listen = "127.0.0.1:7000"
peer = "site-b"
connect = "127.0.0.2:4444"
{extra}"#
        )
    }

    fn dir_with_certs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "site-a.pem", "site-a.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        std::fs::set_permissions(dir.path().join("site-a.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        dir
    }

    fn parse(text: &str, dir: &Path) -> Result<Config, ConfigError> {
        Config::parse(text, &dir.join("gw.toml"), dir)
    }

    #[test]
    fn valid_config_resolves_paths() {
        let dir = dir_with_certs();
        let cfg = parse(&sample(""), dir.path()).unwrap();
        assert_eq!(cfg.tls.cert, dir.path().join("site-a.pem"));
        assert_eq!(cfg.link.bdp_bytes(), 18_750_000);
        assert_eq!(cfg.forwards[0].peer, "site-b");
    }

    #[test]
    fn typo_names_the_key() {
        let dir = dir_with_certs();
        let text = sample("").replace("bandwidth =", "bandwith =");
        let err = parse(&text, dir.path()).unwrap_err().to_string();
        assert!(err.contains("bandwith"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let dir = dir_with_certs();
        let err = parse(&sample("").replace("150ms", "150 furlongs"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("rtt") && err.contains("invalid duration"), "{err}");
        let err = parse(&sample("").replace("1gbit", "1gb"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("bandwidth") && err.contains("invalid bandwidth"), "{err}");
    }

    #[test]
    fn unknown_forward_peer_names_the_key() {
        let dir = dir_with_certs();
        let text = sample("").replace("peer = \"site-b\"", "peer = \"site-c\"");
        let err = parse(&text, dir.path()).unwrap_err().to_string();
        assert!(err.contains("forward[0].peer") && err.contains("site-c"), "{err}");
    }

    #[test]
    fn missing_file_names_the_key() {
        let dir = dir_with_certs();
        std::fs::remove_file(dir.path().join("site-a.key")).unwrap();
        let err = parse(&sample(""), dir.path()).unwrap_err().to_string();
        assert!(err.contains("tls.key"), "{err}");
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let dir = dir_with_certs();
        let key = dir.path().join("site-a.key");
        for mode in [0o600, 0o640, 0o400] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            parse(&sample(""), dir.path()).unwrap_or_else(|e| panic!("{mode:o}: {e}"));
        }
        for mode in [0o644, 0o604, 0o606] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = parse(&sample(""), dir.path()).unwrap_err().to_string();
            assert!(err.contains("tls.key") && err.contains("chmod 600"), "{mode:o}: {err}");
        }
    }

    #[test]
    fn cache_and_codec_keys() {
        let dir = dir_with_certs();
        let cfg = parse(&sample("[cache]\nsize = \"256MiB\"\ndir = \"pages\"\n"), dir.path()).unwrap();
        assert_eq!(cfg.cache.size, ByteSize(256 << 20));
        assert_eq!(cfg.cache.dir, Some(dir.path().join("pages")));
        let err = parse(&sample("[cache]\nsession_window_pages = 10\n"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("cache.session_window_pages"), "{err}");
        assert_eq!(cfg.cache.resupply_budget, ByteSize(64 << 20));
        let small = parse(&sample("[cache]\nresupply_budget = \"1MiB\"\n"), dir.path()).unwrap();
        assert_eq!(small.cache.resupply_budget, ByteSize(1 << 20));
        let err = parse(&sample("[cache]\nresupply_budget = \"1TiB\"\n"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("cache.resupply_budget"), "{err}");
        assert_eq!(cfg.forwards[0].codec, CodecMode::Auto);
        let text = sample("").replace("connect = \"127.0.0.2:4444\"", "connect = \"127.0.0.2:4444\"\ncodec = \"off\"");
        assert_eq!(parse(&text, dir.path()).unwrap().forwards[0].codec, CodecMode::Off);
        let text = sample("").replace("connect = \"127.0.0.2:4444\"", "connect = \"127.0.0.2:4444\"\ncodec = \"maybe\"");
        let err = parse(&text, dir.path()).unwrap_err().to_string();
        assert!(err.contains("codec") && err.contains("maybe"), "{err}");
    }

    #[test]
    fn allow_connect_takes_networks_and_ports_and_absent_means_nothing() {
        let dir = dir_with_certs();
        let target: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let cfg = parse(&sample(""), dir.path()).unwrap();
        assert!(cfg.peers[0].allow_connect.is_empty());
        let err = cfg.egress_policy(cfg.listen).check("site-b", &target).unwrap_err();
        assert!(err.contains("no allow_connect"), "absent: nothing may be dialed: {err}");
        let text = sample("").replace(
            "addr = \"127.0.0.2:4433\"",
            "addr = \"127.0.0.2:4433\"\nallow_connect = [\"10.77.0.0/24\", \"10.78.0.5/32:7800\", \"10.79.0.0/24:7800-7900\", \"[fd00::/8]:7800\"]",
        );
        let cfg = parse(&text, dir.path()).unwrap();
        let policy = cfg.egress_policy(cfg.listen);
        for ok in ["10.77.0.9:7800", "10.78.0.5:7800", "10.79.0.1:7900", "[fd00::1]:7800"] {
            assert_eq!(policy.check("site-b", &ok.parse().unwrap()), Ok(()), "{ok}");
        }
        for refused in ["10.77.1.9:7800", "10.78.0.5:7801", "10.79.0.1:7901", "[fd00::1]:7801", "127.0.0.1:4433"] {
            assert!(policy.check("site-b", &refused.parse().unwrap()).is_err(), "{refused}");
        }
        for bad in ["10.77.0.0/33", "10.78.0.5/32:0", "10.79.0.0/24:7900-7800"] {
            let err = parse(&text.replace("10.77.0.0/24", bad), dir.path()).unwrap_err().to_string();
            assert!(err.contains("allow_connect") && err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn forward_allow_from_is_a_list_of_networks() {
        let dir = dir_with_certs();
        assert_eq!(parse(&sample(""), dir.path()).unwrap().forwards[0].allow_from, None);
        let text = sample("").replace("connect = \"127.0.0.2:4444\"", "connect = \"127.0.0.2:4444\"\nallow_from = [\"10.0.0.0/24\"]");
        assert_eq!(parse(&text, dir.path()).unwrap().forwards[0].allow_from, Some(vec!["10.0.0.0/24".parse().unwrap()]));
        let err = parse(&text.replace("10.0.0.0/24", "10.0.0.0/40"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("allow_from"), "{err}");
    }

    fn token_file(dir: &Path, mode: u32, text: &str) {
        let path = dir.join("api.token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn api_defaults_to_a_unix_socket() {
        let dir = dir_with_certs();
        assert!(parse(&sample(""), dir.path()).unwrap().api.is_none());
        let api = parse(&sample("[api]\n"), dir.path()).unwrap().api.unwrap();
        assert_eq!(api.max_sessions, DEFAULT_API_MAX_SESSIONS);
        let ApiEndpoint::Unix { path, mode, group } = api.endpoint else { panic!("{api:?}") };
        assert_eq!((path, mode, group), (PathBuf::from(DEFAULT_API_SOCKET), 0o660, None));
        let api = parse(&sample("[api]\nsocket = \"gw.sock\"\nmode = 0o600\ngroup = \"0\"\nmax_sessions = 4\n"), dir.path()).unwrap().api.unwrap();
        let ApiEndpoint::Unix { path, mode, group } = api.endpoint else { panic!("{api:?}") };
        assert_eq!((path, mode, group, api.max_sessions), (dir.path().join("gw.sock"), 0o600, Some(0), 4));
        assert_eq!(group_id("root"), Ok(0));
        for (extra, key) in [
            ("mode = 0o666", "api.mode"),
            ("mode = 0o1660", "api.mode"),
            ("group = \"no-such-group-here\"", "api.group"),
            ("max_sessions = 0", "api.max_sessions"),
            ("forward_ip = \"0.0.0.0\"", "api.forward_ip"),
            ("token_file = \"api.token\"", "api.token_file"),
            ("listen = \"127.0.0.1:7070\"\nsocket = \"gw.sock\"", "api.listen"),
        ] {
            let err = parse(&sample(&format!("[api]\n{extra}\n")), dir.path()).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn a_tcp_api_needs_a_private_token_file() {
        let dir = dir_with_certs();
        let tcp = "[api]\nlisten = \"127.0.0.1:7070\"\n";
        let err = parse(&sample(tcp), dir.path()).unwrap_err().to_string();
        assert!(err.contains("api.token_file") && err.contains("required"), "{err}");
        let with_token = format!("{tcp}token_file = \"api.token\"\n");
        token_file(dir.path(), 0o600, "0123456789abcdef0123\n");
        let api = parse(&sample(&with_token), dir.path()).unwrap().api.unwrap();
        let ApiEndpoint::Tcp { listen, token } = api.endpoint else { panic!("{api:?}") };
        assert_eq!((listen, token), ("127.0.0.1:7070".parse().unwrap(), Token("0123456789abcdef0123".into())));
        for mode in [0o640, 0o604, 0o644] {
            token_file(dir.path(), mode, "0123456789abcdef0123\n");
            let err = parse(&sample(&with_token), dir.path()).unwrap_err().to_string();
            assert!(err.contains("api.token_file") && err.contains("chmod 600"), "{mode:o}: {err}");
        }
        token_file(dir.path(), 0o400, "short\n");
        let err = parse(&sample(&with_token), dir.path()).unwrap_err().to_string();
        assert!(err.contains("api.token_file") && err.contains("at least 16"), "{err}");
        let err = parse(&sample(&format!("{with_token}mode = 0o600\n")), dir.path()).unwrap_err().to_string();
        assert!(err.contains("api.mode"), "{err}");
        let err = parse(&sample("[api]\nlisten = \"localhost\"\n"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn limits_section() {
        let dir = dir_with_certs();
        let cfg = parse(&sample("[limits]\nmax_connections = 8\nreorder_buffer = \"32MiB\"\n"), dir.path()).unwrap();
        assert_eq!(cfg.limits.max_connections, 8);
        assert_eq!(cfg.limits.reorder_buffer, Some(ByteSize(32 << 20)));
        assert_eq!(cfg.limits.decoder_output, ByteSize(4 << 20), "default");
        let cfg = parse(&sample("[limits]\ndecoder_output = \"1MiB\"\n"), dir.path()).unwrap();
        assert_eq!(cfg.limits.decoder_output, ByteSize(1 << 20));
        for bad in ["0", "4095"] {
            let err = parse(&sample(&format!("[limits]\ndecoder_output = \"{bad}\"\n")), dir.path()).unwrap_err().to_string();
            assert!(err.contains("limits.decoder_output") && err.contains("at least 4096"), "{bad}: {err}");
        }
        let err = parse(&sample("[limits]\ndecoder_output = \"4 pages\"\n"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("decoder_output"), "{err}");
        assert_eq!(cfg.limits.idle_timeout, Duration::from_secs(3600), "default");
        let cfg = parse(&sample("[limits]\nidle_timeout = \"30s\"\n"), dir.path()).unwrap();
        assert_eq!(cfg.limits.idle_timeout, Duration::from_secs(30));
        let err = parse(&sample("[limits]\nidle_timeout = \"10ms\"\n"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("limits.idle_timeout"), "{err}");
        let err = parse(&sample("[limits]\nmax_conections = 8\n"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("max_conections"), "{err}");
    }

    #[test]
    fn the_sample_configs_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        for f in ["ca.pem", "site-a.pem", "site-a.key", "site-b.pem", "site-b.key"] {
            std::fs::write(dir.path().join("certs").join(f), "x").unwrap();
            std::fs::set_permissions(dir.path().join("certs").join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        for site in ["site-a", "site-b"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../config/{site}.toml"));
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg = Config::parse(&text, &path, dir.path()).unwrap_or_else(|e| panic!("{site}: {e}"));
            assert!(!cfg.peers[0].allow_connect.is_empty(), "{site}: the sample lists what its peer may dial");
            assert!(matches!(cfg.api.unwrap().endpoint, ApiEndpoint::Unix { mode: 0o660, .. }), "{site}");
        }
    }

    #[test]
    fn shutdown_section() {
        let dir = dir_with_certs();
        assert_eq!(parse(&sample(""), dir.path()).unwrap().shutdown.grace, Duration::from_secs(10), "default");
        let cfg = parse(&sample("[shutdown]\ngrace = \"1.5s\"\n"), dir.path()).unwrap();
        assert_eq!(cfg.shutdown.grace, Duration::from_millis(1500));
        assert_eq!(parse(&sample("[shutdown]\ngrace = \"0s\"\n"), dir.path()).unwrap().shutdown.grace, Duration::ZERO);
        let err = parse(&sample("[shutdown]\ngrace = \"2h\"\n"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("shutdown.grace") && err.contains("at most 3600s"), "{err}");
        let err = parse(&sample("[shutdown]\ngrace = \"10 parsecs\"\n"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("grace") && err.contains("invalid duration"), "{err}");
        let err = parse(&sample("[shutdown]\ngrase = \"1s\"\n"), dir.path()).unwrap_err().to_string();
        assert!(err.contains("grase"), "{err}");
    }
}
