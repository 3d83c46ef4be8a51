//! QEMU versions and modes known to make a live migration unsafe: pure functions of what QMP
//! says (`query-version`, `query-kvm`), for `ferry-host` to refuse or warn before it migrates.
//!
//! Today one entry. QEMU's TCG accelerator before 9.0 (upstream commit 03bfc2188f, "physmem:
//! Fix migration dirty bitmap coherency with TCG memory access"; Debian 12's 7.2 does not have
//! it) does not re-arm write tracking for pages that sit in a vCPU's TLB when a migration syncs
//! the dirty bitmap. From the third dirty sync on, writes to such pages (stacks, hot kernel
//! data) are not sent again: the destination resumes with stale copies. Measured with Ferry's
//! RAM check at cutover (`ferry_netem::qemu::ram_check`, `netem-tests/README.md`), on QEMU
//! 7.2.22 it loses pages both with and without Ferry in the path; QEMU 10.0.2 loses none.
//! `ferry-host` holds the switchover for many passes, which makes such losses near certain.
//! KVM tracks writes in hardware and is not affected.

use std::fmt;

use crate::types::VersionTriple;

/// The first QEMU release whose TCG keeps dirty tracking coherent across syncs.
pub const TCG_DIRTY_TRACKING_FIXED_IN: VersionTriple = VersionTriple { major: 9, minor: 0, micro: 0 };

/// A QEMU defect that makes migrating this VM unsafe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownIssue {
    /// What goes wrong, in a few words.
    pub summary: &'static str,
    /// The QEMU of the VM.
    pub version: VersionTriple,
    /// The first QEMU version without it.
    pub fixed_in: VersionTriple,
}

impl fmt::Display for KnownIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "QEMU {} under TCG: {} (fixed in QEMU {}; use KVM or a newer QEMU)",
            self.version, self.summary, self.fixed_in
        )
    }
}

/// The known issue that makes migrating a VM of QEMU `version` (from `query-version`) unsafe,
/// given whether it runs under KVM (`query-kvm`'s `enabled`), if any. `ferry-host` should refuse
/// such a migration (or, if told to go ahead, warn that the destination may resume with stale
/// memory).
pub fn migration_issue(version: VersionTriple, kvm_enabled: bool) -> Option<KnownIssue> {
    (!kvm_enabled && version < TCG_DIRTY_TRACKING_FIXED_IN).then_some(KnownIssue {
        summary: "dirty tracking misses pages written again after the second dirty sync, so a migration \
                  of more than two passes can resume the guest with stale memory",
        version,
        fixed_in: TCG_DIRTY_TRACKING_FIXED_IN,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, micro: u32) -> VersionTriple {
        VersionTriple { major, minor, micro }
    }

    #[test]
    fn tcg_before_9_0_is_an_issue_kvm_and_newer_qemu_are_not() {
        let issue = migration_issue(v(7, 2, 22), false).expect("7.2 under TCG");
        assert_eq!((issue.version, issue.fixed_in), (v(7, 2, 22), v(9, 0, 0)));
        let text = issue.to_string();
        assert!(text.starts_with("QEMU 7.2.22 under TCG: dirty tracking misses pages"), "{text}");
        assert!(text.ends_with("(fixed in QEMU 9.0.0; use KVM or a newer QEMU)"), "{text}");
        assert!(migration_issue(v(8, 2, 9), false).is_some());
        assert!(migration_issue(v(7, 2, 22), true).is_none(), "KVM tracks in hardware");
        assert!(migration_issue(v(9, 0, 0), false).is_none());
        assert!(migration_issue(v(10, 0, 2), false).is_none());
    }
}
