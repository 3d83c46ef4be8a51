//! A `qemu-nbd` export of an image file on a private UNIX socket, for as long as the value
//! lives (the replica reader uses it to read any format QEMU opens; tests use it as the oracle
//! server).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a stopped `qemu-nbd` may take to exit.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// A running `qemu-nbd`, stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct QemuNbd {
    pid: libc::pid_t,
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
    /// Starts `qemu-nbd --fork --persistent` (it returns once its socket listens) and reads its
    /// pid from its pid file.
    pub fn start(options: &QemuNbdOptions<'_>) -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferry-qemu-nbd").tempdir()?;
        let socket = dir.path().join("nbd.sock");
        let pid_file = dir.path().join("qemu-nbd.pid");
        let mut command = Command::new("qemu-nbd");
        command
            .arg("--fork")
            .arg("--persistent")
            .arg("--shared=8")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", pid_file.display()))
            .arg(format!("--export-name={}", options.export_name))
            .arg("-f")
            .arg(options.format);
        if options.read_only {
            command.arg("--read-only");
        }
        command.arg(options.image);
        let output = command.output()?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(io::Error::other(format!("qemu-nbd on {} failed: {}", options.image.display(), stderr.trim())));
        }
        let pid_text = std::fs::read_to_string(&pid_file)?;
        let pid = pid_text.trim().parse().map_err(|_| io::Error::other(format!("qemu-nbd wrote pid file {pid_text:?}")))?;
        Ok(Self { pid, socket, _dir: dir })
    }

    /// The UNIX socket to connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether `qemu` tools are installed (tests skip without them).
    pub fn available() -> bool {
        ["qemu-nbd", "qemu-img"].iter().all(|tool| Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()))
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let pid = self.pid;
        // SAFETY: kill(2) takes plain integers and touches no memory of ours; the pid is the
        // daemon this value started (read from its pid file).
        let signal = |sig| unsafe { libc::kill(pid, sig) } == 0;
        // Exited means gone or a zombie (whose reaping is init's job, not ours: it is not our
        // child after --fork).
        let running = || signal(0) && !is_zombie(pid);
        if !running() || !signal(libc::SIGTERM) {
            return;
        }
        let deadline = Instant::now() + EXIT_WAIT;
        while running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if running() {
            tracing::warn!(pid, "qemu-nbd ignored SIGTERM; killing it");
            signal(libc::SIGKILL);
        }
    }
}

/// Whether `pid` is a zombie (state `Z` in `/proc/PID/stat`).
fn is_zombie(pid: libc::pid_t) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may contain spaces.
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}
