//! The messages the source and destination host-plugins exchange on their control channel.
//!
//! The channel is an ordinary TCP connection carried by the gateways (a forward the source opens
//! through its gateway's API, codec off), so nothing but the gateways' QUIC connection crosses the
//! WAN. Messages are JSON lines ([`crate::framing`]). One session migrates one VM:
//!
//! ```text
//! source                                   destination (ferry-host serve)
//!   Ping ×N ───────────────────────────────▶  Pong (clock offset for the downtime figure)
//!   Prepare{vm, settings, ips} ────────────▶  connects the incoming QEMU's QMP, sets the same
//!                                             capabilities/parameters, migrate-incoming
//!                             ◀────────────  Prepared{listen}
//!   (migration stream through the gateways to `listen`)
//!   SourceCompleted ───────────────────────▶  waits for the VM to run, its first heartbeat
//!                             ◀────────────  Running{...}, then announces the MACs
//!                             ◀────────────  Announced{...}
//!   Abort{reason} (any time before Running) ▶ gives the incoming QEMU up
//!                             ◀────────────  Failed{reason} (any time)
//! ```

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Default TCP port of `ferry-host serve`.
pub const DEFAULT_SERVE_PORT: u16 = 7800;

/// Migration settings both QEMUs must share (QEMU requires matching capabilities and multifd
/// parameters on the two ends).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedSettings {
    /// Capabilities to set, by QEMU name, with their state.
    pub capabilities: Vec<(String, bool)>,
    /// Multifd channels, when multifd is on.
    pub multifd_channels: Option<u8>,
}

/// Source → destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToDestination {
    /// Clock probe; answered with [`ToSource::Pong`].
    Ping {
        /// Echoed back.
        seq: u32,
    },
    /// Get the incoming VM ready.
    Prepare {
        /// The VM's name (fills the destination's `{vm}` path templates).
        vm: String,
        /// The source QEMU's version, for the log and compatibility checks.
        qemu_version: String,
        /// Settings to mirror.
        settings: SharedSettings,
        /// IP addresses of the VM to announce after cutover.
        ips: Vec<IpAddr>,
    },
    /// The source QEMU reports the migration completed.
    SourceCompleted,
    /// The migration is given up; the source VM keeps running.
    Abort {
        /// Why.
        reason: String,
    },
}

/// Destination → source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToSource {
    /// Answer to [`ToDestination::Ping`].
    Pong {
        /// The ping's `seq`.
        seq: u32,
        /// The destination's clock, ns since the Unix epoch.
        unix_ns: i128,
    },
    /// The incoming QEMU listens on `listen` (as the destination gateway reaches it).
    Prepared {
        /// The incoming migration's address.
        listen: SocketAddr,
        /// The destination QEMU's version.
        qemu_version: String,
    },
    /// The VM runs at the destination.
    Running {
        /// When the destination saw the VM running (its clock, ns since the Unix epoch).
        running_unix_ns: i128,
        /// QEMU's timestamp of the destination VM's `RESUME` event (its clock), if seen.
        resumed_unix_ns: Option<i128>,
        /// Arrival of the first guest heartbeat line at the destination (its clock), if the
        /// destination watches a heartbeat.
        first_heartbeat_unix_ns: Option<i128>,
        /// QEMU's own downtime figure is on the source; this is the destination's status.
        status: String,
    },
    /// MAC re-announcement on the destination L2 finished (or was not configured).
    Announced {
        /// Interface used; `None`: no interface configured, nothing sent.
        interface: Option<String>,
        /// MACs announced.
        macs: Vec<String>,
        /// Frames sent.
        frames: usize,
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// The destination cannot go on.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The destination's clock minus the source's, estimated from ping round trips as NTP does:
/// `offset = t_dest - (t_send + t_recv) / 2`, taking the probe with the shortest round trip
/// (least room for asymmetry). Returns `(offset_ns, uncertainty_ns)`; `None` without probes.
pub fn clock_offset(probes: &[(i128, i128, i128)]) -> Option<(i128, i128)> {
    probes
        .iter()
        .min_by_key(|(sent, _, received)| received - sent)
        .map(|&(sent, dest, received)| (dest - (sent + received) / 2, (received - sent) / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_uses_the_tightest_probe() {
        // Destination 1 s ahead. The first probe took 300 ms; the second 10 ms, with its
        // answer stamped 2 ms after the midpoint (asymmetry within its ±5 ms uncertainty).
        let probes = [(0, 1_150_000_000, 300_000_000), (1_000_000_000, 2_007_000_000, 1_010_000_000)];
        let (offset, err) = clock_offset(&probes).unwrap();
        assert_eq!((offset, err), (1_002_000_000, 5_000_000));
        assert!(clock_offset(&[]).is_none());
    }

    #[test]
    fn messages_are_strict() {
        let m: ToDestination = serde_json::from_str(r#"{"abort":{"reason":"x"}}"#).unwrap();
        assert_eq!(m, ToDestination::Abort { reason: "x".into() });
        assert!(serde_json::from_str::<ToDestination>(r#"{"abort":{"reason":"x","extra":1}}"#).is_err());
    }
}
