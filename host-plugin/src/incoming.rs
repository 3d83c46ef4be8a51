//! What the destination does to an incoming QEMU besides migrating into it: find out whether it
//! runs ([`inquire`]) and make sure it never will ([`discard`]).
//!
//! A discard is a promise to the source (`Failed { vm_discarded: true }` lets it resume its own
//! VM), so it is only reported done when the QEMU process is gone: first `quit` over QMP, then,
//! if QEMU does not answer or does not exit, SIGKILL to the pid its QMP socket reports
//! (SO_PEERCRED). A stopped (SIGSTOP) or hung QEMU is killed just the same.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_api::control::IncomingState;
use ferry_qmp::{Qmp, QmpConfig};

/// How long a QEMU that was asked to quit (or killed) may take to disappear.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// How long `quit` may take to be answered.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to try a QMP socket that is not there (absent QEMU) before concluding so.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects to an incoming VM's QMP socket; `None` when no QEMU answers there.
pub async fn connect(path: &Path) -> Option<Qmp> {
    let config = QmpConfig { connect_timeout: CONNECT_TIMEOUT, command_timeout: QUIT_TIMEOUT, ..QmpConfig::default() };
    match Qmp::connect(path, config).await {
        Ok(qmp) => Some(qmp),
        Err(e) => {
            tracing::debug!(socket = %path.display(), error = %e, "no incoming QEMU");
            None
        }
    }
}

/// What the incoming VM at `path` is.
pub async fn inquire(path: &Path) -> IncomingState {
    let Some(qmp) = connect(path).await else { return IncomingState::Absent };
    match qmp.query_status().await {
        Ok(s) if s.running => IncomingState::Running,
        Ok(_) => IncomingState::Paused,
        // It answered the greeting: there is a QEMU, and it is not known to run. Reporting
        // `Running` would be as wrong as `Paused`; `Busy` makes resolve ask again.
        Err(_) => IncomingState::Busy,
    }
}

/// Makes sure the QEMU behind `qmp` (or, without a session, behind the socket at `path`) is
/// gone. `Ok(what was done)` when it certainly is (or there was none); `Err(why not)` otherwise.
pub async fn discard(qmp: Option<&Qmp>, path: &Path) -> Result<String, String> {
    let connected;
    let qmp = match qmp {
        Some(q) if !q.is_closed() => q,
        _ => match connect(path).await {
            Some(q) => {
                connected = q;
                &connected
            }
            None => return Ok(format!("no QEMU answers at {}", path.display())),
        },
    };
    let Some(pid) = qmp.peer_pid() else {
        // Without a pid, only QEMU's own word is left.
        return match qmp.quit().await {
            Ok(()) => Ok("quit (pid unknown)".into()),
            Err(e) => Err(format!("quit failed ({e}) and QEMU's pid is unknown")),
        };
    };
    let quit = tokio::time::timeout(QUIT_TIMEOUT, qmp.quit()).await;
    if wait_gone(pid, EXIT_WAIT).await {
        return Ok(format!("QEMU (pid {pid}) quit"));
    }
    tracing::warn!(pid, ?quit, "the incoming QEMU did not quit: killing it");
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(format!("cannot kill QEMU (pid {pid}): {e}"));
        }
    }
    if wait_gone(pid, EXIT_WAIT).await {
        Ok(format!("QEMU (pid {pid}) killed"))
    } else {
        Err(format!("QEMU (pid {pid}) still exists {EXIT_WAIT:?} after SIGKILL"))
    }
}

/// Waits until `pid` no longer runs (gone, or a zombie waiting for its parent).
async fn wait_gone(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !runs(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether process `pid` exists and is not a zombie (from `/proc/PID/stat`).
fn runs(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain any
        // character: read it after the last ')'.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()).is_some_and(|state| !matches!(state, 'Z' | 'X')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_does_not_run_and_a_live_process_does() {
        assert!(runs(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not yet reaped: a zombie once it exited.
        let deadline = Instant::now() + Duration::from_secs(5);
        while runs(pid) {
            assert!(Instant::now() < deadline, "`true` did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "reaped too early");
        child.wait().unwrap();
        assert!(!runs(pid));
    }
}
