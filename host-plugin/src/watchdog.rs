//! The orphan watchdog of `ferry-host migrate`: a child process that outlives a `migrate` killed
//! by SIGKILL, the OOM killer or a panic, and undoes what it left behind on the source QEMU.
//!
//! Without it, a dead `migrate` leaves QEMU migrating with a 1 ms downtime limit (the
//! controller's switchover hold) while auto-converge raises the vCPU throttle toward 99 %: the
//! guest crawls until someone notices. The watchdog is `ferry-host watchdog`, spawned before
//! the first parameter changes, in its own process group (a Ctrl-C at the terminal is for
//! `migrate`, which handles it). It waits on a pipe from its parent: `disarm` on it means the
//! parent finished (and cleaned up) itself; end-of-file without it means the parent died. Then
//! it connects to the VM's QMP socket (free once the parent's connection closed with it),
//! cancels a migration still under way and sets back the parameters it was given. It never
//! resumes the VM: before the commit QEMU does that itself when a migration is cancelled, and
//! after it the VM may run at the destination.

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_qmp::{MigrationParameters, MigrationStatus, Qmp, QmpConfig};

/// The word on the pipe that tells the watchdog its parent is done.
const DISARM: &str = "disarm";
/// How long the watchdog waits for the QMP socket to accept it, and a cancel to settle.
const QMP_WAIT: Duration = Duration::from_secs(10);

/// The parent's handle on its watchdog.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts `ferry-host watchdog` for the VM at `qmp`, to set back `restore` if this process dies.
    pub fn spawn(qmp: &Path, restore: &MigrationParameters) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the ferry-host binary for the watchdog")?;
        let restore = serde_json::to_string(restore).context("encoding the parameters to restore")?;
        let mut child = Command::new(exe)
            .arg("watchdog")
            .arg("--qmp")
            .arg(qmp)
            .arg("--restore")
            .arg(restore)
            .arg("--parent")
            .arg(std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .context("cannot start the watchdog")?;
        let pipe = child.stdin.take();
        tracing::debug!(pid = child.id(), "watchdog started");
        Ok(Self { child, pipe })
    }

    /// This process is done with the VM: the watchdog exits without touching it.
    pub fn disarm(mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = writeln!(pipe, "{DISARM}");
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `ferry-host watchdog` was started with.
#[derive(Clone, Debug)]
pub struct WatchdogOptions {
    /// The source VM's QMP socket.
    pub qmp: PathBuf,
    /// The parameters to set back.
    pub restore: MigrationParameters,
    /// The parent's pid (for the log).
    pub parent: u32,
}

/// `ferry-host watchdog`: waits for the parent on stdin; if it died, cleans up. Blocking until
/// the parent ends, then async for QMP.
pub fn run(options: WatchdogOptions, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.trim() == DISARM => return Ok(()),
            Ok(_) => {}
        }
    }
    tracing::warn!(parent = options.parent, qmp = %options.qmp.display(), "ferry-host migrate died: cancelling its migration and restoring QEMU's parameters");
    runtime.block_on(clean_up(&options))
}

async fn clean_up(options: &WatchdogOptions) -> anyhow::Result<()> {
    let qmp = Qmp::connect(&options.qmp, QmpConfig { connect_timeout: QMP_WAIT, ..QmpConfig::default() })
        .await
        .with_context(|| format!("cannot open the VM's QMP socket {}", options.qmp.display()))?;
    let status = qmp.query_migrate().await.context("query-migrate")?.status();
    if !status.is_terminal() && status != MigrationStatus::None {
        qmp.migrate_cancel().await.context("migrate_cancel")?;
        let deadline = Instant::now() + QMP_WAIT;
        loop {
            let now = qmp.query_migrate().await.context("query-migrate")?.status();
            if now.is_terminal() || Instant::now() >= deadline {
                tracing::warn!(was = status.as_str(), now = now.as_str(), "migration cancelled");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    qmp.migrate_set_parameters(&options.restore).await.context("restoring the migration parameters")?;
    tracing::warn!(restored = ?options.restore, "migration parameters restored");
    Ok(())
}
