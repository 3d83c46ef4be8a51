//! Re-announcing a migrated VM's MAC (and IP addresses) on the destination L2 segment.
//!
//! After a VM starts running at the destination, switches still forward its MAC towards the
//! source site and neighbours still hold stale ARP/ND entries until something on the
//! destination segment speaks for it. QEMU's `announce-self` only sends RARP frames from inside
//! the destination QEMU; this module lets the host plugin send the same RARP frames, plus
//! gratuitous ARP and unsolicited IPv6 neighbour advertisements for the VM's known addresses,
//! from any interface on the destination segment.
//!
//! * [`frame`]: sans-IO builders, pure functions from addresses to wire bytes.
//! * [`sender`]: an `AF_PACKET` raw socket and the timed send schedule.

pub mod frame;
pub mod sender;

pub use frame::{frames, Announcement, MacAddr, MacParseError};
pub use sender::{
    announce, announce_blocking, default_schedule, AnnounceError, AnnounceReport, PacketSocket,
    DEFAULT_SCHEDULE_MS,
};
