//! A `qemu-nbd` export of an image file on a private UNIX socket, for as long as the value
//! lives (the replica reader uses it to read any format QEMU opens; tests use it as the oracle
//! server).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long `qemu-nbd` may take to listen, and to exit once told to.
const WAIT: Duration = Duration::from_secs(10);

/// A running `qemu-nbd`, our child (not `--fork`ed, so we reap it), stopped with SIGTERM on
/// drop (it then closes the image cleanly: a qcow2's metadata is written).
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// What to export and how.
#[derive(Clone, Debug)]
pub struct QemuNbdOptions<'a> {
    /// Image file.
    pub image: &'a Path,
    /// Image format (`raw`, `qcow2`, ...), passed as `-f`.
    pub format: &'a str,
    /// Export read-only (`--read-only`).
    pub read_only: bool,
    /// Export name (`--export-name`).
    pub export_name: &'a str,
}

impl QemuNbd {
    /// Starts `qemu-nbd --persistent` and returns once its socket accepts connections.
    pub fn start(options: &QemuNbdOptions<'_>) -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferry-qemu-nbd").tempdir()?;
        let socket = dir.path().join("nbd.sock");
        let log_path = dir.path().join("qemu-nbd.log");
        let mut command = Command::new("qemu-nbd");
        command
            .arg("--persistent")
            .arg("--shared=8")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--export-name={}", options.export_name))
            .arg("-f")
            .arg(options.format);
        if options.read_only {
            command.arg("--read-only");
        }
        command.arg(options.image).stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log_path)?);
        let child = command.spawn()?;
        let mut export = Self { child, socket, _dir: dir };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = export.child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(io::Error::other(format!("qemu-nbd on {} exited ({status}): {}", options.image.display(), log.trim())));
            }
            // A probe connection: qemu-nbd (persistent) serves the next one regardless.
            if UnixStream::connect(&export.socket).is_ok() {
                return Ok(export);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("qemu-nbd on {} did not listen within {WAIT:?}", options.image.display())));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The UNIX socket to connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the QEMU tools are installed (tests skip without them).
    pub fn available() -> bool {
        ["qemu-nbd", "qemu-img"].iter().all(|tool| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()))
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours; the pid is our
            // own child, not yet reaped (so not reused).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                _ => return,
            }
        }
        tracing::warn!(pid = self.child.id(), "qemu-nbd ignored SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
