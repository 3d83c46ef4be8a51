//! One migration per VM per host: `ferry-host migrate` holds an exclusive lock for the VM's QMP
//! socket and for its name while it runs, so a second one for the same VM is refused at once
//! with the first one's pid, instead of racing it. The locks are `flock`s on files in the state
//! directory: the kernel drops them when the process ends, however it ends.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/ferry";

/// A held lock; released on drop (or when the process ends).
#[derive(Debug)]
pub struct MigrationLock {
    _file: File,
    path: PathBuf,
}

impl MigrationLock {
    /// Takes the lock named `key` (a file name) in `dir`, or says who holds it.
    pub fn acquire(dir: &Path, key: &str, what: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        let path = dir.join(key);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
                bail!("another ferry-host migrate{holder} is migrating {what}; refusing a second one");
            }
            Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
        }
        file.set_len(0).and_then(|()| file.rewind()).and_then(|()| write!(file, "{}", std::process::id())).ok();
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock key of a QMP socket: its canonical path, made a file name.
pub fn qmp_key(qmp: &Path) -> String {
    let canonical = std::fs::canonicalize(qmp).unwrap_or_else(|_| qmp.to_path_buf());
    let flat: String = canonical.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '%' }).collect();
    format!("qmp{flat}.lock")
}

/// The lock key of a VM name (already checked to be path-safe).
pub fn vm_key(name: &str) -> String {
    format!("vm-{name}.lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = MigrationLock::acquire(dir.path(), &vm_key("web1"), "VM web1").unwrap();
        let err = MigrationLock::acquire(dir.path(), &vm_key("web1"), "VM web1").unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())) && err.contains("VM web1"), "{err}");
        // Another VM is independent.
        let _other = MigrationLock::acquire(dir.path(), &vm_key("web2"), "VM web2").unwrap();
        drop(first);
        MigrationLock::acquire(dir.path(), &vm_key("web1"), "VM web1").unwrap();
    }

    #[test]
    fn qmp_keys_are_file_names() {
        let key = qmp_key(Path::new("/nonexistent/run/vm 1.qmp"));
        assert!(!key.contains('/') && key.ends_with(".lock"), "{key}");
        assert_ne!(key, qmp_key(Path::new("/nonexistent/run/vm 2.qmp")));
    }
}
