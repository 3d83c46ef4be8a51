//! The QEMU migration settings Ferry picks for the user (pure; applied by the orchestration).
//!
//! - QEMU-side compression off (xbzrle, the old `compress` threads, multifd compression): the
//!   gateway compresses and deduplicates, and cannot see into QEMU-compressed pages.
//! - Return path on: the source then reports `completed` only after the destination loaded the
//!   whole state, and a destination that fails makes the source resume its VM.
//! - Multifd for large VMs (several connections keep a busy guest's pages moving while one
//!   connection waits), off for small ones (fewer flows to set up across the WAN).
//! - Auto-converge on, with the convergence controller adjusting its step.
//! - Postcopy off: a lost WAN during postcopy loses the VM.

use anyhow::Context;
use ferry_api::control::SharedSettings;
use ferry_qmp::{CapabilityState, MigrationCapability, MigrationParameters, MultifdCompression, Qmp};

use crate::convergence::THROTTLE_INCREMENT_START;

/// VMs at least this large use multifd when the user leaves the choice to Ferry.
pub const MULTIFD_MIN_RAM: u64 = 1 << 30;
/// Multifd channels Ferry picks.
pub const AUTO_MULTIFD_CHANNELS: u8 = 4;

/// The user's multifd choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultifdChoice {
    /// Multifd with [`AUTO_MULTIFD_CHANNELS`] for VMs of [`MULTIFD_MIN_RAM`] or more.
    Auto,
    /// A single migration connection.
    Off,
    /// Multifd with this many channels.
    Channels(u8),
}

impl std::str::FromStr for MultifdChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" | "0" | "1" => Ok(Self::Off),
            n => match n.parse::<u8>() {
                Ok(n) => Ok(Self::Channels(n)),
                Err(_) => Err(format!("`{s}`: expected auto, off or a channel count 2..=255")),
            },
        }
    }
}

/// What to set on each side.
#[derive(Clone, Debug, PartialEq)]
pub struct Chosen {
    /// Capabilities and multifd channels both sides set.
    pub shared: SharedSettings,
    /// Source-only capabilities.
    pub source_capabilities: Vec<(String, bool)>,
    /// Source parameters (besides the shared multifd ones).
    pub source_parameters: MigrationParameters,
}

/// Picks the settings for a VM of `ram_bytes`, among the capabilities this QEMU knows
/// (`available`, from `query-migrate-capabilities`; unknown ones are never set).
pub fn choose(ram_bytes: u64, multifd: MultifdChoice, available: &[MigrationCapability], max_bandwidth: u64, downtime_limit_ms: u64) -> Chosen {
    let channels = match multifd {
        MultifdChoice::Off => None,
        MultifdChoice::Channels(n) => Some(n),
        MultifdChoice::Auto => (ram_bytes >= MULTIFD_MIN_RAM).then_some(AUTO_MULTIFD_CHANNELS),
    };
    let has = |c: &MigrationCapability| available.contains(c);
    let pick = |list: &[(MigrationCapability, bool)]| -> Vec<(String, bool)> {
        list.iter().filter(|(c, _)| has(c)).map(|(c, on)| (c.as_str().to_owned(), *on)).collect()
    };
    let shared = pick(&[
        (MigrationCapability::ReturnPath, true),
        (MigrationCapability::Multifd, channels.is_some()),
        (MigrationCapability::Xbzrle, false),
        (MigrationCapability::Compress, false),
        (MigrationCapability::PostcopyRam, false),
    ]);
    let source_capabilities = pick(&[(MigrationCapability::AutoConverge, true), (MigrationCapability::Events, true)]);
    let source_parameters = MigrationParameters {
        max_bandwidth: Some(max_bandwidth),
        downtime_limit: Some(downtime_limit_ms),
        cpu_throttle_initial: Some(20),
        cpu_throttle_increment: Some(THROTTLE_INCREMENT_START),
        max_cpu_throttle: Some(99),
        throttle_trigger_threshold: Some(50),
        ..MigrationParameters::default()
    };
    Chosen { shared: SharedSettings { capabilities: shared, multifd_channels: channels }, source_capabilities, source_parameters }
}

/// The parameters both sides set for `shared` (multifd channels, compression none).
pub fn shared_parameters(shared: &SharedSettings) -> Option<MigrationParameters> {
    shared.multifd_channels.map(|n| MigrationParameters {
        multifd_channels: Some(n),
        multifd_compression: Some(MultifdCompression::None),
        ..MigrationParameters::default()
    })
}

/// Sets `shared` (plus `extra_capabilities`, this side's own) on one end of the migration:
/// the capabilities, then the shared parameters. Both sides call it, so they cannot drift apart;
/// errors name the command and `side` ("source" or "destination").
pub async fn apply_shared(
    qmp: &Qmp,
    shared: &SharedSettings,
    extra_capabilities: &[(String, bool)],
    side: &str,
) -> anyhow::Result<()> {
    let caps: Vec<CapabilityState> = shared
        .capabilities
        .iter()
        .chain(extra_capabilities)
        .map(|(c, on)| CapabilityState::new(MigrationCapability::from(c.as_str()), *on))
        .collect();
    qmp.migrate_set_capabilities(&caps).await.with_context(|| format!("migrate-set-capabilities on the {side}"))?;
    if let Some(p) = shared_parameters(shared) {
        qmp.migrate_set_parameters(&p).await.with_context(|| format!("migrate-set-parameters (multifd) on the {side}"))?;
    }
    Ok(())
}

/// The parameters the convergence controller adjusts during a migration (values are markers).
pub fn steered_parameters() -> MigrationParameters {
    MigrationParameters { max_bandwidth: Some(0), downtime_limit: Some(0), cpu_throttle_increment: Some(0), ..MigrationParameters::default() }
}

/// What undoes `changed`: for every parameter any of them sets, the value `original` had
/// (from `query-migrate-parameters` before the migration). Parameters `original` lacks stay
/// unset.
pub fn undo_parameters(original: &MigrationParameters, changed: &[&MigrationParameters]) -> MigrationParameters {
    let as_map = |p: &MigrationParameters| match serde_json::to_value(p) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let original = as_map(original);
    let mut undo = serde_json::Map::new();
    for key in changed.iter().flat_map(|c| as_map(c).into_iter().map(|(k, _)| k)) {
        if let Some(value) = original.get(&key) {
            undo.insert(key, value.clone());
        }
    }
    serde_json::from_value(serde_json::Value::Object(undo)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undo_restores_exactly_what_was_changed() {
        let original = MigrationParameters {
            max_bandwidth: Some(134_217_728),
            downtime_limit: Some(300),
            cpu_throttle_increment: Some(10),
            multifd_channels: Some(2),
            announce_rounds: Some(5),
            ..MigrationParameters::default()
        };
        let chosen = MigrationParameters { multifd_channels: Some(4), ..MigrationParameters::default() };
        let undo = undo_parameters(&original, &[&chosen, &steered_parameters()]);
        assert_eq!(
            undo,
            MigrationParameters {
                max_bandwidth: Some(134_217_728),
                downtime_limit: Some(300),
                cpu_throttle_increment: Some(10),
                multifd_channels: Some(2),
                ..MigrationParameters::default()
            }
        );
    }

    fn all() -> Vec<MigrationCapability> {
        use MigrationCapability::*;
        vec![Xbzrle, AutoConverge, Compress, Events, PostcopyRam, ReturnPath, Multifd]
    }

    #[test]
    fn small_vm_single_channel_large_vm_multifd() {
        let small = choose(512 << 20, MultifdChoice::Auto, &all(), 1, 400);
        assert_eq!(small.shared.multifd_channels, None);
        assert!(small.shared.capabilities.contains(&("multifd".into(), false)));
        assert!(small.shared.capabilities.contains(&("return-path".into(), true)));
        assert!(small.shared.capabilities.contains(&("xbzrle".into(), false)));
        assert!(shared_parameters(&small.shared).is_none());
        let large = choose(8 << 30, MultifdChoice::Auto, &all(), 1, 400);
        assert_eq!(large.shared.multifd_channels, Some(AUTO_MULTIFD_CHANNELS));
        let p = shared_parameters(&large.shared).unwrap();
        assert_eq!(p.multifd_compression, Some(MultifdCompression::None));
        assert_eq!(choose(64 << 20, MultifdChoice::Channels(2), &all(), 1, 400).shared.multifd_channels, Some(2));
    }

    #[test]
    fn unknown_capabilities_are_not_set() {
        // A QEMU without the old `compress` (removed in 9.1) never gets it.
        let caps: Vec<_> = all().into_iter().filter(|c| *c != MigrationCapability::Compress).collect();
        let chosen = choose(1 << 30, MultifdChoice::Auto, &caps, 1, 400);
        assert!(chosen.shared.capabilities.iter().all(|(c, _)| c != "compress"));
        assert!(chosen.source_capabilities.contains(&("auto-converge".into(), true)));
    }

    #[test]
    fn multifd_choice_parses() {
        assert_eq!("auto".parse(), Ok(MultifdChoice::Auto));
        assert_eq!("off".parse(), Ok(MultifdChoice::Off));
        assert_eq!("4".parse(), Ok(MultifdChoice::Channels(4)));
        assert!("many".parse::<MultifdChoice>().is_err());
    }
}
