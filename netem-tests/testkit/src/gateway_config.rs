//! Gateway configuration files for tests: written as TOML next to a [`Pki`](crate::pki::Pki)'s
//! certificates and loaded through the gateway's real parser, so tests exercise the same path
//! as a deployment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferry_gateway::Config;

use crate::KitError;

/// One `[[forward]]` section.
#[derive(Clone, Debug)]
struct Forward {
    listen: SocketAddr,
    peer: String,
    connect: SocketAddr,
    codec: Option<String>,
}

/// The `allow_connect` of [`GatewayConfig::peer`]: every target (tests dial ephemeral ports on
/// loopback and in namespaces; the gateway's own ports stay refused).
pub const ALLOW_ANY: &[&str] = &["0.0.0.0/0", "::/0"];

/// `[api]`: where.
#[derive(Clone, Debug)]
enum Api {
    Socket(PathBuf),
    Tcp(SocketAddr, PathBuf),
}

/// A gateway configuration under construction. Defaults: `[link]` 10 Gbit/s and 1 ms RTT, no
/// peers, no forwards, no API.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    site: String,
    listen: SocketAddr,
    bandwidth: String,
    rtt: String,
    peers: Vec<(String, SocketAddr, Vec<String>)>,
    api: Option<Api>,
    forwards: Vec<Forward>,
    extra: String,
}

impl GatewayConfig {
    /// The gateway of `site`, its QUIC endpoint on `listen`, with the certificates
    /// `ca.pem`, `SITE.pem`, `SITE.key`.
    pub fn new(site: &str, listen: SocketAddr) -> Self {
        Self {
            site: site.to_string(),
            listen,
            bandwidth: "10gbit".into(),
            rtt: "1ms".into(),
            peers: Vec::new(),
            api: None,
            forwards: Vec::new(),
            extra: String::new(),
        }
    }

    /// `[link]`: the path's `bandwidth` (e.g. `"1gbit"`) and `rtt` (e.g. `"150ms"`).
    pub fn link(mut self, bandwidth: &str, rtt: &str) -> Self {
        self.bandwidth = bandwidth.to_string();
        self.rtt = rtt.to_string();
        self
    }

    /// A `[[peer]]`: the gateway of `site` at `addr`, whose flows may dial anything
    /// ([`ALLOW_ANY`]).
    pub fn peer(self, site: &str, addr: SocketAddr) -> Self {
        self.peer_allowing(site, addr, ALLOW_ANY)
    }

    /// A `[[peer]]` with this `allow_connect` (none at all if empty: the key is left out).
    pub fn peer_allowing(mut self, site: &str, addr: SocketAddr, allow_connect: &[&str]) -> Self {
        self.peers.push((site.to_string(), addr, allow_connect.iter().map(|r| r.to_string()).collect()));
        self
    }

    /// `[api]` on the UNIX socket `path` (the host-plugin API).
    pub fn api_socket(mut self, path: &Path) -> Self {
        self.api = Some(Api::Socket(path.to_owned()));
        self
    }

    /// `[api]` over TCP on `listen`, with the token in `token_file` (see
    /// [`write_token`](crate::api_client::write_token)).
    pub fn api_tcp(mut self, listen: SocketAddr, token_file: &Path) -> Self {
        self.api = Some(Api::Tcp(listen, token_file.to_owned()));
        self
    }

    /// A `[[forward]]` listening on `127.0.0.1:0` to `connect` behind `peer`, codec by default.
    pub fn forward(self, peer: &str, connect: SocketAddr) -> Self {
        self.forward_at(SocketAddr::from(([127, 0, 0, 1], 0)), peer, connect)
    }

    /// [`forward`](Self::forward) listening on `listen` (for a gateway process, whose bound
    /// port a test cannot ask for).
    pub fn forward_at(mut self, listen: SocketAddr, peer: &str, connect: SocketAddr) -> Self {
        self.forwards.push(Forward { listen, peer: peer.to_string(), connect, codec: None });
        self
    }

    /// [`forward`](Self::forward) with an explicit `codec` setting (`"auto"`, `"off"`).
    pub fn forward_with_codec(mut self, peer: &str, connect: SocketAddr, codec: &str) -> Self {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        self.forwards.push(Forward { listen, peer: peer.to_string(), connect, codec: Some(codec.to_string()) });
        self
    }

    /// Extra TOML (whole sections) appended at the end.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// The configuration file's text.
    pub fn to_toml(&self) -> String {
        let Self { site, listen, bandwidth, rtt, .. } = self;
        let mut text = format!(
            "site = \"{site}\"\nlisten = \"{listen}\"\n[tls]\nca = \"ca.pem\"\ncert = \"{site}.pem\"\nkey = \"{site}.key\"\n\
             [link]\nbandwidth = \"{bandwidth}\"\nrtt = \"{rtt}\"\n"
        );
        for (peer, addr, allow) in &self.peers {
            text += &format!("[[peer]]\nsite = \"{peer}\"\naddr = \"{addr}\"\n");
            if !allow.is_empty() {
                text += &format!("allow_connect = {allow:?}\n");
            }
        }
        match &self.api {
            None => {}
            Some(Api::Socket(path)) => text += &format!("[api]\nsocket = {:?}\n", path.display().to_string()),
            Some(Api::Tcp(listen, token)) => {
                text += &format!("[api]\nlisten = \"{listen}\"\ntoken_file = {:?}\n", token.display().to_string());
            }
        }
        for f in &self.forwards {
            text += &format!("[[forward]]\nlisten = \"{}\"\npeer = \"{}\"\nconnect = \"{}\"\n", f.listen, f.peer, f.connect);
            if let Some(codec) = &f.codec {
                text += &format!("codec = \"{codec}\"\n");
            }
        }
        text += &self.extra;
        text
    }

    /// Writes the file as `dir/file_name` (`dir` holds the certificates) and loads it through
    /// the gateway's parser.
    pub fn load(&self, dir: &Path, file_name: &str) -> Result<Config, KitError> {
        let path = dir.join(file_name);
        std::fs::write(&path, self.to_toml()).map_err(|source| KitError::File { what: "writing", path: path.clone(), source })?;
        Config::load(&path).map_err(|e| KitError::Config { path, message: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Pki;

    #[test]
    fn every_section_loads_through_the_real_parser() {
        let pki = Pki::generate(&["site-a", "site-b"]).expect("pki");
        let peer: SocketAddr = "127.0.0.1:4433".parse().expect("literal");
        let target: SocketAddr = "127.0.0.1:9".parse().expect("literal");
        let config = GatewayConfig::new("site-a", "127.0.0.1:4434".parse().expect("literal"))
            .link("1gbit", "150ms")
            .peer("site-b", peer)
            .api_socket(&pki.path().join("api.sock"))
            .forward("site-b", target)
            .forward_with_codec("site-b", target, "off")
            .extra("[cache]\nsize = \"1MiB\"\n");
        let text = config.to_toml();
        assert!(text.contains("codec = \"off\"") && text.contains("[api]") && text.ends_with("size = \"1MiB\"\n"), "{text}");
        config.load(pki.path(), "site-a.toml").expect("the gateway accepts the kit's config");
        let (token, _) = crate::api_client::write_token(pki.path());
        let tcp = GatewayConfig::new("site-a", "127.0.0.1:4434".parse().expect("literal"))
            .peer_allowing("site-b", peer, &["10.0.0.0/24:7800-7900"])
            .api_tcp("127.0.0.1:0".parse().expect("literal"), &token);
        let loaded = tcp.load(pki.path(), "site-a-tcp.toml").expect("the gateway accepts the kit's TCP api config");
        assert_eq!(loaded.peers[0].allow_connect[0].to_string(), "10.0.0.0/24:7800-7900");
    }
}
