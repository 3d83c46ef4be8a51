//! The messages the source and destination host-plugins exchange on their control channel.
//!
//! The channel is an ordinary TCP connection carried by the gateways (a forward the source opens
//! through its gateway's API, codec off), so nothing but the gateways' QUIC connection crosses the
//! WAN. Messages are JSON lines ([`crate::framing`]). One session migrates one VM:
//!
//! ```text
//! source                                    destination (ferry-host serve)
//!   Ping ×N ────────────────────────────────▶  Pong (clock offset for the downtime figure)
//!   Prepare{vm, settings, ips} ─────────────▶  claims `vm` (one session per VM), connects the
//!                                              incoming QEMU's QMP, `stop` (autostart off: the
//!                                              VM never starts by itself), capabilities,
//!                                              migrate-incoming
//!                              ◀────────────  Prepared{listen}
//!   (migration stream through the gateways to `listen`; the destination loads it and stays paused)
//!   ── source QEMU `completed` (return path on: the destination loaded the state) ──
//!   ══ commit point: the source never resumes again unless told Failed{vm_discarded: true} ══
//!   Commit ─────────────────────────────────▶  checks the state is loaded, `cont`
//!                              ◀────────────  Running{...}, then announces the MACs
//!                              ◀────────────  Announced{...}
//!   Abort{reason} (before Commit) ──────────▶  discards the incoming QEMU (so does a lost channel)
//!                              ◀────────────  Failed{reason, vm_discarded} (any time)
//! ```
//!
//! After a migration that ended without knowing (the source saw no answer to `Commit`),
//! `ferry-host resolve` opens a session of its own:
//!
//! ```text
//!   Inquire{vm} ────────────────────────────▶  VmState{state: running | paused | absent | busy}
//!   Discard{vm} ────────────────────────────▶  Discarded{vm_discarded} (quit, else SIGKILL)
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
    /// The commit: the source QEMU completed and the source will never resume its VM (unless
    /// told `Failed { vm_discarded: true }`); start the VM here.
    Commit,
    /// The migration is given up before `Commit`; the source VM keeps running.
    Abort {
        /// Why.
        reason: String,
    },
    /// (`ferry-host resolve`) What is the incoming VM `vm` here?
    Inquire {
        /// The VM's name.
        vm: String,
    },
    /// (`ferry-host resolve`) Make sure the incoming VM `vm` does not and will not run here.
    Discard {
        /// The VM's name.
        vm: String,
    },
}

/// An incoming VM's state at the destination, as `Inquire` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncomingState {
    /// It runs here.
    Running,
    /// Its QEMU is there and not running.
    Paused,
    /// No QEMU answers at its QMP socket.
    Absent,
    /// A migration session for it is under way here; ask again.
    Busy,
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
        /// The incoming VM is certainly not running and never will (its QEMU quit or was
        /// killed). After `Commit` only this lets the source resume.
        vm_discarded: bool,
    },
    /// Answer to `Inquire`.
    VmState {
        /// The VM's name.
        vm: String,
        /// What it is here.
        state: IncomingState,
    },
    /// Answer to `Discard`.
    Discarded {
        /// The VM's name.
        vm: String,
        /// Its QEMU is certainly gone (quit or killed), or there was none.
        vm_discarded: bool,
        /// What was done, or why it could not be made sure.
        detail: String,
    },
}

/// Checks a VM name as both sides use it: in file names (the destination's `{vm}` socket paths,
/// the source's lock files). Letters, digits, `.`, `_`, `-`, not starting with `.`, up to 64.
pub fn check_vm_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!("VM name `{name}` is not usable in a socket path (letters, digits, `.`, `_`, `-`; up to 64)"))
    }
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
    fn vm_names_cannot_escape_a_path() {
        assert!(check_vm_name("vm-1.prod_a").is_ok());
        for bad in ["", "../etc", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(check_vm_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_are_strict() {
        let m: ToDestination = serde_json::from_str(r#"{"abort":{"reason":"x"}}"#).unwrap();
        assert_eq!(m, ToDestination::Abort { reason: "x".into() });
        assert!(serde_json::from_str::<ToDestination>(r#"{"abort":{"reason":"x","extra":1}}"#).is_err());
    }
}
