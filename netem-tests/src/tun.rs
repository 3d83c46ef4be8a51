//! TUN devices (`IFF_TUN | IFF_NO_PI`, non-blocking) opened through
//! `/dev/net/tun` with the `TUNSETIFF` ioctl.  A device is created in the
//! network namespace of the calling thread; its file descriptor keeps working
//! from any thread and namespace afterwards.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{Error, Result};

/// `struct ifreq` as used by `TUNSETIFF`: name + flags, padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TUN device: reading yields IP packets the namespace sends out of
/// it, writing injects IP packets as if received from the wire.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
}

impl Tun {
    /// Creates TUN device `name` (at most 15 bytes) in the calling thread's
    /// network namespace. The device disappears when this value is dropped.
    pub fn create(name: &str) -> Result<Tun> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(Error::InvalidConfig(format!(
                "interface name {name:?} must be 1..{} bytes",
                libc::IFNAMSIZ - 1
            )));
        }
        let path =
            CString::new("/dev/net/tun").map_err(|e| Error::io("tun path", io::Error::other(e)))?;
        // SAFETY: `path` is a valid NUL-terminated string; open has no other preconditions.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(Error::io(
                "opening /dev/net/tun",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a freshly opened descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has the
        // kernel's layout (name[16], short flags, padding to 40 bytes) and
        // lives across the call; `fd` is an open /dev/net/tun descriptor.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETIFF as _,
                &mut req as *mut IfReqFlags,
            )
        };
        if rc < 0 {
            return Err(Error::io(
                format!("TUNSETIFF {name}"),
                io::Error::last_os_error(),
            ));
        }
        let actual: Vec<u8> = req
            .name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        let name = String::from_utf8_lossy(&actual).into_owned();
        tracing::debug!(device = %name, "created TUN device");
        Ok(Tun { fd, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw descriptor (for `poll`).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one packet into `buf` (non-blocking: `WouldBlock` when none is queued).
    #[inline]
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid writable memory of `buf.len()` bytes for the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Injects one packet.
    #[inline]
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        // SAFETY: `packet` is valid readable memory of `packet.len()` bytes for the call.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}
