//! Names and address blocks for concurrently running WANs: unique namespace
//! names (pid + counter), a cross-process lease on a `10.77.<n>.0/24` block
//! (an `flock`ed file per block), and sweeping of leftovers from dead processes.

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::netns;

/// Prefix of every namespace this crate names by itself.
pub const DEFAULT_PREFIX: &str = "fnetem";

/// Name the CLI uses when `--name` is not given.
pub const CLI_DEFAULT_NAME: &str = "fnetem-cli";

/// Directories tried, in order, for the per-block lock files.
const LOCK_DIRS: [&str; 2] = ["/run/ferry-netem", "/tmp/ferry-netem"];

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh WAN name, `fnetem-<pid>-<counter>`, unique within the machine
/// while this process lives.
pub fn auto_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{DEFAULT_PREFIX}-{}-{n}", std::process::id())
}

/// Namespace names of the two sites of WAN `base`.
pub fn site_names(base: &str) -> (String, String) {
    (format!("{base}-a"), format!("{base}-b"))
}

/// Exclusive lease on the address block `10.77.<index>.0/24`, held (via
/// `flock`) until dropped or the process dies.
#[derive(Debug)]
pub struct SubnetLease {
    index: u8,
    path: PathBuf,
    _file: File,
}

impl SubnetLease {
    /// The block's third octet.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Address of site A (`10.77.<n>.1`).
    pub fn addr_a(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 1)
    }

    /// Address of site B (`10.77.<n>.2`).
    pub fn addr_b(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 2)
    }

    /// The lock file backing this lease.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SubnetLease {
    fn drop(&mut self) {
        // Unlink while still holding the lock (see `try_lease` for why that is safe), so that
        // tests leave no files behind.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock_dir() -> Result<PathBuf> {
    let mut last = None;
    for dir in LOCK_DIRS {
        match std::fs::create_dir_all(dir) {
            Ok(()) => return Ok(PathBuf::from(dir)),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::io(
        "creating a lock directory",
        last.unwrap_or_else(|| std::io::Error::other("no lock directory candidates")),
    ))
}

/// Tries to take block `index` without waiting.
fn try_lease(dir: &Path, index: u8) -> Result<Option<SubnetLease>> {
    let path = dir.join(format!("subnet-{index}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    // SAFETY: flock on a file descriptor we own for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        // A previous holder unlinks the file on drop; if that happened between our open and our
        // lock, we hold a lock on a file nobody else can find, so the block is not ours.
        use std::os::unix::fs::MetadataExt;
        let same = match (file.metadata(), std::fs::metadata(&path)) {
            (Ok(held), Ok(named)) => held.ino() == named.ino() && held.dev() == named.dev(),
            _ => false,
        };
        if !same {
            return Ok(None);
        }
        return Ok(Some(SubnetLease {
            index,
            path,
            _file: file,
        }));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(Error::io(format!("locking {}", path.display()), err))
    }
}

/// Leases a free `10.77.<n>.0/24` block, starting the search at a value derived
/// from the pid and a counter so concurrent processes rarely contend.
pub fn lease_subnet() -> Result<SubnetLease> {
    let dir = lock_dir()?;
    sweep_stale_leases(&dir);
    let seed =
        (std::process::id() as u64).wrapping_mul(7919) + COUNTER.load(Ordering::Relaxed) * 31;
    // Block 0 is left out: 10.77.0.x looks too much like a network address.
    for i in 0..255u64 {
        let index = (1 + (seed + i) % 255) as u8;
        if let Some(lease) = try_lease(&dir, index)? {
            return Ok(lease);
        }
    }
    Err(Error::InvalidConfig(
        "all 255 address blocks 10.77.1-255.0/24 are in use".into(),
    ))
}

/// Removes lease files nobody holds (left by a process that died, or a test that leaked its
/// `Wan` on purpose): taking the lease and dropping it unlinks the file.
fn sweep_stale_leases(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let index = name
            .to_str()
            .and_then(|n| n.strip_prefix("subnet-"))
            .and_then(|n| n.strip_suffix(".lock"))
            .and_then(|n| n.parse::<u8>().ok());
        if let Some(index) = index {
            // Held leases answer Ok(None); a free one is taken and dropped at once.
            let _ = try_lease(dir, index);
        }
    }
}

/// The pid encoded in an auto name `fnetem-<pid>-<n>-{a,b,probe}`, if it is one.
fn owner_pid(ns_name: &str) -> Option<u32> {
    let rest = ns_name.strip_prefix(DEFAULT_PREFIX)?.strip_prefix('-')?;
    let mut parts = rest.split('-');
    let pid = parts.next()?.parse().ok()?;
    let _counter: u64 = parts.next()?.parse().ok()?;
    let side = parts.next()?;
    if matches!(side, "a" | "b" | "probe") && parts.next().is_none() {
        Some(pid)
    } else {
        None
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes auto-named namespaces whose owning process no longer exists
/// (leftovers of a crashed or killed test). Returns what was removed.
pub fn sweep_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in netns::list()? {
        if let Some(pid) = owner_pid(&name) {
            if !pid_alive(pid) {
                tracing::info!(netns = %name, pid, "removing leftover namespace of a dead process");
                netns::delete(&name)?;
                removed.push(name);
            }
        }
    }
    Ok(removed)
}

/// Deletes every namespace whose name starts with `prefix`. Returns what was removed.
pub fn remove_prefixed(prefix: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in netns::list()? {
        if name.starts_with(prefix) {
            netns::delete(&name)?;
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_names_are_unique_and_parse_back() {
        let a = auto_name();
        let b = auto_name();
        assert_ne!(a, b);
        let (sa, sb) = site_names(&a);
        assert_eq!(owner_pid(&sa), Some(std::process::id()));
        assert_eq!(owner_pid(&sb), Some(std::process::id()));
        assert_eq!(owner_pid("fnetem-cli-a"), None);
        assert_eq!(owner_pid("fnetem-12-3-c"), None);
        assert_eq!(owner_pid("fnetem-12-3-probe"), Some(12));
        assert_eq!(owner_pid("other-12-3-a"), None);
    }
}
