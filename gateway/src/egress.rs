//! Which targets a peer's flows may make this gateway dial: `[[peer]] allow_connect` rules
//! (networks with optional ports), deny by default, and never the gateway's own listeners.
//!
//! Pure logic: the tunnel asks [`EgressPolicy::check`] before it dials; the rules are parsed
//! here and read by the config.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;

use ipnet::IpNet;

/// One `allow_connect` entry: a network and the ports it allows, written `NET`, `NET:PORT` or
/// `NET:LOW-HIGH` (`10.0.0.0/24`, `10.0.0.5/32:7800`, `10.0.0.0/24:7800-7900`); a bare IP is a
/// one-address network; IPv6 with ports goes in brackets (`[fd00::/64]:7800`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct ConnectRule {
    /// The network.
    pub net: IpNet,
    /// The ports allowed in it (all of them without a port).
    pub ports: RangeInclusive<u16>,
}

impl ConnectRule {
    /// Whether the rule allows dialing `target`.
    pub fn allows(&self, target: &SocketAddr) -> bool {
        self.net.contains(&target.ip()) && self.ports.contains(&target.port())
    }
}

impl FromStr for ConnectRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("`{s}`: {why} (expected NET, NET:PORT or NET:LOW-HIGH, IPv6 as [NET]:PORT)");
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or_else(|| bad("no closing `]`"))?;
            match after {
                "" => (net, None),
                _ => (net, Some(after.strip_prefix(':').ok_or_else(|| bad("expected `:` after `]`"))?)),
            }
        } else {
            match s.split_once(':') {
                // More than one colon and no brackets: an IPv6 network without ports.
                Some((_, rest)) if rest.contains(':') => (s, None),
                Some((net, ports)) => (net, Some(ports)),
                None => (s, None),
            }
        };
        let net = match net.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => IpNet::from(net.parse::<IpAddr>().map_err(|_| bad("not a network or an IP address"))?),
        };
        let ports = match ports {
            None => 1..=u16::MAX,
            Some(p) => {
                let port = |t: &str| t.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| bad("ports are 1 to 65535"));
                let (low, high) = match p.split_once('-') {
                    Some((low, high)) => (port(low)?, port(high)?),
                    None => (port(p)?, port(p)?),
                };
                if low > high {
                    return Err(bad("the port range is empty"));
                }
                low..=high
            }
        };
        Ok(Self { net, ports })
    }
}

impl TryFrom<String> for ConnectRule {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for ConnectRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = match (*self.ports.start(), *self.ports.end()) {
            (1, u16::MAX) => return write!(f, "{}", self.net),
            (low, high) if low == high => format!("{low}"),
            (low, high) => format!("{low}-{high}"),
        };
        match self.net {
            IpNet::V4(net) => write!(f, "{net}:{ports}"),
            IpNet::V6(net) => write!(f, "[{net}]:{ports}"),
        }
    }
}

/// What each peer may have this gateway dial.
#[derive(Clone, Debug, Default)]
pub struct EgressPolicy {
    /// Each peer site's `allow_connect` (empty or absent: nothing).
    allowed: HashMap<String, Vec<ConnectRule>>,
    /// The gateway's own listeners (QUIC endpoint, TCP API): never dialed for a peer.
    own: Vec<SocketAddr>,
}

impl EgressPolicy {
    /// The rules of each peer, and the gateway's own listening addresses.
    pub fn new(allowed: impl IntoIterator<Item = (String, Vec<ConnectRule>)>, own: Vec<SocketAddr>) -> Self {
        Self { allowed: allowed.into_iter().collect(), own }
    }

    /// Whether `peer`'s flow may have this gateway dial `target`; the error says why not.
    pub fn check(&self, peer: &str, target: &SocketAddr) -> Result<(), String> {
        if let Some(own) = self.own.iter().find(|own| reaches(own, target)) {
            return Err(format!("{target} is this gateway's own listener ({own}): never dialed for a peer"));
        }
        match self.allowed.get(peer) {
            Some(rules) if rules.iter().any(|r| r.allows(target)) => Ok(()),
            Some(rules) if !rules.is_empty() => Err(format!("{target} is not in peer `{peer}`'s allow_connect list")),
            _ => Err(format!("peer `{peer}` has no allow_connect list: its flows may dial nothing")),
        }
    }
}

/// Whether dialing `target` may reach the listener bound to `own`: same port, and the same IP,
/// a loopback or unspecified IP (both mean this host), or any IP if `own` is bound to all of
/// them (this host's other addresses are not enumerated, so that is refused on every IP).
fn reaches(own: &SocketAddr, target: &SocketAddr) -> bool {
    let local = |ip: IpAddr| ip.is_loopback() || ip.is_unspecified();
    own.port() == target.port() && (own.ip() == target.ip() || own.ip().is_unspecified() || local(target.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> ConnectRule {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_take_networks_ports_and_ranges() {
        let net = rule("10.0.0.0/24");
        assert!(net.allows(&addr("10.0.0.9:1")) && net.allows(&addr("10.0.0.9:65535")));
        assert!(!net.allows(&addr("10.0.1.9:7800")));
        let one = rule("10.0.0.5/32:7800");
        assert!(one.allows(&addr("10.0.0.5:7800")));
        assert!(!one.allows(&addr("10.0.0.5:7801")) && !one.allows(&addr("10.0.0.6:7800")));
        let range = rule("10.0.0.0/24:7800-7900");
        assert!(range.allows(&addr("10.0.0.1:7800")) && range.allows(&addr("10.0.0.1:7900")));
        assert!(!range.allows(&addr("10.0.0.1:7799")) && !range.allows(&addr("10.0.0.1:7901")));
        assert_eq!(rule("10.0.0.5"), rule("10.0.0.5/32"));
        assert!(rule("10.0.0.5:80").allows(&addr("10.0.0.5:80")));
        let v6 = rule("fd00::/8");
        assert!(v6.allows(&addr("[fd00::1]:7800")) && !v6.allows(&addr("[fe80::1]:7800")));
        let v6_port = rule("[fd00::/64]:7800-7801");
        assert!(v6_port.allows(&addr("[fd00::1]:7801")) && !v6_port.allows(&addr("[fd00::1]:7802")));
        assert!(rule("[fd00::1]").allows(&addr("[fd00::1]:9")));
        for text in ["10.0.0.0/24", "10.0.0.5/32:7800", "10.0.0.0/24:7800-7900", "[fd00::/64]:7800"] {
            assert_eq!(rule(text).to_string(), text);
        }
    }

    #[test]
    fn malformed_rules_say_what_is_wrong() {
        for (text, why) in [
            ("10.0.0.0/33", "not a network"),
            ("10.0.0.0/24:0", "ports are 1 to 65535"),
            ("10.0.0.0/24:70000", "ports are 1 to 65535"),
            ("10.0.0.0/24:7900-7800", "empty"),
            ("10.0.0.0/24:http", "ports are"),
            ("[fd00::/64", "closing"),
            ("[fd00::/64]7800", "after `]`"),
            ("somehost:7800", "not a network"),
        ] {
            let err = text.parse::<ConnectRule>().unwrap_err();
            assert!(err.contains(why) && err.contains(text), "{text}: {err}");
        }
    }

    #[test]
    fn deny_by_default_and_never_the_gateways_own_listeners() {
        let policy = EgressPolicy::new(
            [("site-b".to_owned(), vec![rule("10.0.0.0/8"), rule("127.0.0.0/8")]), ("site-c".to_owned(), vec![])],
            vec![addr("10.0.0.1:4433"), addr("0.0.0.0:7070")],
        );
        assert_eq!(policy.check("site-b", &addr("10.0.0.2:7800")), Ok(()));
        let err = policy.check("site-b", &addr("192.0.2.1:7800")).unwrap_err();
        assert!(err.contains("allow_connect"), "{err}");
        for peer in ["site-c", "site-d"] {
            let err = policy.check(peer, &addr("10.0.0.2:7800")).unwrap_err();
            assert!(err.contains("no allow_connect list"), "{peer}: {err}");
        }
        // The QUIC port on its own IP and on loopback; the API bound to all IPs on any of them.
        for own in ["10.0.0.1:4433", "127.0.0.1:4433", "10.0.0.9:7070", "127.0.0.1:7070"] {
            let err = policy.check("site-b", &addr(own)).unwrap_err();
            assert!(err.contains("own listener"), "{own}: {err}");
        }
        assert_eq!(policy.check("site-b", &addr("10.0.0.2:4433")), Ok(()), "another host's port 4433");
    }
}
