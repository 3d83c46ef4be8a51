//! Named Linux network namespaces (`ip netns`): creating, deleting, listing,
//! and running commands or Rust threads inside them (`setns(CLONE_NEWNET)`).

use std::ffi::OsStr;
use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::command::run_args;
use crate::error::{Error, Result};

/// Where `ip netns` keeps its bind-mounted namespace files.
const NETNS_DIR: &str = ferry_testkit::sys::NETNS_DIR;

/// Path of the file that pins namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// True when a namespace called `name` exists.
pub fn exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Names of all named network namespaces.
pub fn list() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("reading {NETNS_DIR}"), e)),
    };
    let mut names: Vec<String> = dir
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// Creates namespace `name` and brings its loopback up.
pub fn create(name: &str) -> Result<()> {
    validate_name(name)?;
    run_args("ip", &["netns", "add", name])?;
    run_args("ip", &["-n", name, "link", "set", "lo", "up"])?;
    tracing::debug!(netns = name, "created network namespace");
    Ok(())
}

/// Deletes namespace `name`; a missing namespace is not an error.
pub fn delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    match run_args("ip", &["netns", "del", name]) {
        Ok(_) => {
            tracing::debug!(netns = name, "deleted network namespace");
            Ok(())
        }
        Err(_) if !exists(name) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Rejects names `ip netns` would choke on or that could escape `/run/netns`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig(format!(
            "namespace name {name:?}: use 1-64 characters from [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

/// A `Command` that runs `program` inside namespace `name` (`ip netns exec NAME program`).
pub fn command(name: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.arg("netns").arg("exec").arg(name).arg(program);
    cmd
}

/// Opens the namespace file pinning `name` (a handle for `setns`).
pub fn open(name: &str) -> Result<File> {
    let path = netns_path(name);
    File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// Moves the calling thread into the network namespace referred to by `ns`
/// (a file from [`open`]).
pub fn enter_fd(ns: &File, name: &str) -> Result<()> {
    ferry_testkit::sys::setns_net(ns).map_err(|e| Error::io(format!("setns into {name}"), e))
}

/// Moves the calling thread into namespace `name` for good.
pub fn enter_current_thread(name: &str) -> Result<()> {
    enter_fd(&open(name)?, name)
}

/// Spawns an OS thread that enters namespace `name` and then runs `f`.
///
/// Returns once the thread is inside the namespace, or the error if it could
/// not get there (then `f` is never run).  Sockets, TUN devices and tokio
/// runtimes created on that thread live in the namespace.
pub fn spawn_in<F, T>(name: &str, thread_name: String, f: F) -> Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let ns_file = open(name)?;
    let (tx, rx) = mpsc::channel::<Result<()>>();
    let ns = name.to_string();
    let handle = std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let entered = enter_fd(&ns_file, &ns);
            drop(ns_file);
            let failed = entered.is_err();
            // The receiver only goes away if the spawner is gone; nobody to tell then.
            let _ = tx.send(entered);
            if failed {
                // The spawner has returned the error and dropped this handle;
                // unwinding here just ends the thread without running `f`.
                panic!("not entering {ns}: setns failed (reported to the caller)");
            }
            f()
        })
        .map_err(|e| Error::io("spawning thread", e))?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::io(
            "namespace thread",
            std::io::Error::other("thread died before entering the namespace"),
        )),
    }
}
