//! Sending announcement frames out of a named interface on a schedule.
//!
//! [`PacketSocket`] is a Linux `AF_PACKET`/`SOCK_RAW` socket bound to one interface. It is bound
//! with protocol 0, so it never queues received traffic; it only transmits complete Ethernet
//! frames as built by [`super::frame`]. [`announce`] (async, tokio timers) and
//! [`announce_blocking`] (thread sleeps) send every frame of an [`Announcement`] once per entry
//! of a schedule of offsets from the start, by default QEMU's announce-self timing
//! ([`DEFAULT_SCHEDULE_MS`]: 0, 50, 200, 450, 800 ms).
//!
//! Opening the socket needs root or `CAP_NET_RAW` in the interface's network namespace, and the
//! socket belongs to the network namespace of the thread that opens it.

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::time::Duration;

use super::frame::{frames, Announcement, ETH_HEADER_LEN};

/// QEMU's default announce-self timing: a round at each of these offsets (ms) from the start.
///
/// QEMU (`initial` 50, `max` 550, `rounds` 5, `step` 100) sends the first round at once and waits
/// `initial + (rounds - round - 1) * step` between rounds: 50, 150, 250, 350 ms.
pub const DEFAULT_SCHEDULE_MS: [u64; 5] = [0, 50, 200, 450, 800];

/// Longest interface name Linux accepts (`IFNAMSIZ` minus the terminating NUL).
const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// [`DEFAULT_SCHEDULE_MS`] as durations.
pub fn default_schedule() -> Vec<Duration> {
    DEFAULT_SCHEDULE_MS
        .iter()
        .map(|ms| Duration::from_millis(*ms))
        .collect()
}

/// Why an announcement could not be sent. Every variant names the interface.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// The interface name cannot be a Linux interface name.
    #[error("invalid interface name {interface:?}: {reason}")]
    InvalidInterfaceName {
        /// The rejected name.
        interface: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No interface of that name exists in this thread's network namespace.
    #[error("no such interface {interface}")]
    NoSuchInterface {
        /// The interface asked for.
        interface: String,
    },
    /// Looking the interface up failed for another reason.
    #[error("cannot look up interface {interface}: {source}")]
    InterfaceLookup {
        /// The interface asked for.
        interface: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The process may not open raw packet sockets.
    #[error(
        "permission denied opening a raw packet socket on {interface} \
         (needs root or CAP_NET_RAW): {source}"
    )]
    PermissionDenied {
        /// The interface asked for.
        interface: String,
        /// The OS error (`EPERM` or `EACCES`).
        #[source]
        source: io::Error,
    },
    /// Creating the raw packet socket failed for another reason.
    #[error("cannot open a raw packet socket for {interface}: {source}")]
    Socket {
        /// The interface asked for.
        interface: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Binding the socket to the interface failed.
    #[error("cannot bind a raw packet socket to {interface}: {source}")]
    Bind {
        /// The interface asked for.
        interface: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Transmitting a frame failed (e.g. `ENETDOWN` when the interface is down).
    #[error("cannot send an announcement frame on {interface}: {source}")]
    Send {
        /// The interface.
        interface: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel accepted only part of a frame.
    #[error("short send on {interface}: {sent} of {len} bytes")]
    ShortSend {
        /// The interface.
        interface: String,
        /// Bytes the kernel took.
        sent: usize,
        /// Bytes in the frame.
        len: usize,
    },
    /// A frame shorter than an Ethernet header was handed to [`PacketSocket::send`].
    #[error("refusing to send a {len}-byte frame on {interface}: shorter than an Ethernet header")]
    FrameTooShort {
        /// The interface.
        interface: String,
        /// The frame's length.
        len: usize,
    },
}

/// What a completed schedule did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceReport {
    /// Rounds sent (the schedule's length).
    pub rounds: usize,
    /// Frames sent in total (rounds × frames per round).
    pub frames_sent: usize,
}

/// A raw `AF_PACKET` socket bound to one interface, for transmitting whole Ethernet frames.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    interface: String,
    ifindex: libc::c_int,
}

impl PacketSocket {
    /// Opens a raw packet socket (`socket(AF_PACKET, SOCK_RAW, 0)`) bound to `interface` in the
    /// calling thread's network namespace.
    ///
    /// # Errors
    /// [`AnnounceError::InvalidInterfaceName`], [`AnnounceError::NoSuchInterface`],
    /// [`AnnounceError::PermissionDenied`] without `CAP_NET_RAW`, or another variant for other
    /// OS failures; all name the interface.
    pub fn open(interface: &str) -> Result<Self, AnnounceError> {
        let ifindex = interface_index(interface)?;

        // SAFETY: socket(2) takes no pointers; the returned descriptor is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            let source = io::Error::last_os_error();
            let interface = interface.to_owned();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => {
                    AnnounceError::PermissionDenied { interface, source }
                }
                _ => AnnounceError::Socket { interface, source },
            });
        }
        // SAFETY: `raw` is a valid descriptor just returned by socket(2) and owned by nothing
        // else, so OwnedFd may take ownership and close it on drop.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // Protocol 0: the socket is bound to the device but receives no frames at all.
        let addr = sockaddr_ll(ifindex, 0, None);
        // SAFETY: `addr` is a fully initialised sockaddr_ll that outlives the call, and the length
        // passed is exactly its size; `fd` is an open socket.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                socklen_of::<libc::sockaddr_ll>(),
            )
        };
        if rc != 0 {
            let source = io::Error::last_os_error();
            return Err(AnnounceError::Bind {
                interface: interface.to_owned(),
                source,
            });
        }
        tracing::debug!(interface, ifindex, "opened raw packet socket");
        Ok(Self {
            fd,
            interface: interface.to_owned(),
            ifindex,
        })
    }

    /// The interface this socket is bound to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The interface's index in the socket's network namespace.
    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }

    /// Transmits one complete Ethernet frame (no FCS) unchanged.
    ///
    /// The call does not wait on the network: it returns once the kernel has queued the frame.
    ///
    /// # Errors
    /// [`AnnounceError::FrameTooShort`] for fewer than 14 bytes, [`AnnounceError::Send`] when the
    /// kernel refuses the frame (interface down, frame larger than the MTU, …),
    /// [`AnnounceError::ShortSend`] if it took only part of it.
    pub fn send(&self, frame: &[u8]) -> Result<(), AnnounceError> {
        if frame.len() < ETH_HEADER_LEN {
            return Err(AnnounceError::FrameTooShort {
                interface: self.interface.clone(),
                len: frame.len(),
            });
        }
        // The ethertype bytes are already in network order, as sll_protocol wants them.
        let protocol = u16::from_ne_bytes([frame[12], frame[13]]);
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let addr = sockaddr_ll(self.ifindex, protocol, Some(dst));
        loop {
            // SAFETY: `frame` is a live slice whose pointer and length describe readable memory;
            // `addr` is a fully initialised sockaddr_ll that outlives the call and the length
            // passed is exactly its size; `self.fd` is an open socket.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast::<libc::c_void>(),
                    frame.len(),
                    0,
                    ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                    socklen_of::<libc::sockaddr_ll>(),
                )
            };
            match usize::try_from(sent) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => {
                    return Err(AnnounceError::ShortSend {
                        interface: self.interface.clone(),
                        sent: n,
                        len: frame.len(),
                    })
                }
                Err(_) => {
                    let source = io::Error::last_os_error();
                    if source.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(AnnounceError::Send {
                        interface: self.interface.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// Sends each of `frames` once, in order.
    fn send_round(&self, frames: &[Vec<u8>]) -> Result<(), AnnounceError> {
        frames.iter().try_for_each(|f| self.send(f))
    }
}

/// Sends every frame of `announcement` out of `interface` once per entry of `schedule`, each
/// round at that offset from the call's start (tokio timers; offsets in the past fire at once).
///
/// The socket is opened in the calling thread's network namespace before the first round. The
/// first error aborts the remaining rounds.
///
/// # Errors
/// See [`PacketSocket::open`] and [`PacketSocket::send`].
pub async fn announce(
    interface: &str,
    announcement: &Announcement,
    schedule: &[Duration],
) -> Result<AnnounceReport, AnnounceError> {
    let (socket, frames) = prepare(interface, announcement, schedule)?;
    let start = tokio::time::Instant::now();
    for (round, offset) in schedule.iter().enumerate() {
        tokio::time::sleep_until(start + *offset).await;
        send_logged(&socket, &frames, round, *offset)?;
    }
    Ok(finish(&socket, &frames, schedule))
}

/// Blocking twin of [`announce`]: same frames, same schedule, waiting with thread sleeps.
///
/// # Errors
/// See [`PacketSocket::open`] and [`PacketSocket::send`].
pub fn announce_blocking(
    interface: &str,
    announcement: &Announcement,
    schedule: &[Duration],
) -> Result<AnnounceReport, AnnounceError> {
    let (socket, frames) = prepare(interface, announcement, schedule)?;
    let start = std::time::Instant::now();
    for (round, offset) in schedule.iter().enumerate() {
        let due = start + *offset;
        let now = std::time::Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        send_logged(&socket, &frames, round, *offset)?;
    }
    Ok(finish(&socket, &frames, schedule))
}

/// Opens the socket and builds the frames; logs what is about to happen.
fn prepare(
    interface: &str,
    announcement: &Announcement,
    schedule: &[Duration],
) -> Result<(PacketSocket, Vec<Vec<u8>>), AnnounceError> {
    if announcement.mac.is_multicast() {
        tracing::warn!(mac = %announcement.mac, interface, "announcing a multicast MAC address");
    }
    let socket = PacketSocket::open(interface)?;
    let frames = frames(announcement);
    tracing::info!(
        interface,
        mac = %announcement.mac,
        ipv4 = announcement.ipv4.len(),
        ipv6 = announcement.ipv6.len(),
        rounds = schedule.len(),
        "announcing MAC on destination segment"
    );
    Ok((socket, frames))
}

/// Sends one round, logging the outcome.
fn send_logged(
    socket: &PacketSocket,
    frames: &[Vec<u8>],
    round: usize,
    offset: Duration,
) -> Result<(), AnnounceError> {
    match socket.send_round(frames) {
        Ok(()) => {
            tracing::debug!(
                interface = socket.interface(),
                round,
                ?offset,
                frames = frames.len(),
                "sent announce round"
            );
            Ok(())
        }
        Err(err) => {
            tracing::warn!(interface = socket.interface(), round, error = %err, "announce round failed");
            Err(err)
        }
    }
}

/// The report for a completed schedule.
fn finish(socket: &PacketSocket, frames: &[Vec<u8>], schedule: &[Duration]) -> AnnounceReport {
    let report = AnnounceReport {
        rounds: schedule.len(),
        frames_sent: schedule.len() * frames.len(),
    };
    tracing::info!(
        interface = socket.interface(),
        rounds = report.rounds,
        frames = report.frames_sent,
        "announcement done"
    );
    report
}

/// Resolves `interface` to its index in the calling thread's network namespace.
fn interface_index(interface: &str) -> Result<libc::c_int, AnnounceError> {
    let invalid = |reason| AnnounceError::InvalidInterfaceName {
        interface: interface.to_owned(),
        reason,
    };
    if interface.is_empty() {
        return Err(invalid("empty"));
    }
    if interface.len() > MAX_IFNAME_LEN {
        return Err(invalid("longer than 15 bytes"));
    }
    let name = CString::new(interface).map_err(|_| invalid("contains a NUL byte"))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        let source = io::Error::last_os_error();
        return Err(match source.raw_os_error() {
            Some(libc::ENODEV | libc::ENXIO) => AnnounceError::NoSuchInterface {
                interface: interface.to_owned(),
            },
            _ => AnnounceError::InterfaceLookup {
                interface: interface.to_owned(),
                source,
            },
        });
    }
    libc::c_int::try_from(index).map_err(|_| AnnounceError::InterfaceLookup {
        interface: interface.to_owned(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("interface index {index} out of range"),
        ),
    })
}

/// A `sockaddr_ll` for `ifindex`, `protocol` (network byte order) and an optional Ethernet
/// destination.
fn sockaddr_ll(ifindex: libc::c_int, protocol: u16, dst: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is a plain C struct of integers and byte arrays, for which all-zero
    // bytes are a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
    // AF_PACKET (17) fits sa_family_t (u16).
    addr.sll_family = libc::AF_PACKET as libc::sa_family_t;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex;
    if let Some(dst) = dst {
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst);
    }
    addr
}

/// `size_of::<T>()` as a `socklen_t` (socket address structs are far below 4 GiB).
fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_matches_qemu() {
        let ms: Vec<u128> = default_schedule().iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 50, 200, 450, 800]);
    }

    #[test]
    fn missing_interface_is_named() {
        let err = PacketSocket::open("eth9").expect_err("no eth9 here");
        // Root or not, lookup happens before the socket is opened.
        assert_eq!(err.to_string(), "no such interface eth9");
    }

    #[test]
    fn bad_interface_names() {
        for (name, what) in [
            ("", "empty"),
            ("abcdefghijklmnop", "longer than 15"),
            ("a\0b", "NUL"),
        ] {
            let err = PacketSocket::open(name).expect_err(name);
            assert!(
                matches!(err, AnnounceError::InvalidInterfaceName { .. }),
                "{err}"
            );
            assert!(err.to_string().contains(what), "{err}");
        }
    }
}
