//! Which image a manifest describes, and whether it changed since.
//!
//! **Check used: metadata, not content.** [`ImageIdentity::check_unchanged`] compares size,
//! mtime, ctime (nanoseconds), inode and device. ctime cannot be set from user space, so a
//! write followed by `touch -d` to restore the mtime is still caught. Limits: (1) it sees only
//! writes through the filesystem: a block device node (a zvol, an RBD or DRBD device, an LV)
//! keeps its times when its content changes, so for those it proves nothing; (2) a filesystem
//! with coarse timestamps can miss a write within the same tick as the manifest's reading;
//! (3) writes through a shared mmap may update the times late. Where these matter, recompute
//! the manifest (or its Merkle root) and compare: that is exact, and costs a full read.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The identity of an image file at one moment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageIdentity {
    /// Path as given.
    pub path: PathBuf,
    /// File size in bytes (for qcow2 not the disk size).
    pub file_size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Status change time, nanoseconds since the epoch.
    pub ctime_ns: i128,
    /// Inode number.
    pub inode: u64,
    /// Device number.
    pub device: u64,
}

/// The image is not the one the manifest describes any more.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaChanged {
    /// Its metadata differs.
    #[error("{path} changed after its manifest: {what} was {before}, is {now}")]
    Changed {
        /// The image.
        path: PathBuf,
        /// Which field.
        what: &'static str,
        /// Value in the manifest.
        before: String,
        /// Value now.
        now: String,
    },
    /// It cannot be examined.
    #[error("cannot stat {path}: {source}")]
    Stat {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl ImageIdentity {
    /// The identity of `path` now.
    pub fn of(path: &Path) -> Result<Self, ReplicaChanged> {
        let meta = std::fs::metadata(path).map_err(|source| ReplicaChanged::Stat { path: path.to_owned(), source })?;
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Ok(Self {
            path: path.to_owned(),
            file_size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            inode: meta.ino(),
            device: meta.dev(),
        })
    }

    /// Whether the file is still the one described (see the module doc for what this misses).
    pub fn check_unchanged(&self) -> Result<(), ReplicaChanged> {
        let now = Self::of(&self.path)?;
        let fields: [(&'static str, i128, i128); 5] = [
            ("size", self.file_size.into(), now.file_size.into()),
            ("mtime (ns)", self.mtime_ns, now.mtime_ns),
            ("ctime (ns)", self.ctime_ns, now.ctime_ns),
            ("inode", self.inode.into(), now.inode.into()),
            ("device", self.device.into(), now.device.into()),
        ];
        match fields.iter().find(|(_, before, now)| before != now) {
            None => Ok(()),
            Some((what, before, now)) => Err(ReplicaChanged::Changed { path: self.path.clone(), what, before: before.to_string(), now: now.to_string() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_write_is_seen_even_when_the_mtime_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let identity = ImageIdentity::of(&path).unwrap();
        identity.check_unchanged().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[1], 100).unwrap();
        // Put the mtime back as it was: ctime still moves.
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(identity.mtime_ns as u64);
        file.set_modified(mtime).unwrap();
        let err = identity.check_unchanged().unwrap_err();
        assert!(matches!(err, ReplicaChanged::Changed { what: "ctime (ns)", .. }), "{err}");
        // Replaced by another file of the same size: another inode.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        assert!(identity.check_unchanged().is_err());
    }
}
