//! A raw `AF_PACKET` socket receiving every frame seen on one interface, for tests that check
//! what crosses a bridge. (The product's announcement sender has its own sending socket in
//! ferry-host; the kit must not depend on ferry-host.)

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;

/// How long [`Capture::recv`] waits for a frame.
const RECV_TIMEOUT_US: libc::suseconds_t = 20_000;

/// A raw packet socket bound to one interface (in the calling thread's network namespace).
#[derive(Debug)]
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    /// Opens a capture of all protocols on `interface` with a 20 ms receive timeout.
    pub fn open(interface: &str) -> io::Result<Self> {
        // ETH_P_ALL (3) in network byte order, as both socket() and sockaddr_ll want it.
        let all = (libc::ETH_P_ALL as u16).to_be();
        let name = std::ffi::CString::new(interface).map_err(io::Error::other)?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(all)) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh valid descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
        // SAFETY: `addr` is initialised, outlives the call, and its exact size is passed.
        let rc = unsafe {
            libc::bind(fd.as_raw_fd(), ptr::addr_of!(addr).cast(), mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let timeout = libc::timeval { tv_sec: 0, tv_usec: RECV_TIMEOUT_US };
        // SAFETY: `timeout` is an initialised timeval that outlives the call; its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                ptr::addr_of!(timeout).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// The next incoming (not locally sent) frame, or `None` after the 20 ms receive timeout.
    ///
    /// # Panics
    /// On a receive error other than a timeout or an interruption (the capture is broken).
    pub fn recv(&self) -> Option<Vec<u8>> {
        loop {
            let mut buf = vec![0u8; 2048];
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
            let mut from_len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its full length, `from`/`from_len` are valid for
            // writes and describe a buffer of the stated size; all outlive the call.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    ptr::addr_of_mut!(from).cast(),
                    &mut from_len,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return None,
                    _ => panic!("capture recvfrom failed: {err}"),
                }
            };
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            buf.truncate(n);
            return Some(buf);
        }
    }
}

/// The source MAC address of an Ethernet frame (bytes 6..12).
///
/// # Panics
/// When `frame` is shorter than an Ethernet header's two addresses.
pub fn src_mac(frame: &[u8]) -> &[u8] {
    &frame[6..12]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn src_mac_is_the_second_address() {
        let frame: Vec<u8> = (0u8..14).collect();
        assert_eq!(src_mac(&frame), &[6, 7, 8, 9, 10, 11]);
    }

    #[test]
    fn missing_interface_is_an_error() {
        assert!(Capture::open("ferry-no-such0").is_err());
    }
}
